"""The consumer worker: one process, many shards, KCL-style leases.

Loop: sync shards into the lease table, scan leases (renew ours, take free/expired ones, steal towards a
fair share), poll each owned shard with GetRecords into its buffer, and flush buffers that are due.

A flush is the only place data becomes durable, in this order:

1. record the batch's sequence range on the lease (``pending``), conditional on still owning it;
2. write the raw and dead-letter files (deterministic names from shard + range, atomic appearance);
3. apply the Redis online features (idempotent for the range); when Redis stays unreachable for
   ``redis_retry_seconds`` the batch goes on without them (counted): the lake is the record, the
   features are derived, and Kinesis keeps records only for its retention;
4. checkpoint the last sequence number and clear ``pending``.

If the worker dies anywhere in 2-4, whoever takes the lease next re-reads exactly the pending range
first and rewrites the same files, so nothing is lost and nothing is duplicated. SIGTERM stops the
loop; every buffer is flushed and checkpointed and the leases are released before exit.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import signal
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from ingest import metrics
from ingest.buffer import FlushBatch, ShardBuffer
from ingest.dedup import DedupWindow
from ingest.lease_table import LeaseTable, LeaseTableMissing
from ingest.leases import SHARD_END, ExpiryTracker, Lease, eligible, plan_takes, read_start
from ingest.sinks import LakeSink, RedisFeatureSink
from ingest.transform import Transformer
from streamrec.pacing import backoff_delay

log = logging.getLogger("streamrec.ingest")

SHARD_SYNC_SECONDS = 30.0
MIN_POLL_INTERVAL_SECONDS = 0.2
_CREDENTIAL_ERRORS = {"UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException",
                      "AccessDeniedException"}
GC_GEN0_THRESHOLD = 20_000
# Fault injection for the crash tests: the worker SIGKILLs itself at this point of its first flush.
CRASH_POINTS = ("after_pending", "after_lake_write", "after_redis")


def tune_gc() -> None:
    """Collect garbage less often: a consumer allocates millions of short-lived, acyclic objects (bytes,
    str, tuples) per minute, and the default gen-0 threshold (700 allocations) spends a large share of
    the processing path scanning them. Objects alive at start-up are frozen out of collection. Measured
    by benchmarks/ingest.py, which applies the same setting."""
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 10, 10)


def default_worker_id() -> str:
    """Pod name (HOSTNAME) plus a random suffix: a restarted pod is a new worker, like the KCL's ids."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


@dataclass
class WorkerStats:
    records_in: int = 0
    rows_out: int = 0
    duplicates: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    files: int = 0
    users_updated: int = 0
    feature_batches_skipped: int = 0
    leases_taken: int = 0
    leases_lost: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"records_in": self.records_in, "rows_out": self.rows_out, "duplicates": self.duplicates,
                "dead_lettered": dict(self.dead_lettered), "batches": self.batches, "files": self.files,
                "users_updated": self.users_updated, "feature_batches_skipped": self.feature_batches_skipped,
                "leases_taken": self.leases_taken,
                "leases_lost": self.leases_lost}


@dataclass
class ShardState:
    """A shard this worker owns: its lease, read position and buffer."""

    lease: Lease
    buffer: ShardBuffer
    iterator: str | None = None
    # Where reading started (iterator type, sequence number), and the last record read since (not
    # necessarily durable yet): together, where to resume after an expired iterator.
    start: tuple[str, str | None] = ("TRIM_HORIZON", None)
    read_seq: str | None = None
    # While re-reading a pending batch after a takeover, flush exactly when this sequence number is read.
    replay_until: str | None = None
    caught_up: bool = False
    ended: bool = False
    next_poll: float = 0.0


class LeaseLost(Exception):
    pass


class StartupError(RuntimeError):
    """The worker cannot start: a missing stream or lease table, an unreachable AWS endpoint, rejected
    credentials, an unreachable Redis or an unusable lake root."""


