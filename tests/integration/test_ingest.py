"""The Kinesis consumer end to end against a real moto server and a real redis-server.

Workers run as real processes (``python -m streamrec ingest run``), exactly as a pod runs them, and are
crashed with SIGKILL (self-inflicted at a chosen point of a flush, or from here at an arbitrary moment)
and stopped with SIGTERM. Assertions are on data: event ids in the Parquet lake, dead letters with their
reasons and original bytes, lease-table checkpoints, Redis online features. Every wait polls a condition
under a deadline.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
import redis
import yaml
from ingest_support import (
    REGION,
    Env,
    FakeClock,
    assert_exactly_once,
    assert_no_overlapping_batches,
    batch_ranges,
    checkpoints,
    event,
    last_seqs,
    lease_map,
    make_events,
    put,
    put_events,
    raw_files,
    read_dataset,
    wait_until,
)

from ingest.leases import SHARD_END, TRIM_HORIZON
from streamrec.devstack.process import free_port
from streamrec.devstack.redis_server import RedisLauncher
from streamrec.events import EVENT_WEIGHTS, canonical_json
from streamrec.online import read_popular, read_recent

pytestmark = pytest.mark.integration

# Environments (make_env) start from ingest_support.FAST_INGEST: small timings, so the whole file runs in
# well under a minute. Crash tests wait for a dead worker's lease to expire; with one live worker at a
# time a short lease is safe.
SHORT_LEASE: dict[str, Any] = {"lease_duration_seconds": 1, "lease_renew_seconds": 0.25}


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


# ---------------------------------------------------------------------------------------------------
# 1. two workers share four shards


def test_two_workers_consume_four_shards_exactly_once(make_env: Callable[..., Env], workers: Any) -> None:
    """Two workers converge on two leases each and consume every event exactly once.

    The second half of the events is put only once the lease table shows two leases per worker, so both
    workers have work whatever order and speed their processes start in. (Racing a flush age instead
    failed on a busy CI machine: the second worker came up after the first had drained the stream.)
    A 10 s lease keeps a starved renewal from handing a lease over mid-test."""
    env = make_env(4, lease_duration_seconds=10, lease_renew_seconds=0.5)
    events = make_events(3000, users=200)
    first = put_events(env, events[:1500])

    a = workers(env, worker_id="worker-a", until_drained=False)
    b = workers(env, worker_id="worker-b", until_drained=False)

    def balanced_or_exited() -> bool:
        owners = Counter(lease.owner for lease in lease_map(env).values())
        return owners == {"worker-a": 2, "worker-b": 2} or a.proc.poll() is not None \
            or b.proc.poll() is not None

    wait_until(balanced_or_exited, 60, "two leases per worker")
    assert a.proc.poll() is None, a.tail()
    assert b.proc.poll() is None, b.tail()
    second = put_events(env, events[1500:])
    assert len({p.shard_id for p in second}) == 4
    puts = first + second
    wait_until(lambda: checkpoints(env) == last_seqs(puts) or a.proc.poll() is not None
               or b.proc.poll() is not None, 60, "every shard checkpointed at its last event")
    for worker in (a, b):
        worker.proc.send_signal(signal.SIGTERM)
    assert a.wait() == 0, a.tail()
    assert b.wait() == 0, b.tail()

    assert_exactly_once(env, {e["event_id"] for e in events})
    assert_no_overlapping_batches(env)
    sa, sb = a.stats(), b.stats()
    assert sa["rows_out"] > 0 and sb["rows_out"] > 0, (sa, sb)
    assert sa["rows_out"] + sb["rows_out"] == 3000
    assert sa["dead_lettered"] == {} and sb["dead_lettered"] == {}
    table = lease_map(env)
    assert {s: l.checkpoint for s, l in table.items()} == last_seqs(puts)
    assert all(l.owner is None and l.pending is None for l in table.values())


# ---------------------------------------------------------------------------------------------------
# 2. crashes


def test_crash_after_lake_write_is_replayed_under_the_same_file_name(
        make_env: Callable[..., Env], workers: Any) -> None:
    env = make_env(1, batch_max_records=100, **SHORT_LEASE)
    events = make_events(250)
    puts = put_events(env, events)

    crashed = workers(env, "--crash-after", "after_lake_write", worker_id="crasher")
    assert crashed.wait() == -signal.SIGKILL, crashed.tail()
    before = raw_files(env)
    assert len(before) == 1, before
    (lease,) = env.leases().scan()
    assert lease.owner == "crasher" and lease.checkpoint == TRIM_HORIZON
    assert lease.pending is not None and lease.pending[0] == puts[0].seq
    first_file, inode = before[0], before[0].stat().st_ino

    survivor = workers(env, worker_id="survivor")
    assert survivor.wait() == 0, survivor.tail()

    assert_exactly_once(env, {e["event_id"] for e in events})
    assert_no_overlapping_batches(env)
    # The batch written before the crash was written again, under the same name (a new file replaced it).
    assert first_file.exists() and first_file.stat().st_ino != inode
    ((_, (first, last)),) = [(s, min(r)) for s, r in batch_ranges(env).items()]
    assert (str(first), str(last)) == lease.pending
    (final,) = env.leases().scan()
    assert final.checkpoint == puts[-1].seq and final.pending is None and final.owner is None


def test_kill_at_an_arbitrary_moment_then_restart_is_exactly_once(
        make_env: Callable[..., Env], workers: Any) -> None:
    env = make_env(2, batch_max_records=100, get_records_limit=100, **SHORT_LEASE)
    events = make_events(2000, users=50)
    puts = put_events(env, events)

    victim = workers(env, worker_id="victim", until_drained=False)
    wait_until(lambda: raw_files(env) or victim.proc.poll() is not None, 30, "a first raw file")
    os.kill(victim.proc.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert read_dataset(env, "raw").num_rows < 2000, "the kill came too late to test anything"

    restarted = workers(env, worker_id="restarted")
    assert restarted.wait() == 0, restarted.tail()
    assert_exactly_once(env, {e["event_id"] for e in events})
    assert_no_overlapping_batches(env)
    assert checkpoints(env) == last_seqs(puts)


def test_replay_after_a_crash_does_not_split_the_pending_batch(
        make_env: Callable[..., Env], workers: Any) -> None:
    """The successor must rewrite the crashed batch as one file even if Kinesis hands it the range in
    smaller GetRecords responses than the crashed worker got (Kinesis may return fewer records than the
    limit; here the successor asks for 100 at a time). BUG: the buffer's size/age trigger fires mid-replay
    and writes a second file covering part of the crashed batch's records."""
    env = make_env(1, batch_max_records=100, get_records_limit=10_000, **SHORT_LEASE)
    events = make_events(300)
    put_events(env, events)

    crashed = workers(env, "--crash-after", "after_lake_write", worker_id="crasher")
    assert crashed.wait() == -signal.SIGKILL, crashed.tail()
    (lease,) = env.leases().scan()
    assert lease.pending is not None
    assert read_dataset(env, "raw").num_rows == 300  # one GetRecords response, one batch of 300

    small_reads = env.tmp / "small-reads.yaml"
    doc = yaml.safe_load(env.config.read_text())
    doc["ingest"]["get_records_limit"] = 100
    small_reads.write_text(yaml.safe_dump(doc))
    survivor = workers(env, worker_id="survivor", config=small_reads)
    assert survivor.wait() == 0, survivor.tail()
    assert_no_overlapping_batches(env)
    assert_exactly_once(env, {e["event_id"] for e in events})


