"""Sinks for record streams: a Kinesis PutRecords publisher and a JSONL file writer.

Both consume ``Iterable[GeneratedRecord]`` and return :class:`PublishStats`, so the generator, the
replayer and the CLI treat them alike. :func:`publish_generated` is the one call the demo makes: it
generates every configured region and publishes each to its own stream, accounting for every record.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamrec.clickstream.config import GeneratorConfig
from streamrec.clickstream.generate import generate_region
from streamrec.clickstream.putrecords import (
    MAX_RECORDS_PER_CALL,
    batches,
    read_response,
)
from streamrec.clickstream.records import GeneratedRecord, RecordTally, report_progress
from streamrec.clickstream.truth import build_truth
from streamrec.pacing import TokenBucket, backoff_delay

Progress = Callable[[int], None]


class PublishError(RuntimeError):
    """Records could not be delivered after every retry."""


@dataclass
class PublishStats:
    records_put: int = 0
    put_calls: int = 0
    # Records sent again because a PutRecords response reported them failed (each retry counts).
    retried_records: int = 0
    bytes_put: int = 0
    per_shard: Counter[str] = field(default_factory=Counter)


@dataclass
class PublishSummary:
    """One region's delivery: what was produced (by kind, malformed reasons) and how it was put."""

    region: str
    target: str  # stream name or file path
    tally: RecordTally
    stats: PublishStats

    @property
    def by_kind(self) -> dict[str, int]:
        return dict(self.tally.by_kind)


class KinesisPublisher:
    """Puts records on one stream with PutRecords, retrying partial failures record by record.

    Transport errors and whole-call throttling are retried by botocore (adaptive mode, see
    ``streamrec.aws``); what is left here is the per-record failure that a 200 response can carry.
    """

    def __init__(
        self,
        kinesis_client: Any,
        stream_name: str,
        *,
        rate_per_s: float | None = None,
        max_attempts: int = 8,
        progress: Progress | None = None,
        backoff_base_s: float = 0.1,
        backoff_cap_s: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.client = kinesis_client
        self.stream_name = stream_name
        self.max_attempts = max_attempts
        self.progress = progress
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self.sleep, self.clock = sleep, clock
        self.bucket = TokenBucket(rate_per_s, clock=clock) if rate_per_s else None
        # At a low rate, small calls keep the flow smooth instead of one 500-record call per long pause.
        self.max_batch = (
            MAX_RECORDS_PER_CALL if not rate_per_s else max(1, min(MAX_RECORDS_PER_CALL, int(rate_per_s)))
        )
        self._jitter = random.Random()

    def put(self, records: Iterable[GeneratedRecord]) -> PublishStats:
        stats = PublishStats()
        for batch in batches(records, max_records=self.max_batch):
            if self.bucket is not None:
                self.sleep(self.bucket.reserve(len(batch)))
            self._put_batch(batch, stats)
            if self.progress is not None:
                self.progress(len(batch))
        return stats

    def _put_batch(self, batch: list[GeneratedRecord], stats: PublishStats) -> None:
        pending = batch
        for attempt in range(self.max_attempts):
            if attempt:
                self.sleep(
                    backoff_delay(attempt - 1, self.backoff_base_s, self.backoff_cap_s, self._jitter.random())
                )
                stats.retried_records += len(pending)
            response = self.client.put_records(
                StreamName=self.stream_name,
                Records=[{"Data": r.data, "PartitionKey": r.partition_key} for r in pending],
            )
            stats.put_calls += 1
            outcome = read_response(response)
            stats.per_shard.update(outcome.shard_counts)
            failed = set(outcome.failed)
            for i, record in enumerate(pending):
                if i not in failed:
                    stats.records_put += 1
                    stats.bytes_put += len(record.data)
            if not failed:
                return
            pending = [pending[i] for i in outcome.failed]
        raise PublishError(
            f"{len(pending)} records still failing on stream {self.stream_name} after {self.max_attempts} "
            f"PutRecords attempts (last error: {outcome.last_error})"
        )


def write_jsonl(path: str | Path, records: Iterable[GeneratedRecord]) -> PublishStats:
    """Write each record's data bytes, untouched, as one line; ``replay --format jsonl`` reads it back.

    The bytes are not re-encoded (malformed records stay malformed), so a record may not contain a raw
    newline: canonical JSON never does, and the malformed generator never makes one.
    """
    stats = PublishStats()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for record in records:
            if b"\n" in record.data:
                raise ValueError(
                    f"record for {record.partition_key} contains a raw newline; it cannot be one line"
                )
            out.write(record.data + b"\n")
            stats.records_put += 1
            stats.bytes_put += len(record.data)
    return stats


Sink = Callable[[Iterable[GeneratedRecord]], PublishStats]


def deliver(region: str, target: str, records: Iterable[GeneratedRecord], sink: Sink) -> PublishSummary:
    """Send records through a sink, counting them by kind on the way."""
    tally = RecordTally()
    stats = sink(tally.count(records))
    return PublishSummary(region=region, target=target, tally=tally, stats=stats)


def jsonl_path(template: str | Path, region: str, regions: int) -> Path:
    """Where a region's JSONL goes: ``{region}`` in the template is replaced; it is required for several."""
    text = str(template)
    if "{region}" in text:
        return Path(text.replace("{region}", region))
    if regions > 1:
        raise ValueError(f"--out {text!r} must contain {{region}} when writing several regions")
    return Path(text)


def _per_region(config: GeneratorConfig, job: Callable[[str], PublishSummary]) -> dict[str, PublishSummary]:
    # Regions are independent streams and clients: publish them side by side.
    with ThreadPoolExecutor(max_workers=len(config.regions), thread_name_prefix="publish") as pool:
        futures = {region: pool.submit(job, region) for region in config.regions}
        return {region: f.result() for region, f in futures.items()}


def publish_generated(
    settings: Any,  # streamrec.settings.Settings
    config: GeneratorConfig,
    *,
    rate_per_s: float | None = None,
    progress: Progress | None = None,
) -> dict[str, PublishSummary]:
    """Generate every region of ``config`` and put it on that region's stream (``settings.region(r)``).

    ``rate_per_s`` applies to each region. Returns, per region, the records produced by kind (valid,
    bot, malformed, duplicate) and the delivery stats, so a caller can account for every record.
    """
    from streamrec.aws import client

    config = config.resolved()
    truth = build_truth(config)
    streams = {region: settings.region(region).stream_name for region in config.regions}

    def job(region: str) -> PublishSummary:
        publisher = KinesisPublisher(
            client("kinesis", region, settings.aws), streams[region], rate_per_s=rate_per_s, progress=progress
        )
        return deliver(region, streams[region], generate_region(config, region, truth), publisher.put)

    return _per_region(config, job)


def write_generated_jsonl(
    config: GeneratorConfig, out: str | Path, *, progress: Progress | None = None
) -> dict[str, PublishSummary]:
    """Generate every region of ``config`` into JSONL files (see :func:`jsonl_path` for the names)."""
    config = config.resolved()
    truth = build_truth(config)
    paths = {region: jsonl_path(out, region, len(config.regions)) for region in config.regions}

    def job(region: str) -> PublishSummary:
        records = generate_region(config, region, truth)
        if progress is not None:
            records = report_progress(records, progress)
        return deliver(region, str(paths[region]), records, lambda rs: write_jsonl(paths[region], rs))

    return _per_region(config, job)
