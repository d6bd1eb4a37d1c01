"""The Spark ETL (spark_etl/) end to end, checked on its outputs read back with pyarrow and pandas.

Once per module, a generated clickstream (bots, malformed records, retried duplicates) is put on a moto
Kinesis stream and landed by real ``streamrec ingest run --until-drained`` worker processes; then
``spark_etl.runner.run`` cleans every event day and builds features and keys for the last one. The
outputs, summaries and file schemas are loaded into memory right away, so the invariant tests read
that snapshot while the rerun and schema-drift tests work on the lake itself.

Every expectation (receive window, dedup, sessions, bots, histories, popularity, keys) is recomputed
here from the raw or clean rows in plain Python, not with the job's own transforms. The row-count and
missing-input tests, the CLI (in process for Spark runs, as a process for its user errors) and the EMR
entry point (``python -m spark_etl.main``, a process) use small lakes of their own, landed offline with
``ingest.offline.land``.
"""

from __future__ import annotations

import bisect
import json
import os
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import Result
from ingest_support import FAST_INGEST, REGION, WorkerProcess, event
from pyspark.sql import SparkSession
from typer.testing import CliRunner

from ingest.offline import land
from spark_etl import runner, schemas
from spark_etl.jobs.common import MissingInputError
from spark_etl.summary import DataQualityError
from streamrec.aws import client
from streamrec.cli import app as streamrec_cli
from streamrec.clickstream.config import GeneratorConfig
from streamrec.clickstream.generate import generate_region
from streamrec.clickstream.publish import KinesisPublisher
from streamrec.clickstream.truth import build_truth
from streamrec.devstack.provision import provision_region
from streamrec.devstack.service import ServiceHandle
from streamrec.events import EVENT_TYPES, canonical_json
from streamrec.settings import EtlSettings, load_settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SUMMARY = "_run_summary.json"
FAILED_SUMMARY = "_run_summary.failed.json"
# The documented event weights (docs/etl.md), written out so popularity is recomputed independently.
WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0}
GAP = timedelta(minutes=30)
# A Redis database of its own for the consumer's online features (the per-test fixture flushes db 1).
REDIS_DB = 3
# Machines running these tests are shared and noisy: generous limits, never sleeps.
WORKER_TIMEOUT_S = 240.0
PROCESS_TIMEOUT_S = 420.0
# At most this share of human events may be removed as bots (humans manage a few events a minute).
MAX_HUMAN_REMOVED_SHARE = 0.002

# A live consumer stamps every record with the moment it arrives (today), whatever its event time, so
# the whole generated window lands in today's receive-hour partitions. The run for event day D reads
# receive hours up to ``late_arrival_hours`` into D+1: 6 days reaches today from every day of the
# 4-day window (the oldest day's events arrive 3 days and a few hours after its end).
CONSUMER_ETL: dict[str, Any] = {"late_arrival_hours": 24 * 6, "history_length": 10, "popular_top_k": 25}

CONSUMER_GENERATOR = dict(
    # Seed 5 puts bot bursts on two different days, one of them the last (the features cutoff).
    seed=5, regions=(REGION,), users_per_region=300, items=400, events_per_region=9_000, days=4,
    bot_share=0.03, malformed_share=0.01, duplicate_share=0.01, bots_per_region=3,
)
SMALL_DAY = date(2024, 6, 3)  # the small offline lakes' first day


# ---------------------------------------------------------------------------------------------------
# reading the lake (pyarrow, not Spark)


def partition(lake: Path, dataset: str, day: date, *table: str) -> Path:
    return lake.joinpath(dataset, f"region={REGION}", f"dt={day.isoformat()}", *table)


def data_files(folder: Path) -> list[Path]:
    """The Parquet files a reader sees under ``folder`` (names starting with _ or . are not data)."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.rglob("*.parquet")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts))


def read_table(folder: Path, partitions: tuple[str, ...] = ()) -> pa.Table:
    """All data files under ``folder``, with its hive partition folders as string columns."""
    files = data_files(folder)
    assert files, f"no Parquet files under {folder}"
    partitioning = ds.partitioning(pa.schema([(p, pa.string()) for p in partitions]), flavor="hive")
    return ds.dataset([str(f) for f in files], format="parquet", partitioning=partitioning,
                      partition_base_dir=str(folder)).to_table()


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (hidden ones too) → modification time in ns."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(table: pa.Table) -> list[tuple[Any, ...]]:
    """A table's rows as sorted tuples (lists made tuples): an order-independent comparison of all columns."""
    out = []
    for row in table.to_pylist():
        out.append(tuple(tuple(v) if isinstance(v, list) else v for v in row.values()))
    return sorted(out, key=repr)