# ---------------------------------------------------------------------------------------------------
# 3. bad records


def test_bad_records_are_dead_lettered_with_reason_and_exact_bytes(
        make_env: Callable[..., Env], workers: Any) -> None:
    env = make_env(1)
    now = datetime.now(UTC)
    good = make_events(60, users=6)
    bad: list[tuple[bytes, str]] = [
        (b'{"event_id": "oops', "malformed_json"),
        (b"\xff\xfe\x00garbage", "invalid_utf8"),
        (canonical_json(event("u1", "i1", now))[:-1] + b',"user_id":"\xc3\x28"}', "invalid_utf8"),
        (b"[1, 2, 3]", "not_an_object"),
        (b'"just a string"', "not_an_object"),
        (canonical_json({**event("u1", "i1", now), "user_id": 12345}), "schema"),
        (canonical_json({**event("u1", "i1", now), "context": {"price": "9.99"}}), "schema"),
        (canonical_json({k: v for k, v in event("u1", "i1", now).items() if k != "item_id"}), "schema"),
        (canonical_json(event("u1", "i1", now, event_type="hover")), "schema"),
        (canonical_json({**event("u1", "i1", now), "event_id": "not-a-uuid"}), "schema"),
        (canonical_json({**event("u1", "i1", now), "ts": "2026-11-26T08:00:00"}), "schema"),
        (canonical_json({**event("u1", "i1", now), "surprise": True}), "schema"),
        (canonical_json(event("u1", "i1", now, context={"page": "p" * 500})) + b" " * 8000, "oversize"),
        (canonical_json(event("u1", "i1", now + timedelta(days=3))), "future_ts"),
        (canonical_json(event("u1", "i1", now + timedelta(days=400))), "future_ts"),
    ]
    duplicate = canonical_json(good[10])
    # Interleave: every fourth record is bad, all on the one shard; one valid event is sent twice.
    records: list[tuple[bytes, str | None]] = []
    bad_iter = iter(bad)
    for i, e in enumerate(good):
        records.append((canonical_json(e), None))
        if i % 4 == 3:
            nxt = next(bad_iter, None)
            if nxt:
                records.append(nxt)
        if i == 30:
            records.append((duplicate, "duplicate"))
    assert next(bad_iter, None) is None
    puts = put(env, [(d, "pk") for d, _ in records])

    worker = workers(env, worker_id="checker")
    assert worker.wait() == 0, worker.tail()

    expected_dead = {p.seq: (reason, p.data) for p, (_, reason) in zip(puts, records)
                     if reason not in (None, "duplicate")}
    dead = read_dataset(env, "dead_letter")
    got_dead = {seq: (reason, data) for seq, reason, data in zip(
        dead.column("sequence_number").to_pylist(), dead.column("reason").to_pylist(),
        dead.column("data").to_pylist())}
    assert dead.num_rows == len(got_dead) == len(bad)
    assert got_dead == expected_dead
    for detail, reason in zip(dead.column("detail").to_pylist(), dead.column("reason").to_pylist()):
        assert detail, f"{reason} without a detail"

    raw = assert_exactly_once(env, {e["event_id"] for e in good})
    expected_raw = {p.seq for p, (_, reason) in zip(puts, records) if reason is None}
    assert set(raw.column("sequence_number").to_pylist()) == expected_raw
    stats = worker.stats()
    assert stats["rows_out"] == len(good) and stats["duplicates"] == 1
    assert stats["dead_lettered"] == dict(Counter(reason for _, reason in bad))


