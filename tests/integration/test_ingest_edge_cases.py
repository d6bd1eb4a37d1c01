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

import signal
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from botocore.exceptions import ClientError
from ingest_support import (
    BATCH_NAME,
    REGION,
    Env,
    FakeClock,
    Put,
    assert_exactly_once,
    assert_no_overlapping_batches,
    batch_ranges,
    ids,
    last_seqs,
    lease_map,
    put_events,
    raw_files,
)
from ingest_support import FAST_INGEST as _FAST_INGEST
from ingest_support import make_events as _make_events

import ingest.worker
from ingest.leases import SHARD_END, TRIM_HORIZON
from ingest.worker import Worker, build_worker

pytestmark = pytest.mark.integration

# make_env and workers (conftest.py) take this module's FAST_INGEST and WORKER_TIMEOUT_S.
# In-process workers run on a fake clock: these durations are fake seconds, except idle_poll_seconds,
# which also bounds the real sleep of an idle loop iteration in Worker.run.
FAST_INGEST: dict[str, Any] = {**_FAST_INGEST, "idle_poll_seconds": 0.01}
WORKER_TIMEOUT_S = 30.0
# Events from 50 users (partition keys) unless a test says otherwise.
make_events = partial(_make_events, users=50)


# ---------------------------------------------------------------------------------------------------
# in-process workers on a fake clock


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
    (crashed_file,) = [p for p in raw_files(env) if BATCH_NAME.match(p.name)["first"] == second[0].seq]  # type: ignore[index]
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
