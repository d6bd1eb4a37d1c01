"""The warehouse's pure parts: table definitions, the SQL text builders (both dialects), the schema
contract check, DSN parsing and the run record. No database here: tests/integration/test_warehouse.py
runs the same statements on PostgreSQL."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pytest
from botocore.stub import Stubber

from operators.warehouse import sql
from operators.warehouse.load import (
    GATE_REASON_MAX,
    PipelineRunRecord,
    RedshiftDataWarehouse,
    RedshiftTarget,
    WarehouseError,
    arrow_kind,
    open_warehouse,
    schema_problems,
)
from operators.warehouse.tables import (
    CLICKSTREAM_FACT,
    DAILY_RECS,
    ITEM_DIM,
    LAKE_TABLES,
    PIPELINE_RUNS,
    TABLES,
    USER_DIM,
    Column,
    Explode,
    SourceColumn,
    Table,
    table,
)
from streamrec.aws import client as aws_client
from streamrec.settings import AwsSettings, RegionSettings, Settings

pytestmark = pytest.mark.unit

DIALECTS = ("postgres", "redshift")


def flat(text: str) -> str:
    """SQL written over several lines, as the one line the builders produce (no SQL here holds a
    significant run of whitespace)."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- quoting and parameters


@pytest.mark.parametrize(("name", "quoted"), [
    ("item_dim", '"item_dim"'), ("rank", '"rank"'), ("Mixed Case", '"Mixed Case"'), ('a"b', '"a""b"'),
])
def test_quote_ident(name: str, quoted: str) -> None:
    assert sql.quote_ident(name) == quoted


@pytest.mark.parametrize("bad", ["", "a\x00b"])
def test_quote_ident_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid SQL identifier"):
        sql.quote_ident(bad)


@pytest.mark.parametrize(("value", "quoted"), [
    ("s3://bucket/lake/x.manifest", "'s3://bucket/lake/x.manifest'"),
    ("arn:aws:iam::123456789012:role/copy", "'arn:aws:iam::123456789012:role/copy'"),
    ("it's", "'it''s'"), ("", "''"),
])
def test_quote_literal(value: str, quoted: str) -> None:
    assert sql.quote_literal(value) == quoted


@pytest.mark.parametrize("bad", ["a\\b", "line\nbreak", "tab\there", "nul\x00", "del\x7f"])
def test_quote_literal_refuses_backslashes_and_control_characters(bad: str) -> None:
    with pytest.raises(ValueError, match="backslash or control character"):
        sql.quote_literal(bad)


@pytest.mark.parametrize(("dialect", "expected"), [("postgres", "%(run_id)s"), ("redshift", ":run_id")])
def test_placeholder(dialect: str, expected: str) -> None:
    assert sql.placeholder("run_id", dialect) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "dialect"), [("Run", "postgres"), ("a-b", "redshift"), ("x", "mysql")])
def test_placeholder_refuses(name: str, dialect: str) -> None:
    with pytest.raises(ValueError):
        sql.placeholder(name, dialect)  # type: ignore[arg-type]


@pytest.mark.parametrize(("statement", "dialect", "names"), [
    ("SELECT CAST(%(dt)s AS date), %(run_id)s, %(dt)s", "postgres", ["dt", "run_id"]),
    ("SELECT CAST(:dt AS DATE), :run_id, x::text, 'a:b'", "redshift", ["dt", "run_id"]),
    ("SELECT 1", "postgres", []),
])
def test_referenced_params(statement: str, dialect: str, names: list[str]) -> None:
    assert sql.referenced_params(statement, dialect) == names  # type: ignore[arg-type]


def test_bind_literals_inlines_checked_values() -> None:
    statement = "DELETE FROM t WHERE dt = CAST(:dt AS DATE) AND r = CAST(:region AS VARCHAR(32)) AND d = :dt"
    assert sql.bind_literals(statement, {"dt": "2026-03-10", "region": "us-east-1"}, "redshift") == (
        "DELETE FROM t WHERE dt = CAST('2026-03-10' AS DATE) AND r = CAST('us-east-1' AS VARCHAR(32)) "
        "AND d = '2026-03-10'")
    assert sql.bind_literals("x = %(v)s", {"v": "it's"}, "postgres") == "x = 'it''s'"
    with pytest.raises(ValueError, match="no value for parameter"):
        sql.bind_literals(statement, {"dt": "2026-03-10"}, "redshift")
    with pytest.raises(ValueError, match="backslash"):
        sql.bind_literals("x = :v", {"v": "a\\'; DROP TABLE t; --"}, "redshift")


# --------------------------------------------------------------------------- DDL


