"""build_features: clean events of the 30 days up to D → features/region=R/dt=D/{items,users,examples}.

- items: category, first and last seen, weighted popularity over 1, 7 and 30 days and its rank;
- users: last N items (oldest first), purchased items, counts by event type, first and last seen;
- examples: one per interaction of the ``etl.train_days`` days before D (split=train) and of D itself
  (split=eval), each with the user's history strictly before it: the temporal split the model's
  evaluation relies on.
"""

from __future__ import annotations

from datetime import timedelta

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from spark_etl import lakeio, schemas, transforms
from spark_etl.jobs.common import JobContext, MissingInputError, conform, files_for, run_with_summary, write_parquet
from spark_etl.summary import SUMMARY_NAME, RunSummary, non_empty_check, null_keys_check, row_drop_check

WINDOW_DAYS = 30


def read_clean(ctx: JobContext, days: int) -> DataFrame:
    """Clean events of the ``days`` days ending at ``ctx.day`` (those that exist; D itself must)."""
    if not lakeio.exists(ctx.spark, f"{ctx.partition('clean')}/{SUMMARY_NAME}"):
        raise MissingInputError(f"no clean events for region {ctx.region} on {ctx.dt} "
                                f"(run the clean job first): {ctx.partition('clean')}")
    first = transforms.days_before(ctx.day, days - 1)
    return (ctx.spark.read.parquet(ctx.region_root("clean"))
            .where((F.col("dt") >= first) & (F.col("dt") <= ctx.dt)))


def _previous_items(ctx: JobContext) -> DataFrame | None:
    prior = ctx.partition("features", ctx.day - timedelta(days=1), "items")
    if not lakeio.exists(ctx.spark, f"{ctx.partition('features', ctx.day - timedelta(days=1))}/{SUMMARY_NAME}"):
        return None
    return ctx.spark.read.parquet(prior).select("item_id", "first_seen")


def _count_nulls(df: DataFrame, columns: list[str]) -> dict[str, int]:
    row = df.select([F.sum(F.col(c).isNull().cast("long")).alias(c) for c in columns]).first()
    return {c: int(row[c] or 0) for c in columns}


def run(ctx: JobContext) -> RunSummary:
    etl = ctx.etl
    summary = RunSummary("features", ctx.region, ctx.dt, params={
        "window_days": WINDOW_DAYS, "train_days": etl.train_days, "history_length": etl.history_length,
        "purchased_items_max": etl.purchased_items_max,
    })
    out_dir = ctx.partition("features")

    def body(summary: RunSummary) -> None:
        with summary.step("read") as step:
            clean = read_clean(ctx, WINDOW_DAYS).cache()
            step.rows_out = clean.count()
        try:
            previous = ctx.previous("features") or {}
            with summary.step("items") as step:
                items = conform(transforms.item_table(clean, ctx.day, _previous_items(ctx)), schemas.ITEMS).cache()
                step.rows_in, step.rows_out = summary.steps[0].rows_out, items.count()
            with summary.step("users") as step:
                users = conform(transforms.user_table(clean, etl.history_length, etl.purchased_items_max),
                                schemas.USERS).cache()
                step.rows_in, step.rows_out = summary.steps[0].rows_out, users.count()
            with summary.step("examples") as step:
                ranks = transforms.popularity_rank_before(clean, ctx.day)
                examples = conform(transforms.training_examples(
                    clean, ctx.day, etl.train_days, etl.history_length, ctx.region, ranks),
                    schemas.EXAMPLES, "split").cache()
                splits = {r["split"]: int(r["count"]) for r in examples.groupBy("split").count().collect()}
                step.rows_in, step.rows_out = summary.steps[0].rows_out, sum(splits.values())
            outputs = {"items": items.count(), "users": users.count(),
                       "examples_train": splits.get("train", 0), "examples_eval": splits.get("eval", 0)}
            summary.check(null_keys_check("items", _count_nulls(items, ["item_id", "first_seen"])))
            summary.check(null_keys_check("users", _count_nulls(users, ["user_id", "last_seen"])))
            summary.check(null_keys_check("examples", _count_nulls(examples, ["user_id", "item_id", "ts"])))
            for name in ("items", "users", "examples_eval"):
                summary.check(non_empty_check(name, outputs[name], f"features {name} of {ctx.dt}"))
            for name, rows in outputs.items():
                summary.check(row_drop_check(name, rows, previous.get(name), etl.max_row_drop_share))
            with summary.step("write") as step:
                write_parquet(items, f"{out_dir}/items", etl, files=files_for(outputs["items"], etl),
                              cluster_by=["item_id"], sort_by=["popularity_rank"])
                write_parquet(users, f"{out_dir}/users", etl, files=files_for(outputs["users"], etl),
                              cluster_by=["user_id"], sort_by=["user_id"])
                n_examples = outputs["examples_train"] + outputs["examples_eval"]
                # Examples are shuffled by the trainer anyway; clustering by user keeps histories compressible.
                write_parquet(examples, f"{out_dir}/examples", etl, files=files_for(n_examples, etl),
                              cluster_by=["user_id"], sort_by=["split", "user_id", "ts", "item_id"],
                              partition_by=["split"])
                step.rows_out = sum(outputs.values())
            summary.outputs = outputs
        finally:
            clean.unpersist()

    return run_with_summary(ctx, summary, out_dir, body)
