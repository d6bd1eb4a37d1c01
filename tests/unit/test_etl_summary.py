"""The ETL's pure parts (no Spark session): data-quality checks, schema drift lines, run summaries and
their JSON, reading the previous run's outputs, and the run plan of a backfill."""

from __future__ import annotations

import json
from datetime import date, timedelta

import pytest
from pyspark.sql.types import (
    ArrayType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
)

from spark_etl import runner, schemas
from spark_etl.summary import (
    FAILED_SUMMARY_NAME,
    SUMMARY_FORMAT,
    SUMMARY_NAME,
    Check,
    DataQualityError,
    RunSummary,
    non_empty_check,
    null_keys_check,
    previous_outputs,
    row_drop_check,
    schema_check,
)

pytestmark = pytest.mark.unit

# --------------------------------------------------------------------------------------------------
# row_drop_check
# --------------------------------------------------------------------------------------------------


# (id, rows, previous, max_drop_share, passed)
ROW_DROP_CASES: list[tuple[str, int, int | None, float, bool]] = [
    ("no_previous", 0, None, 0.5, True),
    ("same", 100, 100, 0.5, True),
    ("growth", 1_000, 100, 0.5, True),
    ("drop_exactly_the_share", 50, 100, 0.5, True),
    ("one_below", 49, 100, 0.5, False),
    ("to_zero", 0, 100, 0.5, False),
    ("fractional_floor_below", 50, 101, 0.5, False),   # floor 50.5: 50 of 101 is a 50.5% drop
    ("fractional_floor_above", 51, 101, 0.5, True),
    ("share_0_no_drop_allowed", 100, 100, 0.0, True),
    ("share_0_one_row_less", 99, 100, 0.0, False),
    ("share_1_anything_goes", 0, 100, 1.0, True),
    ("previous_zero", 0, 0, 0.5, True),
    ("share_0.25", 75, 100, 0.25, True),
    ("share_0.25_below", 74, 100, 0.25, False),
    ("float_floor_0.7", 30, 100, 0.7, True),
    ("float_floor_0.7_below", 29, 100, 0.7, False),
    ("float_floor_0.7_small", 3, 10, 0.7, True),
    ("float_floor_0.9", 100, 1_000, 0.9, True),
]


@pytest.mark.parametrize(("rows", "previous", "share", "passed"), [
    pytest.param(*case[1:], id=case[0]) for case in ROW_DROP_CASES])
def test_row_drop_check(rows: int, previous: int | None, share: float, passed: bool) -> None:
    check = row_drop_check("clean", rows, previous, share)
    assert check.name == "row_drop:clean"
    assert check.passed is passed


def test_row_drop_check_details_name_the_numbers() -> None:
    assert row_drop_check("clean", 40, 100, 0.5).detail == (
        "clean: 40 rows against 100 the previous day (minimum 50 at a 50% allowed drop)")
    assert row_drop_check("users", 7, None, 0.5).detail == "no previous successful run to compare with"


def test_row_drop_check_detail_minimum_is_a_count_that_passes() -> None:
    check = row_drop_check("clean", 50, 101, 0.5)
    assert not check.passed
    assert "(minimum 51 at a 50% allowed drop)" in check.detail


# --------------------------------------------------------------------------------------------------
# null_keys_check, schema_check, non_empty_check
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("nulls", "passed", "detail"), [
    ({"event_id": 0, "user_id": 0}, True, "no null event_id, user_id"),
    ({"user_id": 3}, False, "raw has null key values (user_id: 3)"),
    # only the columns with nulls are listed, sorted by name
    ({"user_id": 3, "event_id": 0, "item_id": 2}, False, "raw has null key values (item_id: 2, user_id: 3)"),
])
def test_null_keys_check(nulls: dict[str, int], passed: bool, detail: str) -> None:
    assert null_keys_check("raw", nulls) == Check("null_keys:raw", passed, detail)


def test_schema_and_non_empty_checks() -> None:
    assert schema_check("raw", [], "s3://lake/raw") == Check("schema:raw", True, "matches the contract")
    problems = ["missing column ts (timestamp)", "unexpected column x (int)"]
    assert schema_check("raw", problems, "s3://lake/raw") == Check(
        "schema:raw", False,
        "schema drift in s3://lake/raw: missing column ts (timestamp); unexpected column x (int)")
    assert non_empty_check("clean", 1, "clean of 2026-03-10") == Check(
        "non_empty:clean", True, "1 rows in clean of 2026-03-10")
    assert non_empty_check("clean", 0, "clean of 2026-03-10").passed is False