def test_create_table_sql_postgres_exact() -> None:
    assert sql.create_table_sql(ITEM_DIM, "postgres") == """CREATE TABLE IF NOT EXISTS "item_dim" (
    "region" text NOT NULL,
    "dt" date NOT NULL,
    "item_id" text NOT NULL,
    "category" text,
    "first_seen" timestamptz NOT NULL,
    "last_seen" timestamptz NOT NULL,
    "pop_1d" double precision NOT NULL,
    "pop_7d" double precision NOT NULL,
    "pop_30d" double precision NOT NULL,
    "events_30d" bigint NOT NULL,
    "popularity_rank" integer NOT NULL,
    "load_run_id" text NOT NULL,
    PRIMARY KEY ("region", "dt", "item_id")
)"""


def test_create_table_sql_redshift_exact() -> None:
    assert sql.create_table_sql(DAILY_RECS, "redshift") == """CREATE TABLE IF NOT EXISTS "daily_recs" (
    "region" VARCHAR(32) NOT NULL,
    "dt" DATE NOT NULL,
    "user_id" VARCHAR(128) NOT NULL,
    "model_version" VARCHAR(128) NOT NULL,
    "rank" INTEGER NOT NULL,
    "item_id" VARCHAR(128) NOT NULL,
    "score" REAL,
    "source" VARCHAR(16) NOT NULL,
    "generated_at" TIMESTAMP NOT NULL,
    "load_run_id" VARCHAR(256) NOT NULL,
    PRIMARY KEY ("region", "dt", "user_id", "model_version", "rank")
)
DISTSTYLE KEY DISTKEY ("user_id")
COMPOUND SORTKEY ("dt", "model_version", "user_id")"""


@pytest.mark.parametrize(("tbl", "dialect", "present", "absent"), [
    (CLICKSTREAM_FACT, "redshift", ['DISTKEY ("user_id")', 'SORTKEY ("dt", "ts")', '"ts" TIMESTAMP NOT NULL',
                                    'PRIMARY KEY ("event_id")'], ["jsonb", "timestamptz"]),
    (CLICKSTREAM_FACT, "postgres", ['"ts" timestamptz NOT NULL', '"price" double precision,'],
     ["DISTKEY", "SORTKEY", "VARCHAR"]),
    (USER_DIM, "redshift", ['"last_items" SUPER', 'DISTKEY ("user_id")', 'SORTKEY ("dt", "user_id")'],
     ["jsonb"]),
    (USER_DIM, "postgres", ['"last_items" jsonb', '"purchased_items" jsonb'], ["SUPER"]),
    (PIPELINE_RUNS, "redshift",
     ["DISTSTYLE AUTO", '"metrics" SUPER', '"gate_promote" BOOLEAN', 'SORTKEY ("dt")'], ["DISTKEY"]),
    (PIPELINE_RUNS, "postgres", ['"metrics" jsonb', 'PRIMARY KEY ("run_id")'], ["DISTSTYLE"]),
])
def test_create_table_sql_fragments(tbl: Table, dialect: str, present: list[str], absent: list[str]) -> None:
    text = sql.create_table_sql(tbl, dialect)  # type: ignore[arg-type]
    assert text.startswith(f'CREATE TABLE IF NOT EXISTS "{tbl.name}" (')
    for fragment in present:
        assert fragment in text
    for fragment in absent:
        assert fragment not in text


@pytest.mark.parametrize(("tbl", "dialect", "expected"), [
    (CLICKSTREAM_FACT, "postgres",
     ['CREATE INDEX IF NOT EXISTS "clickstream_fact_region_dt_idx" ON "clickstream_fact" ("region", "dt")']),
    (DAILY_RECS, "postgres", [('CREATE INDEX IF NOT EXISTS "daily_recs_region_dt_model_version_idx" ON '
                              '"daily_recs" ("region", "dt", "model_version")')]),
    (ITEM_DIM, "postgres", []),  # the primary key starts with the scope
    (PIPELINE_RUNS, "postgres", []),  # no scope
    (CLICKSTREAM_FACT, "redshift", []),  # no indexes in Redshift
])
def test_create_index_sql(tbl: Table, dialect: str, expected: list[str]) -> None:
    assert sql.create_index_sql(tbl, dialect) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("tbl", "dialect", "expected"), [
    (ITEM_DIM, "postgres", flat("""
        CREATE TEMP TABLE "stage_item_dim" ("item_id" text, "category" text, "first_seen" timestamptz,
        "last_seen" timestamptz, "pop_1d" double precision, "pop_7d" double precision,
        "pop_30d" double precision, "events_30d" bigint, "popularity_rank" integer) ON COMMIT DROP""")),
    (DAILY_RECS, "redshift", flat("""
        CREATE TEMP TABLE "stage_daily_recs" ("user_id" VARCHAR(128), "item_ids" SUPER, "scores" SUPER,
        "source" VARCHAR(16), "model_version" VARCHAR(128), "generated_at" TIMESTAMP)""")),
    (DAILY_RECS, "postgres", flat("""
        CREATE TEMP TABLE "stage_daily_recs" ("user_id" text, "item_ids" jsonb, "scores" jsonb,
        "source" text, "model_version" text, "generated_at" timestamptz) ON COMMIT DROP""")),
])
def test_create_staging_sql(tbl: Table, dialect: str, expected: str) -> None:
    assert sql.create_staging_sql(tbl, dialect) == expected  # type: ignore[arg-type]


