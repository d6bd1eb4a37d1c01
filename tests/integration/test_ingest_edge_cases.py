"""Regression tests for consumer edge cases found in review: drain mode and dead workers, drain mode and
closed (split) shards, an expired iterator before the first record, and a worker restarted under its own id.

Real components throughout: the moto server's Kinesis and DynamoDB (the real lease table), a real
redis-server and a local Parquet lake. Time-dependent cases run the worker in-process with a fake
monotonic clock (``Worker(clock=...)``), so lease expiry is a matter of advancing that clock, never of
waiting; the crash cases run ``python -m streamrec ingest run`` processes, as a pod does. Two cases need
behaviour the moto server cannot show (a closed shard, an expired iterator): there a thin wrapper around
the real moto Kinesis client injects exactly that behaviour, and says why where it is defined.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import yaml
from botocore.exceptions import ClientError

import ingest.worker
from ingest.lease_table import LeaseTable
from ingest.leases import SHARD_END, TRIM_HORIZON, Lease
from ingest.worker import Worker, build_worker
from streamrec.aws import client
from streamrec.devstack.provision import provision_region
from streamrec.devstack.service import ServiceHandle
from streamrec.events import EVENT_TYPES, canonical_json
from streamrec.lake import LakeLayout
from streamrec.settings import Settings, load_settings

pytestmark = pytest.mark.integration

REGION = "us-east-1"
# In-process workers run on a fake clock: these durations are fake seconds, except idle_poll_seconds,
# which also bounds the real sleep of an idle loop iteration in Worker.run.
FAST_INGEST: dict[str, Any] = {
    "batch_max_seconds": 1,
    "idle_poll_seconds": 0.01,
    "lease_duration_seconds": 2,
    "lease_renew_seconds": 0.5,
}
WORKER_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------------------------------
# environment, records, lake


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

    @property
    def lake(self) -> LakeLayout:
        return LakeLayout(self.region.lake_uri)

    def shard_ids(self) -> list[str]:
        return sorted(s["ShardId"] for s in self.kinesis().list_shards(StreamName=self.stream)["Shards"])


@pytest.fixture
def make_env(tmp_path: Path, moto_server: ServiceHandle, redis_url: str) -> Callable[..., Env]:
    """Provisioned settings with unique stream and table names, written to a YAML file for the workers."""

    def make(shard_count: int, **ingest: Any) -> Env:
        suffix = uuid.uuid4().hex[:8]
        document = {
            "environment": "local",
            "aws": {"endpoint_url": moto_server.url, "access_key_id": "testing",
                    "secret_access_key": "testing"},
            "regions": {REGION: {
                "stream_name": f"clicks-{suffix}",
                "shard_count": shard_count,
                "lake_uri": f"file://{tmp_path / f'lake-{suffix}'}",
                "tables": {"leases": f"leases-{suffix}", "recs": f"recs-{suffix}",
                           "features": f"features-{suffix}"},
                "redis_url": redis_url,
            }},
            "ingest": {**FAST_INGEST, **ingest},
        }
        path = tmp_path / f"streamrec-{suffix}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        settings = load_settings(path)
        provision_region(settings, REGION)
        return Env(settings, path, tmp_path)

    return make


def event(user: str, item: str, ts: datetime, event_type: str = "view") -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "user_id": user,
        "session_id": f"s-{user}",
        "item_id": item,
        "event_type": event_type,
        "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
        "region": REGION,
    }


def make_events(n: int, users: int = 50, items: int = 37) -> list[dict[str, Any]]:
    start = datetime.now(UTC) - timedelta(minutes=30)
    return [event(f"u{i % users}", f"i{(i * 7) % items}", start + timedelta(milliseconds=i * 10),
                  EVENT_TYPES[i % len(EVENT_TYPES)]) for i in range(n)]


@dataclass
class Put:
    event_id: str
    shard_id: str
    seq: str


def put_events(env: Env, events: list[dict[str, Any]], hash_key: str | None = None) -> list[Put]:
    """PutRecords (partition key = user id, or every record to the shard owning ``hash_key``)."""
    kinesis = env.kinesis()
    out: list[Put] = []
    for start in range(0, len(events), 500):
        chunk = events[start:start + 500]
        entries = [{"Data": canonical_json(e), "PartitionKey": e["user_id"],
                    **({"ExplicitHashKey": hash_key} if hash_key else {})} for e in chunk]
        resp = kinesis.put_records(StreamName=env.stream, Records=entries)
        assert resp["FailedRecordCount"] == 0
        out.extend(Put(e["event_id"], r["ShardId"], r["SequenceNumber"]) for e, r in zip(chunk, resp["Records"]))
    return out


def last_seqs(puts: list[Put]) -> dict[str, str]:
    last: dict[str, str] = {}
    for p in puts:
        if p.shard_id not in last or int(p.seq) > int(last[p.shard_id]):
            last[p.shard_id] = p.seq
    return last


def read_raw(env: Env) -> pa.Table:
    root = Path(env.lake.dataset("raw"))  # type: ignore[arg-type]
    files = [str(p) for p in root.rglob("*.parquet")] if root.exists() else []
    if not files:
        return pa.table({"event_id": pa.array([], pa.string())})
    return ds.dataset(files, format="parquet", partitioning=ds.partitioning(flavor="hive"),
                      partition_base_dir=str(root)).to_table()


def lake_files(env: Env) -> list[Path]:
    base = Path(env.lake.base)
    return sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []


def raw_files(env: Env) -> list[Path]:
    root = Path(env.lake.dataset("raw"))
    return sorted(root.rglob("*.parquet")) if root.exists() else []


_NAME = re.compile(r"^(?P<shard>.+)-(?P<first>\d+)-(?P<last>\d+)\.parquet$")


def batch_ranges(env: Env) -> dict[str, set[tuple[int, int]]]:
    """Every distinct batch file name in the lake, as (first, last) sequence ranges per shard."""
    ranges: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for path in lake_files(env):
        match = _NAME.match(path.name)
        assert match, f"unexpected file in the lake: {path}"
        ranges[match["shard"]].add((int(match["first"]), int(match["last"])))
    return ranges


def assert_no_overlapping_batches(env: Env) -> None:
    for shard, spans in batch_ranges(env).items():
        ordered = sorted(spans)
        for (a_first, a_last), (b_first, b_last) in zip(ordered, ordered[1:]):
            assert a_last < b_first, (
                f"{shard}: batch files {a_first}-{a_last} and {b_first}-{b_last} cover the same records")


def assert_exactly_once(env: Env, expected_ids: set[str]) -> None:
    counts = Counter(read_raw(env).column("event_id").to_pylist())
    dupes = {k: v for k, v in counts.items() if v > 1}
    missing = expected_ids - set(counts)
    extra = set(counts) - expected_ids
    assert not dupes, f"{len(dupes)} event ids in the raw lake more than once, e.g. {list(dupes.items())[:3]}"
    assert not missing, f"{len(missing)} of {len(expected_ids)} event ids missing from the raw lake"
    assert not extra, f"{len(extra)} unexpected event ids in the raw lake"
    assert not [p for p in lake_files(env) if p.name.endswith(".tmp")]


def lease_map(env: Env) -> dict[str, Lease]:
    return {lease.shard_id: lease for lease in env.leases().scan()}


def ids(puts: list[Put]) -> set[str]:
    return {p.event_id for p in puts}


# ---------------------------------------------------------------------------------------------------
# in-process workers on a fake clock


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


def run_drained(worker: Worker, clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
                fake_seconds: float = 120.0, tick: float = 0.01) -> float:
    """Run ``worker.run()`` (until drained) with the fake clock moving ``tick`` per reading; fail if it
    has not drained within ``fake_seconds`` of fake time. Returns the fake time it exited at."""
    assert worker.until_drained
    # Worker.run freezes the garbage collector and raises its thresholds for the whole process: right for
    # a pod, a lasting side effect in the test process. It has no bearing on what these tests check.
    monkeypatch.setattr(ingest.worker, "tune_gc", lambda: None)
    clock.tick, clock.deadline = tick, clock.now + fake_seconds
    clock.on_deadline = lambda: setattr(worker, "stopping", True)
    try:
        worker.run()
    finally:
        clock.tick, clock.deadline = 0.0, float("inf")
    assert not clock.overran, f"worker {worker.worker_id} did not drain within {fake_seconds:.0f} fake seconds"
    return clock.now


def step_until(cond: Callable[[], Any], workers: list[Worker], clock: FakeClock, what: str,
               dt: float = 0.25, max_steps: int = 100) -> None:
    """Step the workers' loop by hand (scan, poll) on the fake clock until ``cond`` holds."""
    for _ in range(max_steps):
        if cond():
            return
        clock.advance(dt)
        for w in workers:
            w.scan_leases()
            w.poll_shards()
    pytest.fail(f"{what}: not reached after {max_steps} steps of {dt} fake seconds")