def arrow_kind(t: pa.DataType) -> str:
    """A Parquet column's type in Spark's spelling (what ``schemas.describe`` gives for a contract)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_timestamp(t):
        # TIMESTAMP_MICROS, UTC-adjusted: what pyarrow, Ray Data and Redshift read as is.
        return "timestamp" if (t.unit, t.tz) == ("us", "UTC") else f"timestamp[{t.unit}, {t.tz}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"array<{arrow_kind(t.value_type)}>"
    names = {pa.float64(): "double", pa.int32(): "int", pa.int64(): "bigint"}
    return names.get(t, str(t))


def file_schemas(folder: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    return [(str(f.relative_to(folder)), [(fld.name, arrow_kind(fld.type)) for fld in pq.read_schema(f)])
            for f in data_files(folder)]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------
# the consumer-landed lake and one pipeline run over it, loaded into memory


@dataclass
class Landing:
    """What the consumer was given and what it landed (the premise of the pipeline run)."""

    lake: Path
    bot_ids: set[str]  # the generator's bots (streamrec.clickstream.truth)
    by_kind: Counter[str]  # records put on the stream: valid, bot, malformed, duplicate
    accepted_ids: set[str]  # event ids of the valid and bot records
    raw: pd.DataFrame  # every raw row, with its dt/hour receive partition
    dead_letters: int


@pytest.fixture(scope="module")
def landing(tmp_path_factory: pytest.TempPathFactory, moto_server: ServiceHandle,
            redis_server: ServiceHandle) -> Landing:
    """A generated clickstream put on moto Kinesis and landed by two real consumer worker processes."""
    tmp = tmp_path_factory.mktemp("etl-consumer")
    suffix = uuid.uuid4().hex[:8]
    lake = tmp / "lake"
    document = {
        "environment": "local",
        "aws": {"endpoint_url": moto_server.url, "access_key_id": "testing", "secret_access_key": "testing"},
        "regions": {REGION: {
            "stream_name": f"etl-clicks-{suffix}", "shard_count": 2, "lake_uri": f"file://{lake}",
            "tables": {"leases": f"etl-leases-{suffix}", "recs": f"etl-recs-{suffix}",
                       "features": f"etl-features-{suffix}"},
            "redis_url": f"{redis_server.url}/{REDIS_DB}",
        }},
        # dedup_window 0: the consumer lets retried duplicates through, so the ETL's exact dedup works.
        "ingest": {**FAST_INGEST, "dedup_window": 0},
    }
    config_path = tmp / "streamrec.yaml"
    config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    settings = load_settings(config_path)
    provision_region(settings, REGION)

    # The window ends at the last midnight UTC: four whole event days, none in the consumer's future,
    # always cut the same way by day boundaries (the seed decides which days the bots burst on).
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    config = GeneratorConfig(**CONSUMER_GENERATOR, end=end)
    truth = build_truth(config)
    records = list(generate_region(config, REGION, truth))
    publisher = KinesisPublisher(client("kinesis", REGION, settings.aws), settings.region(REGION).stream_name)
    assert publisher.put(records).records_put == len(records)

    workers = []
    for wid in ("etl-worker-a", "etl-worker-b"):
        log, summary = tmp / f"{wid}.log", tmp / f"{wid}.summary.json"
        argv = [sys.executable, "-m", "streamrec", "ingest", "run", "--region", REGION, "--config",
                str(config_path), "--worker-id", wid, "--summary-out", str(summary), "--until-drained"]
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        workers.append(WorkerProcess(proc, wid, log, summary, WORKER_TIMEOUT_S))
    try:
        for worker in workers:
            assert worker.wait() == 0, worker.tail()
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()

    return Landing(
        lake=lake, bot_ids=set(truth.regions[REGION].bot_ids), by_kind=Counter(r.kind for r in records),
        accepted_ids={json.loads(r.data)["event_id"] for r in records if r.kind in ("valid", "bot")},
        raw=read_table(lake / "raw" / f"region={REGION}", ("dt", "hour")).to_pandas(),
        dead_letters=sum(pq.read_metadata(f).num_rows for f in data_files(lake / "dead_letter")),
    )


@dataclass
class EtlRun:
    lake: Path
    etl: EtlSettings
    bot_ids: set[str]
    raw: pd.DataFrame
    event_days: list[date]
    last_day: date
    failures: dict[date, str]  # clean runs that raised
    clean: pd.DataFrame  # every cleaned day, with dt
    features: dict[str, pd.DataFrame]  # items, users, examples (with split)
    keys: dict[str, pd.DataFrame]  # popular, items, users
    summaries: dict[tuple[str, date], dict[str, Any]]  # (job, day) → _run_summary.json beside its output
    failed_summaries: list[str]
    schemas: dict[str, list[tuple[str, list[tuple[str, str]]]]]  # output → (file, columns) per data file
    tables: dict[str, pa.Table]  # the last day's outputs as read back, for the rerun comparison

    @property
    def uri(self) -> str:
        return f"file://{self.lake}"

    @property
    def cleaned(self) -> list[date]:
        return sorted(day for job, day in self.summaries if job == "clean")


def run_jobs(spark: Any, lake_uri: str, job: str, day: date, etl: EtlSettings) -> Any:
    (summary,) = runner.run(spark, lake_uri, REGION, job, day, None, etl)
    return summary


def last_day_tables(lake: Path, day: date) -> dict[str, pa.Table]:
    out = {"clean": read_table(partition(lake, "clean", day))}
    for name in ("items", "users"):
        out[f"features/{name}"] = read_table(partition(lake, "features", day, name))
    out["features/examples"] = read_table(partition(lake, "features", day, "examples"), ("split",))
    for name in ("popular", "items", "users"):
        out[f"keys/{name}"] = read_table(partition(lake, "keys", day, name))
    return out


@pytest.fixture(scope="module")
def pipeline(landing: Landing, spark: Any) -> EtlRun:
    """Clean every event day, then features and keys for the last one (``spark_etl.runner.run``); load
    every output, summary and file schema into memory before any test touches the lake."""
    lake, etl = landing.lake, EtlSettings(**CONSUMER_ETL)
    event_days = sorted({ts.date() for ts in landing.raw["ts"]})
    last_day = event_days[-1]
    failures: dict[date, str] = {}
    uri = f"file://{lake}"
    for day in event_days:
        try:
            run_jobs(spark, uri, "clean", day, etl)
        except (MissingInputError, DataQualityError) as exc:
            failures[day] = f"{type(exc).__name__}: {exc}"
    run_jobs(spark, uri, "features", last_day, etl)
    run_jobs(spark, uri, "keys", last_day, etl)

    summaries: dict[tuple[str, date], dict[str, Any]] = {}
    for job, days in (("clean", event_days), ("features", [last_day]), ("keys", [last_day])):
        for day in days:
            if (path := partition(lake, job, day, SUMMARY)).exists():
                summaries[(job, day)] = read_json(path)
    cleaned = [day for day in event_days if ("clean", day) in summaries]
    clean = pd.concat([read_table(partition(lake, "clean", day)).to_pandas().assign(dt=day.isoformat())
                       for day in cleaned], ignore_index=True)
    tables = last_day_tables(lake, last_day)
    out_schemas = {"clean": [(f"dt={day}/{name}", columns) for day in cleaned
                             for name, columns in file_schemas(partition(lake, "clean", day))]}
    for job, names in (("features", ("items", "users", "examples")), ("keys", ("popular", "items", "users"))):
        for name in names:
            out_schemas[f"{job}/{name}"] = file_schemas(partition(lake, job, last_day, name))
    return EtlRun(
        lake=lake, etl=etl, bot_ids=landing.bot_ids, raw=landing.raw, event_days=event_days,
        last_day=last_day, failures=failures, clean=clean,
        features={n: tables[f"features/{n}"].to_pandas() for n in ("items", "users", "examples")},
        keys={n: tables[f"keys/{n}"].to_pandas() for n in ("popular", "items", "users")},
        summaries=summaries, schemas=out_schemas, tables=tables,
        failed_summaries=sorted(str(p.relative_to(lake)) for p in lake.rglob(FAILED_SUMMARY)),
    )


# ---------------------------------------------------------------------------------------------------
# 1. the pipeline's outputs, end to end


def test_consumer_landed_every_accepted_record(landing: Landing) -> None:
    """The premise of the pipeline run: every valid and bot record is in the raw lake, retried duplicates
    too (consumer dedup is off), every malformed one is dead-lettered; four event days."""
    kinds = landing.by_kind
    assert kinds["bot"] > 0 and kinds["duplicate"] > 0 and kinds["malformed"] > 0
    assert set(landing.raw["event_id"]) == landing.accepted_ids
    assert len(landing.raw) == kinds["valid"] + kinds["bot"] + kinds["duplicate"]
    assert landing.dead_letters == kinds["malformed"]
    assert len({ts.date() for ts in landing.raw["ts"]}) == 4


def test_every_event_day_is_cleaned(pipeline: EtlRun) -> None:
    """Each of the four event days finds its events, although all of them arrived today."""
    run = pipeline
    assert not run.failures, f"clean failed for some event days: {run.failures}"
    assert run.cleaned == run.event_days
    assert set(run.clean["dt"]) == {d.isoformat() for d in run.event_days}


def test_clean_accounts_for_every_raw_row(pipeline: EtlRun) -> None:
    """Per cleaned day: rows in = receive window (recomputed), = clean rows + every removed row; the
    duplicates removed are the extra copies; whatever else is missing was removed as a bot; each clean
    row is its raw event's first-received copy; no event id appears twice across all days."""
    run = pipeline
    raw, clean = run.raw, run.clean
    assert not clean["event_id"].duplicated().any(), "an event id is in clean more than once"
    late = timedelta(hours=run.etl.late_arrival_hours)
    for day in run.cleaned:
        summary = run.summaries[("clean", day)]
        start = datetime.combine(day, time(0), UTC)
        received = raw["received_at"]
        window = raw[(received >= start - timedelta(hours=1)) & (received < start + timedelta(days=1) + late)]
        on_day = window[(window["ts"] >= start) & (window["ts"] < start + timedelta(days=1))]
        day_clean = clean[clean["dt"] == day.isoformat()]
        (step,) = [s for s in summary["steps"] if s["name"] == "dedup_sessionize_bots"]
        removed = summary["removed"]

        assert step["rows_in"] == len(window), (day, step, len(window))
        assert step["rows_in"] == summary["outputs"]["clean"] + sum(removed.values()), (day, summary)
        assert summary["outputs"]["clean"] == len(day_clean)
        assert removed.get("other_day", 0) == len(window) - len(on_day), (day, removed)
        assert removed.get("duplicate", 0) == len(on_day) - on_day["event_id"].nunique(), (day, removed)
        assert set(removed) <= {"other_day", "duplicate", "bot_session", "bot_user"}, removed

        day_ids = set(on_day["event_id"])
        assert set(day_clean["event_id"]) <= day_ids
        missing = day_ids - set(day_clean["event_id"])
        assert len(missing) == removed.get("bot_session", 0) + removed.get("bot_user", 0), (day, removed)

        # Each clean row is the first-received copy of its raw event, carried over unchanged.
        first = on_day.sort_values(["received_at", "shard_id", "sequence_number"]).drop_duplicates("event_id")
        merged = day_clean.merge(first, on="event_id", suffixes=("", "_raw"), validate="one_to_one")
        assert len(merged) == len(day_clean)
        for col in ("user_id", "item_id", "event_type", "ts", "received_at", "client_region"):
            assert (merged[col] == merged[f"{col}_raw"]).all(), col
        for col in ("category", "price", "device", "page", "referrer"):
            same = (merged[col] == merged[f"{col}_raw"]) | (merged[col].isna() & merged[f"{col}_raw"].isna())
            assert same.all(), col
        assert (merged["client_session_id"] == merged["session_id_raw"]).all()
        assert (merged["event_weight"] == merged["event_type"].map(WEIGHTS)).all()
        assert (merged["ts"].dt.date == day).all()