def test_staging_columns_follow_the_file_order() -> None:
    for tbl in LAKE_TABLES:
        assert [c.name for c in tbl.staging_columns()] == [c.name for c in tbl.source_columns]
    with pytest.raises(ValueError, match="not loaded from the lake"):
        sql.create_staging_sql(PIPELINE_RUNS, "postgres")


@pytest.mark.parametrize(("dialect", "expected"), [
    ("postgres", 'CREATE TEMP TABLE "load_user_dim" (LIKE "user_dim" INCLUDING INDEXES) ON COMMIT DROP'),
    ("redshift", 'CREATE TEMP TABLE "load_user_dim" (LIKE "user_dim")'),
])
def test_create_load_sql(dialect: str, expected: str) -> None:
    assert sql.create_load_sql(USER_DIM, dialect) == expected  # type: ignore[arg-type]


# --------------------------------------------------------------------------- COPY


def test_copy_from_stdin_sql_names_the_file_columns() -> None:
    assert sql.copy_from_stdin_sql(DAILY_RECS) == flat("""
        COPY "stage_daily_recs" ("user_id", "item_ids", "scores", "source", "model_version", "generated_at")
        FROM STDIN""")


ROLE = "arn:aws:iam::123456789012:role/copy"


@pytest.mark.parametrize(("tbl", "uri", "manifest", "expected"), [
    (ITEM_DIM, "s3://lake/features/region=us-east-1/dt=2026-03-10/items/", False,
     ("COPY \"stage_item_dim\" FROM 's3://lake/features/region=us-east-1/dt=2026-03-10/items/' "
     f"IAM_ROLE '{ROLE}' FORMAT AS PARQUET")),
    (ITEM_DIM, "s3://lake/_warehouse/m/item_dim.manifest", True,
     (f"COPY \"stage_item_dim\" FROM 's3://lake/_warehouse/m/item_dim.manifest' IAM_ROLE '{ROLE}' "
     "FORMAT AS PARQUET MANIFEST")),
    (USER_DIM, "s3://lake/u.manifest", True,
     (f"COPY \"stage_user_dim\" FROM 's3://lake/u.manifest' IAM_ROLE '{ROLE}' FORMAT AS PARQUET "
      "SERIALIZETOJSON MANIFEST")),
    (DAILY_RECS, "s3://lake/r/", False,
     f"COPY \"stage_daily_recs\" FROM 's3://lake/r/' IAM_ROLE '{ROLE}' FORMAT AS PARQUET SERIALIZETOJSON"),
])
def test_copy_from_s3_sql(tbl: Table, uri: str, manifest: bool, expected: str) -> None:
    assert sql.copy_from_s3_sql(tbl, uri, ROLE, manifest=manifest) == expected


