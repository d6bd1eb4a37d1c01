"""clean_events: raw clickstream of one region and day → clean/region=R/dt=D.

Reads the raw receive-hour partitions that can hold events of day D (the last hour of D-1 through
``etl.late_arrival_hours`` into D+1), checks the schema contract, drops null keys, events of other
days, exact duplicate event ids and behavioural bots, sessionizes, and replaces only partition D.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from spark_etl import rawfiles, schemas, transforms
from spark_etl.jobs.common import JobContext, MissingInputError, conform, files_for, run_with_summary, write_parquet
from spark_etl.summary import RunSummary, non_empty_check, null_keys_check, row_drop_check, schema_check
from spark_etl.transforms import DROP
from streamrec.lake import filesystem


def read_raw(ctx: JobContext, summary: RunSummary) -> DataFrame:
    """The raw rows of the receive window, after the schema-contract check of every file."""
    layout = ctx.layout
    fs = filesystem(layout.uri, region=ctx.region)
    hours = transforms.receive_hours(ctx.day, ctx.etl.late_arrival_hours)
    files = rawfiles.window_files(fs, layout.region_root("raw", ctx.region), hours)
    if not files:
        raise MissingInputError(f"no raw data for region {ctx.region} around {ctx.dt} "
                                f"under {ctx.region_root('raw')}")
    drifted = rawfiles.drifted_files(fs, files, schemas.describe(schemas.RAW))
    shown = sorted(drifted.items())[:3]
    problems = [f"{layout.to_uri(path)}: {', '.join(p)}" for path, p in shown]
    if len(drifted) > len(shown):
        problems.append(f"and {len(drifted) - len(shown)} more files")
    summary.check(schema_check("raw", problems, f"{len(drifted)} of {len(files)} raw files"))
    # Every file matches the contract, so Spark needs no schema merge; basePath keeps dt and hour.
    return (ctx.spark.read.option("basePath", ctx.region_root("raw"))
            .parquet(*[layout.to_uri(path) for path in files]))


def _null_counts(df: DataFrame) -> dict[str, int]:
    row = df.select([F.sum(F.col(c).isNull().cast("long")).alias(c) for c in schemas.RAW_KEYS]).first()
    return {c: int(row[c] or 0) for c in schemas.RAW_KEYS}


def run(ctx: JobContext) -> RunSummary:
    etl = ctx.etl
    summary = RunSummary("clean", ctx.region, ctx.dt, params={
        "late_arrival_hours": etl.late_arrival_hours, "session_gap_minutes": etl.session_gap_minutes,
        "bot_min_session_events": etl.bot_min_session_events,
        "bot_max_events_per_minute": etl.bot_max_events_per_minute,
        "bot_max_user_events_per_day": etl.bot_max_user_events_per_day,
    })

    def body(summary: RunSummary) -> None:
        with summary.step("read") as step:
            raw = read_raw(ctx, summary).withColumnRenamed("session_id", "client_session_id")
        # Only what the clean table and the dedup tie-break use rides through the shuffle and the cache.
        rules_in = raw.select(*[c for c in schemas.CLEAN.fieldNames() if c in raw.columns],
                              "shard_id", "sequence_number")
        tagged = transforms.tag_raw(transforms.cluster_by_user(rules_in), ctx.day, schemas.RAW_KEYS)
        sessions = transforms.sessionize(tagged, etl.session_gap_minutes)
        flagged = transforms.flag_bots(
            sessions, min_session_events=etl.bot_min_session_events,
            max_events_per_minute=etl.bot_max_events_per_minute,
            max_user_events_per_day=etl.bot_max_user_events_per_day).cache()
        try:
            with summary.step("dedup_sessionize_bots") as step:
                counts = {r[DROP]: int(r["count"]) for r in flagged.groupBy(DROP).count().collect()}
                step.rows_in, step.rows_out = sum(counts.values()), counts.get(None, 0)
            rows_out = counts.pop(None, 0)
            summary.removed = dict(sorted(counts.items()))
            nulls = _null_counts(raw) if counts.get("null_key") else {c: 0 for c in schemas.RAW_KEYS}
            summary.check(null_keys_check("raw", nulls))
            summary.check(non_empty_check("clean", rows_out, f"clean events of {ctx.dt}"))
            previous = (ctx.previous("clean") or {}).get("clean")
            summary.check(row_drop_check("clean", rows_out, previous, etl.max_row_drop_share))
            with summary.step("write") as step:
                out = conform(transforms.clean_rows(flagged), schemas.CLEAN).select(
                    "*", F.lit(ctx.region).alias("region"), F.lit(ctx.dt).alias("dt"))
                write_parquet(out, ctx.root("clean"), etl, files=files_for(rows_out, etl),
                              cluster_by=["user_id"], sort_by=["user_id", "ts", "event_id"],
                              partition_by=["region", "dt"])
                step.rows_out = rows_out
            summary.outputs = {"clean": rows_out}
        finally:
            flagged.unpersist()

    return run_with_summary(ctx, summary, ctx.partition("clean"), body)