def checkpoint_is(env: Env, want: dict[str, str]) -> Callable[[], bool]:
    def reached() -> bool:
        table = lease_map(env)
        return all(table[s].checkpoint == seq for s, seq in want.items())
    return reached


# ---------------------------------------------------------------------------------------------------
# worker processes


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    worker_id: str
    log: Path
    summary: Path

    def wait(self, timeout: float = WORKER_TIMEOUT_S) -> int:
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


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `streamrec ingest run --until-drained` processes; any still running at the end are killed."""
    started: list[WorkerProcess] = []

    def start(env: Env, *extra: str, worker_id: str) -> WorkerProcess:
        n = sum(1 for w in started if w.worker_id == worker_id)
        log = tmp_path / f"{worker_id}-{n}.log"
        summary = tmp_path / f"{worker_id}-{n}.summary.json"
        argv = [sys.executable, "-m", "streamrec", "ingest", "run", "--region", REGION,
                "--config", str(env.config), "--worker-id", worker_id, "--summary-out", str(summary),
                "--until-drained", *extra]
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        worker = WorkerProcess(proc, worker_id, log, summary)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()


# ---------------------------------------------------------------------------------------------------
# fault-injecting wrappers around the REAL moto Kinesis client


class KinesisProxy:
    """Delegates everything to the real client; subclasses change one behaviour. Records every
    GetShardIterator (shard, type, sequence number) and which shard each GetRecords read."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.iterator_calls: list[tuple[str, str, str | None]] = []
        self.reads: list[tuple[str, int]] = []  # (shard, records returned), in call order
        self._shard_of: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def get_shard_iterator(self, **kwargs: Any) -> dict[str, Any]:
        self.iterator_calls.append((kwargs["ShardId"], kwargs["ShardIteratorType"],
                                    kwargs.get("StartingSequenceNumber")))
        out = self.real.get_shard_iterator(**kwargs)
        self._shard_of[out["ShardIterator"]] = kwargs["ShardId"]
        return out

    def get_records(self, *, ShardIterator: str, **kwargs: Any) -> dict[str, Any]:  # noqa: N803
        shard = self._shard_of.pop(ShardIterator)
        out = self.before_read(shard) or self.real.get_records(ShardIterator=ShardIterator, **kwargs)
        out = self.after_read(shard, out)
        self.reads.append((shard, len(out.get("Records", []))))
        if out.get("NextShardIterator"):
            self._shard_of[out["NextShardIterator"]] = shard
        return out

    def before_read(self, shard: str) -> None:
        return None

    def after_read(self, shard: str, out: dict[str, Any]) -> dict[str, Any]:
        return out