@pytest.mark.parametrize(("uri", "role", "message"), [
    ("file:///lake/x", ROLE, "needs an s3:// URI"),
    ("s3://lake/x", "my-role", "must be a role ARN"),
    ("s3://lake/x'; DROP TABLE t; --\\", ROLE, "backslash"),
])
def test_copy_from_s3_sql_refuses(uri: str, role: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sql.copy_from_s3_sql(ITEM_DIM, uri, role)


# --------------------------------------------------------------------------- stage → load, delete, MERGE


@pytest.mark.parametrize("dialect", DIALECTS)
def test_merge_sql_item_dim_exact(dialect: str) -> None:
    """Both dialects accept the same text: no target alias, equality ON, both WHEN clauses, no conditions."""
    assert sql.merge_sql(ITEM_DIM, "load_item_dim", dialect) == flat("""
        MERGE INTO "item_dim" USING "load_item_dim" AS s
        ON "item_dim"."region" = s."region" AND "item_dim"."dt" = s."dt"
            AND "item_dim"."item_id" = s."item_id"
        WHEN MATCHED THEN UPDATE SET "category" = s."category", "first_seen" = s."first_seen",
            "last_seen" = s."last_seen", "pop_1d" = s."pop_1d", "pop_7d" = s."pop_7d",
            "pop_30d" = s."pop_30d",
            "events_30d" = s."events_30d", "popularity_rank" = s."popularity_rank",
            "load_run_id" = s."load_run_id"
        WHEN NOT MATCHED THEN INSERT ("region", "dt", "item_id", "category", "first_seen", "last_seen",
            "pop_1d", "pop_7d", "pop_30d", "events_30d", "popularity_rank", "load_run_id")
        VALUES (s."region", s."dt", s."item_id", s."category", s."first_seen", s."last_seen", s."pop_1d",
            s."pop_7d", s."pop_30d", s."events_30d", s."popularity_rank", s."load_run_id")""")


@pytest.mark.parametrize("tbl", TABLES, ids=lambda t: t.name)
@pytest.mark.parametrize("dialect", DIALECTS)
def test_merge_sql_shape(tbl: Table, dialect: str) -> None:
    text = sql.merge_sql(tbl, tbl.load_name, dialect)  # type: ignore[arg-type]
    on = re.search(r" ON (.*) WHEN MATCHED THEN UPDATE SET (.*) WHEN NOT MATCHED THEN INSERT \((.*)\) VALUES",
                   text)
    assert on is not None
    assert on.group(1) == " AND ".join(f'"{tbl.name}"."{k}" = s."{k}"' for k in tbl.key)
    updated = re.findall(r'"(\w+)" = s\."\w+"', on.group(2))
    assert updated == list(tbl.value_columns)  # every non-key column, never a key column
    assert on.group(3) == ", ".join(f'"{c}"' for c in tbl.column_names)
    assert f'MERGE INTO "{tbl.name}" USING' in text and f'"{tbl.name}" AS' not in text  # no target alias


@pytest.mark.parametrize(("tbl", "dialect", "fragments"), [
    (CLICKSTREAM_FACT, "postgres", [
        'ROW_NUMBER() OVER (PARTITION BY m."event_id" ORDER BY m."received_at" DESC, m."ts" DESC)',
        'CAST(%(region)s AS text) AS "region"', 'CAST(%(dt)s AS date) AS "dt"',
        'CAST(%(run_id)s AS text) AS "load_run_id"', ('FROM "stage_clickstream_fact" AS s) AS m) AS d '
        'WHERE d.row_number_ = 1')]),
    (CLICKSTREAM_FACT, "redshift",
     ['CAST(:dt AS DATE) AS "dt"', 'CAST(:run_id AS VARCHAR(256)) AS "load_run_id"']),
    (DAILY_RECS, "postgres", [
        'CAST(e.pos AS integer) AS "rank"', 'CAST(e.e0 AS text) AS "item_id"',
        'CAST(e.e1 AS real) AS "score"', 'CAST(%(model_version)s AS text) AS "model_version"',
        flat("""FROM "stage_daily_recs" AS s CROSS JOIN LATERAL ROWS FROM
                (jsonb_array_elements_text(s."item_ids"), jsonb_array_elements_text(s."scores"))
                WITH ORDINALITY AS e(e0, e1, pos)"""),
        flat("""PARTITION BY m."region", m."dt", m."user_id", m."model_version", m."rank"
                ORDER BY m."generated_at" DESC""")]),
    (DAILY_RECS, "redshift", [
        'CAST(pos + 1 AS INTEGER) AS "rank"', 'CAST(e0 AS VARCHAR(128)) AS "item_id"',
        'CAST(s."scores"[pos] AS REAL) AS "score"',
        'FROM "stage_daily_recs" AS s, s."item_ids" AS e0 AT pos']),
    (USER_DIM, "redshift",
     ['s."last_items" AS "last_items"',
      'INSERT INTO "load_user_dim" ("region", "dt", "user_id", "last_items"']),
])
def test_fill_load_sql(tbl: Table, dialect: str, fragments: list[str]) -> None:
    text = sql.fill_load_sql(tbl, dialect)  # type: ignore[arg-type]
    assert text.startswith(f'INSERT INTO "{tbl.load_name}" (')
    for fragment in fragments:
        assert fragment in text, fragment


@pytest.mark.parametrize(("dialect", "expected"), [
    ("postgres", flat("""
        DELETE FROM "daily_recs" WHERE "daily_recs"."region" = CAST(%(region)s AS text)
        AND "daily_recs"."dt" = CAST(%(dt)s AS date)
        AND "daily_recs"."model_version" = CAST(%(model_version)s AS text)
        AND NOT EXISTS (SELECT 1 FROM "load_daily_recs" AS s WHERE s."region" = "daily_recs"."region"
            AND s."dt" = "daily_recs"."dt" AND s."user_id" = "daily_recs"."user_id"
            AND s."model_version" = "daily_recs"."model_version" AND s."rank" = "daily_recs"."rank")""")),
    ("redshift", flat("""
        DELETE FROM "daily_recs" WHERE "daily_recs"."region" = CAST(:region AS VARCHAR(32))
        AND "daily_recs"."dt" = CAST(:dt AS DATE)
        AND "daily_recs"."model_version" = CAST(:model_version AS VARCHAR(128))
        AND NOT EXISTS (SELECT 1 FROM "load_daily_recs" AS s WHERE s."region" = "daily_recs"."region"
            AND s."dt" = "daily_recs"."dt" AND s."user_id" = "daily_recs"."user_id"
            AND s."model_version" = "daily_recs"."model_version" AND s."rank" = "daily_recs"."rank")""")),
])
def test_delete_stale_sql(dialect: str, expected: str) -> None:
    assert sql.delete_stale_sql(DAILY_RECS, "load_daily_recs", dialect) == expected  # type: ignore[arg-type]


def test_delete_stale_sql_needs_a_scope() -> None:
    with pytest.raises(ValueError, match="no load scope"):
        sql.delete_stale_sql(PIPELINE_RUNS, "load_pipeline_runs", "postgres")


@pytest.mark.parametrize(("dialect", "steps"), [
    ("postgres",
     ["create_stage", "copy", "create_load", "fill_load", "analyze", "lock", "delete_stale", "merge"]),
    ("redshift", ["create_stage", "copy", "create_load", "fill_load", "delete_stale", "merge"]),
])
@pytest.mark.parametrize("tbl", LAKE_TABLES, ids=lambda t: t.name)
def test_load_statements_order(tbl: Table, dialect: str, steps: list[str]) -> None:
    plan = sql.load_statements(tbl, dialect, "COPY-HERE")  # type: ignore[arg-type]
    assert [step for step, _ in plan] == steps
    assert dict(plan)["copy"] == "COPY-HERE"
    if dialect == "postgres":
        assert dict(plan)["lock"] == f'LOCK TABLE "{tbl.name}" IN SHARE ROW EXCLUSIVE MODE'
    # Every statement's parameters are the table's load parameters, nothing else.
    used = {p for _, s in plan for p in sql.referenced_params(s, dialect)}  # type: ignore[arg-type]
    assert used == set(tbl.load_params)


# --------------------------------------------------------------------------- pipeline runs


@pytest.mark.parametrize(("dialect", "present", "expected_values"), [
    ("postgres", ["run_id", "region", "dt", "phase", "load_run_id"], flat("""
        CAST(%(run_id)s AS text), CAST(%(region)s AS text), CAST(%(dt)s AS date), CAST(%(phase)s AS text),
        NULL, NULL, NULL, NULL, NULL, NULL, NULL, CAST(%(load_run_id)s AS text)""")),
    ("redshift", ["run_id", "region", "dt", "phase", "gate_promote", "metrics", "finished_at", "load_run_id"],
     flat("""
        CAST(:run_id AS VARCHAR(256)), CAST(:region AS VARCHAR(32)), CAST(:dt AS DATE),
        CAST(:phase AS VARCHAR(16)), NULL, CAST(:gate_promote AS BOOLEAN), NULL, JSON_PARSE(:metrics), NULL,
        NULL, CAST(:finished_at AS TIMESTAMP), CAST(:load_run_id AS VARCHAR(256))""")),
    ("postgres", ["run_id", "region", "dt", "phase", "synced", "load_run_id"], flat("""
        CAST(%(run_id)s AS text), CAST(%(region)s AS text), CAST(%(dt)s AS date), CAST(%(phase)s AS text),
        NULL, NULL, NULL, NULL, CAST(%(synced)s AS jsonb), NULL, NULL, CAST(%(load_run_id)s AS text)""")),
])
def test_insert_run_sql(dialect: str, present: list[str], expected_values: str) -> None:
    columns = ", ".join(f'"{c}"' for c in PIPELINE_RUNS.column_names)
    assert sql.insert_run_sql(present, dialect) == (  # type: ignore[arg-type]
        f'INSERT INTO "load_pipeline_runs" ({columns}) VALUES ({expected_values})')


@pytest.mark.parametrize(("present", "message"), [
    (["run_id", "region", "dt", "load_run_id"], "pipeline_runs.phase is required"),
    (["run_id", "region", "dt", "phase", "load_run_id", "colour"], "no column"),
])
def test_insert_run_sql_refuses(present: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sql.insert_run_sql(present, "postgres")


def test_record_run_statements() -> None:
    steps = sql.record_run_statements(["run_id", "region", "dt", "phase", "load_run_id"], "redshift")
    assert steps[0] == 'CREATE TEMP TABLE "load_pipeline_runs" (LIKE "pipeline_runs")'
    assert steps[1].startswith('INSERT INTO "load_pipeline_runs"')
    assert steps[2] == sql.merge_sql(PIPELINE_RUNS, "load_pipeline_runs", "redshift")


def record(**overrides: Any) -> PipelineRunRecord:
    fields: dict[str, Any] = {"run_id": "us-east-1-2026-03-10", "region": "us-east-1",
                              "dt": date(2026, 3, 10), "phase": "Succeeded"}
    fields.update(overrides)
    return PipelineRunRecord(**fields)


def test_run_record_values() -> None:
    started = datetime(2026, 3, 11, 4, 0, tzinfo=timezone(timedelta(hours=2)))
    values = record(metrics={"recall@20": 0.3, "bad": float("inf"), "nested": [float("nan"), 1]},
                    synced={"warehouse_item_dim": 4}, started_at=started, gate_promote=False,
                    gate_reason="x" * (GATE_REASON_MAX + 10)).values()
    assert values["metrics"] == '{"bad": null, "nested": [null, 1], "recall@20": 0.3}'
    assert values["synced"] == '{"warehouse_item_dim": 4}'
    assert values["started_at"] == datetime(2026, 3, 11, 2, 0, tzinfo=UTC)
    assert values["gate_promote"] is False
    assert len(values["gate_reason"]) == GATE_REASON_MAX and values["gate_reason"].endswith("…")
    assert values["load_run_id"] == values["run_id"]
    assert "finished_at" not in values and "model_version" not in values


@pytest.mark.parametrize(("overrides", "message"), [
    ({"run_id": "bad id"}, "run id"),
    ({"region": "moon-1"}, "not an AWS region"),
    ({"phase": "Done"}, "phase must be one of"),
    ({"dt": datetime(2026, 3, 10, tzinfo=UTC)}, "dt must be a date"),
    ({"model_version": "../etc"}, "model version"),
    ({"started_at": datetime(2026, 3, 10)}, "timezone-aware"),
    ({"synced": {"x": 1.5}}, "integer counts"),
])
def test_run_record_refuses(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        record(**overrides)


def test_run_record_refuses_huge_metrics() -> None:
    with pytest.raises(ValueError, match="bytes of JSON"):
        record(metrics={"blob": "x" * 70_000}).values()


# --------------------------------------------------------------------------- table definitions


def test_every_target_column_has_one_origin() -> None:
    origins = {c: DAILY_RECS.origin(c) for c in DAILY_RECS.column_names}
    assert origins == {
        "region": ("param", "region"), "dt": ("param", "dt"), "user_id": ("source", "user_id"),
        "model_version": ("param", "model_version"), "rank": ("position", ""),
        "item_id": ("element", "item_ids"), "score": ("element", "scores"), "source": ("source", "source"),
        "generated_at": ("source", "generated_at"),
        "load_run_id": ("param", "run_id")}
    assert DAILY_RECS.load_params == ("run_id", "region", "dt", "model_version")
    assert ITEM_DIM.load_params == ("run_id", "region", "dt")
    assert table("user_dim") is USER_DIM
    with pytest.raises(KeyError, match="no warehouse table"):
        table("users")


def test_keys_and_scopes() -> None:
    assert CLICKSTREAM_FACT.key == ("event_id",)
    assert ITEM_DIM.key == ("region", "dt", "item_id") and USER_DIM.key == ("region", "dt", "user_id")
    assert DAILY_RECS.key == ("region", "dt", "user_id", "model_version", "rank")
    assert PIPELINE_RUNS.key == ("run_id",)
    for tbl in TABLES:
        assert "load_run_id" in tbl.column_names and "region" in tbl.column_names
        assert set(tbl.scope) <= set(tbl.key) or tbl is CLICKSTREAM_FACT


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"key": ("nope",)}, "key names unknown column"),
    ({"key": ()}, "needs a key"),
    ({"key": ("b",)}, "must be NOT NULL"),
    ({"sortkey": ("zz",)}, "sortkey names unknown column"),
    ({"params": {"a": "colour"}}, "unknown load parameter"),
    ({"source_columns": (SourceColumn("a", "string"),)}, r"t\.b: not a load parameter"),
    ({"source_columns": (SourceColumn("a", "string"), SourceColumn("b", "string")),
      "explode": Explode(("xs",), ("b",), "a")}, "explode names unknown source column"),
])
def test_table_definition_is_checked(kwargs: dict[str, Any], message: str) -> None:
    columns = (Column("a", "text", "VARCHAR(8)", False), Column("b", "text", "VARCHAR(8)"))
    fields: dict[str, Any] = {"name": "t", "description": "", "columns": columns, "key": ("a",), "source": "test"}
    fields.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Table(**fields)


