"""Replay real interaction logs (MovieLens, DIGINETICA) or a JSONL capture as clickstream records.

Mappings (documented here because the evaluation depends on them):

- MovieLens ``u.data`` (``user<TAB>item<TAB>rating<TAB>unix_ts``): one event per rating; the rating
  says how far the user went: 5 → purchase, 4 → add_to_cart, 3 → click, 1-2 → view. Users are
  ``ml-u<id>``, items ``ml-i<id>``; sessions split a user's ratings at gaps over 30 minutes.
- DIGINETICA (``session_id;user_id;item_id;timeframe;eventdate`` with a header): one view per row at
  eventdate midnight UTC + timeframe ms; users are ``dg-u<id>``, or ``dg-s<session>`` where the user is
  ``NA``; items ``dg-i<id>``, sessions ``dg-s<session>``.
- JSONL: each line is one record, passed through byte for byte (even broken ones, so the consumer's
  dead-letter path can be exercised); kind is ``valid`` when it parses, else ``malformed`` with the
  ``parse_event`` reason. Timestamps inside cannot be shifted.

Event ids are uuid5 of the dataset name, line number and line, so replaying a file twice yields the
same ids (and the consumer's dedup can recognise a replay). Records come out in time order.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from streamrec.clickstream.records import GeneratedRecord
from streamrec.events import InvalidEvent, canonical_json, format_ts, parse_event

ReplayFormat = Literal["movielens", "diginetica", "jsonl"]
REPLAY_FORMATS: tuple[str, ...] = ("movielens", "diginetica", "jsonl")
RATING_EVENT = {5: "purchase", 4: "add_to_cart", 3: "click", 2: "view", 1: "view"}
SESSION_GAP_MS = 30 * 60 * 1000
# A fixed namespace for replayed event ids (uuid5 of "streamrec.replay" in the URL namespace).
REPLAY_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "streamrec.replay")


class ReplayError(ValueError):
    """The input file does not match its declared format; the message names the line."""


@dataclass(frozen=True, slots=True)
class Interaction:
    """One row of a dataset, already mapped onto the event vocabulary."""

    ts_ms: int
    user_id: str
    item_id: str
    event_type: str
    session_id: str
    event_id: str


def _event_id(dataset: str, line_no: int, line: str) -> str:
    return str(uuid.uuid5(REPLAY_NAMESPACE, f"{dataset}:{line_no}:{line}"))


def _fail(path: Path, line_no: int, why: str) -> ReplayError:
    return ReplayError(f"{path}:{line_no}: {why}")


def read_movielens(path: Path) -> list[Interaction]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            try:
                user, item, rating, ts = (int(p) for p in parts)
            except ValueError:
                raise _fail(
                    path, line_no, "expected user<TAB>item<TAB>rating<TAB>unix_ts (integers)"
                ) from None
            if rating not in RATING_EVENT:
                raise _fail(path, line_no, f"rating {rating} is not 1-5")
            rows.append(
                (
                    ts * 1000,
                    f"ml-u{user}",
                    f"ml-i{item}",
                    RATING_EVENT[rating],
                    _event_id("movielens", line_no, line),
                )
            )
    # MovieLens has no sessions: a user's session ends at a gap of more than 30 minutes.
    rows.sort(key=lambda r: (r[1], r[0]))
    out, session, prev = [], "", None
    for ts, user, item, etype, eid in rows:
        if prev is None or prev[0] != user or ts - prev[1] > SESSION_GAP_MS:
            session = f"{user}-{ts // 1000}"
        prev = (user, ts)
        out.append(Interaction(ts, user, item, etype, session, eid))
    return out


def read_diginetica(path: Path) -> list[Interaction]:
    out = []
    with path.open(encoding="utf-8") as f:
        header = f.readline().strip().split(";")
        if header != ["session_id", "user_id", "item_id", "timeframe", "eventdate"]:
            raise _fail(path, 1, "expected the header session_id;user_id;item_id;timeframe;eventdate")
        for line_no, raw in enumerate(f, 2):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                session, user, item, timeframe, date = line.split(";")
                day = datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=UTC)
                ts = int(day.timestamp() * 1000) + int(timeframe)
                int(session), int(item)
            except ValueError:
                raise _fail(
                    path, line_no, "expected session_id;user_id;item_id;timeframe;YYYY-MM-DD"
                ) from None
            user_id = f"dg-s{session}" if user in ("NA", "") else f"dg-u{user}"
            out.append(
                Interaction(
                    ts,
                    user_id,
                    f"dg-i{item}",
                    "view",
                    f"dg-s{session}",
                    _event_id("diginetica", line_no, line),
                )
            )
    return out


READERS = {"movielens": read_movielens, "diginetica": read_diginetica}


def shift_offset_ms(latest_ms: int, now: datetime) -> int:
    """How far to move every timestamp so the latest lands at ``now`` (gaps are kept)."""
    return int(now.timestamp() * 1000) - latest_ms


def _to_record(row: Interaction, region: str, shift_ms: int) -> GeneratedRecord:
    event = {
        "event_id": row.event_id,
        "user_id": row.user_id,
        "session_id": row.session_id,
        "item_id": row.item_id,
        "event_type": row.event_type,
        "ts": format_ts(row.ts_ms + shift_ms),
        "region": region,
    }
    return GeneratedRecord(region, row.user_id, canonical_json(event), "valid", None)


def _jsonl_records(path: Path, region: str, limit: int | None) -> Iterator[GeneratedRecord]:
    with path.open("rb") as f:
        n = 0
        for raw in f:
            data = raw[:-1] if raw.endswith(b"\n") else raw
            if not data.strip():
                continue
            if limit is not None and n >= limit:
                return
            n += 1
            try:
                key = parse_event(data).user_id
                yield GeneratedRecord(region, key, data, "valid", None)
            except InvalidEvent as exc:
                # No trustworthy user id: a stable key from the bytes keeps a record on one shard.
                key = hashlib.sha1(data).hexdigest()[:16]
                yield GeneratedRecord(region, key, data, "malformed", exc.reason)


def replay(
    path: str | Path,
    fmt: ReplayFormat,
    region: str,
    *,
    shift_to_now: bool = False,
    now: datetime | None = None,
    limit: int | None = None,
) -> Iterator[GeneratedRecord]:
    """Records of a dataset file for ``region``, in time order (jsonl: file order).

    ``limit`` keeps the first N records (in time order); ``shift_to_now`` moves the kept records so the
    latest is at ``now`` (default: the current time).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if fmt == "jsonl":
        if shift_to_now:
            raise ValueError("--shift-to-now does not apply to jsonl: its records are replayed byte for byte")
        return _jsonl_records(path, region, limit)
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(REPLAY_FORMATS)}")
    rows = sorted(READERS[fmt](path), key=lambda r: r.ts_ms)[:limit]
    shift = shift_offset_ms(rows[-1].ts_ms, now or datetime.now(UTC)) if shift_to_now and rows else 0
    return (_to_record(row, region, shift) for row in rows)