def test_sessions_respect_the_gap(pipeline: EtlRun) -> None:
    """Within a session events are at most 30 min apart and numbered 1..n in time order; a user's next
    session starts more than 30 min after the previous one ends; ids are <user>:<first event ms>."""
    clean = pipeline.clean.sort_values(["user_id", "ts", "event_id"])
    for (_, user), events in clean.groupby(["dt", "user_id"], sort=False):
        previous_end = None
        for session_id, s in events.groupby("session_id", sort=False):
            ts = list(s["ts"])
            assert ts == sorted(ts)
            assert list(s["session_position"]) == list(range(1, len(s) + 1)), session_id
            assert all(b - a <= GAP for a, b in zip(ts, ts[1:])), f"session {session_id} spans a longer gap"
            assert session_id == f"{user}:{int(ts[0].timestamp() * 1000)}"
            if previous_end is not None:
                assert ts[0] - previous_end > GAP, f"{session_id} should have continued the previous session"
            previous_end = ts[-1]
        # groupby keeps first-appearance order, which is time order here: sessions did not interleave.
        firsts = events.groupby("session_id", sort=False)["ts"].min().tolist()
        assert firsts == sorted(firsts)


def test_bots_are_removed_and_humans_kept(pipeline: EtlRun) -> None:
    """Every event of the generator's bots is gone from clean; at most a tiny share of human events is
    removed; the removed-as-bot counts are exactly those events."""
    run = pipeline
    cleaned = {d.isoformat() for d in run.cleaned}
    raw_days = run.raw.assign(day=run.raw["ts"].dt.date.map(date.isoformat))
    raw_days = raw_days[raw_days["day"].isin(cleaned)].drop_duplicates("event_id")
    bot_rows = raw_days[raw_days["user_id"].isin(run.bot_ids)]
    assert set(bot_rows["user_id"]) == run.bot_ids, "every generated bot bursts on a cleaned day"
    assert not set(run.clean["user_id"]) & run.bot_ids, "a generator bot survived into clean"
    removed_bots = sum(run.summaries[("clean", d)]["removed"].get(r, 0)
                       for d in run.cleaned for r in ("bot_session", "bot_user"))
    assert removed_bots >= len(bot_rows)

    humans = raw_days[~raw_days["user_id"].isin(run.bot_ids)]
    lost = set(humans["event_id"]) - set(run.clean["event_id"])
    assert len(lost) <= MAX_HUMAN_REMOVED_SHARE * len(humans), f"{len(lost)} human events removed"
    assert removed_bots == len(bot_rows) + len(lost)