class SplitShardView(KinesisProxy):
    """The stream as Kinesis shows it after ``parent`` was split into ``children``.

    A mock is justified here: moto 5's SplitShard does not behave like Kinesis. It moves the parent's
    records into the children (emptying the parent) and never ends the parent's iterator
    (NextShardIterator is always set), so a worker can never see a closed shard reach its end. Real
    Kinesis keeps the parent's records readable and ends its iterator after the last one. So the
    stream's own shards stand in: ListShards reports ``children`` with ParentShardId = ``parent``, and
    GetRecords on ``parent`` returns no NextShardIterator once its last record (``parent_end``) has been
    returned, or when nothing is left after it. Records, sequence numbers and iterators stay moto's."""

    def __init__(self, real: Any, parent: str, children: list[str], parent_end: str) -> None:
        super().__init__(real)
        self.parent, self.children, self.parent_end = parent, children, parent_end

    def list_shards(self, **kwargs: Any) -> dict[str, Any]:
        page = self.real.list_shards(**kwargs)
        page["Shards"] = [{**s, "ParentShardId": self.parent} if s["ShardId"] in self.children else s
                          for s in page["Shards"]]
        return page

    def after_read(self, shard: str, out: dict[str, Any]) -> dict[str, Any]:
        records = out.get("Records", [])
        if shard == self.parent and (not records or records[-1]["SequenceNumber"] == self.parent_end):
            out.pop("NextShardIterator", None)
        return out


