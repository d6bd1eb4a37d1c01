"""A Firehose-style buffer of one shard's records, flushed by size, count or age.

Rows are grouped by server receive hour (the raw lake's partition), so one flush writes one file per
hour touched. The buffer remembers the sequence range it covers: the files it produces are named
after that range, which is what makes a replay overwrite instead of duplicate.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from ingest.columns import events_table
from ingest.transform import MS_PER_HOUR, DeadColumns, Outcomes, Record, RowColumns, Transformer, hash_pii


RAW_SCHEMA = pa.schema([
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("session_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("event_type", pa.string(), nullable=False),
    pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("client_region", pa.string(), nullable=False),
    pa.field("device", pa.string()),
    pa.field("page", pa.string()),
    pa.field("referrer", pa.string()),
    pa.field("price", pa.float64()),
    pa.field("category", pa.string()),
    pa.field("ip_hash", pa.string()),
    pa.field("ua_hash", pa.string()),
    pa.field("received_at", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("sequence_number", pa.string(), nullable=False),
])

DEAD_LETTER_SCHEMA = pa.schema([
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string(), nullable=False),
    pa.field("data", pa.binary(), nullable=False),
    pa.field("partition_key", pa.string(), nullable=False),
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("sequence_number", pa.string(), nullable=False),
    pa.field("received_at", pa.timestamp("ms", tz="UTC"), nullable=False),
])


def hour_partition(hour_bucket: int) -> tuple[str, int]:
    """(dt, hour) of an hour bucket (ms since epoch // 3,600,000)."""
    start = datetime.fromtimestamp(hour_bucket * 3600, UTC)
    return start.date().isoformat(), start.hour


def _ts(values: list[int]) -> pa.Array:
    return pa.array(values, pa.int64()).cast(pa.timestamp("ms", tz="UTC"))


def rows_table(rows: RowColumns, shard_id: str, pii_salt: bytes) -> pa.Table:
    """The raw lake table of one partition's accepted records (IP and user agent only as keyed hashes)."""
    events = events_table(rows.data)
    context = events.column("context")

    def ctx(name: str) -> pa.ChunkedArray:
        return pc.struct_field(context, name)

    def hashed(name: str) -> pa.Array:
        # The same IP or user agent recurs across a user's events: hash each distinct value once.
        values = ctx(name)
        distinct = [v for v in pc.unique(values).to_pylist() if v is not None]
        if not distinct:
            return pa.nulls(len(events), pa.string())
        digests = pa.array([hash_pii(v, pii_salt) for v in distinct], pa.string())
        return pc.take(digests, pc.index_in(values, pa.array(distinct, pa.string())))

    return pa.Table.from_arrays([
        events.column("event_id"),
        events.column("user_id"),
        events.column("session_id"),
        events.column("item_id"),
        events.column("event_type"),
        _ts(rows.ts_ms),
        events.column("region"),
        ctx("device"),
        ctx("page"),
        ctx("referrer"),
        ctx("price"),
        ctx("category"),
        hashed("ip"),
        hashed("user_agent"),
        _ts(rows.received_ms),
        pa.repeat(pa.scalar(shard_id, pa.string()), len(events)),
        pa.array(rows.sequence_number, pa.string()),
    ], schema=RAW_SCHEMA)


def dead_table(dead: DeadColumns, shard_id: str) -> pa.Table:
    return pa.Table.from_arrays([
        pa.array(dead.reason, pa.string()),
        pa.array(dead.detail, pa.string()),
        pa.array(dead.data, pa.binary()),
        pa.array(dead.partition_key, pa.string()),
        pa.repeat(pa.scalar(shard_id, pa.string()), len(dead)),
        pa.array(dead.sequence_number, pa.string()),
        _ts(dead.received_ms),
    ], schema=DEAD_LETTER_SCHEMA)


@dataclass
class FlushBatch:
    """What one flush writes: tables per receive hour, plus the counts for metrics and the demo."""

    shard_id: str
    first_seq: str
    last_seq: str
    raw: dict[int, pa.Table]
    dead: dict[int, pa.Table]
    records: int
    duplicates: int
    dead_reasons: Counter[str]


@dataclass
class ShardBuffer:
    shard_id: str
    transformer: Transformer
    max_records: int
    max_bytes: int
    max_age_ms: float
    rows: dict[int, RowColumns] = field(default_factory=dict)
    dead: dict[int, DeadColumns] = field(default_factory=dict)
    first_seq: str | None = None
    last_seq: str | None = None
    records: int = 0
    bytes: int = 0
    duplicates: int = 0
    dead_reasons: Counter[str] = field(default_factory=Counter)
    opened_ms: float | None = None

    def partition(self, hour_bucket: int) -> tuple[RowColumns, DeadColumns]:
        rows = self.rows.get(hour_bucket)
        if rows is None:
            rows = self.rows[hour_bucket] = RowColumns()
            self.dead[hour_bucket] = DeadColumns()
        return rows, self.dead[hour_bucket]

    def extend(self, records: list[Record], now_ms: float) -> Outcomes:
        """Transform one GetRecords response (in sequence order) into the buffer."""
        if not records:
            return Outcomes()
        outcomes = self.transformer.apply(records, self)
        if self.first_seq is None:
            self.first_seq = records[0][1]
            self.opened_ms = now_ms
        self.last_seq = records[-1][1]
        self.records += len(records)
        self.bytes += sum(len(r[0]) for r in records)
        self.duplicates += outcomes.duplicate
        self.dead_reasons.update(outcomes.dead)
        return outcomes

    def __len__(self) -> int:
        return self.records

    def due(self, now_ms: float) -> bool:
        if not self.records:
            return False
        return (self.records >= self.max_records or self.bytes >= self.max_bytes
                or (self.opened_ms is not None and now_ms - self.opened_ms >= self.max_age_ms))

    def drain(self) -> FlushBatch:
        """Hand over the buffered records as Arrow tables and start empty."""
        assert self.first_seq is not None and self.last_seq is not None, "drain() on an empty buffer"
        batch = FlushBatch(
            shard_id=self.shard_id,
            first_seq=self.first_seq,
            last_seq=self.last_seq,
            raw={b: rows_table(r, self.shard_id, self.transformer.config.pii_salt)
                 for b, r in self.rows.items() if len(r)},
            dead={b: dead_table(d, self.shard_id) for b, d in self.dead.items() if len(d)},
            records=self.records,
            duplicates=self.duplicates,
            dead_reasons=self.dead_reasons,
        )
        self.rows, self.dead = {}, {}
        self.first_seq = self.last_seq = None
        self.records = self.bytes = self.duplicates = 0
        self.dead_reasons = Counter()
        self.opened_ms = None
        return batch
