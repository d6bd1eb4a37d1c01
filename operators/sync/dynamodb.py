"""Sync to DynamoDB: the scored recs and the ETL's key data points into a region's online store, and the
region's promoted-version pointer. The item layouts and the pure arithmetic are in
:mod:`operators.sync.items`; this module is the I/O (lake reads, BatchWriteItem, checkpoints).

How a sync runs (:func:`sync_recs`, :func:`sync_keys`):

1. Only a complete input is loaded: scoring's ``_run_summary.json`` (the files it lists, and every one
   of its ``users``) or the ETL's ``keys`` summary with status ``succeeded`` (every table it counts).
2. Files are read ``sync.read_batch_rows`` rows at a time, turned into items, cut into batches of 25
   and written by ``sync.dynamodb_workers`` threads with BatchWriteItem, all of them drawing from one
   token bucket of ``sync.dynamodb_items_per_s``. At most two batches per worker are in flight.
3. Items a call returns as ``UnprocessedItems``, and whole batches refused with a throttling error, are
   sent again after a jittered exponential backoff (``sync.backoff_base_s`` .. ``backoff_max_s``). A
   batch that makes no progress for ``sync.max_stalled_rounds`` rounds in a row fails the sync
   (:class:`SyncStalledError`): nothing is dropped; the stage is retried later and resumes.
4. When every batch of a file is acknowledged, the file's checkpoint is written to the lake
   (:mod:`operators.sync.checkpoint`); a rerun skips checkpointed files and writes nothing for them.
5. For recs, once every file is in, the version's sync marker goes into the features table;
   :func:`publish_pointer` moves the region's pointer only to a version whose marker names the same
   number of items, in one transaction with a compare-and-swap on the pointer's revision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError
from prometheus_client import Counter

from operators.sync.checkpoint import Checkpoint, CheckpointStore, keys_folder, recs_folder
from operators.sync.items import (
    FEATURES_KEY,
    MAX_BATCH_ITEMS,
    RECS_COLUMNS,
    RECS_KEY,
    Item,
    ItemError,
    batches,
    key_items,
    marker_item,
    marker_key,
    put_requests,
    recs_items,
    unprocessed_puts,
)
from streamrec.aws import client
from streamrec.lake import LakeLayout, filesystem
from streamrec.online_store import PointerInfo, parse_pointer_item, pointer_item, pointer_key
from streamrec.pacing import TokenBucket, backoff_delay
from streamrec.settings import Settings, SyncSettings

logger = logging.getLogger(__name__)

# Error codes after which the same request may simply be sent again later (botocore has already
# retried them max_attempts times with its adaptive rate limiting when they reach us).
RETRYABLE_CODES = frozenset({
    "ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded",
    "InternalServerError", "ServiceUnavailable",
})
KEYS_SUMMARY = "_run_summary.json"  # spark_etl.summary.SUMMARY_NAME (not imported: no Spark here)

ITEMS = Counter("streamrec_sync_dynamodb_items_total", "Items the DynamoDB sync wrote or skipped (checkpointed)",
                ["region", "target", "outcome"])
BACKOFF = Counter("streamrec_sync_dynamodb_backoff_seconds_total",
                  "Seconds writer threads slept in backoff after UnprocessedItems or throttling", ["region", "target"])
RETRIES = Counter("streamrec_sync_dynamodb_retries_total",
                  "BatchWriteItem batches sent again (unprocessed items or a throttling error)", ["region", "target"])


class SyncError(RuntimeError):
    """The sync cannot run or did not finish; one line for an operator. Rerunning resumes it."""


class SyncInputError(SyncError):
    """The input is missing or incomplete (its producing stage has not finished)."""


class SyncStalledError(SyncError):
    """DynamoDB kept refusing a batch (throttling) beyond ``sync.max_stalled_rounds``."""


class PointerRefusedError(SyncError):
    """The pointer was not moved: the version is not completely synced, or another writer moved it."""


class _Aborted(Exception):
    """A writer thread stopped because another one failed."""


# --------------------------------------------------------------------------- report


@dataclass
class SyncReport:
    """What one sync did. ``items_written + items_skipped`` is every item of the input when it returns.

    ``backoff_seconds`` and ``rate_wait_seconds`` are summed over the writer threads; their shares are
    of ``seconds * workers`` (the writer threads' time)."""

    target: str  # "recs" or "keys"
    region: str
    dt: str
    table: str
    model_version: str | None = None
    expected_items: int = 0
    items_written: int = 0
    items_skipped: int = 0
    files: int = 0
    files_skipped: int = 0
    calls: int = 0
    throttled_retries: int = 0
    throttle_errors: int = 0
    unprocessed_items: int = 0
    seconds: float = 0.0
    backoff_seconds: float = 0.0
    rate_wait_seconds: float = 0.0
    workers: int = 1
    items_per_s_limit: float = 0.0
    max_items_per_call: int = 0

    @property
    def items_per_s(self) -> float:
        return self.items_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def backoff_share(self) -> float:
        return self.backoff_seconds / (self.seconds * self.workers) if self.seconds > 0 else 0.0

    @property
    def rate_wait_share(self) -> float:
        return self.rate_wait_seconds / (self.seconds * self.workers) if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the stage result and the benchmark read it)."""
        out = asdict(self)
        out.update(seconds=round(self.seconds, 3), backoff_seconds=round(self.backoff_seconds, 3),
                   rate_wait_seconds=round(self.rate_wait_seconds, 3), items_per_s=round(self.items_per_s, 1),
                   backoff_share=round(self.backoff_share, 4), rate_wait_share=round(self.rate_wait_share, 4))
        return out


# --------------------------------------------------------------------------- the writer


@dataclass
class _Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    written: int = 0
    calls: int = 0
    retries: int = 0
    throttle_errors: int = 0
    unprocessed: int = 0
    backoff_s: float = 0.0
    rate_wait_s: float = 0.0
    max_items_per_call: int = 0


class BatchWriter:
    """Writes lists of at most 25 items to one table with BatchWriteItem until every item is
    acknowledged; thread-safe (one boto3 client is shared: clients are, resources are not)."""

    def __init__(self, dynamodb: Any, table: str, sync: SyncSettings, *, limiter: TokenBucket,
                 abort: threading.Event | None = None, rng: random.Random | None = None) -> None:
        self.dynamodb = dynamodb
        self.table = table
        self.sync = sync
        self.limiter = limiter
        self.abort = abort or threading.Event()
        self.stats = _Stats()
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()

    def _rand(self) -> float:
        with self._rng_lock:
            return self._rng.random()

    def _pause(self, seconds: float) -> None:
        if seconds > 0 and self.abort.wait(seconds):
            raise _Aborted()

    def write(self, items: Sequence[Item]) -> int:
        """Write ``items`` (at most 25); returns how many were written. Raises :class:`SyncStalledError`
        when DynamoDB refuses them ``sync.max_stalled_rounds`` rounds in a row, :class:`SyncError` on an
        error that retrying cannot fix."""
        remaining = list(items)
        requests = put_requests(remaining)  # refuses more than 25
        attempt = stalled = 0
        while remaining:
            if self.abort.is_set():
                raise _Aborted()
            wait = self.limiter.reserve(len(remaining))
            self._pause(wait)
            throttled = False
            try:
                response = self.dynamodb.batch_write_item(RequestItems={self.table: requests})
                left = unprocessed_puts(response, self.table)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code not in RETRYABLE_CODES:
                    raise SyncError(f"BatchWriteItem on {self.table} failed: {code}: "
                                    f"{exc.response.get('Error', {}).get('Message', exc)}") from None
                left, throttled = remaining, True
            except BotoCoreError as exc:
                raise SyncError(f"BatchWriteItem on {self.table} failed: {exc}") from None
            done = len(remaining) - len(left)
            with self.stats.lock:
                self.stats.calls += 1
                self.stats.written += done
                self.stats.rate_wait_s += wait
                self.stats.max_items_per_call = max(self.stats.max_items_per_call, len(remaining))
                if throttled:
                    self.stats.throttle_errors += 1
                elif left:
                    self.stats.unprocessed += len(left)
            if not left:
                return len(items)
            stalled = stalled + 1 if done == 0 else 0
            if stalled >= self.sync.max_stalled_rounds:
                raise SyncStalledError(
                    f"DynamoDB refused {len(left)} items for {self.table} {stalled} rounds in a row "
                    f"(the table is throttled: its capacity is below sync.dynamodb_items_per_s="
                    f"{self.sync.dynamodb_items_per_s:g} or others write to it too); nothing was lost: "
                    "rerun the stage later (raise the capacity or lower the rate), the checkpoints resume it")
            delay = backoff_delay(attempt, self.sync.backoff_base_s, self.sync.backoff_max_s, self._rand())
            attempt += 1
            with self.stats.lock:
                self.stats.retries += 1
                self.stats.backoff_s += delay
            self._pause(delay)
            remaining = left
            requests = put_requests(remaining)
        return len(items)


# --------------------------------------------------------------------------- files → batches → checkpoints


@dataclass(frozen=True)
class FileJob:
    """One input file: its name relative to the dataset folder (the checkpoint's name), where it is,
    its size and rows, and how its rows become items."""

    name: str
    path: str
    size: int
    rows: int
    build: Callable[[pa.RecordBatch], list[Item]]
    columns: tuple[str, ...] | None = None


def _read_batches(fs: pafs.FileSystem, job: FileJob, rows_per_read: int) -> Iterator[pa.RecordBatch]:
    with fs.open_input_file(job.path) as source:
        reader = pq.ParquetFile(source)
        yield from reader.iter_batches(batch_size=rows_per_read,
                                       columns=list(job.columns) if job.columns else None)


@dataclass
class _Outcome:
    written_files: int = 0
    skipped_files: int = 0
    skipped_items: int = 0
    file_items: int = 0


class ParallelWriter:
    """Runs :meth:`BatchWriter.write` on ``workers`` threads with at most two batches per worker in
    flight (so memory stays bounded however large the input); the first failure stops the others
    (their backoff sleeps wake up) and is what :meth:`fail` returns."""

    def __init__(self, writer: BatchWriter, workers: int) -> None:
        self.writer = writer
        self._slots = threading.BoundedSemaphore(workers * 2)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sync-dynamodb")
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def submit(self, batch: list[Item]) -> Future[int]:
        abort = self.writer.abort
        while not self._slots.acquire(timeout=0.2):
            if abort.is_set():
                raise _Aborted()
        if abort.is_set():
            self._slots.release()
            raise _Aborted()
        fut = self._pool.submit(self.writer.write, batch)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: Future[int]) -> None:
        self._slots.release()
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            with self._lock:
                if self._error is None and not isinstance(exc, _Aborted):
                    self._error = exc
            self.writer.abort.set()

    def close(self) -> None:
        """Wait for every batch; raise the first failure."""
        self._pool.shutdown(wait=True)
        if self._error is not None:
            raise self._error

    def fail(self, raised: BaseException) -> BaseException:
        """Stop everything after ``raised``; the error to report (a writer's, not the _Aborted of the
        threads it stopped)."""
        self.writer.abort.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(raised, _Aborted):
            return self._error or SyncError("the sync was stopped")
        return raised


def write_items(dynamodb: Any, table: str, items: Iterable[Item], sync: SyncSettings, *,
                key: Sequence[str] = FEATURES_KEY) -> SyncReport:
    """Write ``items`` to ``table`` the way the sync does (batches of 25, ``sync.dynamodb_workers``
    threads, the rate limit and the backoff), without inputs or checkpoints (the benchmark's writer)."""
    started = time.perf_counter()
    writer = _make_writer(dynamodb, table, sync)
    parallel = ParallelWriter(writer, sync.dynamodb_workers)
    try:
        for batch in batches(items, key):
            parallel.submit(batch)
        parallel.close()
    except BaseException as exc:
        raise parallel.fail(exc) from None
    report = SyncReport("items", "", "", table, workers=sync.dynamodb_workers,
                        items_per_s_limit=sync.dynamodb_items_per_s)
    return _fill_report(report, _Outcome(), writer, started)


def _run_files(fs: pafs.FileSystem, jobs: Sequence[FileJob], store: CheckpointStore, writer: BatchWriter, *,
               key: Sequence[str], input_id: str, workers: int, rows_per_read: int) -> _Outcome:
    """Write every job's items (skipping checkpointed files); a file's checkpoint is saved as soon as
    all of its batches are acknowledged. On any failure the other writers stop and the first error
    is raised; files that completed keep their checkpoints."""
    outcome = _Outcome()
    pending: list[tuple[FileJob, list[Future[int]], int]] = []

    def checkpoint_finished(block: bool) -> None:
        for entry in list(pending):
            job, futures, items = entry
            if not block and not all(f.done() for f in futures):
                continue
            for f in futures:
                f.result()  # raises the writer's error
            store.save(Checkpoint(job.name, job.size, job.rows, items, input_id, writer.table,
                                  datetime.now(UTC).isoformat(timespec="seconds")))
            outcome.written_files += 1
            pending.remove(entry)

    parallel = ParallelWriter(writer, workers)
    try:
        for job in jobs:
            done = store.load(job.name)
            if done is not None and done.matches(size=job.size, rows=job.rows, input_id=input_id,
                                                 table=writer.table):
                outcome.skipped_files += 1
                outcome.skipped_items += done.items
                continue
            futures: list[Future[int]] = []
            items = 0
            for record_batch in _read_batches(fs, job, rows_per_read):
                try:
                    built = job.build(record_batch)
                    for batch in batches(built, key):
                        futures.append(parallel.submit(batch))
                        items += len(batch)
                except ItemError as exc:
                    raise SyncInputError(f"{job.path}: {exc}") from None
            pending.append((job, futures, items))
            outcome.file_items += items
            checkpoint_finished(block=False)
        checkpoint_finished(block=True)
        parallel.close()
    except BaseException as exc:
        error = parallel.fail(exc)
        if isinstance(error, (OSError, pa.ArrowException)) and not isinstance(error, SyncError):
            raise SyncError(f"reading the input or writing a checkpoint failed (the sync resumes when rerun): "
                            f"{type(error).__name__}: {error}") from error
        raise error from None
    return outcome


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Context:
    settings: Settings
    region: str
    layout: LakeLayout
    fs: pafs.FileSystem
    dynamodb: Any


def sync_client(settings: Settings, region: str) -> Any:
    """The DynamoDB client the sync uses: a connection per writer thread, and no client-side parameter
    validation (botocore walks every nested attribute value of every item before sending, which
    doubled the client's CPU per item in the benchmark; the items come from our own codecs and
    DynamoDB validates them anyway)."""
    return client("dynamodb", region, settings.aws, max_pool_connections=settings.sync.dynamodb_workers + 4,
                  parameter_validation=False)


def _context(settings: Settings, region: str, dynamodb: Any | None) -> _Context:
    region_settings = settings.region(region)
    aws = settings.aws
    fs = filesystem(region_settings.lake_uri, endpoint_url=aws.endpoint_url, region=region,
                    access_key=aws.access_key_id, secret_key=aws.secret_access_key)
    return _Context(settings, region, LakeLayout(region_settings.lake_uri), fs,
                    dynamodb if dynamodb is not None else sync_client(settings, region))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _file_job(fs: pafs.FileSystem, folder: str, name: str, build: Callable[[pa.RecordBatch], list[Item]], *,
              columns: tuple[str, ...] | None = None, rows: int | None = None) -> FileJob:
    path = posixpath.join(folder, name)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise SyncInputError(f"input file {path} is missing (its producing stage did not finish: rerun it)")
    try:
        with fs.open_input_file(path) as source:
            actual = pq.ParquetFile(source).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise SyncInputError(f"input file {path} is not readable Parquet: {exc}") from None
    if rows is not None and actual != rows:
        raise SyncInputError(f"{path} holds {actual} rows but its run summary says {rows}: the output "
                             "changed after it was completed; rerun the producing stage")
    return FileJob(name, path, int(info.size), actual, build, columns)


def _parquet_names(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Data files under ``folder`` (relative names; hidden ``_``/``.`` files and folders skipped)."""
    selector = pafs.FileSelector(folder, allow_not_found=True, recursive=True)
    names = []
    for info in fs.get_file_info(selector):
        rel = posixpath.relpath(info.path, folder)
        if info.type == pafs.FileType.File and rel.endswith(".parquet") and \
                not any(part.startswith(("_", ".")) for part in rel.split("/")):
            names.append(rel)
    return sorted(names)


def _make_writer(dynamodb: Any, table: str, sync: SyncSettings) -> BatchWriter:
    rate = sync.dynamodb_items_per_s
    limiter = TokenBucket(rate, max(MAX_BATCH_ITEMS, rate * sync.dynamodb_burst_s))
    return BatchWriter(dynamodb, table, sync, limiter=limiter)


def _fill_report(report: SyncReport, outcome: _Outcome, writer: BatchWriter, started: float) -> SyncReport:
    stats = writer.stats
    report.items_written = stats.written
    report.items_skipped = outcome.skipped_items
    report.files_skipped = outcome.skipped_files
    report.calls = stats.calls
    report.throttled_retries = stats.retries
    report.throttle_errors = stats.throttle_errors
    report.unprocessed_items = stats.unprocessed
    report.backoff_seconds = stats.backoff_s
    report.rate_wait_seconds = stats.rate_wait_s
    report.max_items_per_call = stats.max_items_per_call
    report.seconds = time.perf_counter() - started
    return report


def _finish_report(report: SyncReport, outcome: _Outcome, writer: BatchWriter, started: float) -> SyncReport:
    _fill_report(report, outcome, writer, started)
    labels = {"region": report.region, "target": report.target}
    ITEMS.labels(outcome="written", **labels).inc(report.items_written)
    ITEMS.labels(outcome="skipped", **labels).inc(report.items_skipped)
    BACKOFF.labels(**labels).inc(report.backoff_seconds)
    RETRIES.labels(**labels).inc(report.throttled_retries)
    logger.info("sync %s %s %s: %d items written, %d skipped (checkpointed), %d calls, %.1f s, %.1f%% in backoff",
                report.target, report.region, report.dt, report.items_written, report.items_skipped,
                report.calls, report.seconds, 100 * report.backoff_share, extra={"sync_report": report.to_json()})
    return report


def sync_recs(settings: Settings, region: str, day: date, version: str, *, dynamodb: Any | None = None) -> SyncReport:
    """Load scoring's recs of (``day``, ``version``) into the region's recs table, one item per user
    (key ``user_id`` + ``model_version``, TTL ``expires_at``), resuming from the per-file checkpoints;
    then record the version's sync marker. ``dynamodb`` is a client to use instead of a new one (tests
    and the benchmark hook its events)."""
    from ray_apps.score import output_folder, read_summary

    started = time.perf_counter()
    ctx = _context(settings, region, dynamodb)
    table = settings.region(region).tables.recs
    folder = output_folder(ctx.layout, region, day, version)
    summary = read_summary(ctx.fs, folder)
    if summary is None:
        raise SyncInputError(f"no complete scoring output for {version} in {region} on {day.isoformat()} "
                             f"({ctx.layout.to_uri(folder)} has no _run_summary.json): run the score stage first")
    if summary.model_version != version or summary.dt != day.isoformat():
        raise SyncInputError(f"{ctx.layout.to_uri(folder)}: its summary is for {summary.model_version} on "
                             f"{summary.dt}, not {version} on {day.isoformat()}")
    listed = sum(int(f["rows"]) for f in summary.files)
    if listed != summary.users:
        raise SyncInputError(f"{ctx.layout.to_uri(folder)}: the summary lists {listed} rows in its files "
                             f"for {summary.users} users")
    input_id = _digest(summary.to_json().encode())
    ttl_days = settings.sync.recs_ttl_days

    def build(batch: pa.RecordBatch) -> list[Item]:
        return recs_items(batch, ttl_days=ttl_days, model_version=version)

    jobs = [_file_job(ctx.fs, folder, str(f["path"]), build, columns=RECS_COLUMNS, rows=int(f["rows"]))
            for f in summary.files]
    store = CheckpointStore(ctx.fs, recs_folder(ctx.layout, region, day, version))
    writer = _make_writer(ctx.dynamodb, table, settings.sync)
    report = SyncReport("recs", region, day.isoformat(), table, version, expected_items=summary.users,
                        files=len(jobs), workers=settings.sync.dynamodb_workers,
                        items_per_s_limit=settings.sync.dynamodb_items_per_s)
    outcome = _run_files(ctx.fs, jobs, store, writer, key=RECS_KEY, input_id=input_id,
                         workers=settings.sync.dynamodb_workers, rows_per_read=settings.sync.read_batch_rows)
    total = outcome.skipped_items + outcome.file_items
    if total != summary.users:
        raise SyncError(f"synced {total} recs items for {summary.users} users of {version} on {day.isoformat()}")
    _put_marker(ctx, version, day, items=total, files=len(jobs), input_id=input_id)
    return _finish_report(report, outcome, writer, started)


def sync_keys(settings: Settings, region: str, day: date, *, dynamodb: Any | None = None) -> SyncReport:
    """Load the ETL's key data points of ``day`` (``keys/region=R/dt=D/<table>/``, one item per row)
    into the region's features table, resuming from the per-file checkpoints."""
    started = time.perf_counter()
    ctx = _context(settings, region, dynamodb)
    table = settings.region(region).tables.features
    folder = ctx.layout.partition("keys", region, day)
    try:
        with ctx.fs.open_input_stream(posixpath.join(folder, KEYS_SUMMARY)) as stream:
            raw = stream.read()
    except FileNotFoundError:
        raise SyncInputError(f"no complete keys export for {region} on {day.isoformat()} "
                             f"({ctx.layout.to_uri(folder)} has no {KEYS_SUMMARY}): run the ETL first") from None
    try:
        summary = json.loads(raw)
        status, outputs = summary.get("status"), {str(k): int(v) for k, v in summary.get("outputs", {}).items()}
    except (ValueError, AttributeError, TypeError):
        raise SyncInputError(f"{ctx.layout.to_uri(folder)}/{KEYS_SUMMARY} is not a run summary") from None
    if status != "succeeded" or not outputs:
        raise SyncInputError(f"the keys export for {region} on {day.isoformat()} did not succeed "
                             f"(status {status!r}): rerun the ETL")
    input_id = _digest(raw)
    jobs: list[FileJob] = []
    for name in sorted(outputs):
        sub = posixpath.join(folder, name)
        sub_jobs = [_file_job(ctx.fs, folder, posixpath.join(name, rel), key_items)
                    for rel in _parquet_names(ctx.fs, sub)]
        rows = sum(j.rows for j in sub_jobs)
        if rows != outputs[name]:
            raise SyncInputError(f"{ctx.layout.to_uri(sub)} holds {rows} rows but the ETL's summary says "
                                 f"{outputs[name]}: rerun the ETL")
        jobs.extend(sub_jobs)
    store = CheckpointStore(ctx.fs, keys_folder(ctx.layout, region, day))
    writer = _make_writer(ctx.dynamodb, table, settings.sync)
    report = SyncReport("keys", region, day.isoformat(), table, expected_items=sum(outputs.values()),
                        files=len(jobs), workers=settings.sync.dynamodb_workers,
                        items_per_s_limit=settings.sync.dynamodb_items_per_s)
    outcome = _run_files(ctx.fs, jobs, store, writer, key=FEATURES_KEY, input_id=input_id,
                         workers=settings.sync.dynamodb_workers, rows_per_read=settings.sync.read_batch_rows)
    return _finish_report(report, outcome, writer, started)


# --------------------------------------------------------------------------- the version marker and pointer


def _put_marker(ctx: _Context, version: str, day: date, *, items: int, files: int, input_id: str) -> None:
    """Record that (version, day) is completely in the recs table; nothing is written when the marker
    already says so (a rerun of a finished sync makes no writes at all)."""
    table = ctx.settings.region(ctx.region).tables.features
    try:
        current = ctx.dynamodb.get_item(TableName=table, Key=marker_key(version, day), ConsistentRead=True).get("Item")
        if current and current.get("items", {}).get("N") == str(items) and \
                current.get("input_id", {}).get("S") == input_id:
            return
        ctx.dynamodb.put_item(TableName=table, Item=marker_item(
            version, day, items=items, files=files, input_id=input_id, completed_at=datetime.now(UTC)))
    except (ClientError, BotoCoreError) as exc:
        raise SyncError(f"recording the sync of {version} on {day.isoformat()} in {table} failed: {exc}") from None


def read_pointer(settings: Settings, region: str, *, dynamodb: Any | None = None) -> PointerInfo | None:
    """The region's promoted version as the online store knows it (a strongly consistent read); None
    before the first promotion."""
    table = settings.region(region).tables.features
    ddb = dynamodb or client("dynamodb", region, settings.aws)
    try:
        item = ddb.get_item(TableName=table, Key=pointer_key(), ConsistentRead=True).get("Item")
        return None if item is None else parse_pointer_item(item)
    except (ClientError, BotoCoreError, ValueError) as exc:
        raise SyncError(f"reading the promoted-version pointer from {table} failed: {exc}") from None


def publish_pointer(settings: Settings, region: str, version: str, *, day: date, items: int,
                    dynamodb: Any | None = None) -> None:
    """Move the region's pointer to ``version`` (its recs of ``day``, ``items`` of them).

    One DynamoDB transaction: the version's sync marker must exist and count exactly ``items`` (so the
    pointer never names a version that is not completely in the table), and the pointer must still be
    at the revision read just before (so two promoters cannot interleave). Publishing the version the
    pointer already names, with the same day and count, is a no-op. Raises :class:`PointerRefusedError`
    and leaves the pointer where it was otherwise."""
    table = settings.region(region).tables.features
    ddb = dynamodb or client("dynamodb", region, settings.aws)
    current = read_pointer(settings, region, dynamodb=ddb)
    if current is not None and (current.model_version, current.dt, current.items) == (version, day, items):
        return
    if current is None:
        previous = None
    else:
        previous = current.model_version if current.model_version != version else current.previous_version
    new = PointerInfo(version, day, items, datetime.now(UTC), (current.revision if current else 0) + 1, previous)
    swap: dict[str, Any] = {"ConditionExpression": "attribute_not_exists(pk)"}
    if current is not None:
        swap = {"ConditionExpression": "#revision = :revision", "ExpressionAttributeNames": {"#revision": "revision"},
                "ExpressionAttributeValues": {":revision": {"N": str(current.revision)}}}
    try:
        ddb.transact_write_items(TransactItems=[
            {"ConditionCheck": {
                "TableName": table, "Key": marker_key(version, day),
                "ConditionExpression": "attribute_exists(pk) AND #items = :items",
                "ExpressionAttributeNames": {"#items": "items"},
                "ExpressionAttributeValues": {":items": {"N": str(items)}}}},
            {"Put": {"TableName": table, "Item": pointer_item(new), **swap}},
        ])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
            raise SyncError(f"moving the pointer of {region} to {version} failed: {exc}") from None
        reasons = [r.get("Code") for r in exc.response.get("CancellationReasons", [])]
        if reasons and reasons[0] == "ConditionalCheckFailed":
            raise PointerRefusedError(_incomplete(ddb, table, version, day, items)) from None
        raise PointerRefusedError(f"the pointer of {region} moved while {version} was being published "
                                  f"(reasons: {reasons}); read it again and retry") from None
    except BotoCoreError as exc:
        raise SyncError(f"moving the pointer of {region} to {version} failed: {exc}") from None
    logger.info("pointer of %s: %s (dt %s, %d items), was %s", region, version, day.isoformat(), items,
                current.model_version if current else None,
                extra={"pointer": {"model_version": version, "dt": day.isoformat(), "items": items,
                                   "revision": new.revision}})


def _incomplete(ddb: Any, table: str, version: str, day: date, items: int) -> str:
    marker = ddb.get_item(TableName=table, Key=marker_key(version, day), ConsistentRead=True).get("Item")
    if marker is None:
        return (f"{version} is not completely synced for {day.isoformat()} (no sync marker): run the sync "
                "stage to the end before promoting")
    return (f"{version} on {day.isoformat()} was synced with {marker['items']['N']} items, not {items}: "
            "the pointer stays where it was")


__all__ = ["BatchWriter", "ParallelWriter", "PointerInfo", "PointerRefusedError", "SyncError", "SyncInputError", "SyncReport",
           "SyncStalledError", "publish_pointer", "read_pointer", "sync_client", "sync_keys", "sync_recs", "write_items"]