def _timelines(clean: pd.DataFrame) -> dict[str, tuple[list[Any], list[str]]]:
    """user → (timestamps, items) in (ts, event_id) order."""
    out = {}
    for user, events in clean.sort_values(["user_id", "ts", "event_id"]).groupby("user_id", sort=False):
        out[user] = (list(events["ts"]), list(events["item_id"]))
    return out


def _window(run: EtlRun, days: int) -> pd.DataFrame:
    first = (run.last_day - timedelta(days=days - 1)).isoformat()
    return run.clean[(run.clean["dt"] >= first) & (run.clean["dt"] <= run.last_day.isoformat())]


def _ranks(events: pd.DataFrame) -> dict[str, int]:
    pop = events.groupby("item_id")["event_weight"].sum()
    order = sorted(pop.items(), key=lambda kv: (-kv[1], kv[0]))
    return {item: rank for rank, (item, _) in enumerate(order, 1)}


def test_examples_split_by_day_without_future_history(pipeline: EtlRun) -> None:
    """One example per clean interaction of the train days (train) and the cutoff day (eval); each
    history is exactly the user's last N items strictly before the interaction, reconstructed here from
    clean, so no history holds the positive's own moment or anything later."""
    run = pipeline
    cutoff, n = run.last_day, run.etl.history_length
    examples = run.features["examples"]
    first_train = cutoff - timedelta(days=run.etl.train_days)
    eval_days = examples["ts"].dt.date[examples["split"] == "eval"]
    train_days = examples["ts"].dt.date[examples["split"] == "train"]
    assert (eval_days == cutoff).all()
    assert ((train_days < cutoff) & (train_days >= first_train)).all()
    assert set(examples["split"]) == {"train", "eval"}

    clean = run.clean
    in_range = clean[(clean["dt"] >= first_train.isoformat()) & (clean["dt"] <= cutoff.isoformat())]
    expected = sorted(zip(
        in_range["dt"].map(lambda d: "eval" if d == cutoff.isoformat() else "train"),
        in_range["user_id"], in_range["item_id"], in_range["event_type"], in_range["ts"]), key=repr)
    actual = sorted(zip(examples["split"], examples["user_id"], examples["item_id"], examples["event_type"],
                        examples["ts"]), key=repr)
    assert actual == expected

    assert (examples["weight"] == examples["event_type"].map(WEIGHTS)).all()
    assert (examples["hour"] == examples["ts"].dt.hour).all()
    assert (examples["region"] == REGION).all()

    timelines = _timelines(_window(run, 30))
    wrong = []
    for user, ts, history in zip(examples["user_id"], examples["ts"], examples["history"]):
        times, items = timelines[user]
        before = bisect.bisect_left(times, ts)
        if list(history) != items[:before][-n:]:
            wrong.append((user, ts, list(history), items[:before][-n:]))
    assert not wrong, f"{len(wrong)} histories are not the user's last items before it, e.g. {wrong[:2]}"
    assert examples["history"].map(len).max() == n  # long histories are cut to the last N

    # item_pop_rank: rank by weighted popularity over the 7 days before the cutoff (not the cutoff day).
    week = (cutoff - timedelta(days=7)).isoformat()
    before = clean[(clean["dt"] >= week) & (clean["dt"] < cutoff.isoformat())]
    ranks = _ranks(before)
    for item, rank in zip(examples["item_id"], examples["item_pop_rank"]):
        assert (rank == ranks[item]) if item in ranks else pd.isna(rank), (item, rank, ranks.get(item))