def test_unknown_source_kind_and_dialect() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        SourceColumn("a", "map<string,int>")
    with pytest.raises(ValueError, match="unknown SQL dialect"):
        sql.create_table_sql(ITEM_DIM, "mysql")  # type: ignore[arg-type]


def test_contracts_match_the_producers() -> None:
    """The tables' source columns are the ETL's and scoring's output schemas, in the same order."""
    schemas = pytest.importorskip("spark_etl.schemas")
    pairs = ((CLICKSTREAM_FACT, schemas.CLEAN), (ITEM_DIM, schemas.ITEMS), (USER_DIM, schemas.USERS))
    for tbl, contract in pairs:
        expected = list(schemas.describe(contract).items())
        assert [(c.name, c.kind) for c in tbl.source_columns] == expected, tbl.name
    score = pytest.importorskip("ray_apps.score")
    assert [(c.name, c.kind) for c in DAILY_RECS.source_columns] == [
        (f.name, arrow_kind(f.type)) for f in score.RECS_SCHEMA]


# --------------------------------------------------------------------------- schema check


CONTRACT = pa.schema([
    ("item_id", pa.string()), ("category", pa.string()), ("first_seen", pa.timestamp("us", "UTC")),
    ("last_seen", pa.timestamp("us", "UTC")), ("pop_1d", pa.float64()), ("pop_7d", pa.float64()),
    ("pop_30d", pa.float64()), ("events_30d", pa.int64()), ("popularity_rank", pa.int32())])


