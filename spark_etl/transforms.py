"""The ETL's data rules as DataFrame → DataFrame functions: no reading, no writing, no settings objects.

Each function takes plain parameters so the unit tests can run it on a handful of rows. The jobs in
spark_etl/jobs/ feed them from the lake and write what they return.

Dropped rows are not filtered away inside these functions: they are tagged with a reason in the
``_drop`` column, so one pass over the data both counts every reason and yields the kept rows.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from streamrec.events import EVENT_WEIGHTS

DROP = "_drop"
EVENT_TYPES: tuple[str, ...] = tuple(EVENT_WEIGHTS)


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(0), tzinfo=timezone.utc)
    return start, start + timedelta(days=1)


def receive_hours(day: date, late_arrival_hours: int) -> list[tuple[str, str]]:
    """(dt, hour) raw partitions that can hold events of ``day``: from the last hour of the day before
    (client clocks run up to a few minutes ahead) to ``late_arrival_hours`` into the next day."""
    start = datetime.combine(day, time(0)) - timedelta(hours=1)
    hours = 1 + 24 + late_arrival_hours
    return [((start + timedelta(hours=h)).date().isoformat(), f"{(start + timedelta(hours=h)).hour:02d}")
            for h in range(hours)]


def weight_of(event_type: Column) -> Column:
    expr = F.lit(None).cast("double")
    for name, weight in EVENT_WEIGHTS.items():
        expr = F.when(event_type == name, F.lit(weight)).otherwise(expr)
    return expr


def cluster_by_user(df: DataFrame) -> DataFrame:
    """Hash-partition by ``user_id`` once, before the clean rules.

    Every window below is partitioned by ``user_id`` plus something (the event id, whether the row is
    kept, the session), and a hash partitioning on ``user_id`` alone satisfies all of them, so the
    whole clean plan costs this one shuffle. Without it each window asks for its own exchange: five
    shuffles of every raw column per day, the largest share of the job's time (docs/etl.md).
    """
    return df.repartition("user_id")


def tag_raw(df: DataFrame, day: date, key_columns: tuple[str, ...]) -> DataFrame:
    """Tag each raw row: null key, event time outside ``day``, or a duplicate event_id (the copy received
    first is kept; ties broken by shard and sequence number so a rerun keeps the same copy).

    A duplicate is a copy of the same user's event: the copies of a resent record carry the same
    ``user_id``, and grouping by it lets dedup share the user clustering of the other rules
    (:func:`cluster_by_user`). Two different users' events with one id (a client bug) are both kept."""
    start, end = day_bounds(day)
    null_key = F.lit(False)
    for col in key_columns:
        null_key = null_key | F.col(col).isNull()
    in_play = F.col(DROP).isNull()
    # Rank copies among the rows still in play only (_drop null), so a null-key row never shadows a
    # good one. Windows partition by the _drop column itself, not by an expression of it: Spark
    # materialises each expression as a new hidden column, which defeats the reuse of sort orders.
    first_copy = (Window.partitionBy("user_id", "event_id", DROP)
                  .orderBy("received_at", "shard_id", "sequence_number"))
    reason = (
        F.when(null_key, F.lit("null_key"))
        .when((F.col("ts") < F.lit(start)) | (F.col("ts") >= F.lit(end)), F.lit("other_day"))
        .when(~F.col("event_type").isin(*EVENT_TYPES), F.lit("unknown_event_type"))
    )
    tagged = df.withColumn(DROP, reason)
    dup_rank = F.when(in_play, F.row_number().over(first_copy))
    return (tagged.withColumn("_copy", dup_rank)
            .withColumn(DROP, F.when(F.col(DROP).isNull() & (F.col("_copy") > 1), F.lit("duplicate"))
                        .otherwise(F.col(DROP)))
            .drop("_copy"))


def sessionize(df: DataFrame, gap_minutes: int) -> DataFrame:
    """Session id and 1-based position for the rows not dropped: a gap of more than ``gap_minutes``
    between a user's consecutive events starts a new session. Ids are ``<user_id>:<first event ms>``,
    so a rerun gives the same ids. Dropped rows get nulls and take no part."""
    kept = F.col(DROP).isNull()
    # Kept rows (_drop null) form one partition per user; see tag_raw on why _drop and not ``kept``.
    by_user = Window.partitionBy("user_id", DROP).orderBy("ts", "event_id")
    running = by_user.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    gap_ms = gap_minutes * 60_000
    prev = F.lag("_ts_ms").over(by_user)
    out = (df.withColumn("_ts_ms", F.unix_millis("ts"))
           .withColumn("_n", F.row_number().over(by_user))
           .withColumn("_new", prev.isNull() | (F.col("_ts_ms") - prev > gap_ms))
           .withColumn("_start_ms", F.max(F.when(F.col("_new"), F.col("_ts_ms"))).over(running))
           .withColumn("_start_n", F.max(F.when(F.col("_new"), F.col("_n"))).over(running)))
    return (out.withColumn("session_id", F.when(kept, F.concat_ws(":", "user_id", F.col("_start_ms").cast("string"))))
            .withColumn("session_position", F.when(kept, (F.col("_n") - F.col("_start_n") + 1).cast("int")))
            .drop("_ts_ms", "_n", "_new", "_start_ms", "_start_n"))