def test_item_popularity_matches_independent_counts(pipeline: EtlRun) -> None:
    """The item table against sums over clean: weighted popularity over 1, 7 and 30 days, event count,
    first/last seen, latest category, and rank by 7-day popularity then item id."""
    run = pipeline
    items = run.features["items"].set_index("item_id")
    window = _window(run, 30)
    assert set(items.index) == set(window["item_id"])
    for days, column in ((1, "pop_1d"), (7, "pop_7d"), (30, "pop_30d")):
        pop = _window(run, days).groupby("item_id")["event_weight"].sum()
        expected = pop.reindex(items.index, fill_value=0.0)
        assert (items[column] - expected).abs().max() < 1e-9, column
    assert (items["events_30d"] == window.groupby("item_id").size().reindex(items.index)).all()
    assert (items["first_seen"] == window.groupby("item_id")["ts"].min().reindex(items.index)).all()
    assert (items["last_seen"] == window.groupby("item_id")["ts"].max().reindex(items.index)).all()
    latest = window.dropna(subset=["category"]).sort_values("ts").groupby("item_id")["category"].last()
    assert (items["category"] == latest.reindex(items.index)).all()

    # Rank by 7-day popularity, ties by item id: 1..n without gaps.
    order = sorted(items.index, key=lambda i: (-items.at[i, "pop_7d"], i))
    assert [int(items.at[i, "popularity_rank"]) for i in order] == list(range(1, len(items) + 1))


def test_user_table_matches_the_timelines(pipeline: EtlRun) -> None:
    """Last N items (oldest first), counts by type, first/last seen, most recent distinct purchases."""
    run = pipeline
    users = run.features["users"].set_index("user_id")
    window = _window(run, 30)
    timelines = _timelines(window)
    assert set(users.index) == set(timelines)
    n = run.etl.history_length
    for user, (times, items) in timelines.items():
        row = users.loc[user]
        assert list(row["last_items"]) == items[-n:], user
        assert row["first_seen"] == times[0] and row["last_seen"] == times[-1]
    counts = (window.groupby(["user_id", "event_type"]).size().unstack(fill_value=0)
              .reindex(columns=list(EVENT_TYPES), fill_value=0).reindex(users.index))
    for event_type in EVENT_TYPES:
        assert (users[f"n_{event_type}"] == counts[event_type]).all(), event_type
    purchases = window[window["event_type"] == "purchase"].sort_values(["ts", "event_id"])
    bought: dict[str, list[str]] = defaultdict(list)
    for user, item in zip(purchases["user_id"], purchases["item_id"]):
        if item in bought[user]:
            bought[user].remove(item)
        bought[user].append(item)  # most recent purchase last
    for user in users.index:
        assert list(users.at[user, "purchased_items"]) == bought[user][-run.etl.purchased_items_max:], user


def test_keys_have_the_documented_layout(pipeline: EtlRun) -> None:
    """popular: pk "popular", sk "top<K>", the top-K items by rank with their 7-day scores; items:
    "item#<id>"/"meta"; users: "user#<id>"/"recent" with the last N items; every row dated."""
    run = pipeline
    dt, k = run.last_day.isoformat(), run.etl.popular_top_k
    items = run.features["items"]
    (popular,) = run.keys["popular"].to_dict("records")
    top = items.sort_values("popularity_rank").head(k)
    assert len(items) > k
    assert (popular["pk"], popular["sk"], popular["dt"]) == ("popular", f"top{k}", dt)
    assert list(popular["item_ids"]) == list(top["item_id"])
    assert list(popular["scores"]) == list(top["pop_7d"])

    item_keys = run.keys["items"]
    assert item_keys["pk"].is_unique and (item_keys["sk"] == "meta").all() and (item_keys["dt"] == dt).all()
    assert (item_keys["pk"] == "item#" + item_keys["item_id"]).all()
    merged = item_keys.merge(items, on="item_id", suffixes=("", "_f"), validate="one_to_one")
    assert len(merged) == len(items) == len(item_keys)
    for col in ("category", "popularity_rank", "pop_7d", "first_seen"):
        assert (merged[col] == merged[f"{col}_f"]).all(), col

    user_keys, users = run.keys["users"], run.features["users"]
    assert user_keys["pk"].is_unique and (user_keys["sk"] == "recent").all() and (user_keys["dt"] == dt).all()
    assert (user_keys["pk"] == "user#" + user_keys["user_id"]).all()
    merged = user_keys.merge(users, on="user_id", suffixes=("", "_f"), validate="one_to_one")
    assert len(merged) == len(users) == len(user_keys)
    assert (merged["last_seen"] == merged["last_seen_f"]).all()
    assert all(list(a) == list(b) for a, b in zip(merged["item_ids"], merged["last_items"]))


