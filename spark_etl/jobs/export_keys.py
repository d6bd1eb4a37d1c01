"""export_keys: features of day D → keys/region=R/dt=D/{popular,items,users}, the key data points the
sync step loads into the region's DynamoDB features table.

Every row is one DynamoDB item: ``pk`` and ``sk`` plus one typed column per attribute, so the loader
maps columns to attributes without knowing the tables. Files are clustered by ``pk``, so parallel
loaders write disjoint keys.

    popular  pk="popular"       sk="top<K>"  item_ids, scores (7-day weighted popularity), dt
    items    pk="item#<id>"     sk="meta"    item_id, category, popularity_rank, pop_7d, first_seen, dt
    users    pk="user#<id>"     sk="recent"  user_id, item_ids (last N, oldest first), last_seen, dt
"""

from __future__ import annotations

from pyspark.sql import DataFrame

from spark_etl import lakeio, schemas, transforms
from spark_etl.jobs.common import JobContext, MissingInputError, conform, files_for, run_with_summary, write_parquet
from spark_etl.summary import SUMMARY_NAME, RunSummary, non_empty_check, row_drop_check


def read_features(ctx: JobContext, table: str) -> DataFrame:
    if not lakeio.exists(ctx.spark, f"{ctx.partition('features')}/{SUMMARY_NAME}"):
        raise MissingInputError(f"no features for region {ctx.region} on {ctx.dt} "
                                f"(run the features job first): {ctx.partition('features')}")
    return ctx.spark.read.parquet(ctx.partition("features", None, table))


def run(ctx: JobContext) -> RunSummary:
    etl = ctx.etl
    summary = RunSummary("keys", ctx.region, ctx.dt, params={"popular_top_k": etl.popular_top_k})
    out_dir = ctx.partition("keys")

    def body(summary: RunSummary) -> None:
        with summary.step("read"):
            items, users = read_features(ctx, "items"), read_features(ctx, "users")
        tables = {
            "popular": conform(transforms.popular_key(items, etl.popular_top_k, ctx.dt), schemas.KEYS_POPULAR),
            "items": conform(transforms.item_keys(items, ctx.dt), schemas.KEYS_ITEMS).cache(),
            "users": conform(transforms.user_keys(users, ctx.dt), schemas.KEYS_USERS).cache(),
        }
        try:
            outputs = {name: df.count() for name, df in tables.items()}
            previous = ctx.previous("keys") or {}
            for name, rows in outputs.items():
                summary.check(non_empty_check(name, rows, f"keys {name} of {ctx.dt}"))
                summary.check(row_drop_check(name, rows, previous.get(name), etl.max_row_drop_share))
            with summary.step("write") as step:
                for name, df in tables.items():
                    write_parquet(df, f"{out_dir}/{name}", etl, files=files_for(outputs[name], etl),
                                  cluster_by=["pk"], sort_by=["pk", "sk"])
                step.rows_out = sum(outputs.values())
            summary.outputs = outputs
        finally:
            for df in tables.values():
                df.unpersist()

    return run_with_summary(ctx, summary, out_dir, body)
