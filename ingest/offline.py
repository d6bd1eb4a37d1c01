"""Land records in the raw lake without Kinesis: the consumer's own transform, buffer and lake sink,
fed from an iterable instead of GetRecords.

For synthetic history (tests, benchmarks, backfills of generated or replayed data), where a live stream
would stamp every record with today's receive time. Here each record is "received" ``delay_ms`` after its
own event time, so the raw lake has the receive-hour partitions a live stream would have produced.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ingest.buffer import ShardBuffer
from ingest.dedup import DedupWindow
from ingest.sinks import LakeSink
from ingest.transform import Record, TransformConfig, Transformer
from streamrec.lake import LakeLayout, filesystem

_TS = re.compile(rb'"ts"\s*:\s*"([^"]{10,40})"')


def _event_ms(data: bytes, fallback: int) -> int:
    """The record's event time in ms, found without decoding it (malformed records keep ``fallback``)."""
    match = _TS.search(data)
    if match is None:
        return fallback
    try:
        return int(datetime.fromisoformat(match.group(1).decode()).timestamp() * 1000)
    except (ValueError, UnicodeDecodeError):
        return fallback


def _receive_ms(event_ms: int, previous: int, delay_ms: int, horizon_ms: int) -> int:
    """When the simulated server receives a record: ``delay_ms`` after its event time, but never after
    the simulated "now" (``horizon_ms``): a client clock running ahead of it is then caught by the
    consumer's future-time check, as live. Undecodable records arrive with their predecessor."""
    if event_ms < 0:
        return previous or horizon_ms
    return min(event_ms + delay_ms, horizon_ms)


@dataclass
class LandingSummary:
    records: int = 0
    rows: int = 0
    duplicates: int = 0
    dead: Counter[str] = field(default_factory=Counter)
    files: int = 0


def land(records: Iterable[tuple[bytes, str]], lake_uri: str, region: str, *, shards: int = 2,
         batch_records: int = 50_000, delay_ms: int = 2_000, dedup_window: int = 100_000,
         pii_salt: bytes = TransformConfig.pii_salt, now: datetime | None = None) -> LandingSummary:
    """Write ``(data, partition_key)`` records, in event-time order, to ``lake_uri``'s raw and dead-letter
    datasets of ``region``, spread over ``shards`` pseudo-shards by partition key as Kinesis would.

    ``dedup_window=0`` lets every duplicate through, leaving the exact dedup to the Spark ETL. ``now`` is
    the simulated present (default: the wall clock): nothing is received after it, so events stamped
    later are dead-lettered as ``future_ts`` (pass the generator window's end for its planted ones).
    """
    layout = LakeLayout(lake_uri)
    sink = LakeSink(layout, filesystem(lake_uri), region)
    sink.check()
    config = TransformConfig(region=region, pii_salt=pii_salt)
    buffers = [ShardBuffer(f"shardId-{i:012d}", Transformer(config, DedupWindow(dedup_window)),
                           max_records=batch_records, max_bytes=1 << 40, max_age_ms=float("inf"))
               for i in range(shards)]
    pending: list[list[Record]] = [[] for _ in range(shards)]
    seq = [0] * shards
    summary = LandingSummary()
    received = 0
    horizon_ms = int((now or datetime.now(UTC)).timestamp() * 1000)

    def flush(i: int) -> None:
        if pending[i]:
            buffers[i].extend(pending[i], now_ms=0)
            pending[i] = []
        if len(buffers[i]):
            batch = buffers[i].drain()
            summary.files += len(sink.write(batch))
            summary.duplicates += batch.duplicates
            summary.dead.update(batch.dead_reasons)

    for data, key in records:
        received = _receive_ms(_event_ms(data, -1), received, delay_ms, horizon_ms)
        i = zlib.crc32(key.encode()) % shards
        seq[i] += 1
        pending[i].append((data, f"{seq[i]:021d}", key, received))
        summary.records += 1
        if len(pending[i]) >= batch_records:
            flush(i)
    for i in range(shards):
        flush(i)
    summary.rows = summary.records - summary.duplicates - sum(summary.dead.values())
    return summary