def test_run_summaries_sit_beside_each_output(pipeline: EtlRun) -> None:
    """A succeeded _run_summary.json in every output partition, its counts those of the files beside it."""
    run = pipeline
    assert run.failed_summaries == []
    expected_outputs = {("clean", d): {"clean": int((run.clean["dt"] == d.isoformat()).sum())}
                        for d in run.cleaned}
    examples = run.features["examples"]
    expected_outputs[("features", run.last_day)] = {
        "items": len(run.features["items"]), "users": len(run.features["users"]),
        "examples_train": int((examples["split"] == "train").sum()),
        "examples_eval": int((examples["split"] == "eval").sum()),
    }
    expected_outputs[("keys", run.last_day)] = {name: len(t) for name, t in run.keys.items()}
    assert set(run.summaries) == set(expected_outputs)
    for (job, day), outputs in expected_outputs.items():
        summary = run.summaries[(job, day)]
        assert summary["format"] == "streamrec-etl-run/1"
        assert (summary["job"], summary["region"], summary["dt"], summary["status"]) == (
            job, REGION, day.isoformat(), "succeeded")
        assert summary["outputs"] == outputs, (job, day)
        assert summary["error"] is None
        assert summary["checks"] and all(c["passed"] for c in summary["checks"]), summary["checks"]
        if job == "clean":
            assert {"schema:raw", "null_keys:raw", "non_empty:clean", "row_drop:clean"} <= {
                c["name"] for c in summary["checks"]}


def test_output_schemas_match_the_contracts(pipeline: EtlRun) -> None:
    """Every data file's columns, in order, with the contract's types (timestamps as UTC microseconds)."""
    contracts = {"clean": schemas.CLEAN, "features/items": schemas.ITEMS, "features/users": schemas.USERS,
                 "features/examples": schemas.EXAMPLES, "keys/popular": schemas.KEYS_POPULAR,
                 "keys/items": schemas.KEYS_ITEMS, "keys/users": schemas.KEYS_USERS}
    assert set(pipeline.schemas) == set(contracts)
    for output, files in pipeline.schemas.items():
        want = list(schemas.describe(contracts[output]).items())
        assert files, output
        for name, columns in files:
            assert columns == want, f"{output}/{name}"


# ---------------------------------------------------------------------------------------------------
# 2. reruns


def test_rerun_gives_the_same_rows_and_replaces_only_its_day(spark: Any, pipeline: EtlRun) -> None:
    """Clean, features and keys again for the last day: the same rows in every output (all columns, any
    order); the day's clean files are new; no other day's clean file is touched."""
    run = pipeline
    day = run.last_day
    others = {d: snapshot(partition(run.lake, "clean", d)) for d in run.cleaned if d != day}
    assert others, "the rerun needs other cleaned days to leave alone"
    before = snapshot(partition(run.lake, "clean", day))

    for job in ("clean", "features", "keys"):
        assert run_jobs(spark, run.uri, job, day, run.etl).status == "succeeded"

    again = last_day_tables(run.lake, day)
    for name, table in run.tables.items():
        assert again[name].schema == table.schema, name
        assert rows(again[name]) == rows(table), f"{name} differs after a rerun"
    assert {d: snapshot(partition(run.lake, "clean", d)) for d in others} == others
    replaced = {f for f in snapshot(partition(run.lake, "clean", day)) if f.endswith(".parquet")}
    assert replaced and not replaced & set(before), "the rerun day's clean files were not replaced"
    summary = read_json(partition(run.lake, "clean", day, SUMMARY))
    assert summary["status"] == "succeeded"
    assert summary["outputs"] == run.summaries[("clean", day)]["outputs"]
    assert summary["removed"] == run.summaries[("clean", day)]["removed"]


# ---------------------------------------------------------------------------------------------------
# 3. data-quality failures


def _drift(table: pa.Table, variant: str) -> pa.Table:
    if variant == "extra_column":
        return table.append_column("coupon", pa.array(["SPRING24"] * len(table)))
    if variant == "retyped_column":  # price as text, as a careless producer sends it
        return table.set_column(table.schema.get_field_index("price"), "price",
                                pa.array([f"{p}" for p in table.column("price").to_pylist()]))
    assert variant == "missing_column"
    return table.drop_columns(["device"])


@pytest.mark.parametrize(("variant", "column"), [
    ("extra_column", "coupon"), ("retyped_column", "price"), ("missing_column", "device")])