def flag_bots(df: DataFrame, *, min_session_events: int, max_events_per_minute: float,
              max_user_events_per_day: int) -> DataFrame:
    """Tag behavioural bots among the kept, sessionized rows.

    ``bot_session``: a session of at least ``min_session_events`` events whose sustained rate
    (events / minutes from its first to its last event, at least one minute) exceeds
    ``max_events_per_minute``. ``bot_user``: a user with more than ``max_user_events_per_day`` events.
    """
    kept = F.col(DROP).isNull()
    session = Window.partitionBy("user_id", "session_id")
    user = Window.partitionBy("user_id", DROP)
    n = F.count(F.lit(1)).over(session)
    minutes = F.greatest(
        (F.unix_millis(F.max("ts").over(session)) - F.unix_millis(F.min("ts").over(session))) / 60_000.0,
        F.lit(1.0))
    bot_session = (n >= min_session_events) & (n / minutes > max_events_per_minute)
    # The user count comes first: its window's order (user_id, kept) is a prefix of sessionize's, so
    # after sessionize it needs no sort of its own; the session window needs one.
    return (df.withColumn("_user_n", F.count(F.lit(1)).over(user))
            .withColumn(DROP, F.when(~kept, F.col(DROP))
                        .when(F.col("_user_n") > max_user_events_per_day, F.lit("bot_user"))
                        .when(bot_session, F.lit("bot_session")))
            .drop("_user_n"))


def clean_rows(df: DataFrame) -> DataFrame:
    """The kept rows in the clean table's column order (see schemas.CLEAN)."""
    return df.where(F.col(DROP).isNull()).select(
        "event_id", "user_id", "item_id", "event_type",
        weight_of(F.col("event_type")).alias("event_weight"), "ts", "category", "price", "device", "page",
        "referrer", "client_region", "client_session_id", "session_id", "session_position", "received_at",
    )


def days_before(day: date, n: int) -> str:
    return (day - timedelta(days=n)).isoformat()


def item_table(clean: DataFrame, day: date, previous_first_seen: DataFrame | None = None) -> DataFrame:
    """Per item over the clean window (up to 30 days ending ``day``): category (latest seen), first
    and last seen, weighted popularity over 1, 7 and 30 days and its rank by 7-day popularity."""
    dt = F.col("dt")
    w = F.col("event_weight")
    agg = clean.groupBy("item_id").agg(
        F.max_by("category", F.when(F.col("category").isNotNull(), F.col("ts"))).alias("category"),
        F.min("ts").alias("first_seen"),
        F.max("ts").alias("last_seen"),
        F.sum(F.when(dt == day.isoformat(), w).otherwise(0.0)).alias("pop_1d"),
        F.sum(F.when(dt > days_before(day, 7), w).otherwise(0.0)).alias("pop_7d"),
        F.sum(F.when(dt > days_before(day, 30), w).otherwise(0.0)).alias("pop_30d"),
        F.count(F.lit(1)).alias("events_30d"),
    )
    if previous_first_seen is not None:
        # first_seen outlives the 30-day window: carry the earliest sighting forward day to day.
        prev = previous_first_seen.select("item_id", F.col("first_seen").alias("_prev_first"))
        agg = (agg.join(prev, "item_id", "left")
               .withColumn("first_seen", F.least("first_seen", F.coalesce("_prev_first", "first_seen")))
               .drop("_prev_first"))
    rank = F.row_number().over(Window.orderBy(F.desc("pop_7d"), F.asc("item_id")))
    return agg.withColumn("popularity_rank", rank.cast("int"))


def popularity_rank_before(clean: DataFrame, day: date, days: int = 7) -> DataFrame:
    """(item_id, item_pop_rank): rank by weighted popularity over the ``days`` days before ``day``."""
    window = clean.where((F.col("dt") < day.isoformat()) & (F.col("dt") >= days_before(day, days)))
    pop = window.groupBy("item_id").agg(F.sum("event_weight").alias("_pop"))
    rank = F.row_number().over(Window.orderBy(F.desc("_pop"), F.asc("item_id")))
    return pop.select("item_id", rank.cast("int").alias("item_pop_rank"))