class ExpiringIterators(KinesisProxy):
    """The next ``expire`` GetRecords calls fail with ExpiredIteratorException (as Kinesis answers an
    iterator used more than 5 minutes after it was issued). A mock is justified here: the moto server's
    iterators never expire, and no local component can make one expire on demand."""

    def __init__(self, real: Any) -> None:
        super().__init__(real)
        self.expire = 0
        self.raised = 0

    def before_read(self, shard: str) -> None:
        if self.expire:
            self.expire -= 1
            self.raised += 1
            raise ClientError({"Error": {"Code": "ExpiredIteratorException",
                                         "Message": "Iterator expired. (injected by the test)"}}, "GetRecords")
        return None


# ---------------------------------------------------------------------------------------------------
# a. drain mode waits for a dead worker's lease


def test_drain_mode_waits_for_a_dead_workers_lease_then_consumes_it(
        make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch) -> None:
    """A and B share two shards; B dies (it is simply never called again) just after renewing its lease,
    with records buffered and more arriving after its death. A, in drain mode, must not exit while B's
    lease is still B's: it waits for the lease to expire, takes it, reads B's shard from B's checkpoint,
    and only then exits."""
    # A lease of 5 fake seconds: A has read and flushed its own shard (1 s flush age) well before then.
    env = make_env(2, lease_duration_seconds=5)
    duration = env.settings.ingest.lease_duration_seconds
    clock = FakeClock()
    a = build_worker(env.settings, REGION, worker_id="A", clock=clock, until_drained=True)
    b = build_worker(env.settings, REGION, worker_id="B", clock=clock, until_drained=True)

    first = put_events(env, make_events(200))
    assert len({p.shard_id for p in first}) == 2
    a.sync_shards()
    a.scan_leases()
    assert len(a.shards) == 2  # alone so far: A takes both
    b.scan_leases()  # B steals one towards its fair share ...
    a.scan_leases()  # ... and A notices on renewal
    assert len(a.shards) == 1 and len(b.shards) == 1, (list(a.shards), list(b.shards))
    (b_shard,) = b.shards
    step_until(checkpoint_is(env, last_seqs(first)), [a, b], clock, "both workers checkpoint the first records")

    # B reads more records and dies before flushing them; it renewed its lease just before, and A saw that.
    second = put_events(env, make_events(100))
    clock.advance(0.25)
    b.scan_leases()
    b.poll_shards()
    a.scan_leases()
    assert len(b.shards[b_shard].buffer) == sum(1 for p in second if p.shard_id == b_shard) > 0
    killed_at = clock.now
    del b
    third = put_events(env, make_events(100))
    assert b_shard in {p.shard_id for p in third}
    b_lease = lease_map(env)[b_shard]
    assert b_lease.owner == "B" and b_lease.checkpoint == last_seqs(first)[b_shard]

    exited_at = run_drained(a, clock, monkeypatch)

    everything = first + second + third
    assert_exactly_once(env, ids(everything))
    assert_no_overlapping_batches(env)
    assert exited_at >= killed_at + duration, "A exited before B's lease could have expired"
    assert a.stats.leases_lost == 1 and a.stats.leases_taken == 3  # both, lost one to B, took it back
    table = lease_map(env)
    assert {s: l.checkpoint for s, l in table.items()} == last_seqs(everything)
    assert all(l.owner is None and l.pending is None for l in table.values())