def test_schema_drift_fails_and_keeps_the_last_good_output(spark: Any, pipeline: EtlRun, variant: str,
                                                           column: str) -> None:
    """docs/etl.md: "a missing, retyped or unexpected column fails the schema:raw check before anything
    is written"; the last good output and its summary stay, _run_summary.failed.json says what failed."""
    run = pipeline
    day = run.last_day
    out = partition(run.lake, "clean", day)
    good = snapshot(out)
    good_summary = (out / SUMMARY).read_text()
    raw_file = data_files(run.lake / "raw" / f"region={REGION}")[0]  # every day's run reads it
    template = pq.read_table(raw_file).slice(0, 3)
    # New events of the day (fresh ids), so a job that wrongly accepted the file would change the output.
    template = template.set_column(0, "event_id", pa.array([str(uuid.uuid4()) for _ in range(3)]))
    noon = pa.scalar(datetime.combine(day, time(12), UTC), template.schema.field("ts").type)
    template = template.set_column(template.schema.get_field_index("ts"), "ts", pa.array([noon] * 3))
    drift_file = raw_file.parent / f"zz-drift-{variant}.parquet"
    pq.write_table(_drift(template, variant), drift_file)
    try:
        with pytest.raises(DataQualityError) as info:
            run_jobs(spark, run.uri, "clean", day, run.etl)
        assert info.value.check == "schema:raw"
        assert "schema:raw" in str(info.value) and column in str(info.value), str(info.value)
        failed = read_json(out / FAILED_SUMMARY)
        assert failed["status"] == "failed" and "schema:raw" in failed["error"]
        assert [c["name"] for c in failed["checks"] if not c["passed"]] == ["schema:raw"]
        assert {k: v for k, v in snapshot(out).items() if FAILED_SUMMARY not in k} == good
        assert (out / SUMMARY).read_text() == good_summary
    finally:
        drift_file.unlink()
        for name in (FAILED_SUMMARY, f".{FAILED_SUMMARY}.crc"):  # the file and its Hadoop checksum
            (out / name).unlink(missing_ok=True)


def small_lake(root: Path, per_day: dict[date, int]) -> Path:
    """Human events (5 users, 7 items) spread over each day, landed offline (received 2 s later).

    Spread over the whole day on purpose: ``land`` takes an event-time jump of more than 12 hours for a
    client clock running ahead and dead-letters the record (and, as it stands, everything after it)."""
    lake = root / "lake"
    events = []
    for day, n in per_day.items():
        start, step = datetime.combine(day, time(0, 5), UTC), timedelta(minutes=1430 // n)
        events += [event(f"u{i % 5}", f"i{i % 7:06d}", start + i * step, EVENT_TYPES[i % 4])
                   for i in range(n)]
    landed = land([(canonical_json(e), e["user_id"]) for e in events], f"file://{lake}", REGION)
    assert landed.rows == len(events), landed
    return lake


def test_row_count_drop_fails_the_day(spark: Any, tmp_path: Path) -> None:
    day1, day2 = SMALL_DAY, SMALL_DAY + timedelta(days=1)
    lake = small_lake(tmp_path, {day1: 60, day2: 6})
    etl = EtlSettings(max_row_drop_share=0.2)
    assert run_jobs(spark, f"file://{lake}", "clean", day1, etl).outputs == {"clean": 60}
    with pytest.raises(DataQualityError) as info:
        run_jobs(spark, f"file://{lake}", "clean", day2, etl)
    assert info.value.check == "row_drop:clean"
    assert "6 rows against 60 the previous day" in str(info.value)
    out = partition(lake, "clean", day2)
    assert not data_files(out) and not (out / SUMMARY).exists()
    failed = read_json(out / FAILED_SUMMARY)
    assert failed["status"] == "failed" and "row_drop:clean" in failed["error"]
    assert failed["outputs"] == {}
    # Features of the failed day find no clean events: a missing input, not a silent empty table.
    with pytest.raises(MissingInputError, match=rf"no clean events .* on {day2} \(run the clean job first\)"):
        run_jobs(spark, f"file://{lake}", "features", day2, etl)


def test_features_before_clean_is_missing_input(spark: Any, tmp_path: Path) -> None:
    lake = small_lake(tmp_path, {SMALL_DAY: 20})
    uri = f"file://{lake}"
    with pytest.raises(MissingInputError) as clean_missing:
        run_jobs(spark, uri, "features", SMALL_DAY, EtlSettings())
    with pytest.raises(MissingInputError) as features_missing:
        run_jobs(spark, uri, "keys", SMALL_DAY, EtlSettings())
    # The message says what is missing, for which region and day, what to run first, and where it looked.
    for info, what, first in ((clean_missing, "clean events", "clean"),
                              (features_missing, "features", "features")):
        message = str(info.value)
        assert message.startswith(f"no {what} for region {REGION} on {SMALL_DAY} (run the {first} job first)")
        assert str(partition(lake, first, SMALL_DAY)) in message
    for job in ("features", "keys"):
        out = partition(lake, job, SMALL_DAY)
        assert not data_files(out) and not (out / SUMMARY).exists()
        assert read_json(out / FAILED_SUMMARY)["status"] == "failed"


# ---------------------------------------------------------------------------------------------------
# 4. the CLI and 5. the EMR entry point


def write_config(root: Path, lake_uri: str) -> Path:
    path = root / "streamrec.yaml"
    path.write_text(yaml.safe_dump({
        "environment": "local",
        "regions": {REGION: {"stream_name": "etl-cli", "lake_uri": lake_uri,
                             "tables": {"leases": "l", "recs": "r", "features": "f"}}},
        "etl": {"history_length": 5, "popular_top_k": 3},
        "spark": {"shuffle_partitions": 2},
    }))
    return path


def run_process(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        # rich wraps at 80 columns when the output is not a terminal (see the devstack tests).
        "COLUMNS": "200",
        # A short-lived Spark JVM spends most of its CPU in the optimizing JIT: the quick one halves it.
        "JAVA_TOOL_OPTIONS": "-XX:TieredStopAtLevel=1",
    }
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=PROCESS_TIMEOUT_S, env=env)


