"""Record bytes → a lake row or a dead letter. Pure: no I/O, no clock (times are passed in).

Per record: validate against the event contract, reject client timestamps too far in the future of the
server receive time, drop duplicates by event_id within the window, and stamp the server receive time.
Personal fields are hashed when the rows become columns (``ingest.buffer.rows_table``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import ValidationError

from ingest.dedup import DedupWindow
from streamrec.events import InvalidEvent, classify_error, oversize, validate_json

MS_PER_HOUR = 3_600_000


@dataclass(frozen=True)
class TransformConfig:
    region: str
    max_record_bytes: int = 8 * 1024
    max_future_skew_ms: int = 300_000
    pii_salt: bytes = b"streamrec-local-salt"


def hash_pii(value: str, salt: bytes) -> str:
    """Keyed hash of a personal field: stable for joins, not reversible without the salt.

    Keyed BLAKE2b is a MAC in one C call; the ``hmac`` module's Python wrapper costs ten times more, and
    this runs for every event that carries an IP or user agent.
    """
    return hashlib.blake2b(value.encode("utf-8"), key=salt[:64], digest_size=16).hexdigest()


class RowColumns:
    """Accepted records of one partition (one receive hour), with their server-side fields.

    The record bytes are kept, not the validated objects: they become columns in one bulk call at
    flush time (``ingest.columns``), which is far cheaper than holding and splitting objects.
    """

    __slots__ = ("data", "ts_ms", "received_ms", "sequence_number")

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ts_ms: list[int] = []
        self.received_ms: list[int] = []
        self.sequence_number: list[str] = []

    def __len__(self) -> int:
        return len(self.data)


class DeadColumns:
    """Column lists of dead letters for one partition: the reason and the original bytes."""

    __slots__ = ("reason", "detail", "data", "partition_key", "sequence_number", "received_ms")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, [])

    def __len__(self) -> int:
        return len(self.reason)


Record = tuple[bytes, str, str, int]  # data, sequence number, partition key, server receive time (ms)


class Partitions(Protocol):
    def partition(self, hour_bucket: int) -> tuple[RowColumns, DeadColumns]: ...


@dataclass
class Outcomes:
    ok: int = 0
    duplicate: int = 0
    dead: Counter[str] = field(default_factory=Counter)


class Transformer:
    def __init__(self, config: TransformConfig, dedup: DedupWindow) -> None:
        self.config = config
        self.dedup = dedup

    def apply(self, records: Iterable[Record], into: Partitions) -> Outcomes:
        """Validate, future-check and dedup ``records``, appending each to its receive hour's partition.

        One tight loop per GetRecords response: this is the consumer's hot path, so lookups are hoisted
        and a record costs little beyond its validation.
        """
        max_bytes = self.config.max_record_bytes
        skew = self.config.max_future_skew_ms
        validate = validate_json
        dedup_add = self.dedup.add
        out = Outcomes()
        current = None
        count = 0
        for data, seq, pkey, received_ms in records:
            count += 1
            bucket = received_ms // MS_PER_HOUR
            if bucket != current:
                current = bucket
                rows, dead = into.partition(bucket)
                add_data, add_ts = rows.data.append, rows.ts_ms.append
                add_received, add_seq = rows.received_ms.append, rows.sequence_number.append
            if len(data) > max_bytes:
                problem = oversize(data, max_bytes)
            else:
                try:
                    event = validate(data)
                except ValidationError as exc:
                    problem = classify_error(exc, data)
                else:
                    if event.ts > received_ms + skew:
                        problem = InvalidEvent(
                            "future_ts", f"ts is {(event.ts - received_ms) // 1000} s after the server receive time")
                    elif dedup_add(event.event_id.lower()):
                        add_data(data)
                        add_ts(event.ts)
                        add_received(received_ms)
                        add_seq(seq)
                        continue
                    else:
                        out.duplicate += 1
                        continue
            _dead_letter(dead, problem.reason, problem.detail, data, pkey, seq, received_ms)
            out.dead[problem.reason] += 1
        out.ok = count - out.duplicate - out.dead.total()
        return out


def _dead_letter(dead: DeadColumns, reason: str, detail: str, data: bytes, partition_key: str,
                 sequence_number: str, received_ms: int) -> None:
    dead.reason.append(reason)
    dead.detail.append(detail[:2000])
    dead.data.append(data)
    dead.partition_key.append(partition_key)
    dead.sequence_number.append(sequence_number)
    dead.received_ms.append(received_ms)