# --------------------------------------------------------------------------------------------------
# schemas.drift
# --------------------------------------------------------------------------------------------------

def _without(schema: StructType, *names: str) -> list[StructField]:
    return [f for f in schema.fields if f.name not in names]


def test_drift_of_the_contract_itself_is_empty() -> None:
    contracts = (schemas.RAW, schemas.CLEAN, *schemas.FEATURE_TABLES.values(), *schemas.KEY_TABLES.values())
    for contract in contracts:
        assert schemas.drift(contract, contract) == []


def test_drift_ignores_nullability_and_column_order() -> None:
    relaxed = StructType([StructField(f.name, f.dataType, True) for f in reversed(schemas.CLEAN.fields)])
    assert schemas.drift(relaxed, schemas.CLEAN) == []
    # array element nullability is not part of the contract either
    users = StructType([StructField(f.name, ArrayType(StringType(), False), True)
                        if f.name == "last_items" else f for f in schemas.USERS.fields])
    assert schemas.drift(users, schemas.USERS) == []


def test_drift_names_a_missing_a_retyped_and_an_extra_column() -> None:
    fields = _without(schemas.RAW, "ip_hash")
    fields = [StructField("price", StringType(), True) if f.name == "price" else f for f in fields]
    actual = StructType([*fields, StructField("coupon", IntegerType(), True)])
    assert schemas.drift(actual, schemas.RAW) == [
        "missing column ip_hash (string)",
        "column price is string, expected double",
        "unexpected column coupon (int)",
    ]


def test_drift_lists_every_problem_in_a_stable_order() -> None:
    actual = StructType([
        *[StructField(f.name, LongType() if f.name == "popularity_rank" else f.dataType)
          for f in _without(schemas.ITEMS, "pop_1d", "category")],
        StructField("pop_1d_v2", DoubleType()), StructField("a_extra", ArrayType(StringType())),
    ])
    assert schemas.drift(actual, schemas.ITEMS) == [
        "missing column category (string)",      # contract order
        "missing column pop_1d (double)",
        "column popularity_rank is bigint, expected int",
        "unexpected column pop_1d_v2 (double)",  # the data's order
        "unexpected column a_extra (array<string>)",
    ]


# --------------------------------------------------------------------------------------------------
# RunSummary, DataQualityError, previous_outputs
# --------------------------------------------------------------------------------------------------

def test_check_records_passes_and_raises_on_failure_with_the_check_name() -> None:
    summary = RunSummary("clean", "eu-west-1", "2026-03-10")
    summary.check(non_empty_check("clean", 5, "clean of 2026-03-10"))
    failing = row_drop_check("clean", 10, 100, 0.5)
    with pytest.raises(DataQualityError) as info:
        summary.check(failing)
    assert info.value.check == "row_drop:clean"
    assert str(info.value) == f"data-quality check 'row_drop:clean' failed: {failing.detail}"
    assert isinstance(info.value, RuntimeError)
    # both are recorded, the failed one last, so the failed summary shows what failed
    assert [(c.name, c.passed) for c in summary.checks] == [
        ("non_empty:clean", True), ("row_drop:clean", False)]


def test_summary_to_json_round_trip() -> None:
    summary = RunSummary("features", "eu-west-1", "2026-03-10",
                         params={"train_days": 14, "history_length": 50})
    with summary.step("read") as step:
        step.rows_out = 1_000
    with summary.step("items") as step:
        step.rows_in, step.rows_out = 1_000, 42
    summary.removed = {"duplicate": 3, "null_key": 1}
    summary.outputs = {"items": 42, "users": 7}
    summary.check(non_empty_check("items", 42, "features items of 2026-03-10"))
    summary.finish("succeeded")

    text = summary.to_json()
    assert text.endswith("\n")
    data = json.loads(text)
    assert list(data)[:4] == ["format", "job", "region", "dt"]
    assert data["format"] == SUMMARY_FORMAT
    assert "_t0" not in data
    assert (data["job"], data["region"], data["dt"], data["status"], data["error"]) == (
        "features", "eu-west-1", "2026-03-10", "succeeded", None)
    assert [(s["name"], s["rows_in"], s["rows_out"]) for s in data["steps"]] == [
        ("read", None, 1_000), ("items", 1_000, 42)]
    assert all(isinstance(s["seconds"], float) and s["seconds"] >= 0 for s in data["steps"])
    assert data["checks"] == [
        {"name": "non_empty:items", "passed": True, "detail": "42 rows in features items of 2026-03-10"}]
    assert data["removed"] == {"duplicate": 3, "null_key": 1}
    assert data["params"] == {"train_days": 14, "history_length": 50}
    assert data["seconds"] >= 0 and data["started_at"] == summary.started_at
    # and what the next day's run reads back from it
    assert previous_outputs(text) == {"items": 42, "users": 7}


