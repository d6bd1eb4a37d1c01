"""The end-to-end demo behind ``make demo``: the whole job on the embedded local stack.

1. The local stack (moto, redis-server, PostgreSQL) in its own state folder; each region gets its own
   stream, tables, lake, warehouse database and model registry (regions share nothing).
2. A clickstream for two regions onto their Kinesis streams; two consumer workers per region (real
   ``streamrec ingest run`` processes, as the pods run them) until the streams are drained; every
   produced record accounted for: raw lake rows + dead letters + duplicates dropped = records produced.
3. Per region, one PipelineRun executed in-process (operators/local.py, the same stages the controller
   runs in a cluster): the Spark ETL cleans every full day of the window and builds features and key
   data points for the last one (every raw row accounted for: clean rows + rows removed by reason = raw
   rows), Ray Train trains and the gate evaluates against popularity, Ray Data scores every user, the
   sync writes DynamoDB and the PostgreSQL warehouse, and promotion flips the region to the new model.
4. Ray Serve with one application per region, and three requests each: a known user, a cold user and a
   user who has just clicked (through Kinesis and the consumer), each answer saying its source."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Callable

import pyarrow.dataset as ds

from streamrec.lake import LakeLayout, filesystem

DEMO_REGIONS = ("us-east-1", "eu-west-1")
# The demo's PipelineRuns override the epochs (spec.overrides, as a user would): a few days of a small
# synthetic clickstream need more passes than the daily default to clear the gate's +10% over popularity.
DEMO_OVERRIDES = {"train": {"epochs": 4}}


class DemoError(RuntimeError):
    """A stage of the demo failed; the message says which and where its log is."""


@dataclass
class RegionReport:
    region: str
    produced: int = 0
    produced_by_kind: dict[str, int] = field(default_factory=dict)
    lake_rows: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    users_online: int = 0
    seconds: float = 0.0

    @property
    def accounted(self) -> int:
        return self.lake_rows + sum(self.dead_lettered.values()) + self.duplicates

    @property
    def balanced(self) -> bool:
        return self.accounted == self.produced


@dataclass
class EtlReport:
    region: str
    days: list[str] = field(default_factory=list)
    raw_rows: int = 0
    clean_rows: int = 0
    removed: Counter[str] = field(default_factory=Counter)
    features: dict[str, int] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def balanced(self) -> bool:
        return self.clean_rows + sum(self.removed.values()) == self.raw_rows


def count_rows(fs: Any, path: str) -> int:
    """Rows in a hive-partitioned Parquet dataset; 0 if nothing was written there."""
    info = fs.get_file_info(path)
    if info.type.name == "NotFound":
        return 0
    return ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive").count_rows()


def dead_letter_reasons(fs: Any, path: str) -> Counter[str]:
    info = fs.get_file_info(path)
    if info.type.name == "NotFound":
        return Counter()
    table = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table(columns=["reason"])
    return Counter(table.column("reason").to_pylist())


def count_online_users(redis_client: Any, region: str) -> int:
    from streamrec.online import user_recent_key

    return sum(1 for _ in redis_client.scan_iter(match=user_recent_key(region, "*"), count=1000))


def run_consumers(config_path: Path, region: str, workers: int, out_dir: Path) -> list[dict[str, Any]]:
    """Run ``workers`` consumer processes for one region until the stream is drained; their summaries."""
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for n in range(workers):
            summary = out_dir / f"{region}-worker-{n}.json"
            summary.unlink(missing_ok=True)
            log = (out_dir / f"{region}-worker-{n}.log").open("wb")
            cmd = [sys.executable, "-m", "streamrec", "ingest", "run", "--region", region, "--config",
                   str(config_path), "--until-drained", "--worker-id", f"demo-{region}-{n}",
                   "--summary-out", str(summary)]
            procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log), summary, log))
        results = []
        for proc, summary, log in procs:
            rc = proc.wait(timeout=900)
            if rc != 0:
                raise DemoError(f"consumer for {region} exited with {rc}; see {log.name}")
            results.append(json.loads(summary.read_text()))
        return results
    finally:
        # On any failure the other workers are stopped too (SIGTERM: they flush and release their leases).
        for proc, _, log in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()


def raw_rows_between(fs: Any, path: str, start: datetime, end: datetime) -> int:
    """Raw lake rows whose event time is in [start, end)."""
    import pyarrow as pa

    dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    ts = ds.field("ts")
    return dataset.count_rows(filter=(ts >= pa.scalar(start, pa.timestamp("ms", "UTC")))
                              & (ts < pa.scalar(end, pa.timestamp("ms", "UTC"))))


def etl_days(window_start: datetime, window_end: datetime) -> list[date]:
    """The event days the demo's ETL processes: every day of the window up to the last full one (the
    window ends now, so today is partial)."""
    first, last = window_start.date(), window_end.date() - timedelta(days=1)
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


@dataclass
class PipelineReport:
    """One region's PipelineRun, as the demo's summary table shows it."""

    region: str
    run_id: str
    stages: list[tuple[str, str, float, str]] = field(default_factory=list)  # stage, state, seconds, message
    users: int = 0
    items: int = 0
    version: str | None = None
    promoted: bool = False
    gate_reason: str = ""
    metric: str = ""
    model_metric: float | None = None
    popular_metric: float | None = None
    synced: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def recs_items(self) -> int:
        return self.synced.get("dynamodb_recs", 0)

    @property
    def warehouse_rows(self) -> int:
        return sum(v for k, v in self.synced.items() if k.startswith("warehouse_"))


@dataclass
class DemoResult:
    ingest: list[RegionReport]
    etl: list[EtlReport]
    pipelines: list[PipelineReport]
    answers: list[Any]  # list[ServedAnswer]
    seconds: float


def etl_report(settings: Any, region: str, days: list[date], outputs: dict[str, Any]) -> EtlReport:
    """The ETL stage's counts next to the raw rows of its days, for the accounting check."""
    report = EtlReport(region, [d.isoformat() for d in days])
    report.clean_rows = int(outputs["clean_rows"])
    report.removed.update(outputs["removed"])
    report.features = dict(outputs["features"])
    report.keys = dict(outputs["keys"])
    lake_uri = settings.region(region).lake_uri
    start = datetime.combine(days[0], datetime.min.time(), UTC)
    end = datetime.combine(days[-1] + timedelta(days=1), datetime.min.time(), UTC)
    layout = LakeLayout(lake_uri)
    report.raw_rows = raw_rows_between(filesystem(lake_uri), layout.region_root("raw", region), start, end)
    return report