def etl_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``streamrec etl run`` as a process: for the errors that end it before Spark starts."""
    return run_process("-m", "streamrec", "etl", "run", "--region", REGION, "--config", str(config), *args)


def etl_cli_in_process(monkeypatch: pytest.MonkeyPatch, config: Path, *args: str) -> Result:
    """``streamrec etl run`` through typer's CliRunner, for the runs that need Spark.

    A Spark JVM of its own would cost a process tens of CPU seconds on a 2-core box before its first job;
    in process, the command's ``local_session`` (getOrCreate) gets the module's warm session instead. The
    command stops its session when it ends, and that session has to outlive it: ``stop`` is a no-op here.
    """
    monkeypatch.setattr(SparkSession, "stop", lambda self: None)
    # COLUMNS: rich wraps at 80 columns when the output is not a terminal (see the devstack tests).
    argv = ["etl", "run", "--region", REGION, "--config", str(config), *args]
    return CliRunner().invoke(streamrec_cli, argv, env={"COLUMNS": "200"})


def test_cli_runs_every_job_and_prints_a_line_each(spark: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    lake = small_lake(tmp_path, {SMALL_DAY: 40})
    done = etl_cli_in_process(monkeypatch, write_config(tmp_path, f"file://{lake}"),
                              "--date", SMALL_DAY.isoformat(), "--job", "all")
    assert done.exit_code == 0, (done.output, done.exception)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert [line.split()[:3] for line in lines] == [
        [job, REGION, SMALL_DAY.isoformat()] for job in ("clean", "features", "keys")], done.stdout
    assert "out: clean 40 " in lines[0] and "out: popular 1, items 7, users 5" in lines[2], done.stdout
    for job in ("clean", "features", "keys"):
        summary = read_json(partition(lake, job, SMALL_DAY, SUMMARY))
        assert summary["status"] == "succeeded", summary


@pytest.mark.parametrize(("case", "expected"), [
    ("bad_date", ["--date '2024-02-30'", "YYYY-MM-DD"]),
    ("s3_lake", ["file://", "streamrec etl submit"]),
])
def test_cli_user_errors_are_one_line_with_exit_2(tmp_path: Path, case: str, expected: list[str]) -> None:
    lake_uri = "s3://streamrec-lake/lake" if case == "s3_lake" else f"file://{tmp_path / 'lake'}"
    day = "2024-02-30" if case == "bad_date" else SMALL_DAY.isoformat()
    done = etl_cli(write_config(tmp_path, lake_uri), "--date", day)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and all(text in line for text in expected), line
    assert done.stdout == ""


def test_cli_data_quality_failure_exits_3(spark: Any, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    lake = small_lake(tmp_path, {SMALL_DAY: 20})
    raw_file = data_files(partition(lake, "raw", SMALL_DAY))[0]
    extra = pq.read_table(raw_file)
    pq.write_table(extra.append_column("coupon", pa.array(["SPRING24"] * len(extra))),
                   raw_file.parent / "zz-drift.parquet")
    done = etl_cli_in_process(monkeypatch, write_config(tmp_path, f"file://{lake}"),
                              "--date", SMALL_DAY.isoformat(), "--job", "all")
    assert done.exit_code == 3, (done.output, done.exception)
    # One message (rich may fold it: it names the lake path), no summary line of a job that did not finish.
    message = " ".join(done.stdout.split())
    assert message.startswith(f"clean {REGION} {SMALL_DAY} failed: data-quality check 'schema:raw' failed: "
                              "schema drift in "), message
    assert message.endswith("unexpected column coupon (string)"), message
    assert not partition(lake, "clean", SMALL_DAY).joinpath(SUMMARY).exists()
    assert not partition(lake, "features", SMALL_DAY).exists()  # the run stopped at the first failure


def test_emr_entry_point_prints_json_summaries(tmp_path: Path) -> None:
    lake = small_lake(tmp_path, {SMALL_DAY: 30})
    done = run_process(
        "-m", "spark_etl.main", "--job", "clean", "--region", REGION, "--date", SMALL_DAY.isoformat(),
        "--lake-uri", f"file://{lake}", "--etl-json", json.dumps({"late_arrival_hours": 3}),
        # A cluster's default of 200 shuffle partitions makes a tiny local run slow.
        "--spark-json", json.dumps({"spark.sql.shuffle.partitions": "2"}))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [(p["job"], p["region"], p["dt"], p["status"], p["outputs"]) for p in printed] == [
        ("clean", REGION, SMALL_DAY.isoformat(), "succeeded", {"clean": 30})]
    summary = read_json(partition(lake, "clean", SMALL_DAY, SUMMARY))
    assert summary["params"]["late_arrival_hours"] == 3 and summary["outputs"] == {"clean": 30}
    assert len(read_table(partition(lake, "clean", SMALL_DAY))) == 30


@pytest.mark.parametrize("etl_json", ['{"late_arrival_hours": ', '{"late_arival_hours": 6}',
                                      '{"late_arrival_hours": "soon"}'])
def test_emr_entry_point_rejects_bad_settings_with_exit_2(tmp_path: Path, etl_json: str) -> None:
    done = run_process("-m", "spark_etl.main", "--job", "clean", "--region", REGION, "--date",
                       SMALL_DAY.isoformat(), "--lake-uri", f"file://{tmp_path / 'lake'}",
                       "--etl-json", etl_json)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: bad argument: "), line
    assert done.stdout == ""
    assert not (tmp_path / "lake").exists()
