"""spark_etl.transforms on tables of hand-written rows: dedup and day tagging, sessions, the bot rule, the
temporal split of training examples, the item and user tables and the popular key.

Every case is one explicit row (or a generated run of rows) with the answer it must get. Spark actions
are the slow part (a fraction of a second each), so each group of cases is one DataFrame computed once
by a module-scoped fixture, and the parametrized tests look their rows up in its collected result.
Timestamps are compared as epoch milliseconds, so the Python process's time zone does not matter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    DoubleType,
    IntegerType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from spark_etl import schemas, transforms
from spark_etl.transforms import DROP
from streamrec.events import EVENT_WEIGHTS

pytestmark = pytest.mark.unit

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY = date(2026, 3, 10)  # the day the clean-side cases run for
PREV, NEXT, NEXT2 = (DAY + timedelta(days=n) for n in (-1, 1, 2))
CUTOFF = date(2026, 3, 20)  # the day the feature-side cases run for


def at(day: date, hh: int = 0, mm: int = 0, ss: int = 0, ms: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hh, mm, ss, ms * 1000, tzinfo=UTC)


def ms(t: datetime) -> int:
    """Epoch milliseconds of an aware datetime, or of a naive one as PySpark collects it (local time)."""
    if t.tzinfo is None:
        t = t.astimezone(UTC)
    return (t - EPOCH) // timedelta(milliseconds=1)


def ago(n: int, day: date = CUTOFF) -> date:
    return day - timedelta(days=n)


def schema(*fields: tuple[str, Any]) -> StructType:
    return StructType([StructField(name, dtype, True) for name, dtype in fields])


_S, _TS, _D, _I = StringType(), TimestampType(), DoubleType(), IntegerType()


# --------------------------------------------------------------------------------------------------
# receive_hours
# --------------------------------------------------------------------------------------------------

def _hours(day: date, first: int, last: int) -> list[tuple[str, str]]:
    return [(day.isoformat(), f"{h:02d}") for h in range(first, last + 1)]


@pytest.mark.parametrize(("day", "late", "expected"), [
    # the last hour of D-1 (clocks ahead), all of D, the first `late` hours of D+1
    (DAY, 6, [("2026-03-09", "23"), *_hours(DAY, 0, 23), *_hours(date(2026, 3, 11), 0, 5)]),
    (DAY, 0, [("2026-03-09", "23"), *_hours(DAY, 0, 23)]),
    (DAY, 1, [("2026-03-09", "23"), *_hours(DAY, 0, 23), ("2026-03-11", "00")]),
    # a late window longer than a day reaches into D+2
    (DAY, 26, [("2026-03-09", "23"), *_hours(DAY, 0, 23), *_hours(date(2026, 3, 11), 0, 23),
               *_hours(date(2026, 3, 12), 0, 1)]),
    # month, leap-free February and year boundaries
    (date(2026, 3, 1), 2,
     [("2026-02-28", "23"), *_hours(date(2026, 3, 1), 0, 23), *_hours(date(2026, 3, 2), 0, 1)]),
    (date(2027, 1, 1), 1, [("2026-12-31", "23"), *_hours(date(2027, 1, 1), 0, 23), ("2027-01-02", "00")]),
    (date(2026, 12, 31), 1, [("2026-12-30", "23"), *_hours(date(2026, 12, 31), 0, 23), ("2027-01-01", "00")]),
])
def test_receive_hours_cover_last_hour_before_to_late_hours_after(day: date, late: int,
                                                                   expected: list[tuple[str, str]]) -> None:
    hours = transforms.receive_hours(day, late)
    assert hours == expected
    assert len(hours) == 1 + 24 + late
    assert len(set(hours)) == len(hours)


# --------------------------------------------------------------------------------------------------
# tag_raw: null keys, other days, unknown types, duplicates
# --------------------------------------------------------------------------------------------------

RAW_TEST = schema(("case", _S), ("event_id", _S), ("user_id", _S), ("item_id", _S), ("event_type", _S),
                  ("ts", _TS), ("received_at", _TS), ("shard_id", _S), ("sequence_number", _S))
SHARD0, SHARD1 = "shardId-000000000000", "shardId-000000000001"


def seq(n: int) -> str:
    """A Kinesis sequence number: a decimal string of fixed width."""
    return f"49{n:054d}"


T = at(DAY, 10)
R = at(DAY, 10, 0, 1)  # a common receive time for the tie cases


# (case, event_id, user_id, item_id, event_type, ts, received_at, shard_id, sequence_number, expected _drop)
DEDUP_CASES: list[tuple[Any, ...]] = [
    # the same event in the raw files of two receive days: the copy received first is kept
    ("two_days.late_copy", "e-01", "u1", "i1", "view", T, at(NEXT, 2), SHARD0, seq(9), "duplicate"),
    ("two_days.first", "e-01", "u1", "i1", "view", T, at(DAY, 10, 0, 2), SHARD1, seq(5), None),
    # a copy received the day before (clock skew at midnight) is the first one
    ("prev_day_receipt.first", "e-02", "u1", "i1", "view", at(DAY), at(PREV, 23, 59, 59),
     SHARD1, seq(7), None),
    ("prev_day_receipt.copy", "e-02", "u1", "i1", "view", at(DAY), at(DAY, 0, 0, 1), SHARD0, seq(1),
     "duplicate"),
    # same receive time: the lower shard id wins, whatever the sequence numbers
    ("tie_received.shard1", "e-03", "u1", "i1", "click", T, R, SHARD1, seq(1), "duplicate"),
    ("tie_received.shard0", "e-03", "u1", "i1", "click", T, R, SHARD0, seq(9), None),
    # same receive time and shard: the lower sequence number wins
    ("tie_shard.seq_high", "e-04", "u1", "i1", "click", T, R, SHARD0, seq(2), "duplicate"),
    ("tie_shard.seq_low", "e-04", "u1", "i1", "click", T, R, SHARD0, seq(1), None),
    # three copies: one kept
    ("three.third", "e-05", "u2", "i2", "purchase", T, at(DAY, 10, 0, 3), SHARD0, seq(3), "duplicate"),
    ("three.first", "e-05", "u2", "i2", "purchase", T, at(DAY, 10, 0, 1), SHARD0, seq(1), None),
    ("three.second", "e-05", "u2", "i2", "purchase", T, at(DAY, 10, 0, 2), SHARD1, seq(2), "duplicate"),
    # null keys: every key column, and two rows without event id are not duplicates of each other
    ("null.event_id.a", None, "u3", "i3", "view", T, R, SHARD0, seq(10), "null_key"),
    ("null.event_id.b", None, "u3", "i3", "view", T, R, SHARD0, seq(11), "null_key"),
    ("null.user_id", "e-10", None, "i3", "view", T, R, SHARD0, seq(12), "null_key"),
    ("null.item_id", "e-11", "u3", None, "view", T, R, SHARD0, seq(13), "null_key"),
    ("null.event_type", "e-12", "u3", "i3", None, T, R, SHARD0, seq(14), "null_key"),
    ("null.ts", "e-13", "u3", "i3", "view", None, R, SHARD0, seq(15), "null_key"),
    # a null key wins over other reasons
    ("null.and_other_day", "e-14", None, "i3", "view", at(NEXT), R, SHARD0, seq(16), "null_key"),
    # a null-key copy received first never shadows the good copy (it is not "in play")
    ("null_shadow.bad_copy", "e-15", "u4", None, "view", T, at(DAY, 9), SHARD0, seq(1), "null_key"),
    ("null_shadow.good_copy", "e-15", "u4", "i4", "view", T, at(DAY, 11), SHARD0, seq(2), None),
    # day boundaries in event time (UTC): [00:00:00.000 of D, 00:00:00.000 of D+1)
    ("day.first_ms", "e-20", "u5", "i5", "view", at(DAY), R, SHARD0, seq(20), None),
    ("day.last_ms", "e-21", "u5", "i5", "view", at(DAY, 23, 59, 59, 999), R, SHARD0, seq(21), None),
    ("day.next_first_ms", "e-22", "u5", "i5", "view", at(NEXT), R, SHARD0, seq(22), "other_day"),
    ("day.prev_last_ms", "e-23", "u5", "i5", "view", at(PREV, 23, 59, 59, 999), R, SHARD0,
     seq(23), "other_day"),
    # two copies of an other-day event are both other_day (duplicates are ranked among kept rows only)
    ("other_day_copy.a", "e-24", "u5", "i5", "view", at(NEXT2), R, SHARD0, seq(24), "other_day"),
    ("other_day_copy.b", "e-24", "u5", "i5", "view", at(NEXT2), R, SHARD0, seq(25), "other_day"),
    # event types: the four known ones are kept, anything else is tagged
    ("type.view", "e-30", "u6", "i6", "view", T, R, SHARD0, seq(30), None),
    ("type.click", "e-31", "u6", "i6", "click", T, R, SHARD0, seq(31), None),
    ("type.add_to_cart", "e-32", "u6", "i6", "add_to_cart", T, R, SHARD0, seq(32), None),
    ("type.purchase", "e-33", "u6", "i6", "purchase", T, R, SHARD0, seq(33), None),
    ("type.like", "e-34", "u6", "i6", "like", T, R, SHARD0, seq(34), "unknown_event_type"),
    ("type.case_sensitive", "e-35", "u6", "i6", "View", T, R, SHARD0, seq(35), "unknown_event_type"),
]


@pytest.fixture(scope="module")
def tagged(spark: SparkSession) -> dict[str, str | None]:
    rows = [case[:-1] for case in DEDUP_CASES]
    df = spark.createDataFrame(rows, RAW_TEST)
    out = transforms.tag_raw(df, DAY, schemas.RAW_KEYS)
    assert out.columns == [*RAW_TEST.names, DROP]  # no helper column left behind
    result = {r["case"]: r[DROP] for r in out.select("case", DROP).collect()}
    assert len(result) == len(rows)  # one row out per row in
    return result


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0])
                                  for c in DEDUP_CASES])
def test_tag_raw(tagged: dict[str, str | None], case: tuple[Any, ...]) -> None:
    assert tagged[case[0]] == case[-1]


def test_tag_raw_keeps_one_copy_of_every_event_id(tagged: dict[str, str | None]) -> None:
    kept: Counter[str] = Counter()
    for case in DEDUP_CASES:
        if tagged[case[0]] is None:
            kept[case[1]] += 1
    assert kept and max(kept.values()) == 1


# --------------------------------------------------------------------------------------------------
# sessionize
# --------------------------------------------------------------------------------------------------

SESSION_TEST = schema(("case", _S), ("event_id", _S), ("user_id", _S), ("ts", _TS), (DROP, _S))
T0 = at(DAY, 8)
MIN = timedelta(minutes=1)
MS1 = timedelta(milliseconds=1)

# (case, event_id, user_id, ts, _drop, expected session start (None: no session), expected position)
SESSION_CASES: list[tuple[str, str | None, str | None, datetime, str | None, datetime | None, int | None]] = [
    # a gap of exactly 30 minutes stays in the session; 30 min + 1 ms starts a new one
    ("u1.first", "e-01", "u1", T0, None, T0, 1),
    ("u1.gap_exactly_30m", "e-02", "u1", T0 + 30 * MIN, None, T0, 2),
    ("u1.gap_30m_plus_1ms", "e-03", "u1", T0 + 60 * MIN + MS1, None, T0 + 60 * MIN + MS1, 1),
    ("u1.same_session", "e-04", "u1", T0 + 61 * MIN, None, T0 + 60 * MIN + MS1, 2),
    ("u1.third_in_session", "e-05", "u1", T0 + 90 * MIN, None, T0 + 60 * MIN + MS1, 3),
    ("u1.late_session", "e-06", "u1", at(DAY, 23, 59, 59, 999), None, at(DAY, 23, 59, 59, 999), 1),
    # users are independent: u2's events interleave with u1's and form their own sessions
    ("u2.first", "e-07", "u2", T0 + 30 * MIN, None, T0 + 30 * MIN, 1),
    ("u2.second", "e-08", "u2", T0 + 45 * MIN, None, T0 + 30 * MIN, 2),
    ("u2.third", "e-09", "u2", T0 + 60 * MIN + MS1, None, T0 + 30 * MIN, 3),
    # same timestamp: ordered by event_id
    ("u3.c", "e-c", "u3", T0, None, T0, 3),
    ("u3.a", "e-a", "u3", T0, None, T0, 1),
    ("u3.b", "e-b", "u3", T0, None, T0, 2),
    ("u3.d_later", "e-d", "u3", T0 + MS1, None, T0, 4),
    # tagged rows take no part: no session fields, they neither start nor bridge a session
    ("u4.tagged_before", "e-40", "u4", T0 - MIN, "other_day", None, None),
    ("u4.first", "e-41", "u4", T0, None, T0, 1),
    ("u4.tagged_bridge", "e-42", "u4", T0 + 20 * MIN, "duplicate", None, None),
    ("u4.after_40m", "e-43", "u4", T0 + 40 * MIN, None, T0 + 40 * MIN, 1),
    ("u4.tagged_after", "e-44", "u4", T0 + 41 * MIN, "unknown_event_type", None, None),
    ("u4.next", "e-45", "u4", T0 + 42 * MIN, None, T0 + 40 * MIN, 2),
    ("null_user.tagged", "e-50", None, T0, "null_key", None, None),
]


Sessions = dict[str, tuple[str | None, int | None]]


@pytest.fixture(scope="module")
def session_runs(spark: SparkSession) -> tuple[Sessions, Sessions]:
    """The cases sessionized twice, in one action: as listed, and reversed over three partitions."""
    listed = spark.createDataFrame([c[:5] for c in SESSION_CASES], SESSION_TEST)
    shuffled = spark.createDataFrame([c[:5] for c in reversed(SESSION_CASES)], SESSION_TEST).repartition(3)
    runs = []
    for run, df in enumerate((listed, shuffled)):
        out = transforms.sessionize(df, 30)
        assert out.columns == [*SESSION_TEST.names, "session_id", "session_position"]
        runs.append(out.select(F.lit(run).alias("run"), "case", "session_id", "session_position"))
    result: tuple[Sessions, Sessions] = ({}, {})
    for r in runs[0].unionByName(runs[1]).collect():
        result[r["run"]][r["case"]] = (r["session_id"], r["session_position"])
    return result


@pytest.fixture(scope="module")
def sessions(session_runs: tuple[Sessions, Sessions]) -> Sessions:
    return session_runs[0]


@pytest.mark.parametrize("case", SESSION_CASES, ids=lambda c: c[0])
def test_sessionize(sessions: Sessions, case: tuple[Any, ...]) -> None:
    name, _, user, _, _, start, position = case
    expected_id = None if start is None else f"{user}:{ms(start)}"
    assert sessions[name] == (expected_id, position)


def test_sessionize_positions_run_1_to_n_in_each_session(sessions: Sessions) -> None:
    by_session: dict[str, list[int]] = {}
    for session_id, position in sessions.values():
        if session_id is not None:
            by_session.setdefault(session_id, []).append(position)  # type: ignore[arg-type]
    assert sorted(len(p) for p in by_session.values()) == [1, 1, 2, 2, 3, 3, 4]
    for positions in by_session.values():
        assert sorted(positions) == list(range(1, len(positions) + 1))


def test_sessionize_ids_do_not_depend_on_row_order_or_partitioning(
        session_runs: tuple[Sessions, Sessions]) -> None:
    listed, shuffled = session_runs
    assert len(listed) == len(SESSION_CASES)
    assert shuffled == listed


# --------------------------------------------------------------------------------------------------
# flag_bots (after sessionize, as in the job)
# --------------------------------------------------------------------------------------------------

BOT_TEST = schema(("event_id", _S), ("user_id", _S), ("part", _S), ("ts", _TS), (DROP, _S))
BOT_PARAMS = {"min_session_events": 20, "max_events_per_minute": 30.0, "max_user_events_per_day": 150}
SEC = timedelta(seconds=1)


def run_of(user: str, part: str, start: datetime, n: int, every: timedelta,
           drop: str | None = None) -> list[tuple[Any, ...]]:
    return [(f"{user}-{part}-{i:04d}", user, part, start + i * every, drop) for i in range(n)]


# user → its rows, and the rows' _drop after flag_bots counted by (part, reason)
BOT_CASES: dict[str, tuple[list[tuple[Any, ...]], dict[tuple[str, str | None], int]]] = {
    # 100 events at 5 per second: a bot session
    "burst_100_at_5_per_s": (run_of("burst", "b", at(DAY, 9), 100, SEC / 5), {("b", "bot_session"): 100}),
    # already-tagged rows keep their reason, whatever their user does
    "burst_keeps_other_tags": (
        run_of("burst2", "b", at(DAY, 9), 100, SEC / 5)
        + run_of("burst2", "dup", at(DAY, 9, 0, 1), 2, SEC, "duplicate"),
        {("b", "bot_session"): 100, ("dup", "duplicate"): 2}),
    # fast, but fewer than min_session_events
    "fast_19_events": (run_of("fast19", "s", at(DAY, 9), 19, SEC / 5), {("s", None): 19}),
    # a long, slow session of many events
    "slow_long_session": (run_of("slow", "s", at(DAY, 9), 120, 15 * SEC), {("s", None): 120}),
    # the rate is per minute over at least one minute: 30 events within a minute is 30/min (not above)
    "rate_exactly_30_per_min": (run_of("r30", "s", at(DAY, 9), 30, 2 * SEC), {("s", None): 30}),
    "rate_31_per_min": (run_of("r31", "s", at(DAY, 9), 31, 2 * SEC), {("s", "bot_session"): 31}),
    # the rule is per session: the same user's human session stays
    "bot_session_only_that_session": (
        run_of("mixed", "human", at(DAY, 8), 3, 5 * 60 * SEC)
        + run_of("mixed", "bot", at(DAY, 12), 40, SEC / 2),
        {("human", None): 3, ("bot", "bot_session"): 40}),
    # daily volume: 150 events is the limit, 151 is a bot user (counted over kept rows only)
    "volume_at_limit": (
        run_of("vol150", "s", at(DAY, 1), 150, 60 * SEC)
        + run_of("vol150", "dup", at(DAY, 5), 5, SEC, "duplicate"),
        {("s", None): 150, ("dup", "duplicate"): 5}),
    "volume_over_limit": (run_of("vol151", "s", at(DAY, 1), 151, 60 * SEC), {("s", "bot_user"): 151}),
    # bot_user wins over bot_session, for every row of the user
    "volume_and_burst": (
        run_of("both", "burst", at(DAY, 9), 120, SEC / 5) + run_of("both", "slow", at(DAY, 14), 40, 60 * SEC),
        {("burst", "bot_user"): 120, ("slow", "bot_user"): 40}),
    "human": (run_of("human", "s", at(DAY, 9), 5, 3 * 60 * SEC), {("s", None): 5}),
}


@pytest.fixture(scope="module")
def bot_tags(spark: SparkSession) -> dict[str, dict[tuple[str, str | None], int]]:
    rows = [row for case_rows, _ in BOT_CASES.values() for row in case_rows]
    df = spark.createDataFrame(rows, BOT_TEST)
    flagged = transforms.flag_bots(transforms.sessionize(df, 30), **BOT_PARAMS)
    counts: dict[str, dict[tuple[str, str | None], int]] = {}
    for r in flagged.groupBy("user_id", "part", DROP).count().collect():
        counts.setdefault(r["user_id"], {})[(r["part"], r[DROP])] = r["count"]
    return counts


@pytest.mark.parametrize("case", list(BOT_CASES))
def test_flag_bots(bot_tags: dict[str, dict[tuple[str, str | None], int]], case: str) -> None:
    rows, expected = BOT_CASES[case]
    assert bot_tags[rows[0][1]] == expected


# --------------------------------------------------------------------------------------------------
# training_examples: temporal split, no leakage
# --------------------------------------------------------------------------------------------------

EXAMPLES_CLEAN = schema(("event_id", _S), ("user_id", _S), ("item_id", _S), ("category", _S),
                        ("event_type", _S), ("event_weight", _D), ("ts", _TS), ("device", _S), ("dt", _S))
TRAIN_DAYS, HISTORY = 3, 3  # train = CUTOFF-3 .. CUTOFF-1, eval = CUTOFF
C = CUTOFF

# (event_id, user_id, item_id, event_type, ts)
EXAMPLE_EVENTS: list[tuple[str, str, str, str, datetime]] = [
    ("e-a0", "a", "a0", "view", at(ago(5), 10)),                   # before the train window: history only
    ("e-a1", "a", "a1", "click", at(ago(4), 23, 59, 59, 999)),     # last ms before the window
    ("e-a2", "a", "a2", "view", at(ago(3))),                       # first ms of the window
    ("e-a3", "a", "a3", "purchase", at(ago(2), 10)),
    ("e-a4", "a", "a4", "view", at(ago(1), 10)),
    ("e-a5", "a", "a5", "view", at(C, 9)),                         # a5 and a6 share a timestamp
    ("e-a6", "a", "a6", "click", at(C, 9)),
    ("e-a7", "a", "a7", "add_to_cart", at(C, 10)),
    ("e-b1", "b", "a2", "purchase", at(C, 12)),                    # first event on the cutoff day
    ("e-c1", "c", "c1", "view", at(ago(1), 23, 59, 59, 999)),      # last ms of the last train day
    ("e-c2", "c", "c2", "click", at(ago(1), 23, 59, 59, 999)),
    ("e-c3", "c", "c3", "view", at(C)),                            # first ms of the cutoff day
    ("e-d1", "d", "hot", "purchase", at(ago(7), 10)),              # popularity only, first day of its window
    ("e-d2", "d", "hot", "purchase", at(ago(7), 11)),
    ("e-d3", "d", "a3", "purchase", at(ago(8), 11)),               # outside the 7-day popularity window
    # three events, then five at one timestamp: each of the five sees the three, none of the others
    *[(f"e-t{k}", "t", f"t{k}", "view", at(ago(1), 6, k)) for k in range(3)],
    *[(f"e-u{k}", "t", f"u{k}", "view", at(ago(1), 7)) for k in range(5)],
]

# (user_id, item_id) → (split, history, item_pop_rank)
# Popularity of the 7 days before the cutoff (cutoff day and 8th day back excluded): hot 16, a3 8,
# a1 2, c2 2, then a0 a2 a4 c1 t0-t2 u0-u4 at 1 each (ties by item_id).
EXPECTED_EXAMPLES: dict[tuple[str, str], tuple[str, list[str], int | None]] = {
    ("a", "a2"): ("train", ["a0", "a1"], 6),
    ("a", "a3"): ("train", ["a0", "a1", "a2"], 2),
    ("a", "a4"): ("train", ["a1", "a2", "a3"], 7),
    ("a", "a5"): ("eval", ["a2", "a3", "a4"], None),
    ("a", "a6"): ("eval", ["a2", "a3", "a4"], None),   # same-ts a5 excluded
    ("a", "a7"): ("eval", ["a4", "a5", "a6"], None),   # oldest first, same-ts pair by event_id
    ("b", "a2"): ("eval", [], 6),                      # b's cutoff-day purchase does not lift a2's rank
    ("c", "c1"): ("train", [], 8),
    ("c", "c2"): ("train", [], 4),
    ("c", "c3"): ("eval", ["c1", "c2"], None),
    ("t", "t0"): ("train", [], 9),
    ("t", "t1"): ("train", ["t0"], 10),
    ("t", "t2"): ("train", ["t0", "t1"], 11),
    **{("t", f"u{k}"): ("train", ["t0", "t1", "t2"], 12 + k) for k in range(5)},
}


@pytest.fixture(scope="module")
def examples(spark: SparkSession) -> dict[tuple[str, str], dict[str, Any]]:
    rows = [(eid, user, item, f"cat-{item}", kind, EVENT_WEIGHTS[kind], ts, "mobile", ts.date().isoformat())
            for eid, user, item, kind, ts in EXAMPLE_EVENTS]
    clean = spark.createDataFrame(rows, EXAMPLES_CLEAN)
    ranks = transforms.popularity_rank_before(clean, C)
    out = transforms.training_examples(clean, C, TRAIN_DAYS, HISTORY, "eu-west-1", ranks)
    assert schemas.drift(out.drop("split").schema, schemas.EXAMPLES) == []
    result: dict[tuple[str, str], dict[str, Any]] = {}
    for r in out.collect():
        key = (r["user_id"], r["item_id"])
        assert key not in result, f"two examples for {key}"
        result[key] = r.asDict()
    return result


def test_training_examples_cover_exactly_the_train_days_and_the_cutoff_day(
        examples: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert set(examples) == set(EXPECTED_EXAMPLES)
    for row in examples.values():
        day = datetime.fromtimestamp(ms(row["ts"]) / 1000, UTC).date()
        assert ago(TRAIN_DAYS) <= day <= C
        assert row["split"] == ("eval" if day == C else "train")


@pytest.mark.parametrize("key", list(EXPECTED_EXAMPLES), ids=lambda k: f"{k[0]}-{k[1]}")
def test_training_example(examples: dict[tuple[str, str], dict[str, Any]], key: tuple[str, str]) -> None:
    split, history, rank = EXPECTED_EXAMPLES[key]
    row = examples[key]
    assert (row["split"], row["history"], row["item_pop_rank"]) == (split, history, rank)


def test_training_example_histories_hold_only_strictly_earlier_items(
        examples: dict[tuple[str, str], dict[str, Any]]) -> None:
    ts_of = {(user, item): ms(ts) for _, user, item, _, ts in EXAMPLE_EVENTS if user != "d"}
    for (user, item), row in examples.items():
        assert all(ts_of[(user, h)] < ms(row["ts"]) for h in row["history"]), (user, item, row["history"])
        assert len(row["history"]) <= HISTORY


def test_training_example_columns(examples: dict[tuple[str, str], dict[str, Any]]) -> None:
    kinds = {(user, item): kind for _, user, item, kind, _ in EXAMPLE_EVENTS}
    for key, row in examples.items():
        assert row["region"] == "eu-west-1"
        assert row["weight"] == EVENT_WEIGHTS[kinds[key]]
        assert row["event_type"] == kinds[key]
        assert row["category"] == f"cat-{key[1]}"
        assert row["hour"] == datetime.fromtimestamp(ms(row["ts"]) / 1000, UTC).hour


# --------------------------------------------------------------------------------------------------
# item_table, user_table, popular_key, item_keys, user_keys (fed through clean_rows, as in the jobs)
# --------------------------------------------------------------------------------------------------

FLAGGED_TEST = schema(("event_id", _S), ("user_id", _S), ("item_id", _S), ("event_type", _S), ("ts", _TS),
                      ("category", _S), ("price", _D), ("device", _S), ("page", _S), ("referrer", _S),
                      ("client_region", _S), ("client_session_id", _S), ("session_id", _S),
                      ("session_position", _I), ("received_at", _TS), (DROP, _S))


def clean_frame(spark: SparkSession, events: Iterable[tuple[Any, ...]]) -> DataFrame:
    """Clean rows plus dt, from (event_id, user_id, item_id, event_type, ts, category, device, _drop)."""
    rows = [(eid, user, item, kind, ts, cat, 9.99, device, "/p", None, "eu-west-1", "cs-1", f"{user}:0", 1,
             ts, drop) for eid, user, item, kind, ts, cat, device, drop in events]
    clean = transforms.clean_rows(spark.createDataFrame(rows, FLAGGED_TEST))
    assert schemas.drift(clean.schema, schemas.CLEAN) == []
    return clean.withColumn("dt", F.date_format("ts", "yyyy-MM-dd"))


ITEM_EVENTS = [
    ("i1-a", "u9", "i1", "view", at(ago(29), 12), "shoes", None, None),          # 30d only (first day in it)
    ("i1-b", "u9", "i1", "add_to_cart", at(ago(7), 12), "shoes", None, None),    # 30d only (8th day back)
    ("i1-c", "u9", "i1", "purchase", at(ago(6)), "boots", None, None),           # 7d (7th day back)
    ("i1-d", "u9", "i1", "view", at(C, 8), None, None, None),                    # 1d; null category ignored
    ("i1-e", "u9", "i1", "click", at(C, 23, 59, 59, 999), None, None, None),
    ("i1-bot", "u9", "i1", "purchase", at(C, 9), "robots", None, "bot_session"),  # dropped: counts nowhere
    ("i2-a", "u9", "i2", "purchase", at(ago(1), 5), "hats", None, None),
    ("i2-b", "u9", "i2", "purchase", at(ago(2), 5), "hats", None, None),
    ("i3-a", "u9", "i3", "click", at(C, 1), "bags", None, None),
    ("i3-b", "u9", "i3", "view", at(ago(3), 1), "bags", None, None),
    ("i3-c", "u9", "i3", "purchase", at(ago(3), 2), "bags", None, None),
    ("i0-a", "u9", "i0", "view", at(ago(10)), None, None, None),
]
# item → (category, first_seen, last_seen, pop_1d, pop_7d, pop_30d, events_30d, popularity_rank)
EXPECTED_ITEMS: dict[str, tuple[str | None, datetime, datetime, float, float, float, int, int]] = {
    "i2": ("hats", at(ago(200)), at(ago(1), 5), 0.0, 16.0, 16.0, 2, 1),   # first_seen carried from previous
    "i1": ("boots", at(ago(29), 12), at(C, 23, 59, 59, 999), 3.0, 11.0, 16.0, 5, 2),  # later previous ignored
    "i3": ("bags", at(ago(3), 1), at(C, 1), 2.0, 11.0, 11.0, 3, 3),        # ties i1 on pop_7d: item_id order
    "i0": (None, at(ago(10)), at(ago(10)), 0.0, 0.0, 1.0, 1, 4),           # not in previous
}
PREVIOUS_FIRST_SEEN = [("i2", at(ago(200))), ("i1", at(ago(1))), ("gone", at(ago(300)))]


@pytest.fixture(scope="module")
def items(spark: SparkSession) -> Iterator[DataFrame]:
    previous = spark.createDataFrame(PREVIOUS_FIRST_SEEN, schema(("item_id", _S), ("first_seen", _TS)))
    table = transforms.item_table(clean_frame(spark, ITEM_EVENTS), C, previous)
    assert schemas.drift(table.schema, schemas.ITEMS) == []
    yield table.cache()
    table.unpersist()


def test_item_table_and_item_keys(items: DataFrame) -> None:
    keys = transforms.item_keys(items, C.isoformat())
    assert schemas.drift(keys.schema, schemas.KEYS_ITEMS) == []
    keyed = keys.select(*[F.col(c).alias(f"key_{c}") for c in keys.columns])
    rows = items.join(keyed, items["item_id"] == keyed["key_item_id"], "left").collect()
    got = {r["item_id"]: (r["category"], ms(r["first_seen"]), ms(r["last_seen"]), r["pop_1d"], r["pop_7d"],
                          r["pop_30d"], r["events_30d"], r["popularity_rank"]) for r in rows}
    expected = {item: (cat, ms(first), ms(last), *rest)
                for item, (cat, first, last, *rest) in EXPECTED_ITEMS.items()}
    assert got == expected
    got_keys = {r["key_pk"]: (r["key_sk"], r["key_item_id"], r["key_category"], r["key_popularity_rank"],
                              r["key_pop_7d"], ms(r["key_first_seen"]), r["key_dt"]) for r in rows}
    assert got_keys == {f"item#{i}": ("meta", i, cat, rank, pop_7d, ms(first), "2026-03-20")
                        for i, (cat, first, _, _, pop_7d, _, _, rank) in EXPECTED_ITEMS.items()}


def test_popular_key_holds_the_top_k_in_rank_order(items: DataFrame) -> None:
    popular = transforms.popular_key(items, 3, C.isoformat()).unionByName(
        transforms.popular_key(items, 10, C.isoformat()))
    assert schemas.drift(popular.schema, schemas.KEYS_POPULAR) == []
    rows = {r["sk"]: r.asDict() for r in popular.collect()}
    assert rows == {
        "top3": {"pk": "popular", "sk": "top3", "item_ids": ["i2", "i1", "i3"], "scores": [16.0, 11.0, 11.0],
                 "dt": "2026-03-20"},
        # fewer items than K: all of them
        "top10": {"pk": "popular", "sk": "top10", "item_ids": ["i2", "i1", "i3", "i0"],
                  "scores": [16.0, 11.0, 11.0, 0.0], "dt": "2026-03-20"},
    }


USER_EVENTS = [
    ("u1-1", "u1", "A", "view", at(ago(3), 10), None, "desktop", None),
    ("u1-2", "u1", "B", "click", at(ago(3), 11), None, "desktop", None),
    ("u1-3", "u1", "C", "purchase", at(ago(2), 10), None, "desktop", None),
    ("u1-4", "u1", "A", "purchase", at(ago(2), 11), None, "desktop", None),
    ("u1-5", "u1", "B", "purchase", at(ago(2), 12), None, "desktop", None),
    ("u1-6", "u1", "D", "add_to_cart", at(ago(1), 10), None, "tablet", None),
    ("u1-7", "u1", "C", "purchase", at(C, 9), None, "tablet", None),
    ("u1-8", "u1", "E", "view", at(C, 10), None, "mobile", None),
    ("u1-9", "u1", "F", "purchase", at(C, 11), None, "app", "duplicate"),        # dropped: counts nowhere
    # same timestamp: event_id order
    ("u2-2", "u2", "X", "view", at(C, 7), None, "app", None),
    ("u2-1", "u2", "Y", "view", at(C, 7), None, "app", None),
    # repeats stay in last_items; purchases are distinct, the newest purchase of an item wins its place
    ("u3-1", "u3", "P", "purchase", at(ago(5), 1), None, "desktop", None),
    ("u3-2", "u3", "Q", "purchase", at(ago(4), 1), None, "desktop", None),
    ("u3-3", "u3", "P", "purchase", at(ago(3), 1), None, "desktop", None),
]
# user → (last_items, purchased_items, n_view, n_click, n_add_to_cart, n_purchase, first_seen, last_seen,
#         device)
EXPECTED_USERS: dict[str, tuple[list[str], list[str], int, int, int, int, datetime, datetime, str]] = {
    "u1": (["D", "C", "E"], ["B", "C"], 2, 1, 1, 4, at(ago(3), 10), at(C, 10), "mobile"),
    "u2": (["Y", "X"], [], 2, 0, 0, 0, at(C, 7), at(C, 7), "app"),
    "u3": (["P", "Q", "P"], ["Q", "P"], 0, 0, 0, 3, at(ago(5), 1), at(ago(3), 1), "desktop"),
}


def test_user_table_and_user_keys(spark: SparkSession) -> None:
    users = transforms.user_table(clean_frame(spark, USER_EVENTS), history_length=3, purchased_max=2)
    assert schemas.drift(users.schema, schemas.USERS) == []
    keys = transforms.user_keys(users, C.isoformat())
    assert schemas.drift(keys.schema, schemas.KEYS_USERS) == []
    keyed = keys.select(*[F.col(c).alias(f"key_{c}") for c in keys.columns])
    rows = users.join(keyed, users["user_id"] == keyed["key_user_id"], "left").collect()
    got = {r["user_id"]: (r["last_items"], r["purchased_items"], r["n_view"], r["n_click"],
                          r["n_add_to_cart"], r["n_purchase"], ms(r["first_seen"]), ms(r["last_seen"]),
                          r["device"])
           for r in rows}
    assert got == {u: (*rest, ms(first), ms(last), device)
                   for u, (*rest, first, last, device) in EXPECTED_USERS.items()}
    got_keys = {r["key_pk"]: (r["key_sk"], r["key_user_id"], r["key_item_ids"], ms(r["key_last_seen"]),
                              r["key_dt"])
                for r in rows}
    assert got_keys == {f"user#{u}": ("recent", u, last_items, ms(last), "2026-03-20")
                        for u, (last_items, *_, last, _) in EXPECTED_USERS.items()}