@pytest.mark.parametrize(("schema", "positional", "problems"), [
    (CONTRACT, True, []),
    (CONTRACT.remove(1), False, ["missing column category (string)"]),
    (CONTRACT.set(7, pa.field("events_30d", pa.int32())), False,
     ["column events_30d is int, expected bigint"]),
    (CONTRACT.append(pa.field("extra", pa.string())), False, []),
    (CONTRACT.append(pa.field("extra", pa.string())), True,
     ["unexpected column extra (string): COPY from Parquet maps columns by position"]),
    (pa.schema([CONTRACT.field(1), CONTRACT.field(0), *list(CONTRACT)[2:]]), False, []),
    (pa.schema([CONTRACT.field(1), CONTRACT.field(0), *list(CONTRACT)[2:]]), True,
     [flat("""columns are in the order category, item_id, first_seen, last_seen, pop_1d, pop_7d, pop_30d,
         events_30d, popularity_rank; COPY from Parquet maps columns by position and needs item_id, category,
         first_seen, last_seen, pop_1d, pop_7d, pop_30d, events_30d, popularity_rank""")]),
    (CONTRACT.set(2, pa.field("first_seen", pa.timestamp("ns"))), True, []),  # any timestamp unit or zone
    (CONTRACT.set(1, pa.field("category", pa.dictionary(pa.int32(), pa.string()))), True, []),
])
def test_schema_problems(schema: pa.Schema, positional: bool, problems: list[str]) -> None:
    assert schema_problems(ITEM_DIM, schema, positional=positional) == problems