def demo_settings(settings: Any, days: list[date]) -> Any:
    """The stack's settings, tuned for a demo-sized run on 2 cores.

    A live consumer stamps every generated record with today's receive time, so each event day's ETL
    must accept arrivals up to now: the lateness window covers the whole generated history. The gate
    evaluates every holdout user, and pre-warming covers the few hundred users there are."""
    lateness = (datetime.now(UTC).date() - days[0]).days * 24 + 48
    # Serving's per-step budgets are sized for DynamoDB and ElastiCache on R5 pods; moto's DynamoDB
    # and a 2-core box running Ray, Spark and the servers together answer several times slower, so the
    # demo gives each step of the request path five times its production budget (the answers still
    # show each source and their latency).
    serve = settings.serve
    budgets = {name: getattr(serve, name) * 5 for name in
               ("deadline_ms", "cache_timeout_ms", "batch_timeout_ms", "realtime_timeout_ms")}
    return settings.model_copy(update={
        "etl": settings.etl.model_copy(update={"late_arrival_hours": lateness}),
        "serve": serve.model_copy(update=budgets)})


def run_region_pipeline(settings: Any, region: str, days: list[date], say: Callable[[str], None]) -> PipelineReport:
    """One backfill PipelineRun for the region, in this process: clean every day, then features, train,
    evaluate, score, sync and promote for the last."""
    from operators.local import PipelineFailed, run_pipeline
    from operators.pipeline import RunSpec
    from operators.stages import synced_counts

    spec = RunSpec(region, days[-1], days[0] if len(days) > 1 else None, overrides=DEMO_OVERRIDES)
    t0 = time.monotonic()
    try:
        run = run_pipeline(settings, spec, retry_delay_s=1.0, say=say)
    except PipelineFailed as exc:
        raise DemoError(f"pipeline {spec.run_id} failed: {exc}") from None
    done = run.done
    report = PipelineReport(region, spec.run_id, [(s.stage, s.state, s.seconds, s.result.message) for s in run.stages])
    etl = done["etl"].outputs
    report.users, report.items = int(etl["features"]["users"]), int(etl["features"]["items"])
    train = done["train"].outputs
    report.version = train["version"]
    report.gate_reason = train["gate"]["reason"]
    report.metric, report.model_metric, report.popular_metric = train["metric"], train["model"], train["popular"]
    report.promoted = bool(done["promote"].outputs.get("promoted"))
    report.synced = synced_counts(done)
    report.seconds = time.monotonic() - t0
    return report


