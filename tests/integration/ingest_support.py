"""Helpers shared by the ingest integration tests (``test_ingest.py``, ``test_ingest_edge_cases.py``).

A provisioned environment (:class:`Env`), events and PutRecords, reading the Parquet lake back, the
exactly-once and batch-file assertions, the lease table, a fake monotonic clock and ``streamrec ingest
run`` worker processes. The fixtures built on these (``make_env``, ``workers``) are in this folder's
``conftest.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import redis

from ingest.lease_table import LeaseTable
from ingest.leases import Lease
from streamrec.aws import client
from streamrec.events import EVENT_TYPES, canonical_json
from streamrec.lake import LakeLayout
from streamrec.settings import Settings

REGION = "us-east-1"
# Small timings so a test file runs in well under a minute. make_env (conftest.py) starts from these,
# or from the test module's own FAST_INGEST.
FAST_INGEST: dict[str, Any] = {
    "batch_max_seconds": 1,
    "idle_poll_seconds": 0.1,
    "lease_duration_seconds": 2,
    "lease_renew_seconds": 0.5,
}
# How long WorkerProcess.wait waits by default (the workers fixture takes a test module's own, if any).
WORKER_TIMEOUT_S = 45.0


# ---------------------------------------------------------------------------------------------------
# polling


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something truthy (returned); fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class FakeClock:
    """A monotonic clock that moves only when told to (``advance``), or by ``tick`` on every reading
    while ``run`` drives ``Worker.run``; it stops that worker (gracefully) past ``deadline``."""

    now: float = 1000.0
    tick: float = 0.0
    deadline: float = float("inf")
    overran: bool = False
    on_deadline: Callable[[], None] = lambda: None

    def __call__(self) -> float:
        self.now += self.tick
        if self.now > self.deadline and not self.overran:
            self.overran = True
            self.on_deadline()
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------------------------------------------
# environment


@dataclass
class Env:
    settings: Settings
    config: Path
    tmp: Path

    @property
    def region(self) -> Any:
        return self.settings.region(REGION)

    @property
    def stream(self) -> str:
        return self.region.stream_name

    # One client each per test: creating a boto3 client costs about 0.2 s.
    @cached_property
    def _kinesis(self) -> Any:
        return client("kinesis", REGION, self.settings.aws)

    @cached_property
    def _leases(self) -> LeaseTable:
        return LeaseTable(client("dynamodb", REGION, self.settings.aws), self.region.tables.leases)

    def kinesis(self) -> Any:
        return self._kinesis

    def leases(self) -> LeaseTable:
        return self._leases

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.region.redis_url)

    @property
    def lake(self) -> LakeLayout:
        return LakeLayout(self.region.lake_uri)

    def shard_ids(self) -> list[str]:
        return sorted(s["ShardId"] for s in self.kinesis().list_shards(StreamName=self.stream)["Shards"])


# ---------------------------------------------------------------------------------------------------
# events and PutRecords


def event(user: str, item: str, ts: datetime, event_type: str = "view", **extra: Any) -> dict[str, Any]:
    out = {
        "event_id": str(uuid.uuid4()),
        "user_id": user,
        "session_id": f"s-{user}",
        "item_id": item,
        "event_type": event_type,
        "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
        "region": REGION,
    }
    out.update(extra)
    return out


def make_events(n: int, users: int = 100, items: int = 37,
                start: datetime | None = None) -> list[dict[str, Any]]:
    """``n`` events with distinct, increasing timestamps (ms apart) and a mix of event types."""
    start = start or datetime.now(UTC) - timedelta(minutes=30)
    return [event(f"u{i % users}", f"i{(i * 7) % items}", start + timedelta(milliseconds=i * 10),
                  EVENT_TYPES[i % len(EVENT_TYPES)]) for i in range(n)]


@dataclass
class Put:
    """Where one record landed; ``event_id`` is set for records put by :func:`put_events`."""

    data: bytes
    shard_id: str
    seq: str
    event_id: str = ""


def put(env: Env, records: list[tuple[bytes, str]], hash_key: str | None = None) -> list[Put]:
    """PutRecords (data, partition key) in chunks of 500, every record to the shard owning ``hash_key``
    if given; returns where each record landed."""
    kinesis = env.kinesis()
    out: list[Put] = []
    for start in range(0, len(records), 500):
        chunk = records[start:start + 500]
        entries = [{"Data": d, "PartitionKey": k, **({"ExplicitHashKey": hash_key} if hash_key else {})}
                   for d, k in chunk]
        resp = kinesis.put_records(StreamName=env.stream, Records=entries)
        assert resp["FailedRecordCount"] == 0
        out.extend(Put(d, r["ShardId"], r["SequenceNumber"]) for (d, _), r in zip(chunk, resp["Records"]))
    return out


def put_events(env: Env, events: list[dict[str, Any]], hash_key: str | None = None) -> list[Put]:
    """PutRecords (partition key = user id, or every record to the shard owning ``hash_key``)."""
    puts = put(env, [(canonical_json(e), e["user_id"]) for e in events], hash_key)
    for p, e in zip(puts, events):
        p.event_id = e["event_id"]
    return puts


def last_seqs(puts: list[Put]) -> dict[str, str]:
    last: dict[str, str] = {}
    for p in puts:
        if p.shard_id not in last or int(p.seq) > int(last[p.shard_id]):
            last[p.shard_id] = p.seq
    return last


def ids(puts: list[Put]) -> set[str]:
    return {p.event_id for p in puts}


# ---------------------------------------------------------------------------------------------------
# the lake


def read_dataset(env: Env, name: str) -> pa.Table:
    root = Path(env.lake.dataset(name))  # type: ignore[arg-type]
    files = [str(p) for p in root.rglob("*.parquet")] if root.exists() else []
    if not files:
        return pa.table({})
    return ds.dataset(files, format="parquet", partitioning=ds.partitioning(flavor="hive"),
                      partition_base_dir=str(root)).to_table()


def lake_files(env: Env) -> list[Path]:
    base = Path(env.lake.base)
    return sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []


def raw_files(env: Env) -> list[Path]:
    root = Path(env.lake.dataset("raw"))
    return sorted(root.rglob("*.parquet")) if root.exists() else []


# A batch file's name: ``{shard}-{first sequence number}-{last sequence number}.parquet``.
BATCH_NAME = re.compile(r"^(?P<shard>.+)-(?P<first>\d+)-(?P<last>\d+)\.parquet$")


def batch_ranges(env: Env) -> dict[str, set[tuple[int, int]]]:
    """Every distinct batch file name in the lake (raw + dead_letter), as (first, last) sequence ranges
    per shard."""
    ranges: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for path in lake_files(env):
        match = BATCH_NAME.match(path.name)
        assert match, f"unexpected file in the lake: {path}"
        ranges[match["shard"]].add((int(match["first"]), int(match["last"])))
    return ranges


def assert_no_overlapping_batches(env: Env) -> None:
    for shard, spans in batch_ranges(env).items():
        ordered = sorted(spans)
        for (a_first, a_last), (b_first, b_last) in zip(ordered, ordered[1:]):
            assert a_last < b_first, (
                f"{shard}: batch files {a_first}-{a_last} and {b_first}-{b_last} cover the same records")


def assert_exactly_once(env: Env, expected_ids: set[str]) -> pa.Table:
    """Every expected event id is in the raw lake exactly once, nothing else is, and no temporary file is
    left; returns the raw table."""
    raw = read_dataset(env, "raw")
    counts = Counter(raw.column("event_id").to_pylist()) if raw.num_rows else Counter()
    dupes = {k: v for k, v in counts.items() if v > 1}
    missing = expected_ids - set(counts)
    extra = set(counts) - expected_ids
    assert not dupes, f"{len(dupes)} event ids in the raw lake more than once, e.g. {list(dupes.items())[:3]}"
    assert not missing, f"{len(missing)} of {len(expected_ids)} event ids missing from the raw lake"
    assert not extra, f"{len(extra)} unexpected event ids in the raw lake"
    assert not [p for p in lake_files(env) if p.name.endswith(".tmp")]
    return raw


# ---------------------------------------------------------------------------------------------------
# the lease table


def lease_map(env: Env) -> dict[str, Lease]:
    return {lease.shard_id: lease for lease in env.leases().scan()}


def checkpoints(env: Env) -> dict[str, str]:
    return {s: l.checkpoint for s, l in lease_map(env).items()}


# ---------------------------------------------------------------------------------------------------
# worker processes (started by the ``workers`` fixture)


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    worker_id: str
    log: Path
    summary: Path
    timeout: float = WORKER_TIMEOUT_S  # wait()'s default

    def wait(self, timeout: float | None = None) -> int:
        timeout = self.timeout if timeout is None else timeout
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"worker {self.worker_id} did not exit within {timeout:.0f}s\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stats(self) -> dict[str, Any]:
        return json.loads(self.summary.read_text())