class Worker:
    def __init__(
        self,
        *,
        region: str,
        stream_name: str,
        kinesis: Any,
        leases: LeaseTable,
        lake: LakeSink,
        features: RedisFeatureSink,
        transformer_factory: Callable[[], Transformer],
        worker_id: str | None = None,
        batch_max_records: int = 50_000,
        batch_max_bytes: int = 64 * 1024 * 1024,
        batch_max_seconds: float = 60.0,
        get_records_limit: int = 10_000,
        idle_poll_seconds: float = 1.0,
        lease_duration_seconds: float = 10.0,
        lease_renew_seconds: float = 3.0,
        until_drained: bool = False,
        crash_point: str | None = None,
        redis_retry_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if crash_point is not None and crash_point not in CRASH_POINTS:
            raise ValueError(f"crash_point must be one of {CRASH_POINTS}")
        self.region = region
        self.stream_name = stream_name
        self.kinesis = kinesis
        self.leases = leases
        self.lake = lake
        self.features = features
        self.transformer_factory = transformer_factory
        self.worker_id = worker_id or default_worker_id()
        self.batch_max_records = batch_max_records
        self.batch_max_bytes = batch_max_bytes
        self.batch_max_ms = batch_max_seconds * 1000
        self.get_records_limit = get_records_limit
        self.idle_poll_seconds = idle_poll_seconds
        self.lease_renew_seconds = lease_renew_seconds
        self.until_drained = until_drained
        self.crash_point = crash_point
        # Retrying Redis must end before our leases could lapse (the loop renews them between flushes).
        self.redis_retry_seconds = max(0.0, min(redis_retry_seconds,
                                                lease_duration_seconds - lease_renew_seconds))
        self.clock = clock
        self.expiry = ExpiryTracker(lease_duration_seconds)
        self.shards: dict[str, ShardState] = {}
        self.stats = WorkerStats()
        self.stopping = False
        self._rng = random.Random()
        self._table_view: list[Lease] = []
        # Drain mode decides on a lease scan taken after the last change of our own state.
        self._scanned_at = float("-inf")
        self._changed_at = clock()
        self._verdict: tuple[float, bool] = (float("-inf"), False)

    # -- lifecycle ---------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def _stop(signum: int, _frame: Any) -> None:
            log.info("signal received, draining", extra={"signal": signum})
            self.stopping = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)

    def preflight(self) -> None:
        """Fail at start-up, with a message naming the resource, when the stream, the lease table or the
        AWS endpoint is not there; errors after start-up are real failures and propagate."""
        try:
            self.leases.check_exists()
            self.kinesis.describe_stream_summary(StreamName=self.stream_name)
        except LeaseTableMissing as exc:
            raise StartupError(str(exc)) from None
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            if code == "ResourceNotFoundException":
                raise StartupError(f"Kinesis stream {self.stream_name!r} does not exist in {self.region}") from None
            if code in _CREDENTIAL_ERRORS:
                raise StartupError(f"AWS rejected the credentials: {exc}") from None
            raise
        except NoCredentialsError:
            raise StartupError("no AWS credentials found (Pod Identity/IRSA in a pod; aws settings locally)") from None
        except EndpointConnectionError as exc:
            raise StartupError(f"cannot reach AWS: {exc} (locally: is `streamrec dev up` running?)") from None
        try:
            self.features.ping()
        except Exception as exc:  # any client error means the URL is wrong or Redis is down
            raise StartupError(f"regions.{self.region}.redis_url: cannot reach Redis: {exc}") from None
        try:
            self.lake.check()
        except Exception as exc:
            raise StartupError(f"regions.{self.region}.lake_uri: lake root not usable: {exc}") from None

    def run(self) -> WorkerStats:
        self.preflight()
        tune_gc()
        log.info("worker starting", extra={"worker_id": self.worker_id, "stream": self.stream_name})
        next_sync = next_scan = 0.0
        try:
            while not self.stopping:
                now = self.clock()
                if now >= next_sync:
                    self.sync_shards()
                    next_sync = now + SHARD_SYNC_SECONDS
                quiet = self.until_drained and self._own_shards_quiet() and self._scanned_at <= self._changed_at
                if now >= next_scan or quiet:
                    self.scan_leases()
                    next_scan = now + self.lease_renew_seconds
                busy = self.poll_shards()
                if self.until_drained and self.drained():
                    log.info("stream drained", extra={"worker_id": self.worker_id})
                    break
                if not busy:
                    time.sleep(min(0.05, self.idle_poll_seconds))
        finally:
            self.shutdown()
        return self.stats

    def shutdown(self) -> None:
        """Flush and checkpoint every buffer, then release the leases (graceful SIGTERM path)."""
        failure: BaseException | None = None
        for shard_id in list(self.shards):
            state = self.shards[shard_id]
            try:
                # A half-replayed pending range is dropped, not flushed: the pending mark stays on the
                # lease and the next owner replays it whole.
                if len(state.buffer) and state.replay_until is None:
                    self.flush(state)
                released = self.leases.release(state.lease, self.worker_id)
                if released is None:
                    log.warning("lease already lost at shutdown", extra={"shard": shard_id})
            except LeaseLost:
                pass
            except Exception as exc:  # keep releasing the other leases; report the first failure
                log.exception("shutdown of a shard failed", extra={"shard": shard_id})
                failure = failure or exc
            self.shards.pop(shard_id, None)
        metrics.LEASES_HELD.labels(self.region).set(0)
        log.info("worker stopped", extra={"worker_id": self.worker_id, **self.stats.as_dict()})
        if failure is not None:
            raise failure

    # -- shards and leases -------------------------------------------------------------------------

    def sync_shards(self) -> None:
        """Create a lease for every shard the table does not know yet, with its parents."""
        shards, kwargs = [], {"StreamName": self.stream_name}
        while True:
            page = self.kinesis.list_shards(**kwargs)
            shards.extend(page["Shards"])
            if not page.get("NextToken"):
                break
            kwargs = {"NextToken": page["NextToken"]}
        for shard in shards:
            parents = tuple(p for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")) if p)
            self.leases.create_if_missing(shard["ShardId"], parents)

    def scan_leases(self) -> None:
        now = self.clock()
        table = self.leases.scan()
        self._table_view = table
        self._scanned_at = now
        expired = self.expiry.observe(table, now)
        by_id = {lease.shard_id: lease for lease in table}
        # Renew ours; a failed renewal means another worker took the lease.
        for shard_id, state in list(self.shards.items()):
            current = by_id.get(shard_id)
            renewed = self.leases.renew(state.lease, self.worker_id) if current and current.owner == self.worker_id else None
            if renewed is None:
                self.lose(shard_id, "renewal failed")
            else:
                state.lease = renewed
        if self.stopping:
            return
        plan = plan_takes(self.worker_id, table, expired, self._rng, held=set(self.shards))
        for shard_id in plan.take + ((plan.steal,) if plan.steal else ()):
            taken = self.leases.take(by_id[shard_id], self.worker_id)
            if taken is not None:
                self.adopt(taken, stolen_from=by_id[shard_id].owner)
        metrics.LEASES_HELD.labels(self.region).set(len(self.shards))

    def adopt(self, lease: Lease, stolen_from: str | None) -> None:
        self.stats.leases_taken += 1
        self._changed_at = self.clock()
        buffer = ShardBuffer(lease.shard_id, self.transformer_factory(), self.batch_max_records,
                             self.batch_max_bytes, self.batch_max_ms)
        state = ShardState(lease=lease, buffer=buffer)
        state.start = read_start(lease)
        if lease.pending is not None:
            # The previous owner may have written this batch's files without checkpointing: re-read
            # exactly that range first, so the same file names are written again.
            state.replay_until = lease.pending[1]
        state.iterator = self._iterator(lease.shard_id, *state.start)
        self.shards[lease.shard_id] = state
        log.info("lease taken", extra={"shard": lease.shard_id, "from": stolen_from,
                                       "checkpoint": lease.checkpoint, "pending": lease.pending})

    def lose(self, shard_id: str, why: str) -> None:
        """Forget a shard whose lease is gone; its unflushed records are re-read by the new owner."""
        if self.shards.pop(shard_id, None) is not None:
            self._changed_at = self.clock()
            self.stats.leases_lost += 1
            log.warning("lease lost", extra={"shard": shard_id, "why": why})

    def _iterator(self, shard_id: str, kind: str, seq: str | None = None) -> str:
        kwargs: dict[str, Any] = {"StreamName": self.stream_name, "ShardId": shard_id, "ShardIteratorType": kind}
        if seq is not None:
            kwargs["StartingSequenceNumber"] = seq
        return self.kinesis.get_shard_iterator(**kwargs)["ShardIterator"]

    # -- reading and flushing ----------------------------------------------------------------------

    def poll_shards(self) -> bool:
        busy = False
        for shard_id in list(self.shards):
            state = self.shards.get(shard_id)
            if state is None:
                continue
            now = self.clock()
            try:
                if now >= state.next_poll and not state.ended:
                    busy |= self.poll(state, now)
                # While re-reading a pending range, only reaching its last record may flush: any other
                # boundary would write a second file over the same records. At the end of a closed
                # shard, or at the tip in drain mode, there is nothing to wait for.
                at_end = len(state.buffer) and (state.ended or (self.until_drained and state.caught_up))
                if state.replay_until is None and (state.buffer.due(now * 1000) or at_end):
                    self.flush(state)
                if state.ended and not len(state.buffer):
                    self.finish(state)
            except LeaseLost:
                self.lose(shard_id, "conditional write failed")
        return busy

    def poll(self, state: ShardState, now: float) -> bool:
        try:
            out = self.kinesis.get_records(ShardIterator=state.iterator, Limit=self.get_records_limit)
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            if code == "ExpiredIteratorException":
                # Resume after the last record read, or where this lease started if none was read yet.
                kind, seq = ("AFTER_SEQUENCE_NUMBER", state.read_seq) if state.read_seq else state.start
                state.iterator = self._iterator(state.lease.shard_id, kind, seq)
                return True
            if code in ("ProvisionedThroughputExceededException", "KMSThrottlingException"):
                state.next_poll = now + self.idle_poll_seconds
                return False
            raise
        records = out.get("Records", [])
        behind = int(out.get("MillisBehindLatest", 0))
        metrics.MILLIS_BEHIND.labels(self.region, state.lease.shard_id).set(behind)
        state.iterator = out.get("NextShardIterator")
        now_ms = now * 1000
        batch = [(r["Data"], r["SequenceNumber"], r.get("PartitionKey", ""),
                  int(r["ApproximateArrivalTimestamp"].timestamp() * 1000)) for r in records]
        if batch:
            state.read_seq = batch[-1][1]
        if state.replay_until is not None:
            end = next((i for i, r in enumerate(batch) if r[1] == state.replay_until), None)
            if end is not None:
                # The pending range is complete: write it under exactly the name the previous owner used.
                state.buffer.extend(batch[:end + 1], now_ms)
                self.flush(state)
                state.replay_until = None
                batch = batch[end + 1:]
        state.buffer.extend(batch, now_ms)
        self.stats.records_in += len(records)
        metrics.RECORDS_IN.labels(self.region).inc(len(records))
        if state.iterator is None:
            state.ended = True  # a closed shard (after a split or merge) read to its end
        state.caught_up = not records and behind == 0
        # Kinesis allows 5 GetRecords per second per shard: never poll a shard faster than that.
        state.next_poll = now + (self.idle_poll_seconds if not records else MIN_POLL_INTERVAL_SECONDS)
        if records:
            self._changed_at = now
        return bool(records)

    def flush(self, state: ShardState) -> None:
        started = time.perf_counter()
        batch = state.buffer.drain()
        lease = state.lease
        if lease.pending != (batch.first_seq, batch.last_seq):
            lease = self._must(self.leases.set_pending(lease, self.worker_id, batch.first_seq, batch.last_seq))
            state.lease = lease
        self._maybe_crash("after_pending")
        self.stats.files += len(self.lake.write(batch))
        self._maybe_crash("after_lake_write")
        self.stats.users_updated += self._write_features(batch)
        self._maybe_crash("after_redis")
        state.lease = self._must(self.leases.checkpoint(lease, self.worker_id, batch.last_seq))
        self._account(batch)
        metrics.BATCH_LATENCY.labels(self.region).observe(time.perf_counter() - started)
        log.info("batch written", extra={"shard": batch.shard_id, "first_seq": batch.first_seq,
                                         "last_seq": batch.last_seq, "records": batch.records,
                                         "duplicates": batch.duplicates,
                                         "dead_lettered": sum(batch.dead_reasons.values())})

    def _write_features(self, batch: FlushBatch) -> int:
        """Apply the batch's Redis features, retrying with jittered backoff (they are idempotent for the
        range); after ``redis_retry_seconds`` of failures, go on without them and count the batch."""
        import redis

        deadline = time.monotonic() + self.redis_retry_seconds
        retry = 0
        while True:
            try:
                return self.features.write(batch)
            # Unreachable, timed out, a replica during a failover, or full: Redis is unavailable. Other
            # errors (a script bug) still end the worker.
            except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError,
                    redis.exceptions.OutOfMemoryError) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stats.feature_batches_skipped += 1
                    metrics.FEATURES_SKIPPED.labels(self.region).inc()
                    log.error("Redis unreachable: batch written without its online features",
                              extra={"shard": batch.shard_id, "first_seq": batch.first_seq,
                                     "last_seq": batch.last_seq, "error": str(exc)})
                    return 0
                time.sleep(min(left, backoff_delay(retry, 0.05, 1.0, self._rng.uniform(0.5, 1.0))))
                retry += 1

    def finish(self, state: ShardState) -> None:
        """A closed shard is fully processed: mark it SHARD_END so its children may start."""
        lease = self._must(self.leases.checkpoint(state.lease, self.worker_id, SHARD_END))
        self.leases.release(lease, self.worker_id)
        self.shards.pop(lease.shard_id, None)
        self._changed_at = self.clock()
        log.info("shard finished", extra={"shard": lease.shard_id})

    def _own_shards_quiet(self) -> bool:
        return all(s.caught_up and not len(s.buffer) and s.replay_until is None for s in self.shards.values())

    def drained(self) -> bool:
        """Drain mode: our shards are read to the tip and flushed, and a lease scan taken since then
        shows nothing left for anyone: every eligible lease is either ours or another worker's with no
        pending batch and no record after its checkpoint. Free leases, orphans in our name and the leases
        of a worker that died with unflushed records keep us running until we take them over."""
        if not self._own_shards_quiet() or self._scanned_at <= self._changed_at or not self._table_view:
            return False
        if self._verdict[0] != self._scanned_at:  # peek at other workers' shards once per scan
            self._verdict = (self._scanned_at, self._nothing_left())
        return self._verdict[1]

    def _nothing_left(self) -> bool:
        for lease in eligible(self._table_view):
            if lease.owner is None:
                return False
            if lease.owner == self.worker_id:
                if lease.shard_id not in self.shards:
                    return False
            elif lease.pending is not None or self._unread(lease):
                return False
        return True

    def _unread(self, lease: Lease) -> bool:
        """Whether another worker's shard has records after its checkpoint, or ended without SHARD_END.
        Liveness cannot tell this: a worker killed just after renewing looks alive for a lease duration."""
        out = self.kinesis.get_records(ShardIterator=self._iterator(lease.shard_id, *read_start(lease)), Limit=1)
        return bool(out.get("Records")) or int(out.get("MillisBehindLatest", 0)) > 0 or not out.get("NextShardIterator")

    def _account(self, batch: FlushBatch) -> None:
        rows = sum(t.num_rows for t in batch.raw.values())
        self.stats.batches += 1
        self.stats.rows_out += rows
        self.stats.duplicates += batch.duplicates
        self.stats.dead_lettered.update(batch.dead_reasons)
        metrics.RECORDS_OUT.labels(self.region).inc(rows)
        metrics.DUPLICATES.labels(self.region).inc(batch.duplicates)
        for reason, n in batch.dead_reasons.items():
            metrics.DEAD_LETTERED.labels(self.region, reason).inc(n)

    def _must(self, lease: Lease | None) -> Lease:
        if lease is None:
            raise LeaseLost()
        return lease

    def _maybe_crash(self, point: str) -> None:
        if self.crash_point == point:
            log.error("fault injection: killing this worker", extra={"point": point})
            os.kill(os.getpid(), signal.SIGKILL)