def test_step_is_recorded_even_when_it_raises() -> None:
    summary = RunSummary("clean", "eu-west-1", "2026-03-10")
    with pytest.raises(ValueError), summary.step("read") as step:
        step.rows_in = 3
        raise ValueError("boom")
    assert [(s.name, s.rows_in) for s in summary.steps] == [("read", 3)]


def test_failed_summary_keeps_the_error() -> None:
    summary = RunSummary("clean", "eu-west-1", "2026-03-10")
    summary.outputs = {"clean": 10}
    summary.finish("failed", "data-quality check 'row_drop:clean' failed: ...")
    data = json.loads(summary.to_json())
    assert (data["status"], data["error"]) == ("failed", "data-quality check 'row_drop:clean' failed: ...")
    # a failed run is never a baseline, even though it has outputs
    assert previous_outputs(summary.to_json()) is None
    assert SUMMARY_NAME != FAILED_SUMMARY_NAME


@pytest.mark.parametrize(("text", "expected"), [
    (None, None),
    ("", None),
    (json.dumps({"status": "succeeded", "outputs": {"clean": 10}}), {"clean": 10}),
    (json.dumps({"status": "succeeded", "outputs": {"examples_train": "12", "examples_eval": 3.0}}),
     {"examples_train": 12, "examples_eval": 3}),
    (json.dumps({"status": "succeeded"}), {}),
    (json.dumps({"status": "failed", "outputs": {"clean": 10}}), None),
    (json.dumps({"status": "running", "outputs": {"clean": 10}}), None),
    (json.dumps({"outputs": {"clean": 10}}), None),
], ids=["none", "empty", "succeeded", "coerced_to_int", "no_outputs", "failed", "running", "no_status"])
def test_previous_outputs(text: str | None, expected: dict[str, int] | None) -> None:
    assert previous_outputs(text) == expected


# --------------------------------------------------------------------------------------------------
# runner.days / runner.plan
# --------------------------------------------------------------------------------------------------

D1 = date(2026, 2, 27)


def test_days() -> None:
    assert runner.days(D1) == [D1]
    assert runner.days(D1, D1) == [D1]
    # across a month end (2026 is not a leap year)
    assert runner.days(D1, date(2026, 3, 2)) == [D1, date(2026, 2, 28), date(2026, 3, 1), date(2026, 3, 2)]


def test_plan_of_a_backfill_cleans_every_day_before_building_features() -> None:
    end = D1 + timedelta(days=2)
    plan = runner.plan("all", D1, end)
    ds = [D1, D1 + timedelta(days=1), end]
    assert plan == [*[("clean", d) for d in ds], *[("features", d) for d in ds], *[("keys", d) for d in ds]]
    last_clean = max(i for i, (job, _) in enumerate(plan) if job == "clean")
    first_features = min(i for i, (job, _) in enumerate(plan) if job == "features")
    assert last_clean < first_features


@pytest.mark.parametrize(("job", "end", "expected"), [
    ("clean", None, [("clean", D1)]),
    ("all", None, [("clean", D1), ("features", D1), ("keys", D1)]),
    ("features", D1 + timedelta(days=1), [("features", D1), ("features", D1 + timedelta(days=1))]),
    ("keys", D1, [("keys", D1)]),
])
def test_plan_of_one_job_or_day(job: str, end: date | None, expected: list[tuple[str, date]]) -> None:
    assert runner.plan(job, D1, end) == expected


def test_plan_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown job 'cleanup'; choose one of clean, features, keys, all"):
        runner.plan("cleanup", D1)
    with pytest.raises(ValueError, match=r"end date 2026-02-26 is before start date 2026-02-27"):
        runner.plan("all", D1, D1 - timedelta(days=1))
    with pytest.raises(ValueError, match=r"end date .* is before start date"):
        runner.days(D1, D1 - timedelta(days=1))
