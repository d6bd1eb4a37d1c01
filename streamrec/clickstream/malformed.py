"""Malformed records: the ways real producers break the event contract, one function per defect.

Each defect starts from a valid event dict and breaks exactly one thing, so the consumer's dead-letter
reason can be checked against the defect. No defect produces a raw newline byte: a record must stay
one line in a JSONL file.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from streamrec.events import DEFAULT_MAX_RECORD_BYTES, canonical_json, format_ts

Event = dict[str, Any]
_REQUIRED = ("event_id", "user_id", "session_id", "item_id", "event_type", "ts", "region")
_UTF8_MARK = "\u241fINVALID-UTF8\u241f"


def _invalid_json(e: Event, rnd: random.Random, future_from: datetime) -> bytes:
    data = canonical_json(e)
    # A proper prefix of a JSON object is never valid JSON (the closing brace is missing).
    return data[: rnd.randint(1, len(data) - 1)]


def _wrong_type(e: Event, rnd: random.Random, future_from: datetime) -> bytes:
    field = rnd.choice(("ts", "user_id", "price", "event_type"))
    if field == "ts":  # epoch milliseconds instead of an RFC 3339 string
        e["ts"] = int(datetime.fromisoformat(e["ts"]).timestamp() * 1000)
    elif field == "user_id":  # a numeric id, as a careless producer sends it
        e["user_id"] = int(e["user_id"].lstrip("u") or 0)
    elif field == "price":  # a price as text
        e["context"] = {**e.get("context", {}), "price": f"{rnd.uniform(1, 99):.2f}"}
    else:
        e["event_type"] = [e["event_type"]]
    return canonical_json(e)


def _missing_field(e: Event, rnd: random.Random, future_from: datetime) -> bytes:
    del e[rnd.choice(_REQUIRED)]
    return canonical_json(e)


def _unknown_event_type(e: Event, rnd: random.Random, future_from: datetime) -> bytes:
    e["event_type"] = rnd.choice(("hover", "wishlist", "share", "Purchase", "page_view"))
    return canonical_json(e)


def _bad_uuid(e: Event, rnd: random.Random, future_from: datetime) -> bytes:
    good = e["event_id"]
    e["event_id"] = rnd.choice((good[:-4], good.replace("-", "")[:20], "not-a-uuid", "g" + good[1:]))
    return canonical_json(e)


def _oversize(e: Event, rnd: random.Random, future_from: datetime) -> bytes:
    # A runaway search string, as when a client sends its whole page state.
    query = rnd.randbytes(DEFAULT_MAX_RECORD_BYTES // 2 + rnd.randint(1, 2048)).hex()
    e["context"] = {**e.get("context", {}), "page": "/search?q=" + query}
    return canonical_json(e)


def _invalid_utf8(e: Event, rnd: random.Random, future_from: datetime) -> bytes:
    # A client that encodes text as Latin-1: "café" becomes b"caf\xe9", which is not UTF-8.
    e["context"] = {**e.get("context", {}), "page": _UTF8_MARK}
    return canonical_json(e).replace(_UTF8_MARK.encode(), b"/search?q=caf\xe9+cr\xe8me")


def _future_ts(e: Event, rnd: random.Random, future_from: datetime) -> bytes:
    # Valid per schema: only the consumer, comparing against its own clock, can reject it.
    e["ts"] = format_ts(future_from + timedelta(days=rnd.uniform(1, 10)))
    return canonical_json(e)


def _unknown_field(e: Event, rnd: random.Random, future_from: datetime) -> bytes:
    key, value = rnd.choice((("coupon", "SPRING24"), ("experiment", "b"), ("userId", e["user_id"])))
    e[key] = value
    return canonical_json(e)


DEFECTS: dict[str, Callable[[Event, random.Random, datetime], bytes]] = {
    "invalid_json": _invalid_json,
    "wrong_type": _wrong_type,
    "missing_field": _missing_field,
    "unknown_event_type": _unknown_event_type,
    "bad_uuid": _bad_uuid,
    "oversize": _oversize,
    "invalid_utf8": _invalid_utf8,
    "future_ts": _future_ts,
    "unknown_field": _unknown_field,
}
MALFORMED_REASONS: tuple[str, ...] = tuple(DEFECTS)
# The InvalidEvent.reason that streamrec.events.parse_event gives each defect; None: it parses, and
# only the consumer's clock-skew check rejects it.
PARSE_REASON: dict[str, str | None] = {
    "invalid_json": "malformed_json",
    "wrong_type": "schema",
    "missing_field": "schema",
    "unknown_event_type": "schema",
    "bad_uuid": "schema",
    "oversize": "oversize",
    "invalid_utf8": "invalid_utf8",
    "future_ts": None,
    "unknown_field": "schema",
}


def corrupt(event: Event, reason: str, rnd: random.Random, *, future_from: datetime) -> tuple[bytes, str]:
    """Break ``event`` (left untouched) in the way named by ``reason``; return the bytes and a partition key.

    The partition key is the user id where the record still carries one, as the producer knew it, and a
    random token for records whose bytes are garbage to any reader.
    """
    e = {**event, "context": dict(event.get("context", {}))}
    data = DEFECTS[reason](e, rnd, future_from.astimezone(UTC))
    if b"\n" in data:  # pragma: no cover - a defect that breaks the one-record-per-line guarantee
        raise AssertionError(f"defect {reason} produced a raw newline")
    keeps_user = reason not in ("invalid_json", "invalid_utf8") and isinstance(e.get("user_id"), str)
    key = e["user_id"] if keeps_user else f"{rnd.getrandbits(64):016x}"
    return data, key
