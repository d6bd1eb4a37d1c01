"""The end-to-end demo behind ``make demo``: the whole job on the embedded local stack.

Stages so far: bring up the local stack (moto, redis-server, PostgreSQL) in its own state folder,
generate a clickstream for two regions onto their Kinesis streams, run two consumer workers per region
(real ``streamrec ingest run`` processes, as the pods run them) until the streams are drained, and
account for every produced record: raw lake rows + dead letters + duplicates dropped = records produced.
Then the Spark ETL (local[2]) cleans every full day of the generated window, builds features and exports
the key data points for the last full day, and accounts for every raw row of those days: clean rows +
rows removed by reason = raw rows.
"""

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


def run_etl(settings: Any, region: str, days: list[date], spark: Any) -> EtlReport:
    """clean for every day, then features and keys for the last; fail on the first failed job."""
    from spark_etl import runner

    # A live consumer stamps every generated record with today's receive time, so each event day's run
    # must accept arrivals up to now: the lateness window covers the whole generated history.
    lateness = (datetime.now(UTC).date() - days[0]).days * 24 + 48
    etl = settings.etl.model_copy(update={"late_arrival_hours": lateness})
    lake_uri = settings.region(region).lake_uri
    report = EtlReport(region, [d.isoformat() for d in days])
    t0 = time.monotonic()
    summaries = list(runner.run(spark, lake_uri, region, "clean", days[0], days[-1], etl))
    summaries += list(runner.run(spark, lake_uri, region, "features", days[-1], None, etl))
    summaries += list(runner.run(spark, lake_uri, region, "keys", days[-1], None, etl))
    for s in summaries:
        if s.job == "clean":
            report.clean_rows += s.outputs["clean"]
            report.removed.update({k: v for k, v in s.removed.items() if k != "other_day"})
        elif s.job == "features":
            report.features = dict(s.outputs)
        else:
            report.keys = dict(s.outputs)
    start = datetime.combine(days[0], datetime.min.time(), UTC)
    end = datetime.combine(days[-1] + timedelta(days=1), datetime.min.time(), UTC)
    layout = LakeLayout(lake_uri)
    report.raw_rows = raw_rows_between(filesystem(lake_uri), layout.region_root("raw", region), start, end)
    report.seconds = time.monotonic() - t0
    return report


def run_demo(state_dir: Path, *, events_per_region: int = 25_000, users: int = 2_000, items: int = 3_000,
             days: float = 5.0, workers_per_region: int = 2, seed: int = 7, keep_stack: bool = False,
             say: Callable[[str], None] = print) -> tuple[list[RegionReport], list[EtlReport]]:
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
            report = RegionReport(
                region=region,
                produced=summary.tally.total,
                produced_by_kind=dict(summary.tally.by_kind),
                lake_rows=count_rows(fs, layout.region_root("raw", region)),
                dead_lettered=dead_letter_reasons(fs, layout.region_root("dead_letter", region)),
                duplicates=sum(s["duplicates"] for s in summaries),
                users_online=count_online_users(redis.Redis.from_url(rs.redis_url), region),
                seconds=time.monotonic() - t0,
            )
            reports[region] = report
        etl_reports = []
        etl_window = etl_days(*config.window)
        say(f"starting Spark ({settings.spark.master}) for the ETL of {etl_window[0]} .. {etl_window[-1]}")
        from spark_etl.jobs.common import MissingInputError
        from spark_etl.session import local_session
        from spark_etl.summary import DataQualityError

        from pyspark.sql import SparkSession

        # Inside a process that already runs Spark (the test suite), share its session and leave it up.
        shared = SparkSession.getActiveSession() is not None
        spark = local_session(settings.spark)
        try:
            for region in DEMO_REGIONS:
                say(f"ETL {region}: clean {len(etl_window)} days, features and keys for {etl_window[-1]}")
                try:
                    etl_reports.append(run_etl(settings, region, etl_window, spark))
                except (DataQualityError, MissingInputError) as exc:
                    raise DemoError(f"ETL for {region} failed: {exc}") from None
        finally:
            if not shared:
                spark.stop()
        say(f"done in {time.monotonic() - started:.0f} s")
        return list(reports.values()), etl_reports
    finally:
        if not keep_stack:
            stack.down(state_dir)