# ---------------------------------------------------------------------------------------------------
# 4. Redis online features


def expected_popularity(raw: pa.Table, now: datetime, hours: int = 24,
                        half_life: float = 6.0) -> dict[str, float]:
    now_bucket = int(now.timestamp()) // 3600
    totals: dict[str, float] = defaultdict(float)
    for item, etype, received in zip(raw.column("item_id").to_pylist(), raw.column("event_type").to_pylist(),
                                     raw.column("received_at").to_pylist()):
        age = now_bucket - int(received.timestamp()) // 3600
        if 0 <= age < hours:
            totals[item] += EVENT_WEIGHTS[etype] * 0.5 ** (age / half_life)
    return dict(totals)


def test_online_features_after_a_replayed_batch(make_env: Callable[..., Env], workers: Any) -> None:
    env = make_env(2, user_recent_n=5, **SHORT_LEASE)
    events = make_events(400, users=20, items=17)  # 17 distinct items per user
    put_events(env, events)

    # Dies after Redis was updated but before the checkpoint: the successor replays the same batch.
    crashed = workers(env, "--crash-after", "after_redis", worker_id="crasher")
    assert crashed.wait() == -signal.SIGKILL, crashed.tail()
    survivor = workers(env, worker_id="survivor")
    assert survivor.wait() == 0, survivor.tail()
    raw = assert_exactly_once(env, {e["event_id"] for e in events})

    r = env.redis()
    latest: dict[str, dict[str, int]] = defaultdict(dict)
    for e in events:
        ts = int(datetime.fromisoformat(e["ts"]).timestamp() * 1000)
        seen = latest[e["user_id"]]
        seen[e["item_id"]] = max(ts, seen.get(e["item_id"], -1))
    for user, items in latest.items():
        want = sorted(items.items(), key=lambda kv: kv[1], reverse=True)[:5]
        assert read_recent(r, REGION, user, n=5) == want, user
        assert read_recent(r, REGION, user, n=2) == want[:2]
        assert len(items) > 5 and r.zcard(f"ur:{REGION}:{user}") == 5  # trimmed to user_recent_n

    now = datetime.now(UTC)
    popular = read_popular(r, REGION, now, k=100)
    expected = expected_popularity(raw, now)
    assert dict(popular) == pytest.approx(expected), "popularity must count each event once"
    scores = [s for _, s in popular]
    assert scores == sorted(scores, reverse=True)
    assert [i for i, _ in read_popular(r, REGION, now, k=3)] == [i for i, _ in popular[:3]]