@pytest.mark.parametrize(("dtype", "kind"), [
    (pa.string(), "string"), (pa.large_string(), "string"), (pa.timestamp("ms"), "timestamp"),
    (pa.float64(), "double"), (pa.float32(), "float"), (pa.int32(), "int"), (pa.int64(), "bigint"),
    (pa.list_(pa.string()), "array<string>"), (pa.large_list(pa.float32()), "array<float>"),
    (pa.dictionary(pa.int8(), pa.string()), "string"), (pa.int16(), "int16"),
])
def test_arrow_kind(dtype: pa.DataType, kind: str) -> None:
    assert arrow_kind(dtype) == kind


# --------------------------------------------------------------------------- Redshift DSN and executor


@pytest.mark.parametrize(("dsn", "request_fields", "role"), [
    ("redshift-data://streamrec-wg/analytics?iam_role=arn:aws:iam::1:role/r",
     {"Database": "analytics", "WorkgroupName": "streamrec-wg"}, "arn:aws:iam::1:role/r"),
    ("redshift-data://prod-cluster/dw?type=cluster&db_user=loader&iam_role=arn:aws:iam::1:role/r",
     {"Database": "dw", "ClusterIdentifier": "prod-cluster", "DbUser": "loader"}, "arn:aws:iam::1:role/r"),
    ("redshift-data://wg/db?iam_role=arn%3Aaws%3Aiam%3A%3A1%3Arole%2Fr&secret_arn=arn:aws:secretsmanager:x",
     {"Database": "db", "WorkgroupName": "wg", "SecretArn": "arn:aws:secretsmanager:x"},
     "arn:aws:iam::1:role/r"),
])
def test_redshift_dsn(dsn: str, request_fields: dict[str, str], role: str) -> None:
    target = RedshiftTarget.from_dsn(dsn)
    assert target.request() == request_fields
    assert target.iam_role == role