def run_demo(state_dir: Path, *, events_per_region: int = 25_000, users: int = 1_000, items: int = 1_000,
             days: float = 5.0, workers_per_region: int = 2, seed: int = 7, keep_stack: bool = False,
             online: bool = True, say: Callable[[str], None] = print) -> DemoResult:
    import redis

    from streamrec.clickstream.config import GeneratorConfig
    from streamrec.clickstream.publish import publish_generated
    from streamrec.devstack import stack
    from streamrec.settings import load_settings

    # A fresh stack and lake every run: the demo is rerunnable and its counts are its own.
    stack.down(state_dir)
    shutil.rmtree(state_dir, ignore_errors=True)
    started = time.monotonic()
    state = stack.up(state_dir, regions=DEMO_REGIONS, shard_count=2, on_step=lambda m: say(f"  stack  {m}"))
    try:
        settings = load_settings(state.config_path)
        say(f"generating {events_per_region:,} records per region for {', '.join(DEMO_REGIONS)} onto Kinesis")
        config = GeneratorConfig(seed=seed, regions=DEMO_REGIONS, users_per_region=users, items=items,
                                 events_per_region=events_per_region, days=days).resolved()
        published = publish_generated(settings, config)
        reports = {}
        for region in DEMO_REGIONS:
            t0 = time.monotonic()
            say(f"consuming {region} with {workers_per_region} workers until drained")
            summaries = run_consumers(state.config_path, region, workers_per_region, state_dir / "ingest")
            rs = settings.region(region)
            fs = filesystem(rs.lake_uri, endpoint_url=settings.aws.endpoint_url, region=region)
            layout = LakeLayout(rs.lake_uri)
            summary = published[region]
            reports[region] = RegionReport(
                region=region,
                produced=summary.tally.total,
                produced_by_kind=dict(summary.tally.by_kind),
                lake_rows=count_rows(fs, layout.region_root("raw", region)),
                dead_lettered=dead_letter_reasons(fs, layout.region_root("dead_letter", region)),
                duplicates=sum(s["duplicates"] for s in summaries),
                users_online=count_online_users(redis.Redis.from_url(rs.redis_url), region),
                seconds=time.monotonic() - t0,
            )
        window = etl_days(*config.window)
        run_settings = demo_settings(settings, window)
        pipelines, etl_reports = [], []
        for region in DEMO_REGIONS:
            say(f"PipelineRun {region}: ETL {window[0]} .. {window[-1]}, then train, score, sync, promote "
                f"for {window[-1]}")
            report = run_region_pipeline(run_settings, region, window, say)
            pipelines.append(report)
            etl_reports.append(etl_report(settings, region, window, _etl_outputs(run_settings, region, window)))
        answers: list[Any] = []
        if online:
            answers = _online(run_settings, state.config_path, window[-1], state_dir,
                              {p.region: p.promoted for p in pipelines}, say)
        say(f"done in {time.monotonic() - started:.0f} s")
        return DemoResult(list(reports.values()), etl_reports, pipelines, answers, time.monotonic() - started)
    finally:
        if not keep_stack:
            stack.down(state_dir)


def _etl_outputs(settings: Any, region: str, window: list[date]) -> dict[str, Any]:
    from operators.pipeline import RunSpec
    from operators.stages import read_result

    result = read_result(settings, RunSpec(region, window[-1], window[0] if len(window) > 1 else None), "etl")
    if result is None:
        raise DemoError(f"the ETL of {region} left no result")
    return dict(result.outputs)


def quiet_users(redis_url: str, region: str, candidates: list[str], day: date) -> list[str]:
    """The candidates (in order) whose last click came before their batch recommendations were
    computed (the end of ``day``): Serve answers them from the batch, while a user who clicked since
    gets a real-time answer. The generated clickstream runs up to now, so many active users clicked
    today. Falls back to the first two candidates."""
    import redis

    from streamrec.online import user_recent_key

    cutoff_ms = int(datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC).timestamp() * 1000)
    with redis.Redis.from_url(redis_url) as client:
        pipe = client.pipeline(transaction=False)
        for user in candidates:
            pipe.zrevrange(user_recent_key(region, user), 0, 0, withscores=True)
        newest = [int(pairs[0][1]) if pairs else 0 for pairs in pipe.execute()]
    quiet = [u for u, ms in zip(candidates, newest) if ms < cutoff_ms]
    return quiet[:2] if len(quiet) >= 2 else candidates[:2]


def _online(settings: Any, config_path: Path, day: date, state_dir: Path, promoted: dict[str, bool],
            say: Callable[[str], None]) -> list[Any]:
    import pyarrow.dataset as pads

    from operators.promote import most_active_users
    from streamrec.demo_online import OnlineDemoError, show_online

    known: dict[str, list[str]] = {}
    for region in DEMO_REGIONS:
        lake_uri = settings.region(region).lake_uri
        path = LakeLayout(lake_uri).partition("features", region, day) + "/users"
        users = pads.dataset(path, filesystem=filesystem(lake_uri), format="parquet").to_table()
        known[region] = quiet_users(settings.region(region).redis_url, region, most_active_users(users, 200), day)
    say(f"starting Ray Serve with one application per region ({', '.join(DEMO_REGIONS)})")
    try:
        return show_online(settings, config_path, DEMO_REGIONS, known, promoted, state_dir, run_consumers, say)
    except OnlineDemoError as exc:
        raise DemoError(str(exc)) from None
