"""Spark ETL throughput (clean_events + build_features) against DuckDB running the same SQL, in the same run.

Set-up (not timed): the generator writes ``--events`` records over ``--days`` UTC days (users ~ events/40,
items ~ events/20) and ``ingest.offline.land`` lands them in a local raw lake with ``dedup_window=0``, so
every duplicate send is left for the ETL to remove.

Path measured: ``spark_etl.runner.run`` in the session ``spark_etl.session.local_session`` builds
(``local[2]``, the project's SparkSettings): job ``clean`` for every day, then ``features`` for the last
day, with the EtlSettings defaults except ``train_days = days - 1`` (every day yields training examples).
The session is started before the clock starts; its start-up is timed and reported on its own, and in
a second figure that includes it.

Baseline: DuckDB (in process, ``threads=2``, memory limit = the Spark driver's) running the equivalent
SQL kept in this file on the same raw Parquet: per day the receive-hour window, null-key / other-day /
unknown-type tags, exact dedup on event_id, sessionizing and the bot rules, the clean Parquet; then the
items, users and training-example tables of the last day. Row counts of every output (and of the rows
removed by reason) must match Spark's, or the benchmark fails: the two do the same work.

Per core: events / wall seconds / 2 (Spark ``local[2]`` uses two cores, DuckDB gets two threads).
Events = the raw rows of the processed days (each raw row counted once, although the receive windows of
neighbouring days overlap by seven hours). CPU seconds (the Spark JVM plus the Python driver; DuckDB's
process) are reported beside the wall figures, because these machines are shared and noisy.

    python -m benchmarks.etl [--quick] [--events N] [--days D]

Target (issue): >= 100,000 events/s per core for the Spark path on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.common import emit

REGION = "us-east-1"
# The simulated window ends at a UTC midnight, so every processed day is a whole day of events.
END = datetime(2026, 11, 27, tzinfo=UTC)
CORES = 2  # Spark local[2]; DuckDB threads=2
# Relative difference allowed between Spark's and DuckDB's row counts. Both are deterministic on the same
# input, so in practice they match exactly; a small tolerance only absorbs timestamp-tie ordering.
TOLERANCE = 0.0005


# --------------------------------------------------------------------------------------------------------
# Set-up: generated records → raw lake (not timed)
# --------------------------------------------------------------------------------------------------------

def land_raw(lake_uri: str, events: int, days: int, seed: int) -> dict[str, Any]:
    from ingest.offline import land
    from streamrec.clickstream.config import GeneratorConfig
    from streamrec.clickstream.generate import generate_region

    config = GeneratorConfig(seed=seed, regions=(REGION,), users_per_region=max(100, events // 40),
                             items=max(200, events // 20), events_per_region=events, days=days, end=END)
    t0 = time.perf_counter()
    records = ((rec.data, rec.partition_key) for rec in generate_region(config, REGION))
    # now=END: the simulated present is the window's end (only the generator's planted future-time
    # records are dead-lettered as future_ts, whatever the wall clock says).
    summary = land(records, lake_uri, REGION, dedup_window=0, now=END)
    return {"records": summary.records, "raw_rows": summary.rows, "dead_letter": sum(summary.dead.values()),
            "raw_files": summary.files, "seconds": round(time.perf_counter() - t0, 1)}


def processed_days(days: int) -> list[date]:
    last = (END - timedelta(days=1)).date()
    return [last - timedelta(days=d) for d in range(days - 1, -1, -1)]


# --------------------------------------------------------------------------------------------------------
# CPU time of the Spark JVM (a child process of this one) from /proc
# --------------------------------------------------------------------------------------------------------

def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads (and waited-for children) included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def jvm_pid(spark: Any) -> int | None:
    """The Spark driver JVM's pid (pyspark's gateway process execs into java), if it can be found."""
    try:
        pid = int(spark.sparkContext._gateway.proc.pid)
        if Path(f"/proc/{pid}/comm").read_text().strip() == "java":
            return pid
    except (AttributeError, OSError, ValueError):
        pass
    return None


# --------------------------------------------------------------------------------------------------------
# Spark path
# --------------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    wall_s: float
    cpu_s: float | None
    steps: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)


def run_spark(spark: Any, lake_uri: str, days: list[date], etl: Any) -> RunResult:
    from spark_etl import runner

    pid = jvm_pid(spark)  # CPU seconds: the JVM (all its threads: tasks, JIT, GC) plus this Python driver
    cpu0 = (_cpu_seconds(pid) if pid else 0.0) + time.process_time()
    t0 = time.perf_counter()
    clean = list(runner.run(spark, lake_uri, REGION, "clean", days[0], days[-1], etl))
    t1 = time.perf_counter()
    features = list(runner.run(spark, lake_uri, REGION, "features", days[-1], None, etl))
    t2 = time.perf_counter()
    cpu = (_cpu_seconds(pid) + time.process_time() - cpu0) if pid else None

    steps: dict[str, float] = {}
    for job, summaries in (("clean", clean), ("features", features)):
        for s in summaries:
            for step in s.steps:
                key = f"{job}.{step.name}"
                steps[key] = steps.get(key, 0.0) + step.seconds
    # Outside the timed steps: run summaries written and read, data-quality checks, job set-up.
    steps["clean.other"] = (t1 - t0) - sum(v for k, v in steps.items() if k.startswith("clean."))
    steps["features.other"] = (t2 - t1) - sum(v for k, v in steps.items() if k.startswith("features."))
    steps["clean.total"], steps["features.total"] = t1 - t0, t2 - t1
    removed: dict[str, int] = {}
    for s in clean:
        for reason, n in s.removed.items():
            removed[reason] = removed.get(reason, 0) + n
    counts = {"clean": sum(s.outputs["clean"] for s in clean), **features[-1].outputs}
    for s in clean:
        counts[f"clean.{s.dt}"] = s.outputs["clean"]
    return RunResult(t2 - t0, cpu, {k: round(v, 2) for k, v in steps.items()}, counts, removed)


# --------------------------------------------------------------------------------------------------------
# DuckDB baseline: the same rules as spark_etl/transforms.py, as SQL
# --------------------------------------------------------------------------------------------------------

# One day's raw rows, each tagged with the reason it is dropped (NULL = kept): the receive window,
# null keys, events of other days, unknown event types, duplicate event ids, bot sessions and bot users.
# Materialised as a temporary table, as the Spark job caches its tagged DataFrame: one pass counts the
# reasons, the next writes the kept rows.
CLEAN_TAGGED_SQL = """
CREATE OR REPLACE TEMP TABLE flagged AS
WITH raw AS (
    -- The receive-hour partitions that can hold events of the day: its last hour before, the day
    -- itself, and late_arrival_hours after it (the hive partition filter prunes the other folders).
    SELECT * EXCLUDE (session_id), session_id AS client_session_id
    FROM read_parquet($raw_glob, hive_partitioning = true, hive_types = {'dt': VARCHAR, 'hour': VARCHAR},
                      union_by_name = true)
    WHERE strptime(dt || ' ' || hour, '%Y-%m-%d %H') >= $window_start
      AND strptime(dt || ' ' || hour, '%Y-%m-%d %H') < $window_end
),
tagged AS (
    SELECT *,
        CASE WHEN event_id IS NULL OR user_id IS NULL OR item_id IS NULL OR event_type IS NULL OR ts IS NULL
                  THEN 'null_key'
             WHEN ts < $day_start OR ts >= $day_end THEN 'other_day'
             WHEN NOT list_contains($event_types, event_type) THEN 'unknown_event_type'
        END AS _drop
    FROM raw
),
deduped AS (
    -- Exact dedup: among one user's rows still in play, the copy of an event id received first is
    -- kept (ties broken by shard and sequence number, so a rerun keeps the same copy).
    SELECT * REPLACE (
        CASE WHEN _drop IS NULL AND row_number() OVER (
                 PARTITION BY user_id, event_id, _drop IS NULL ORDER BY received_at, shard_id, sequence_number) > 1
             THEN 'duplicate' ELSE _drop END AS _drop)
    FROM tagged
),
kept AS (SELECT * FROM deduped WHERE _drop IS NULL),
gaps AS (
    -- A gap of more than session_gap_minutes between a user's consecutive events starts a session.
    SELECT *,
        CASE WHEN lag(ts) OVER by_user IS NULL
                  OR epoch_ms(ts) - epoch_ms(lag(ts) OVER by_user) > $gap_ms THEN 1 ELSE 0 END AS _new
    FROM kept
    WINDOW by_user AS (PARTITION BY user_id ORDER BY ts, event_id)
),
numbered AS (
    -- Running sum of session starts = the session's number within the user.
    SELECT *, sum(_new) OVER (PARTITION BY user_id ORDER BY ts, event_id
                              ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS _session_no
    FROM gaps
),
sessions AS (
    -- Session id "<user_id>:<first event ms>", 1-based position, and what the bot rules need.
    SELECT *,
        user_id || ':' || CAST(min(epoch_ms(ts)) OVER s AS VARCHAR) AS session_id,
        CAST(row_number() OVER (PARTITION BY user_id, _session_no ORDER BY ts, event_id) AS INTEGER)
            AS session_position,
        count(*) OVER s AS _session_events,
        greatest((epoch_ms(max(ts) OVER s) - epoch_ms(min(ts) OVER s)) / 60000.0, 1.0) AS _session_minutes,
        count(*) OVER (PARTITION BY user_id) AS _user_events
    FROM numbered
    WINDOW s AS (PARTITION BY user_id, _session_no)
)
SELECT * EXCLUDE (_new, _session_no, _session_events, _session_minutes, _user_events)
    REPLACE (CASE WHEN _user_events > $bot_max_user_events THEN 'bot_user'
                  WHEN _session_events >= $bot_min_session_events
                       AND _session_events / _session_minutes > $bot_max_events_per_minute THEN 'bot_session'
             END AS _drop)
FROM sessions
UNION ALL BY NAME
SELECT *, NULL::VARCHAR AS session_id, NULL::INTEGER AS session_position FROM deduped WHERE _drop IS NOT NULL
"""

# The kept rows in the clean table's columns (spark_etl.schemas.CLEAN), clustered and sorted as the
# Spark job writes them; PARTITION_BY with OVERWRITE_OR_IGNORE replaces only this day's folder.
CLEAN_WRITE_SQL = """
COPY (
    SELECT event_id, user_id, item_id, event_type, {weight} AS event_weight, ts, category, price, device,
           page, referrer, client_region, client_session_id, session_id, session_position, received_at,
           $region AS region, $dt AS dt
    FROM flagged WHERE _drop IS NULL
    ORDER BY user_id, ts, event_id
) TO '{out}' (FORMAT parquet, COMPRESSION snappy, PARTITION_BY (region, dt), OVERWRITE_OR_IGNORE true)
"""

# The clean events of the 30 days up to the cutoff day, materialised (Spark caches them too).
FEATURES_CLEAN_SQL = """
CREATE OR REPLACE TEMP TABLE clean AS
SELECT * FROM read_parquet($clean_glob, hive_partitioning = true,
                           hive_types = {'region': VARCHAR, 'dt': VARCHAR})
WHERE dt >= $first_day AND dt <= $dt
"""

# items: category (latest seen), first and last seen, weighted popularity over 1, 7 and 30 days, rank by
# 7-day popularity. (The Spark job also carries first_seen forward from the previous day's items table;
# the benchmark builds features for one day only, so there is none to carry.)
ITEMS_SQL = """
CREATE OR REPLACE TEMP TABLE items AS
SELECT *, CAST(row_number() OVER (ORDER BY pop_7d DESC, item_id) AS INTEGER) AS popularity_rank
FROM (
    SELECT item_id,
        arg_max(category, ts) FILTER (WHERE category IS NOT NULL) AS category,
        min(ts) AS first_seen,
        max(ts) AS last_seen,
        sum(CASE WHEN dt = $dt THEN event_weight ELSE 0 END) AS pop_1d,
        sum(CASE WHEN dt > $day_minus_7 THEN event_weight ELSE 0 END) AS pop_7d,
        sum(CASE WHEN dt > $day_minus_30 THEN event_weight ELSE 0 END) AS pop_30d,
        count(*) AS events_30d
    FROM clean GROUP BY item_id
)
"""

# users: last N items (oldest first), the newest purchased_items_max distinct purchased items (ordered by
# each item's most recent purchase), counts by event type, first and last seen, latest device.
USERS_SQL = """
CREATE OR REPLACE TEMP TABLE users AS
WITH bought AS (
    SELECT user_id, item_id, max((ts, event_id)) AS _last
    FROM clean WHERE event_type = 'purchase' GROUP BY user_id, item_id
),
purchased AS (
    SELECT user_id, list_reverse(list(item_id ORDER BY _last DESC)[1:$purchased_max]) AS purchased_items
    FROM bought GROUP BY user_id
),
agg AS (
    SELECT user_id,
        list_reverse(list(item_id ORDER BY ts DESC, event_id DESC)[1:$history_length]) AS last_items,
        {counts},
        min(ts) AS first_seen,
        max(ts) AS last_seen,
        arg_max_null(device, ts) AS device
    FROM clean GROUP BY user_id
)
SELECT user_id, last_items, coalesce(purchased_items, []) AS purchased_items,
       {count_names}, first_seen, last_seen, device
FROM agg LEFT JOIN purchased USING (user_id)
"""

# examples: one row per interaction of the train days (split train) and the cutoff day (split eval), with
# the user's last N items strictly before it: a window of the previous N + 8 rows (slack for events of
# the same millisecond), filtered on ts, the last N kept. item_pop_rank: rank by weighted popularity over
# the 7 days before the cutoff day.
EXAMPLES_SQL = """
CREATE OR REPLACE TEMP TABLE examples AS
WITH pop_rank AS (
    SELECT item_id,
        CAST(row_number() OVER (ORDER BY sum(event_weight) DESC, item_id) AS INTEGER) AS item_pop_rank
    FROM clean WHERE dt < $dt AND dt >= $day_minus_7 GROUP BY item_id
),
framed AS (
    SELECT *, list({'ts': ts, 'item_id': item_id}) OVER (
        PARTITION BY user_id ORDER BY ts, event_id ROWS BETWEEN $frame PRECEDING AND 1 PRECEDING) AS _earlier
    FROM clean
),
examples AS (
    SELECT *, list_filter(coalesce(_earlier, []), lambda e: e.ts < framed.ts) AS _before
    FROM framed WHERE dt >= $first_train_day
)
SELECT user_id, list_transform(_before[-$history_length:], lambda e: e.item_id) AS history, item_id, category,
       event_type, event_weight AS weight, ts, device, CAST(hour(ts) AS INTEGER) AS hour, $region AS region,
       item_pop_rank, CASE WHEN dt = $dt THEN 'eval' ELSE 'train' END AS split
FROM examples LEFT JOIN pop_rank USING (item_id)
"""

# One file per table (the Spark job writes one per million rows), sorted as the Spark job sorts them.
FEATURES_WRITE_SQL = {
    "items": "COPY (SELECT * FROM items ORDER BY popularity_rank) TO '{out}/items/part-0.parquet' "
             "(FORMAT parquet, COMPRESSION snappy)",
    "users": "COPY (SELECT * FROM users ORDER BY user_id) TO '{out}/users/part-0.parquet' "
             "(FORMAT parquet, COMPRESSION snappy)",
    "examples": "COPY (SELECT * FROM examples ORDER BY split, user_id, ts, item_id) TO '{out}/examples' "
                "(FORMAT parquet, COMPRESSION snappy, PARTITION_BY (split), OVERWRITE_OR_IGNORE true)",
}


def _weight_sql() -> str:
    from streamrec.events import EVENT_WEIGHTS

    cases = " ".join(f"WHEN '{name}' THEN {weight}" for name, weight in EVENT_WEIGHTS.items())
    return f"CAST(CASE event_type {cases} END AS DOUBLE)"


def _ts(value: datetime) -> datetime:
    return value.replace(tzinfo=None)  # window bounds compared to naive partition timestamps


def run_duckdb(raw_root: Path, out_root: Path, days: list[date], etl: Any, memory: str,
               temp: Path) -> RunResult:
    import duckdb

    from spark_etl.transforms import day_bounds
    from streamrec.events import EVENT_WEIGHTS

    types = list(EVENT_WEIGHTS)
    steps: dict[str, float] = {}
    removed: dict[str, int] = {}
    counts: dict[str, int] = {"clean": 0}

    def timed(key: str, sql: str, params: dict[str, Any] | None = None) -> Any:
        t = time.perf_counter()
        result = con.execute(sql, params or {})
        rows = result.fetchall()
        steps[key] = steps.get(key, 0.0) + time.perf_counter() - t
        return rows

    cpu0, t0 = time.process_time(), time.perf_counter()
    con = duckdb.connect(config={"threads": CORES, "memory_limit": memory, "temp_directory": str(temp)})
    # Without the ICU extension (not bundled) DuckDB's TIMESTAMPTZ arithmetic and hour() are in UTC.
    shutil.rmtree(out_root, ignore_errors=True)
    clean_root = out_root / "clean"
    clean_root.mkdir(parents=True)
    try:
        for day in days:
            start, end = day_bounds(day)
            window_start = _ts(start) - timedelta(hours=1)
            params = {
                "raw_glob": f"{raw_root}/region={REGION}/dt=*/hour=*/*.parquet",
                "window_start": window_start,
                "window_end": _ts(end) + timedelta(hours=etl.late_arrival_hours),
                "day_start": start, "day_end": end, "event_types": types,
                "gap_ms": etl.session_gap_minutes * 60_000,
                "bot_min_session_events": etl.bot_min_session_events,
                "bot_max_events_per_minute": etl.bot_max_events_per_minute,
                "bot_max_user_events": etl.bot_max_user_events_per_day,
            }
            timed("clean.read_dedup_sessionize_bots", CLEAN_TAGGED_SQL, params)
            for reason, n in timed("clean.read_dedup_sessionize_bots",
                                   "SELECT _drop, count(*) FROM flagged GROUP BY _drop"):
                if reason is None:
                    counts["clean"] += n
                    counts[f"clean.{day.isoformat()}"] = n
                else:
                    removed[reason] = removed.get(reason, 0) + n
            timed("clean.write", CLEAN_WRITE_SQL.format(weight=_weight_sql(), out=clean_root),
                  {"region": REGION, "dt": day.isoformat()})
        t1 = time.perf_counter()

        cutoff = days[-1]
        dt = cutoff.isoformat()

        def before(n: int) -> str:
            return (cutoff - timedelta(days=n)).isoformat()

        timed("features.read", FEATURES_CLEAN_SQL, {
            "clean_glob": f"{clean_root}/region={REGION}/dt=*/*.parquet", "first_day": before(29), "dt": dt})
        timed("features.items", ITEMS_SQL, {"dt": dt, "day_minus_7": before(7), "day_minus_30": before(30)})
        count_cols = ", ".join(f"count(*) FILTER (WHERE event_type = '{t}') AS n_{t}" for t in types)
        count_names = ", ".join(f"n_{t}" for t in types)
        timed("features.users", USERS_SQL.format(counts=count_cols, count_names=count_names),
              {"history_length": etl.history_length, "purchased_max": etl.purchased_items_max})
        timed("features.examples", EXAMPLES_SQL, {
            "dt": dt, "day_minus_7": before(7), "frame": etl.history_length + 8,
            "first_train_day": before(etl.train_days), "history_length": etl.history_length,
            "region": REGION})
        out = out_root / "features" / f"region={REGION}" / f"dt={dt}"
        for table in ("items", "users"):
            (out / table).mkdir(parents=True, exist_ok=True)
        for table, sql in FEATURES_WRITE_SQL.items():
            timed("features.write", sql.format(out=out))
        t2 = time.perf_counter()
        counts["items"] = con.execute("SELECT count(*) FROM items").fetchone()[0]
        counts["users"] = con.execute("SELECT count(*) FROM users").fetchone()[0]
        for split, n in con.execute("SELECT split, count(*) FROM examples GROUP BY split").fetchall():
            counts[f"examples_{split}"] = n
    finally:
        con.close()
    cpu = time.process_time() - cpu0
    steps["clean.total"], steps["features.total"] = t1 - t0, t2 - t1
    return RunResult(t2 - t0, cpu, {k: round(v, 2) for k, v in steps.items()}, counts, removed)


# --------------------------------------------------------------------------------------------------------
# Honesty check: both did the same work
# --------------------------------------------------------------------------------------------------------

def compare(spark: RunResult, duck: RunResult) -> list[str]:
    """Row counts that differ by more than TOLERANCE (relative), one line each."""
    problems = []
    keys = sorted(set(spark.counts) | set(duck.counts))
    pairs = [(k, spark.counts.get(k, 0), duck.counts.get(k, 0)) for k in keys]
    pairs += [(f"removed.{k}", spark.removed.get(k, 0), duck.removed.get(k, 0))
              for k in sorted(set(spark.removed) | set(duck.removed))]
    for name, a, b in pairs:
        if abs(a - b) > TOLERANCE * max(a, b, 1):
            problems.append(f"{name}: spark {a:,} vs duckdb {b:,}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.etl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="200k records over 3 days (about a minute on an idle machine)")
    parser.add_argument("--events", type=int, default=None, help="generated records (default 2,000,000)")
    parser.add_argument("--days", type=int, default=None,
                        help="UTC days they span, all processed (default 7; 3 with --quick)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternating Spark/DuckDB repeats on the same lake; the best of each is kept "
                             "(repeats after the first run on a JVM that is already warm)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--shuffle-partitions", type=int, default=None,
                        help="SparkSettings.shuffle_partitions (default: the project's default)")
    parser.add_argument("--driver-memory", default=None,
                        help="SparkSettings.driver_memory, e.g. 6g (default: the project's default); "
                             "DuckDB's memory limit follows it")
    parser.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Spark property (SparkSettings.conf), repeatable, for profiling")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="work here and keep the lake (a later run with the same --events/--days/--seed "
                             "reuses it) instead of a temporary directory that is removed")
    args = parser.parse_args(argv)
    args.events = args.events or (200_000 if args.quick else 2_000_000)
    args.days = args.days or (3 if args.quick else 7)
    if args.days < 2:
        parser.error("--days must be at least 2 (one training day before the evaluation day)")

    from spark_etl.session import local_session
    from streamrec.settings import EtlSettings, SparkSettings

    spark_kwargs: dict[str, Any] = {"conf": dict(kv.split("=", 1) for kv in args.spark_conf)}
    if args.shuffle_partitions:
        spark_kwargs["shuffle_partitions"] = args.shuffle_partitions
    if args.driver_memory:
        spark_kwargs["driver_memory"] = args.driver_memory
    spark_settings = SparkSettings(**spark_kwargs)
    etl = EtlSettings(train_days=args.days - 1)
    days = processed_days(args.days)
    memory = spark_settings.driver_memory.upper() + "B"  # DuckDB gets the Spark driver's memory

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="streamrec-bench-etl-"))
    work.mkdir(parents=True, exist_ok=True)
    lake = work / "lake"
    spark = None
    try:
        marker = work / "landed.json"
        wanted = {"events": args.events, "days": args.days, "seed": args.seed, "end": END.isoformat()}
        previous = json.loads(marker.read_text()) if marker.exists() else {}
        if args.work_dir and previous.get("params") == wanted:
            landed = previous["landed"]  # the same raw lake, landed by an earlier run in this work dir
            print(f"reusing the raw lake in {lake}", file=sys.stderr)
        else:
            marker.unlink(missing_ok=True)
            shutil.rmtree(lake, ignore_errors=True)
            print(f"generating and landing {args.events:,} records over {args.days} days ...",
                  file=sys.stderr)
            landed = land_raw(f"file://{lake}", args.events, args.days, args.seed)
            marker.write_text(json.dumps({"params": wanted, "landed": landed}))
        print(f"landed {landed}", file=sys.stderr)
        events = landed["raw_rows"]

        t = time.perf_counter()
        spark = local_session(spark_settings, app_name="streamrec-bench-etl")
        session_s = time.perf_counter() - t
        print(f"Spark session started in {session_s:.1f} s", file=sys.stderr)

        spark_runs, duck_runs = [], []
        for r in range(args.repeats):
            spark_runs.append(run_spark(spark, f"file://{lake}", days, etl))
            duck_runs.append(run_duckdb(lake / "raw", work / "duckdb", days, etl, memory,
                                        work / "duckdb-tmp"))
            s, d = spark_runs[-1], duck_runs[-1]
            print(f"repeat {r + 1}: spark {s.wall_s:.1f} s ({events / s.wall_s / CORES:,.0f} events/s/core), "
                  f"duckdb {d.wall_s:.1f} s ({events / d.wall_s / CORES:,.0f} events/s/core)",
                  file=sys.stderr)
            print(f"  spark steps {s.steps}\n  duckdb steps {d.steps}", file=sys.stderr)
            problems = compare(s, d)
            print(f"  rows: spark {s.counts} removed {s.removed}\n"
                  f"        duckdb {d.counts} removed {d.removed}", file=sys.stderr)
            if problems:
                print("error: Spark and DuckDB outputs differ, the comparison would not be honest:\n  "
                      + "\n  ".join(problems), file=sys.stderr)
                return 1
        s = min(spark_runs, key=lambda x: x.wall_s)
        d = min(duck_runs, key=lambda x: x.wall_s)
        params = {"events": events, "generated_records": landed["records"], "days": args.days,
                  "raw_files": landed["raw_files"], "cores": CORES, "repeats": args.repeats,
                  "spark_master": spark_settings.master, "spark_driver_memory": spark_settings.driver_memory,
                  "shuffle_partitions": spark_settings.shuffle_partitions,
                  "spark_conf": spark_settings.conf, "duckdb_threads": CORES, "duckdb_memory_limit": memory,
                  "outputs": {k: v for k, v in s.counts.items() if not k.startswith("clean.")},
                  "removed": s.removed, "quick": args.quick, "landing_s": landed["seconds"]}
        extra = {"spark_session_start_s": round(session_s, 2), "spark_wall_s": round(s.wall_s, 2),
                 "duckdb_wall_s": round(d.wall_s, 2), "spark_steps_s": s.steps, "duckdb_steps_s": d.steps}
        emit("etl", "etl_events_per_s_per_core", events / s.wall_s / CORES, "events/s/core",
             "duckdb_events_per_s_per_core", events / d.wall_s / CORES, params,
             session_start_included=False, **extra)
        emit("etl", "etl_events_per_s_per_core_with_session_start", events / (s.wall_s + session_s) / CORES,
             "events/s/core", "duckdb_events_per_s_per_core", events / d.wall_s / CORES, params,
             session_start_included=True, **extra)
        if s.cpu_s and d.cpu_s:
            emit("etl", "etl_events_per_cpu_s", events / s.cpu_s, "events/cpu-s",
                 "duckdb_events_per_cpu_s", events / d.cpu_s, params, session_start_included=False,
                 spark_cpu_s=round(s.cpu_s, 2), duckdb_cpu_s=round(d.cpu_s, 2))
    finally:
        if spark is not None:
            spark.stop()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