def test_applying_the_same_batch_twice_does_not_double_popularity(
        make_env: Callable[..., Env]) -> None:
    from ingest.buffer import ShardBuffer
    from ingest.dedup import DedupWindow
    from ingest.sinks import RedisFeatureSink
    from ingest.transform import TransformConfig, Transformer

    env = make_env(1)
    r = env.redis()
    now = datetime.now(UTC)
    received_ms = int(now.timestamp() * 1000)
    buf = ShardBuffer("shardId-000000000000", Transformer(TransformConfig(REGION), DedupWindow(100)),
                      1000, 1 << 20, 60_000)
    evs = [event("u1", "a", now - timedelta(seconds=3), "purchase"),
           event("u1", "b", now - timedelta(seconds=2)),
           event("u2", "a", now - timedelta(seconds=1), "click")]
    buf.extend([(canonical_json(e), str(100 + i), "pk", received_ms) for i, e in enumerate(evs)], 0)
    batch = buf.drain()
    sink = RedisFeatureSink(r, REGION, recent_n=10, recent_ttl_s=3600, popularity_ttl_s=7200)
    assert sink.write(batch) == 2
    first = read_popular(r, REGION, now)
    sink.write(batch)
    assert read_popular(r, REGION, now) == first == [("a", 10.0), ("b", 1.0)]
    assert [i for i, _ in read_recent(r, REGION, "u1")] == ["b", "a"]


# ---------------------------------------------------------------------------------------------------
# 5. graceful SIGTERM


def test_sigterm_flushes_checkpoints_and_releases(make_env: Callable[..., Env], workers: Any) -> None:
    # Count-triggered first batch; the second part stays buffered (age limit far away) until SIGTERM.
    env = make_env(1, batch_max_records=50, batch_max_seconds=3600)
    first = put_events(env, make_events(50))
    port = free_port()
    worker = workers(env, "--metrics-port", str(port), worker_id="graceful", until_drained=False)
    shard = first[0].shard_id
    wait_until(lambda: checkpoints(env).get(shard) == first[-1].seq or worker.proc.poll() is not None,
               30, "the first batch to be checkpointed")
    assert worker.proc.poll() is None, worker.tail()

    more_events = make_events(10)
    more = put_events(env, more_events)
    wait_until(lambda: metric(port, "streamrec_ingest_records_in_total") == 60, 20,
               "the worker to have read all 60 records")
    (lease,) = env.leases().scan()
    assert lease.checkpoint == first[-1].seq and lease.owner == "graceful"  # the last 10 are only buffered

    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.tail()
    (lease,) = env.leases().scan()
    assert lease.checkpoint == more[-1].seq
    assert lease.owner is None and lease.pending is None
    assert read_dataset(env, "raw").num_rows == 60
    stats = worker.stats()
    assert stats["records_in"] == 60 and stats["rows_out"] == 60 and stats["batches"] == 2


