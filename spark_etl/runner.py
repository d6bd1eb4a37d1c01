"""Run ETL jobs for a region over one day or a range of days, in dependency order."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date, timedelta

from pyspark.sql import SparkSession

from spark_etl.jobs import build_features, clean_events, export_keys
from spark_etl.jobs.common import JobContext
from spark_etl.summary import RunSummary
from streamrec.lake import LakeLayout
from streamrec.settings import EtlSettings

JOBS: dict[str, Callable[[JobContext], RunSummary]] = {
    "clean": clean_events.run,
    "features": build_features.run,
    "keys": export_keys.run,
}
JOB_CHOICES: tuple[str, ...] = (*JOBS, "all")


def days(start: date, end: date | None = None) -> list[date]:
    """``start`` .. ``end`` inclusive (a backfill), or just ``start``."""
    end = end or start
    if end < start:
        raise ValueError(f"end date {end} is before start date {start}")
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def plan(job: str, start: date, end: date | None = None) -> list[tuple[str, date]]:
    """(job, day) pairs in run order. A backfill cleans every day before building features, because
    a day's features read the 30 clean days before it."""
    if job not in JOB_CHOICES:
        raise ValueError(f"unknown job {job!r}; choose one of {', '.join(JOB_CHOICES)}")
    jobs = list(JOBS) if job == "all" else [job]
    return [(name, day) for name in jobs for day in days(start, end)]


def run(spark: SparkSession, lake_uri: str, region: str, job: str, start: date, end: date | None,
        etl: EtlSettings) -> Iterator[RunSummary]:
    """Run the plan, yielding each summary as its job finishes; the first failure stops the run."""
    layout = LakeLayout(lake_uri)
    for name, day in plan(job, start, end):
        yield JOBS[name](JobContext(spark, layout, region, day, etl))