def _recent(values: Column, n: int) -> Column:
    """The last ``n`` elements of an array sorted oldest first (slice with a negative start)."""
    return F.when(F.size(values) > n, F.slice(values, -n, n)).otherwise(values)


def user_table(clean: DataFrame, history_length: int, purchased_max: int) -> DataFrame:
    """Per user over the clean window: last N items (oldest first), recently purchased items, counts by
    event type, first and last seen, latest device."""
    events = F.array_sort(F.collect_list(F.struct("ts", "event_id", "item_id")))
    purchases = F.array_sort(F.collect_list(
        F.when(F.col("event_type") == "purchase", F.struct("ts", "event_id", "item_id"))))
    counts = [F.sum(F.when(F.col("event_type") == t, 1).otherwise(0)).cast("long").alias(f"n_{t}")
              for t in EVENT_TYPES]
    agg = clean.groupBy("user_id").agg(
        events.alias("_events"), purchases.alias("_purchases"), *counts,
        F.min("ts").alias("first_seen"), F.max("ts").alias("last_seen"),
        F.max_by("device", "ts").alias("device"),
    )
    last_items = F.transform(_recent(F.col("_events"), history_length), lambda e: e["item_id"])
    # Most recent purchase of each item wins its place; keep the newest ``purchased_max`` distinct items.
    bought = F.reverse(F.array_distinct(F.reverse(F.transform("_purchases", lambda e: e["item_id"]))))
    return (agg.withColumn("last_items", last_items)
            .withColumn("purchased_items", _recent(bought, purchased_max) if purchased_max else F.array().cast("array<string>"))
            .drop("_events", "_purchases"))


def training_examples(clean: DataFrame, cutoff: date, train_days: int, history_length: int,
                      region: str, pop_rank: DataFrame) -> DataFrame:
    """One example per interaction from ``train_days`` before ``cutoff`` (split ``train``) and on the
    cutoff day (split ``eval``). ``history`` is the user's last ``history_length`` items strictly before
    the interaction: same-timestamp events are excluded, so no example sees its own moment or later."""
    # A few extra rows in the frame make up for same-millisecond events filtered out below.
    slack = 8
    frame = (Window.partitionBy("user_id").orderBy("ts", "event_id")
             .rowsBetween(-(history_length + slack), -1))
    earlier = F.collect_list(F.struct("ts", "item_id")).over(frame)
    first_day = days_before(cutoff, train_days)
    out = (clean.withColumn("_earlier", earlier)
           .where((F.col("dt") >= first_day) & (F.col("dt") <= cutoff.isoformat()))
           .withColumn("_before", F.filter("_earlier", lambda e: e["ts"] < F.col("ts")))
           .withColumn("history", F.transform(_recent(F.col("_before"), history_length), lambda e: e["item_id"]))
           .join(pop_rank, "item_id", "left"))
    return out.select(
        "user_id", "history", "item_id", "category", "event_type", F.col("event_weight").alias("weight"), "ts",
        "device", F.hour("ts").cast("int").alias("hour"), F.lit(region).alias("region"), "item_pop_rank",
        F.when(F.col("dt") == cutoff.isoformat(), F.lit("eval")).otherwise(F.lit("train")).alias("split"),
    )


def popular_key(items: DataFrame, top_k: int, dt: str) -> DataFrame:
    """One DynamoDB item holding the region's top-K items by rank (one GetItem serves the fallback)."""
    top = items.where(F.col("popularity_rank") <= top_k)
    ranked = F.array_sort(F.collect_list(F.struct("popularity_rank", "item_id", "pop_7d")))
    return (top.agg(ranked.alias("_top"))
            .select(F.lit("popular").alias("pk"), F.lit(f"top{top_k}").alias("sk"),
                    F.transform("_top", lambda e: e["item_id"]).alias("item_ids"),
                    F.transform("_top", lambda e: e["pop_7d"]).alias("scores"), F.lit(dt).alias("dt")))


def item_keys(items: DataFrame, dt: str) -> DataFrame:
    return items.select(F.concat(F.lit("item#"), "item_id").alias("pk"), F.lit("meta").alias("sk"), "item_id",
                        "category", "popularity_rank", "pop_7d", "first_seen", F.lit(dt).alias("dt"))


def user_keys(users: DataFrame, dt: str) -> DataFrame:
    return users.select(F.concat(F.lit("user#"), "user_id").alias("pk"), F.lit("recent").alias("sk"), "user_id",
                        F.col("last_items").alias("item_ids"), "last_seen", F.lit(dt).alias("dt"))