def test_redis_down_does_not_stop_the_lake(
    make_env: Callable[..., Env], workers: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Redis goes away mid-run: after ingest.redis_retry_seconds of retries each batch is written to the
    lake and checkpointed without its online features (counted), instead of the worker dying and the lake
    stalling until Redis is back. The features written before the outage stay."""
    launcher = RedisLauncher()
    own_redis = launcher.start(tmp_path_factory.mktemp("outage-redis"))
    try:
        env = make_env(1, batch_max_records=50, batch_max_seconds=3600, redis_retry_seconds=0.3)
        document = yaml.safe_load(env.config.read_text())
        document["regions"][REGION]["redis_url"] = own_redis.url
        config = tmp_path_factory.mktemp("outage-config") / "streamrec.yaml"
        config.write_text(yaml.safe_dump(document, sort_keys=False))
        first_events = make_events(50, users=5)
        first = put_events(env, first_events)
        shard = first[0].shard_id
        worker = workers(env, worker_id="outage", until_drained=False, config=config)
        wait_until(lambda: checkpoints(env).get(shard) == first[-1].seq or worker.proc.poll() is not None,
                   30, "the first batch to be checkpointed")
        assert worker.proc.poll() is None, worker.tail()
        user = first_events[-1]["user_id"]
        with redis.Redis.from_url(own_redis.url) as client:
            assert read_recent(client, REGION, user, n=1), "features were written while Redis was up"

        launcher.stop(own_redis)
        second = put_events(env, make_events(100, users=5))
        wait_until(lambda: checkpoints(env).get(shard) == second[-1].seq or worker.proc.poll() is not None,
                   30, "the batches after the outage to be checkpointed")
        assert worker.proc.poll() is None, worker.tail()
        assert read_dataset(env, "raw").num_rows == 150
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.tail()
        stats = worker.stats()
        assert stats["rows_out"] == 150, stats
        # Every batch after the first went on without its features (one GetRecords may bring all 100).
        assert stats["feature_batches_skipped"] == stats["batches"] - 1 >= 1, stats
        assert "batch written without its online features" in worker.tail(200)
    finally:
        launcher.stop(own_redis)
        launcher.purge(own_redis)


# ---------------------------------------------------------------------------------------------------
# 6. parents before children


def test_child_shard_waits_for_its_parent_to_reach_shard_end(
        make_env: Callable[..., Env], workers: Any) -> None:
    env = make_env(1, lease_duration_seconds=1, lease_renew_seconds=0.25)
    (shard,) = [s["ShardId"] for s in env.kinesis().list_shards(StreamName=env.stream)["Shards"]]
    puts = put_events(env, make_events(30))
    table = env.leases()
    # The stream's one shard is the child of a parent (long gone from the stream) still owned by a live
    # worker, "ghost", which keeps renewing it.
    parent_id = "shardId-parent000000"
    assert table.create_if_missing(parent_id, ())
    assert table.create_if_missing(shard, (parent_id,))
    (parent,) = [l for l in table.scan() if l.shard_id == parent_id]
    ghost = table.take(parent, "ghost")
    assert ghost is not None
    stop = threading.Event()
    ghost_state = {"lease": ghost}

    def renew() -> None:
        while not stop.wait(0.2):
            renewed = table.renew(ghost_state["lease"], "ghost")
            assert renewed is not None
            ghost_state["lease"] = renewed

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        port = free_port()
        worker = workers(env, "--metrics-port", str(port), worker_id="child-reader", until_drained=False)
        # The leases-held gauge appears after the worker's first lease scan.
        wait_until(lambda: metric(port, "streamrec_ingest_leases_held") is not None, 20, "a first lease scan")
        # Observe several lease durations: the child stays untaken while its parent is open.
        window_end = time.monotonic() + 1.75
        while time.monotonic() < window_end:
            leases = lease_map(env)
            assert leases[shard].owner is None and leases[shard].checkpoint == TRIM_HORIZON
            assert leases[parent_id].owner == "ghost"
            time.sleep(0.1)
        assert metric(port, "streamrec_ingest_records_in_total") in (None, 0.0)
        assert raw_files(env) == []
    finally:
        stop.set()
        renewer.join()

    # The parent is finished: its owner checkpoints SHARD_END and lets go.
    ended = table.checkpoint(ghost_state["lease"], "ghost", SHARD_END)
    assert ended is not None and table.release(ended, "ghost") is not None
    wait_until(lambda: checkpoints(env).get(shard) == puts[-1].seq or worker.proc.poll() is not None, 20,
               "the child to be read and checkpointed")
    assert lease_map(env)[shard].owner == "child-reader"
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.tail()
    assert read_dataset(env, "raw").num_rows == 30
    assert lease_map(env)[parent_id].checkpoint == SHARD_END


# ---------------------------------------------------------------------------------------------------
# lease lost, then regained: the worker's dedup window must not swallow the re-read records


def test_records_reread_after_a_lost_lease_are_not_dropped_as_duplicates(
        make_env: Callable[..., Env]) -> None:
    """BUG: the worker-wide dedup window remembers event ids when they are buffered, not when they are
    written. Worker A buffers records, loses the lease to B (which dies before flushing), takes the
    expired lease back and re-reads from the checkpoint: every re-read record is dropped as a
    "duplicate", the checkpoint moves past them, and they never reach the lake."""
    from ingest.worker import build_worker

    env = make_env(1, batch_max_seconds=3600)
    events = make_events(20)
    puts = put_events(env, events)
    clock = FakeClock()
    worker = build_worker(env.settings, REGION, worker_id="A", clock=clock)
    worker.sync_shards()
    worker.scan_leases()
    (shard,) = worker.shards
    worker.poll_shards()
    assert len(worker.shards[shard].buffer) == 20  # buffered, not yet flushed

    # Worker B takes the lease over (a conditional write on the counter, as its scan would) ...
    (lease,) = env.leases().scan()
    assert env.leases().take(lease, "B") is not None
    clock.advance(0.5)
    worker.scan_leases()
    assert shard not in worker.shards  # A noticed and dropped its buffer
    # ... and dies before flushing. Its lease expires (counter unchanged for the lease duration).
    clock.advance(2.5)
    worker.scan_leases()
    assert shard in worker.shards, "A should take the expired lease back"
    worker.poll_shards()
    worker.shutdown()  # graceful: flush, checkpoint, release

    (final,) = env.leases().scan()
    assert final.checkpoint == puts[-1].seq
    assert_exactly_once(env, {e["event_id"] for e in events})