def test_drain_mode_started_after_a_worker_died_waits_for_its_lease(
        make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch) -> None:
    """B holds both leases and dies with records checkpointed, buffered and unread. A starts afterwards:
    a lease it has only ever seen unchanged proves nothing about its owner, so A, in drain mode, must
    wait for B's leases to expire (or steal them), read everything from B's checkpoints, and only then
    exit."""
    env = make_env(2)
    duration = env.settings.ingest.lease_duration_seconds
    clock = FakeClock()
    b = build_worker(env.settings, REGION, worker_id="B", clock=clock, until_drained=True)
    first = put_events(env, make_events(200))
    b.sync_shards()
    step_until(checkpoint_is(env, last_seqs(first)), [b], clock, "B checkpoints the first records")
    second = put_events(env, make_events(100))
    clock.advance(0.25)
    b.scan_leases()
    b.poll_shards()
    assert sum(len(s.buffer) for s in b.shards.values()) == len(second)
    del b  # killed: never called again
    third = put_events(env, make_events(100))
    assert {l.owner for l in lease_map(env).values()} == {"B"}

    a = build_worker(env.settings, REGION, worker_id="A", clock=clock, until_drained=True)
    started_at = clock.now
    exited_at = run_drained(a, clock, monkeypatch)

    everything = first + second + third
    assert_exactly_once(env, ids(everything))
    assert_no_overlapping_batches(env)
    assert exited_at >= started_at + duration, "A exited before B's leases could have expired"
    assert a.stats.leases_taken == 2 and a.stats.rows_out == len(second) + len(third)
    table = lease_map(env)
    assert {s: l.checkpoint for s, l in table.items()} == last_seqs(everything)
    assert all(l.owner is None and l.pending is None for l in table.values())


# ---------------------------------------------------------------------------------------------------
# b. drain mode reads the children of a finished parent


def test_drain_mode_reads_the_children_after_finishing_a_closed_parent(
        make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch) -> None:
    """After a split, finishing the closed parent shard (SHARD_END) makes its children eligible: a
    worker in drain mode must take and read them before it exits."""
    env = make_env(3)
    parent, *children = env.shard_ids()
    ranges = {s["ShardId"]: s["HashKeyRange"]["StartingHashKey"]
              for s in env.kinesis().list_shards(StreamName=env.stream)["Shards"]}
    # Records written before the split go to the parent, later ones to the children.
    before = put_events(env, make_events(60), hash_key=ranges[parent])
    after = [p for child in children for p in put_events(env, make_events(40), hash_key=ranges[child])]
    assert {p.shard_id for p in before} == {parent} and {p.shard_id for p in after} == set(children)

    clock = FakeClock()
    worker = build_worker(env.settings, REGION, worker_id="A", clock=clock, until_drained=True)
    view = SplitShardView(worker.kinesis, parent, children, parent_end=before[-1].seq)
    worker.kinesis = view
    # The worker already holds the parent when its loop starts, so the loop's first lease scan sees the
    # parent in its name; that iteration then reads the parent to its end and finishes it.
    worker.sync_shards()
    worker.scan_leases()
    assert list(worker.shards) == [parent]

    run_drained(worker, clock, monkeypatch)

    assert_exactly_once(env, ids(before + after))
    assert_no_overlapping_batches(env)
    table = lease_map(env)
    assert table[parent].checkpoint == SHARD_END
    assert {c: table[c].checkpoint for c in children} == last_seqs(after)
    assert {c: table[c].parents for c in children} == {c: (parent,) for c in children}
    assert all(l.owner is None and l.pending is None for l in table.values())
    # Parent before children: no child was read until the parent had been read to its end.
    order = [shard for shard, _ in view.reads]
    last_parent_read = max(i for i, s in enumerate(order) if s == parent)
    assert all(s == parent for s in order[:last_parent_read + 1]), order