@pytest.mark.parametrize(("dsn", "message"), [
    ("redshift-data:///db?iam_role=arn:x", "redshift-data://<workgroup-or-cluster>/<database>"),
    ("redshift-data://wg/?iam_role=arn:x", "redshift-data://<workgroup-or-cluster>/<database>"),
    ("redshift-data://wg/db", "needs iam_role"),
    ("redshift-data://wg/db?iam_role=arn:x&type=serverless", "type must be workgroup or cluster"),
    ("redshift-data://wg/db?iam_role=arn:x&password=hunter2", "unknown Redshift DSN option"),
    ("postgresql://wg/db", "not a redshift-data"),
])
def test_redshift_dsn_refuses(dsn: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedshiftTarget.from_dsn(dsn)


def settings_with(dsn: str, lake: str = "s3://lake-bucket/lake") -> Settings:
    region = RegionSettings.default_for("us-east-1", lake).model_copy(update={"warehouse_dsn": dsn})
    return Settings(aws=AwsSettings(access_key_id="testing", secret_access_key="testing"),
                    regions={"us-east-1": region})


@pytest.mark.parametrize(("dsn", "message"), [
    ("mysql://x/y", "unsupported scheme 'mysql'"),
    ("redshift-data://wg/db", "regions.us-east-1.warehouse_dsn: a Redshift DSN needs iam_role"),
])
def test_open_warehouse_refuses(dsn: str, message: str) -> None:
    with pytest.raises(WarehouseError, match=message):
        open_warehouse(settings_with(dsn), "us-east-1")


def data_api_client() -> Any:
    """A real botocore redshift-data client (requests are validated against the service model); the
    tests stub its responses, so nothing is sent."""
    return aws_client("redshift-data", "us-east-1", AwsSettings(access_key_id="testing", secret_access_key="testing"))


def redshift(statuses: list[dict[str, Any]],
             **kwargs: Any) -> tuple[RedshiftDataWarehouse, Stubber, list[float]]:
    client = data_api_client()
    stubber = Stubber(client)
    stubber.add_response("batch_execute_statement", {"Id": "q-1"})
    for status in statuses:
        stubber.add_response("describe_statement", {"Id": "q-1", **status}, {"Id": "q-1"})
    slept: list[float] = []
    warehouse = open_warehouse(settings_with("redshift-data://streamrec-wg/db?iam_role=arn:aws:iam::1:role/r"),
                               "us-east-1", redshift_client=client)
    assert isinstance(warehouse, RedshiftDataWarehouse)
    warehouse.sleep = slept.append
    for key, value in kwargs.items():
        setattr(warehouse, key, value)
    return warehouse, stubber, slept


def test_redshift_batches_are_polled_with_backoff_until_finished() -> None:
    running = [{"Status": s} for s in ("SUBMITTED", "PICKED", "STARTED", "STARTED", "STARTED")]
    finished = {"Status": "FINISHED", "SubStatements": [{"Id": "q-1:1", "ResultRows": 7}]}
    warehouse, stubber, slept = redshift([*running, finished])
    with stubber:
        subs = warehouse.run_batch(["SELECT 1"], name="t")
    assert subs == [{"Id": "q-1:1", "ResultRows": 7}]
    assert slept == [0.5, 1.0, 2.0, 4.0, 5.0]


def test_redshift_batch_timeout_names_the_statement() -> None:
    warehouse, stubber, _ = redshift([{"Status": "STARTED"}] * 3, timeout_s=1.0)
    with stubber, pytest.raises(WarehouseError, match=r"still STARTED after 2 s.*cancel-statement --id q-1"):
        warehouse.run_batch(["SELECT 1"], name="t")


def test_redshift_api_errors_are_one_line() -> None:
    warehouse = open_warehouse(settings_with("redshift-data://wg/db?iam_role=arn:aws:iam::1:role/r"),
                               "us-east-1", redshift_client=data_api_client())
    assert isinstance(warehouse, RedshiftDataWarehouse)
    with pytest.raises(WarehouseError, match=r"batch_execute_statement for t failed: Parameter validation "
                                             r"failed: Invalid length for parameter WorkgroupName"):
        warehouse.run_batch(["SELECT 1"], name="t")  # botocore checks the request before sending anything


def test_redshift_needs_an_s3_lake() -> None:
    with pytest.raises(WarehouseError, match="use an s3:// lake"):
        open_warehouse(settings_with("redshift-data://wg/db?iam_role=arn:aws:iam::1:role/r", "file:///tmp/lake"),
                       "us-east-1", redshift_client=object())