def build_worker(settings: Any, region: str, **overrides: Any) -> Worker:
    """Wire a worker from settings: the composition used by ``streamrec ingest run`` and the tests."""
    import redis

    from streamrec.aws import client
    from streamrec.lake import LakeLayout, filesystem
    from ingest.transform import TransformConfig

    rs = settings.region(region)
    ing = settings.ingest
    layout = LakeLayout(rs.lake_uri)
    fs = filesystem(rs.lake_uri, endpoint_url=settings.aws.endpoint_url, region=region,
                    access_key=settings.aws.access_key_id, secret_key=settings.aws.secret_access_key)
    config = TransformConfig(region=region, max_record_bytes=ing.max_record_bytes,
                             max_future_skew_ms=ing.max_future_skew_seconds * 1000,
                             pii_salt=ing.pii_salt.encode())
    params: dict[str, Any] = dict(
        batch_max_records=ing.batch_max_records, batch_max_bytes=ing.batch_max_bytes,
        batch_max_seconds=ing.batch_max_seconds, get_records_limit=ing.get_records_limit,
        idle_poll_seconds=ing.idle_poll_seconds, lease_duration_seconds=ing.lease_duration_seconds,
        lease_renew_seconds=ing.lease_renew_seconds, redis_retry_seconds=ing.redis_retry_seconds,
    )
    params.update(overrides)
    return Worker(
        region=region,
        stream_name=rs.stream_name,
        kinesis=client("kinesis", region, settings.aws),
        leases=LeaseTable(client("dynamodb", region, settings.aws), rs.tables.leases),
        lake=LakeSink(layout, fs, region),
        features=RedisFeatureSink(redis.Redis.from_url(rs.redis_url), region, recent_n=ing.user_recent_n,
                                  recent_ttl_s=ing.user_recent_ttl_seconds,
                                  popularity_ttl_s=ing.popularity_bucket_ttl_seconds),
        # A fresh window per taken lease: duplicates share a shard (partition key = user id), and a
        # window that outlived a lost lease would drop the records re-read after taking it back.
        transformer_factory=lambda: Transformer(config, DedupWindow(ing.dedup_window)),
        **params,
    )