# ---------------------------------------------------------------------------------------------------
# c. an expired iterator before the first record resumes where the lease starts


def consume_and_release(env: Env, clock: FakeClock, worker_id: str, puts: list[Put]) -> None:
    """An in-process worker reads ``puts`` to a checkpoint, then shuts down gracefully (lease released)."""
    worker = build_worker(env.settings, REGION, worker_id=worker_id, clock=clock)
    worker.sync_shards()
    step_until(checkpoint_is(env, last_seqs(puts)), [worker], clock, f"{worker_id} checkpoints")
    worker.shutdown()


def test_expired_iterator_before_the_first_record_resumes_after_the_checkpoint(
        make_env: Callable[..., Env]) -> None:
    env = make_env(1)
    clock = FakeClock()
    first = put_events(env, make_events(20))
    consume_and_release(env, clock, "A", first)
    (shard,) = last_seqs(first)
    checkpoint = first[-1].seq
    assert lease_map(env)[shard].checkpoint == checkpoint
    second = put_events(env, make_events(10))

    worker = build_worker(env.settings, REGION, worker_id="B", clock=clock)
    kinesis = ExpiringIterators(worker.kinesis)
    worker.kinesis = kinesis
    worker.scan_leases()
    assert list(worker.shards) == [shard]
    kinesis.expire = 1  # the first GetRecords after adopting the lease finds its iterator expired
    step_until(checkpoint_is(env, {shard: second[-1].seq}), [worker], clock, "B checkpoints")
    worker.shutdown()

    assert kinesis.raised == 1
    # Both iterators B asked for start after the checkpoint; nothing before it was read again.
    assert kinesis.iterator_calls == [(shard, "AFTER_SEQUENCE_NUMBER", checkpoint)] * 2
    assert worker.stats.records_in == len(second)
    assert batch_ranges(env) == {shard: {(int(first[0].seq), int(first[-1].seq)),
                                         (int(second[0].seq), int(second[-1].seq))}}
    assert_exactly_once(env, ids(first + second))


def test_expired_iterator_before_the_first_record_replays_the_pending_range(
        make_env: Callable[..., Env], workers: Any) -> None:
    """The lease carries a pending range left by a worker killed after writing its files; its checkpoint
    is a sequence number. The successor's first GetRecords finds its iterator expired: it must re-read
    exactly the pending range (from its first record, not TRIM_HORIZON) and rewrite the same file."""
    env = make_env(1, batch_max_records=10)
    clock = FakeClock()
    first = put_events(env, make_events(20))
    consume_and_release(env, clock, "A", first)
    (shard,) = last_seqs(first)
    assert lease_map(env)[shard].checkpoint == first[-1].seq
    second = put_events(env, make_events(10))

    crashed = workers(env, "--crash-after", "after_lake_write", worker_id="crasher")
    assert crashed.wait() == -signal.SIGKILL, crashed.tail()
    lease = lease_map(env)[shard]
    assert lease.owner == "crasher" and lease.checkpoint == first[-1].seq
    assert lease.pending == (second[0].seq, second[-1].seq)
    (crashed_file,) = [p for p in raw_files(env) if _NAME.match(p.name)["first"] == second[0].seq]  # type: ignore[index]
    inode = crashed_file.stat().st_ino

    worker = build_worker(env.settings, REGION, worker_id="B", clock=clock)
    kinesis = ExpiringIterators(worker.kinesis)
    worker.kinesis = kinesis
    worker.scan_leases()  # first sight of the crasher's lease: it gets a full lease duration
    clock.advance(env.settings.ingest.lease_duration_seconds)
    worker.scan_leases()  # unchanged for a lease duration: expired, taken
    assert list(worker.shards) == [shard]
    kinesis.expire = 1
    step_until(checkpoint_is(env, {shard: second[-1].seq}), [worker], clock, "B replays and checkpoints")
    worker.shutdown()

    assert kinesis.raised == 1
    assert kinesis.iterator_calls == [(shard, "AT_SEQUENCE_NUMBER", second[0].seq)] * 2
    assert worker.stats.records_in == len(second)
    # The pending range was written again under the same name (a new file replaced the crashed one).
    assert crashed_file.exists() and crashed_file.stat().st_ino != inode
    assert batch_ranges(env) == {shard: {(int(first[0].seq), int(first[-1].seq)),
                                         (int(second[0].seq), int(second[-1].seq))}}
    assert_exactly_once(env, ids(first + second))
    final = lease_map(env)[shard]
    assert final.checkpoint == second[-1].seq and final.pending is None and final.owner is None


# ---------------------------------------------------------------------------------------------------
# d. a worker restarted under the same id takes its orphaned leases back


def test_worker_restarted_with_the_same_id_takes_back_its_orphaned_leases(
        make_env: Callable[..., Env], workers: Any) -> None:
    """A pod with a fixed worker id crashes after writing a batch's files, and restarts under the same
    id. Its leases are in its own name, so no other worker will see them expire in time; the restarted
    process must take them back at once, replay the pending range under the same file name and consume
    everything exactly once. The lease duration is an hour: waiting for an expiry cannot pass."""
    env = make_env(2, batch_max_records=100, lease_duration_seconds=3600, lease_renew_seconds=0.5)
    puts = put_events(env, make_events(300))
    assert len({p.shard_id for p in puts}) == 2

    crashed = workers(env, "--crash-after", "after_lake_write", worker_id="pod-0")
    assert crashed.wait() == -signal.SIGKILL, crashed.tail()
    table = lease_map(env)
    assert all(l.owner == "pod-0" and l.checkpoint == TRIM_HORIZON for l in table.values()), table
    (pending,) = [l for l in table.values() if l.pending is not None]
    (crashed_file,) = raw_files(env)
    assert crashed_file.name == f"{pending.shard_id}-{pending.pending[0]}-{pending.pending[1]}.parquet"
    inode = crashed_file.stat().st_ino

    restarted = workers(env, worker_id="pod-0")
    assert restarted.wait() == 0, restarted.tail()

    stats = restarted.stats()
    assert stats["leases_taken"] == 2 and stats["leases_lost"] == 0, stats
    assert stats["records_in"] == stats["rows_out"] == len(puts), stats
    assert crashed_file.exists() and crashed_file.stat().st_ino != inode
    assert_exactly_once(env, ids(puts))
    assert_no_overlapping_batches(env)
    table = lease_map(env)
    assert {s: l.checkpoint for s, l in table.items()} == last_seqs(puts)
    assert all(l.owner is None and l.pending is None for l in table.values())


# ---------------------------------------------------------------------------------------------------
# e. drain mode flushes at the tip instead of waiting for the batch age


def test_drain_mode_flushes_at_the_tip_without_waiting_for_the_batch_age(
        make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch) -> None:
    """With the production flush age (60 s) and a batch far from full, a drain-mode worker read to the
    tip must write what it holds and exit, well before the age limit (fake time)."""
    env = make_env(2, batch_max_seconds=60, batch_max_records=50_000)
    puts = put_events(env, make_events(300))
    clock = FakeClock()
    worker = build_worker(env.settings, REGION, worker_id="A", clock=clock, until_drained=True)
    started_at = clock.now
    exited_at = run_drained(worker, clock, monkeypatch, fake_seconds=60, tick=0.001)
    assert exited_at - started_at < 30
    assert_exactly_once(env, ids(puts))
    assert {s: l.checkpoint for s, l in lease_map(env).items()} == last_seqs(puts)
