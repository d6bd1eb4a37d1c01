"""The warehouse loads (operators/warehouse/load.py) on a real PostgreSQL, fed from small Parquet inputs
written with pyarrow in the exact lake layouts (no Spark, no Ray):

    clean/region=R/dt=D/part-*.parquet + _run_summary.json              (spark_etl clean_events)
    features/region=R/dt=D/{items,users}/part-*.parquet + ../_run_summary.json (spark_etl build_features)
    recs/region=R/dt=D/model_version=V/part-*.parquet + _run_summary.json     (ray_apps.score)

Each test gets an empty database (the ``warehouse_dsn`` fixture) and its own lake directory. The Redshift
executor is checked at the end against a stubbed Data API client (there is no local Redshift).
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.stub import ANY, Stubber

from operators.warehouse import sql
from operators.warehouse.load import (
    PipelineRunRecord,
    PostgresWarehouse,
    RedshiftDataWarehouse,
    SchemaDriftError,
    WarehouseError,
    WarehouseInputError,
    load_day,
    open_warehouse,
    record_run,
)
from operators.warehouse.tables import ITEM_DIM, LAKE_TABLES, PIPELINE_RUNS, Table
from streamrec.aws import client as aws_client
from streamrec.devstack.service import ServiceHandle
from streamrec.lake import LakeLayout, filesystem
from streamrec.settings import AwsSettings, RegionSettings, Settings

REGION = "us-east-1"
DAY = date(2026, 3, 10)
NEXT_DAY = date(2026, 3, 11)
VERSION = "v20260310-abc123"
OTHER_VERSION = "v20260309-def456"

# The lake's file schemas, spelled out as the producers write them (spark_etl/schemas.py with Spark's
# TIMESTAMP_MICROS UTC timestamps; ray_apps/score.py RECS_SCHEMA).
TS = pa.timestamp("us", tz="UTC")
CLEAN_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()),
    ("event_type", pa.string()), ("event_weight", pa.float64()), ("ts", TS), ("category", pa.string()),
    ("price", pa.float64()),
    ("device", pa.string()), ("page", pa.string()), ("referrer", pa.string()), ("client_region", pa.string()),
    ("client_session_id", pa.string()), ("session_id", pa.string()), ("session_position", pa.int32()),
    ("received_at", TS),
])
ITEMS_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("category", pa.string()), ("first_seen", TS), ("last_seen", TS),
    ("pop_1d", pa.float64()), ("pop_7d", pa.float64()), ("pop_30d", pa.float64()), ("events_30d", pa.int64()),
    ("popularity_rank", pa.int32()),
])
USERS_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("last_items", pa.list_(pa.string())),
    ("purchased_items", pa.list_(pa.string())), ("n_view", pa.int64()), ("n_click", pa.int64()),
    ("n_add_to_cart", pa.int64()), ("n_purchase", pa.int64()), ("first_seen", TS), ("last_seen", TS),
    ("device", pa.string()),
])
RECS_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("item_ids", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
    ("source", pa.string()), ("model_version", pa.string()), ("generated_at", TS),
])


# --------------------------------------------------------------------------- lake fixtures


def at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


def event(n: int, day: date, user: str, item: str, event_type: str = "view", **extra: Any) -> dict[str, Any]:
    weight = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0}[event_type]
    row = {
        "event_id": str(uuid.UUID(int=day.toordinal() * 10_000 + n)), "user_id": user, "item_id": item,
        "event_type": event_type, "event_weight": weight, "ts": at(day, 8, n), "category": "books",
        "price": 12.5, "device": "mobile", "page": f"/item/{item}", "referrer": None, "client_region": REGION,
        "client_session_id": f"s-{user}", "session_id": f"{user}:{n}", "session_position": n,
        "received_at": at(day, 8, n) + timedelta(seconds=2),
    }
    row.update(extra)
    return row


def events_of(day: date) -> list[dict[str, Any]]:
    return [
        event(1, day, "u1", "i1"), event(2, day, "u1", "i2", "click"), event(3, day, "u2", "i1", price=None),
        event(4, day, "u2", "i3", "purchase", referrer="https://example.com/?q=it's"),
        event(5, day, "u3", "i4", category=None, device=None, page="/search?q=a\\b\tc\nd \\N"),
    ]


def items_of(day: date) -> list[dict[str, Any]]:
    return [{"item_id": f"i{k}", "category": None if k == 4 else "books",
             "first_seen": at(day - timedelta(days=k), 1), "last_seen": at(day, 8, k), "pop_1d": float(k),
             "pop_7d": 2.0 * k, "pop_30d": 3.5 * k, "events_30d": 10 * k, "popularity_rank": 5 - k} for k in range(1, 5)]


def users_of(day: date) -> list[dict[str, Any]]:
    return [
        {"user_id": "u1", "last_items": ["i1", "i2"], "purchased_items": [], "n_view": 1, "n_click": 1,
         "n_add_to_cart": 0, "n_purchase": 0, "first_seen": at(day, 8, 1), "last_seen": at(day, 8, 2),
         "device": "mobile"},
        {"user_id": "u2", "last_items": ["i1", "i3"], "purchased_items": ["i3"], "n_view": 1, "n_click": 0,
         "n_add_to_cart": 0, "n_purchase": 1, "first_seen": at(day - timedelta(days=3), 9),
         "last_seen": at(day, 8, 4), "device": None},
        {"user_id": "u3", "last_items": [], "purchased_items": [], "n_view": 1, "n_click": 0,
         "n_add_to_cart": 0, "n_purchase": 0, "first_seen": at(day, 8, 5), "last_seen": at(day, 8, 5),
         "device": "mobile"},
    ]


def recs_of(day: date, version: str) -> list[dict[str, Any]]:
    when = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    return [
        {"user_id": "u1", "item_ids": ["i3", "i4", "i1"], "scores": [0.9, 0.55, 0.125], "source": "model",
         "model_version": version, "generated_at": when},
        {"user_id": "u2", "item_ids": ["i2", "i4"], "scores": [0.7, 0.3], "source": "model",
         "model_version": version, "generated_at": when},
        {"user_id": "u3", "item_ids": ["i1", "i2", "i3"], "scores": [4.0, 3.0, 2.0], "source": "popular",
         "model_version": version, "generated_at": when},
    ]


class Lake:
    """Writes producer-shaped outputs into a lake root (file:// or s3://) and reads nothing back."""

    def __init__(self, uri: str, aws: AwsSettings | None = None, region: str = REGION):
        self.layout = LakeLayout(uri)
        aws = aws or AwsSettings()
        self.fs = filesystem(uri, endpoint_url=aws.endpoint_url, access_key=aws.access_key_id,
                             secret_key=aws.secret_access_key, region=region)
        self.region = region

    def _write(self, folder: str, name: str, rows: Sequence[dict[str, Any]] | pa.Table,
               schema: pa.Schema | None = None) -> str:
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows), schema=schema)
        if self.layout.scheme == "file":
            self.fs.create_dir(folder, recursive=True)
        path = posixpath.join(folder, name)
        pq.write_table(table, path, filesystem=self.fs)
        return path

    def _json(self, path: str, doc: dict[str, Any]) -> None:
        with self.fs.open_output_stream(path) as out:
            out.write(json.dumps(doc).encode())

    def delete(self, path: str) -> None:
        self.fs.delete_file(path)

    def clean(self, day: date, rows: Sequence[dict[str, Any]], *, files: int = 1, summary: bool = True,
              table: pa.Table | None = None) -> str:
        folder = self.layout.partition("clean", self.region, day)
        if table is not None:
            self._write(folder, "part-00000-x.c000.snappy.parquet", table)
            count = table.num_rows
        else:
            chunks = [rows[i::files] for i in range(files)]
            for i, chunk in enumerate(chunks):
                self._write(folder, f"part-{i:05d}-x.c000.snappy.parquet", chunk, CLEAN_SCHEMA)
            count = len(rows)
        self._json(posixpath.join(folder, "_SUCCESS"), {})
        if summary:
            self._json(posixpath.join(folder, "_run_summary.json"),
                       {"job": "clean", "region": self.region, "dt": day.isoformat(), "status": "succeeded",
                        "outputs": {"clean": count}})
        return folder

    def features(self, day: date, items: Sequence[dict[str, Any]] | pa.Table,
                 users: Sequence[dict[str, Any]] | pa.Table) -> str:
        folder = self.layout.partition("features", self.region, day)
        self._write(posixpath.join(folder, "items"), "part-00000-x.c000.snappy.parquet", items, ITEMS_SCHEMA)
        self._write(posixpath.join(folder, "users"), "part-00000-x.c000.snappy.parquet", users, USERS_SCHEMA)
        self._json(posixpath.join(folder, "_run_summary.json"),
                   {"job": "features", "region": self.region, "dt": day.isoformat(), "status": "succeeded",
                    "outputs": {"items": len(items), "users": len(users), "examples_train": 0,
                                "examples_eval": 0}})
        return folder

    def recs(self, day: date, version: str, rows: Sequence[dict[str, Any]], *, files: int = 1,
             summary: bool = True) -> str:
        folder = posixpath.join(self.layout.partition("recs", self.region, day), f"model_version={version}")
        listed = []
        for i in range(files):
            chunk = rows[i::files]
            self._write(folder, f"part-{i:05d}-0.parquet", chunk, RECS_SCHEMA)
            listed.append({"path": f"part-{i:05d}-0.parquet", "rows": len(chunk)})
        if summary:
            self._json(posixpath.join(folder, "_run_summary.json"),
                       {"region": self.region, "dt": day.isoformat(), "model_version": version,
                        "users": len(rows), "files": listed})
        return folder

    def day(self, day: date, version: str | None = VERSION) -> None:
        """Every input of a complete day."""
        self.clean(day, events_of(day))
        self.features(day, items_of(day), users_of(day))
        if version is not None:
            self.recs(day, version, recs_of(day, version))


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    """us-east-1 with a file:// lake under tmp_path and this test's own PostgreSQL database."""
    return settings_factory(provision=False)


@pytest.fixture
def lake(settings: Settings) -> Lake:
    return Lake(settings.region(REGION).lake_uri)


@pytest.fixture
def db(warehouse_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(warehouse_dsn, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        yield conn


def rows(db: psycopg.Connection[Any], query: str, *params: Any) -> list[tuple[Any, ...]]:
    return db.execute(query, params or None).fetchall()


def count(db: psycopg.Connection[Any], table: str, where: str = "TRUE", *params: Any) -> int:
    return rows(db, f'SELECT count(*) FROM "{table}" WHERE {where}', *params)[0][0]


def slice_rows(db: psycopg.Connection[Any], table: Table, where: str = "TRUE",
               *params: Any) -> list[tuple[Any, ...]]:
    """The table's rows matching ``where``, every column, in key order ([] when the table does not exist)."""
    if rows(db, "SELECT to_regclass(%s)", table.name)[0][0] is None:
        return []
    keys = ", ".join(f'"{k}"' for k in table.key)
    return rows(db, f'SELECT * FROM "{table.name}" WHERE {where} ORDER BY {keys}', *params)


def snapshot(db: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every lake table, in key order."""
    return {t.name: slice_rows(db, t) for t in LAKE_TABLES}


def assert_no_duplicate_keys(db: psycopg.Connection[Any]) -> None:
    for t in LAKE_TABLES:
        keys = ", ".join(f'"{k}"' for k in t.key)
        assert rows(db, f'SELECT count(*) - count(DISTINCT ({keys})) FROM "{t.name}"')[0][0] == 0, t.name


# --------------------------------------------------------------------------- PostgreSQL: loads


def test_load_day_loads_every_table_with_its_values(settings: Settings, lake: Lake, db: Any) -> None:
    lake.day(DAY)
    report = load_day(settings, REGION, DAY, run_id="run-1", model_version=VERSION)

    assert report.backend == "postgres"
    assert report.rows == {"clickstream_fact": 5, "item_dim": 4, "user_dim": 3, "daily_recs": 8}
    by_table = {t.table: t for t in report.tables}
    recs = by_table["daily_recs"]
    assert (recs.source_rows, recs.staged, recs.rows) == (3, 3, 8)  # users, exploded to one row per rank
    assert all(t.merged == t.rows and t.deleted == 0 for t in report.tables)
    assert report.to_json()["rows"] == report.rows
    assert {t: count(db, t) for t in report.rows} == report.rows

    # The fact: every clean column, nulls kept, timestamps in UTC, the load's constants.
    fact = rows(db, 'SELECT user_id, item_id, event_type, event_weight, ts, category, price, device, '
                    'referrer, session_position, received_at, region, dt, load_run_id FROM clickstream_fact '
                    'WHERE event_id = %s', events_of(DAY)[3]["event_id"])
    assert fact == [("u2", "i3", "purchase", 8.0, at(DAY, 8, 4), "books", 12.5, "mobile",
                     "https://example.com/?q=it's", 4, at(DAY, 8, 4) + timedelta(seconds=2), REGION, DAY,
                     "run-1")]
    assert rows(db, "SELECT price, category, device, page FROM clickstream_fact WHERE event_id IN (%s, %s) "
                    "ORDER BY ts", events_of(DAY)[2]["event_id"], events_of(DAY)[4]["event_id"]) == [
        (None, "books", "mobile", "/item/i1"), (12.5, None, None, "/search?q=a\\b\tc\nd \\N")]

    # Dimensions: daily snapshots keyed by (region, dt, id); lists as JSON.
    assert rows(db, "SELECT dt, category, pop_7d, events_30d, popularity_rank, first_seen FROM item_dim "
                    "WHERE item_id = 'i4'") == [(DAY, None, 8.0, 40, 1, at(DAY - timedelta(days=4), 1))]
    assert rows(db, "SELECT last_items, purchased_items, n_purchase, device FROM user_dim "
                    "WHERE user_id = 'u2'") == [(["i1", "i3"], ["i3"], 1, None)]
    assert rows(db, "SELECT last_items FROM user_dim WHERE user_id = 'u3'") == [([],)]

    # Recs: one row per (user, rank), ranks from 1 in list order, float32 scores exactly.
    assert rows(db, "SELECT rank, item_id, score, source, model_version, generated_at FROM daily_recs "
                    "WHERE user_id = 'u1' ORDER BY rank") == [
        (1, "i3", pytest.approx(0.9, rel=1e-6), "model", VERSION, at(NEXT_DAY, 0)),
        (2, "i4", pytest.approx(0.55, rel=1e-6), "model", VERSION, at(NEXT_DAY, 0)),
        (3, "i1", 0.125, "model", VERSION, at(NEXT_DAY, 0))]
    assert rows(db, "SELECT count(*), min(rank), max(rank) FROM daily_recs WHERE user_id = 'u3'") == [
        (3, 1, 3)]
    assert rows(db, "SELECT DISTINCT load_run_id, region, dt FROM daily_recs") == [("run-1", REGION, DAY)]
    assert_no_duplicate_keys(db)


def test_rerun_of_the_same_run_changes_nothing(settings: Settings, lake: Lake, db: Any) -> None:
    lake.day(DAY)
    first = load_day(settings, REGION, DAY, run_id="run-1", model_version=VERSION)
    before = snapshot(db)

    again = load_day(settings, REGION, DAY, run_id="run-1", model_version=VERSION)

    assert again.rows == first.rows
    assert all(t.deleted == 0 for t in again.tables)
    assert snapshot(db) == before  # same rows, same values, nothing added
    assert_no_duplicate_keys(db)


def test_without_a_model_version_no_recs_are_loaded(settings: Settings, lake: Lake, db: Any) -> None:
    lake.day(DAY, version=None)
    report = load_day(settings, REGION, DAY, run_id="run-1", model_version=None)
    assert report.rows == {"clickstream_fact": 5, "item_dim": 4, "user_dim": 3}
    assert rows(db, "SELECT to_regclass('daily_recs')") == [(None,)]


def test_facts_only_loads_the_clean_events_alone(settings: Settings, lake: Lake, db: Any) -> None:
    """An earlier day of a backfill: its clean events, under the backfill's run id, and no snapshots or
    recs (those are built for the run's last day only)."""
    lake.day(DAY)
    report = load_day(settings, REGION, DAY, run_id="run-backfill", model_version=VERSION, facts_only=True)
    assert report.rows == {"clickstream_fact": 5}
    assert rows(db, "SELECT DISTINCT load_run_id, dt FROM clickstream_fact") == [("run-backfill", DAY)]
    assert [rows(db, "SELECT to_regclass(%s)", t)[0][0] for t in ("item_dim", "user_dim", "daily_recs")] == [
        None, None, None]
    again = load_day(settings, REGION, DAY, run_id="run-backfill", model_version=None, facts_only=True)
    assert again.rows == report.rows and count(db, "clickstream_fact") == 5


def test_a_second_run_of_a_changed_day_replaces_exactly_that_slice(settings: Settings, lake: Lake,
                                                                    db: Any) -> None:
    for day in (DAY, NEXT_DAY):
        lake.day(day)
        load_day(settings, REGION, day, run_id=f"run-{day}", model_version=VERSION)
    lake.recs(NEXT_DAY, OTHER_VERSION, recs_of(NEXT_DAY, OTHER_VERSION))
    load_day(settings, REGION, NEXT_DAY, run_id="run-other", model_version=OTHER_VERSION)
    untouched_day = {t.name: slice_rows(db, t, "dt = %s", DAY) for t in LAKE_TABLES}
    other_version = rows(db, "SELECT * FROM daily_recs WHERE model_version = %s ORDER BY user_id, rank",
                         OTHER_VERSION)

    # The ETL and scoring reran for NEXT_DAY: an event gone, one new, an item's popularity changed, a
    # user gone, and shorter recommendation lists.
    events = events_of(NEXT_DAY)[1:] + [event(9, NEXT_DAY, "u4", "i2", "add_to_cart")]
    items = items_of(NEXT_DAY)
    items[0]["pop_7d"] = 99.0
    users = users_of(NEXT_DAY)[:2]
    recs = recs_of(NEXT_DAY, VERSION)[:2]
    recs[0] = {**recs[0], "item_ids": ["i4"], "scores": [0.5]}
    lake.clean(NEXT_DAY, events)
    lake.features(NEXT_DAY, items, users)
    lake.recs(NEXT_DAY, VERSION, recs)

    report = load_day(settings, REGION, NEXT_DAY, run_id="run-2", model_version=VERSION)

    assert report.rows == {"clickstream_fact": 5, "item_dim": 4, "user_dim": 2, "daily_recs": 3}
    loads = {t.table: t for t in report.tables}
    assert {name: load.deleted for name, load in loads.items()} == {
        "clickstream_fact": 1, "item_dim": 0, "user_dim": 1, "daily_recs": 5}
    assert count(db, "clickstream_fact", "dt = %s", NEXT_DAY) == 5
    assert count(db, "clickstream_fact", "event_id = %s", events_of(NEXT_DAY)[0]["event_id"]) == 0
    assert rows(db, "SELECT user_id, load_run_id FROM clickstream_fact WHERE event_id = %s",
                events[-1]["event_id"]) == [("u4", "run-2")]
    assert rows(db, "SELECT pop_7d, load_run_id FROM item_dim WHERE dt = %s AND item_id = 'i1'",
                NEXT_DAY) == [(99.0, "run-2")]
    assert rows(db, "SELECT user_id FROM user_dim WHERE dt = %s ORDER BY 1", NEXT_DAY) == [("u1",), ("u2",)]
    assert rows(db, "SELECT user_id, rank, item_id FROM daily_recs WHERE dt = %s AND model_version = %s "
                    "ORDER BY 1, 2", NEXT_DAY, VERSION) == [("u1", 1, "i4"), ("u2", 1, "i2"), ("u2", 2, "i4")]
    assert rows(db, "SELECT DISTINCT load_run_id FROM user_dim WHERE dt = %s", NEXT_DAY) == [("run-2",)]
    # Another day and another model version of the same day are not part of this load's slice.
    assert {t.name: slice_rows(db, t, "dt = %s", DAY) for t in LAKE_TABLES} == untouched_day
    assert rows(db, "SELECT * FROM daily_recs WHERE model_version = %s ORDER BY user_id, rank",
                OTHER_VERSION) == other_version
    assert_no_duplicate_keys(db)


def test_duplicate_keys_in_the_input_load_once(settings: Settings, lake: Lake, db: Any) -> None:
    """A key twice in the source (here an event in two files, as after a replayed write) must reach MERGE
    once: Redshift refuses a MERGE whose source matches a target row twice. The later arrival wins."""
    events = events_of(DAY)
    late_copy = {**events[0], "received_at": events[0]["received_at"] + timedelta(minutes=5), "device": "app"}
    lake.clean(DAY, events + [late_copy], files=2)
    lake.features(DAY, items_of(DAY), users_of(DAY))
    report = load_day(settings, REGION, DAY, run_id="run-1", model_version=None)
    load = report.tables[0]
    assert (load.source_rows, load.staged, load.rows) == (6, 6, 5)
    assert rows(db, "SELECT device FROM clickstream_fact WHERE event_id = %s", events[0]["event_id"]) == [
        ("app",)]


def test_regions_sharing_a_database_do_not_touch_each_other(settings_factory: Callable[..., Settings],
                                                             db: Any) -> None:
    settings = settings_factory(REGION, "eu-west-1", provision=False)
    assert settings.region(REGION).warehouse_dsn == settings.region("eu-west-1").warehouse_dsn
    for region in (REGION, "eu-west-1"):
        region_lake = Lake(settings.region(region).lake_uri, region=region)
        region_lake.clean(DAY, [{**e, "event_id": str(uuid.uuid5(uuid.NAMESPACE_DNS, region + e["event_id"]))}
                                for e in events_of(DAY)])
        region_lake.features(DAY, items_of(DAY), users_of(DAY))
        region_lake.recs(DAY, VERSION, recs_of(DAY, VERSION))
        load_day(settings, region, DAY, run_id=f"run-{region}", model_version=VERSION)
    load_day(settings, REGION, DAY, run_id="run-again", model_version=VERSION)
    for table, n in {"clickstream_fact": 5, "item_dim": 4, "user_dim": 3, "daily_recs": 8}.items():
        assert rows(db, f'SELECT region, count(*) FROM "{table}" GROUP BY region ORDER BY region') == [
            ("eu-west-1", n), (REGION, n)]


def test_the_documented_example_queries_run(settings: Settings, lake: Lake, db: Any) -> None:
    """docs/warehouse.md's example queries, on a loaded day and a recorded run."""
    lake.day(DAY)
    load_day(settings, REGION, DAY, run_id="run-1", model_version=VERSION)
    record_run(settings, REGION, PipelineRunRecord(run_id="run-1", region=REGION, dt=DAY, phase="Succeeded",
                                                   metrics={"recall@20": 0.3}))
    doc = (Path(__file__).parents[2] / "docs" / "warehouse.md").read_text()
    block = doc.split("## Example queries", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    block = block.replace("'i-123'", "'i1'").replace("DATE '2026-11-25'", f"DATE '{DAY}'")
    queries = [q for q in block.split(";") if q.strip()]
    assert len(queries) == 6
    results = [rows(db, q) for q in queries]
    assert all(results), "every example returns rows on a loaded day"


# --------------------------------------------------------------------------- PostgreSQL: failures


@pytest.mark.parametrize("crash", ["after_copy", "after_delete"])
def test_a_crash_mid_load_keeps_finished_tables_and_leaves_the_rest_untouched(
        settings: Settings, lake: Lake, db: Any, monkeypatch: pytest.MonkeyPatch, crash: str) -> None:
    """The day is recomputed (one event and one item gone, one of each new) and run-2 crashes in the
    second table (item_dim): right after its COPY (an exception in the loader), or after its stale-row
    DELETE already ran, before the MERGE (a failing statement). The first table is complete; item_dim
    (half-changed in the second case) and the tables after it are exactly as run-1 left them."""
    lake.day(DAY)
    load_day(settings, REGION, DAY, run_id="run-1", model_version=VERSION)
    before = snapshot(db)
    lake.clean(DAY, events_of(DAY)[1:] + [event(7, DAY, "u1", "i5")])
    items = items_of(DAY)[:3] + [{**items_of(DAY)[0], "item_id": "i5", "popularity_rank": 4}]
    lake.features(DAY, items, users_of(DAY))

    if crash == "after_copy":
        real_copy = PostgresWarehouse._copy

        def crash_after_item_copy(self: PostgresWarehouse, cur: Any, inp: Any, statement: str) -> int:
            written = real_copy(self, cur, inp, statement)
            if inp.table is ITEM_DIM:
                raise RuntimeError("injected crash after the COPY of item_dim")
            return written

        monkeypatch.setattr(PostgresWarehouse, "_copy", crash_after_item_copy)
        expected: type[Exception] = RuntimeError
    else:
        real_statements = sql.load_statements

        def fail_after_item_delete(table: Table, dialect: Any, copy_sql: str) -> list[tuple[str, str]]:
            steps = real_statements(table, dialect, copy_sql)
            if table is ITEM_DIM:
                at_delete = [step for step, _ in steps].index(sql.STEP_DELETE_STALE)
                steps.insert(at_delete + 1, ("injected", "SELECT 1 / 0"))
            return steps

        monkeypatch.setattr(sql, "load_statements", fail_after_item_delete)
        expected = WarehouseError
    with pytest.raises(expected, match="injected crash|division by zero"):
        load_day(settings, REGION, DAY, run_id="run-2", model_version=VERSION)

    after = snapshot(db)
    assert len(after["clickstream_fact"]) == 5  # complete: the first table's transaction committed
    assert {r[-1] for r in after["clickstream_fact"]} == {"run-2"}
    assert count(db, "clickstream_fact", "event_id = %s", events_of(DAY)[0]["event_id"]) == 0
    for name in ("item_dim", "user_dim", "daily_recs"):  # rolled back, or never started
        assert after[name] == before[name], name
    assert rows(db, "SELECT count(*) FROM pg_tables "
                    "WHERE tablename LIKE 'stage%' OR tablename LIKE 'load%'") == [(0,)]

    monkeypatch.undo()
    report = load_day(settings, REGION, DAY, run_id="run-2", model_version=VERSION)
    assert report.rows == {"clickstream_fact": 5, "item_dim": 4, "user_dim": 3, "daily_recs": 8}
    assert rows(db, "SELECT item_id, load_run_id FROM item_dim ORDER BY item_id") == [
        ("i1", "run-2"), ("i2", "run-2"), ("i3", "run-2"), ("i5", "run-2")]
    assert_no_duplicate_keys(db)


def test_schema_drift_fails_naming_the_column_before_writing(settings: Settings, lake: Lake, db: Any) -> None:
    lake.day(DAY)
    users = pa.Table.from_pylist(users_of(DAY), schema=USERS_SCHEMA).drop_columns(["n_click"])
    lake.features(DAY, items_of(DAY), users)
    with pytest.raises(SchemaDriftError, match=r"users/part-00000-x\.c000\.snappy\.parquet .*missing column "
                                               r"n_click \(bigint\)") as caught:
        load_day(settings, REGION, DAY, run_id="run-1", model_version=VERSION)
    assert "user_dim" in str(caught.value)
    assert rows(db, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]  # nothing written

    wrong_type = pa.Table.from_pylist(users_of(DAY), schema=USERS_SCHEMA).set_column(
        3, "n_view", pa.array(["1", "1", "1"]))
    lake.features(DAY, items_of(DAY), wrong_type)
    with pytest.raises(SchemaDriftError, match="column n_view is string, expected bigint"):
        load_day(settings, REGION, DAY, run_id="run-1", model_version=VERSION)


def test_incomplete_inputs_are_refused(settings: Settings, lake: Lake, db: Any) -> None:
    lake.day(DAY, version=None)
    lake.recs(DAY, VERSION, recs_of(DAY, VERSION), summary=False)  # scoring crashed before its summary
    with pytest.raises(WarehouseInputError,
                       match=r"no completed recommendations of model .*run scoring first"):
        load_day(settings, REGION, DAY, run_id="run-1", model_version=VERSION)

    clean = lake.clean(DAY, events_of(DAY), summary=False)
    lake.delete(posixpath.join(clean, "_run_summary.json"))
    with pytest.raises(WarehouseInputError, match="no completed clean_events output .* does not exist"):
        load_day(settings, REGION, DAY, run_id="run-1", model_version=None)

    # A summary that counts more rows than the files hold: a partial or rewritten output.
    lake.clean(DAY, events_of(DAY))
    lake.delete(posixpath.join(clean, "part-00000-x.c000.snappy.parquet"))
    lake._write(clean, "part-00000-x.c000.snappy.parquet", events_of(DAY)[:3], CLEAN_SCHEMA)
    with pytest.raises(WarehouseInputError, match="holds 3 rows in 1 files but its run summary says 5"):
        load_day(settings, REGION, DAY, run_id="run-1", model_version=None)

    with pytest.raises(WarehouseError, match="run id"):
        load_day(settings, REGION, DAY, run_id="bad id; DROP TABLE x", model_version=None)
    assert rows(db, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]


# --------------------------------------------------------------------------- PostgreSQL: pipeline runs


def test_record_run_upserts_one_row_per_run(settings: Settings, db: Any) -> None:
    started = datetime(2026, 3, 11, 2, 0, tzinfo=UTC)
    record_run(settings, REGION, PipelineRunRecord(run_id="us-east-1-2026-03-10", region=REGION, dt=DAY,
                                                   phase="Running", started_at=started))
    assert rows(db, "SELECT phase, model_version, gate_promote, metrics, synced, started_at, finished_at "
                    "FROM pipeline_runs") == [("Running", None, None, {}, {}, started, None)]

    finished = started + timedelta(hours=1, minutes=5)
    final = PipelineRunRecord(
        run_id="us-east-1-2026-03-10", region=REGION, dt=DAY, phase="Succeeded", model_version=VERSION,
        gate_promote=True, gate_reason="recall@20 0.31 beats popular 0.22 by 41%",
        metrics={"recall@20": 0.31, "ndcg@20": float("nan"), "popular": {"recall@20": 0.22}},
        synced={"dynamodb_recs": 3, "warehouse_daily_recs": 8}, started_at=started, finished_at=finished)
    record_run(settings, REGION, final)
    record_run(settings, REGION, final)  # recording it again changes nothing
    record_run(settings, REGION, PipelineRunRecord(run_id="us-east-1-2026-03-11", region=REGION, dt=NEXT_DAY,
                                                   phase="Failed", gate_promote=False,
                                                   gate_reason="it's worse"))

    assert rows(db, "SELECT run_id, dt, phase, model_version, gate_promote, gate_reason, metrics, synced, "
                    "started_at, finished_at, load_run_id FROM pipeline_runs ORDER BY run_id") == [
        ("us-east-1-2026-03-10", DAY, "Succeeded", VERSION, True, "recall@20 0.31 beats popular 0.22 by 41%",
         {"recall@20": 0.31, "ndcg@20": None, "popular": {"recall@20": 0.22}},
         {"dynamodb_recs": 3, "warehouse_daily_recs": 8}, started, finished, "us-east-1-2026-03-10"),
        ("us-east-1-2026-03-11", NEXT_DAY, "Failed", None, False, "it's worse", {}, {}, None, None,
         "us-east-1-2026-03-11")]
    assert rows(db, "SELECT metrics->'popular'->>'recall@20' FROM pipeline_runs "
                    "WHERE phase = 'Succeeded'") == [("0.22",)]


def test_an_existing_table_with_other_columns_fails_clearly(settings: Settings, lake: Lake, db: Any) -> None:
    db.execute('CREATE TABLE item_dim (region text, dt date, item_id text, pop_7d double precision)')
    lake.day(DAY, version=None)
    with pytest.raises(WarehouseError,
                       match=r"item_dim exists with other columns \(missing category, first_seen"):
        load_day(settings, REGION, DAY, run_id="run-1", model_version=None)


def test_unreachable_database_is_one_clear_error(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(provision=False)
    broken = settings.model_copy(update={"regions": {REGION: settings.region(REGION).model_copy(
        update={"warehouse_dsn": "postgresql://nobody@127.0.0.1:1/none"})}})
    Lake(broken.region(REGION).lake_uri).day(DAY, version=None)
    with pytest.raises(WarehouseError, match="cannot connect to the us-east-1 warehouse"):
        load_day(broken, REGION, DAY, run_id="run-1", model_version=None)


# --------------------------------------------------------------------------- Redshift (stubbed Data API)


IAM_ROLE = "arn:aws:iam::123456789012:role/streamrec-redshift-copy"
SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:rs-AbC"


@pytest.fixture
def s3_settings(moto_server: ServiceHandle) -> Settings:
    aws = AwsSettings(endpoint_url=moto_server.url, access_key_id="testing", secret_access_key="testing")
    bucket = f"lake-{uuid.uuid4().hex[:10]}"
    aws_client("s3", REGION, aws).create_bucket(Bucket=bucket)
    region = RegionSettings.default_for(REGION, f"s3://{bucket}/lake").model_copy(update={
        "warehouse_dsn": f"redshift-data://streamrec-wg/analytics?iam_role={IAM_ROLE}&secret_arn={SECRET}"})
    return Settings(environment="local", aws=aws, regions={REGION: region})


def stubbed_redshift() -> tuple[Any, Stubber]:
    """A real botocore redshift-data client with a Stubber: every request is checked against the
    service model and the expected parameters, and nothing leaves the process."""
    aws = AwsSettings(access_key_id="testing", secret_access_key="testing")
    client = aws_client("redshift-data", REGION, aws)
    return client, Stubber(client)


def expect_batch(stubber: Stubber, sqls: list[str], statement_id: str, *,
                 result_rows: Sequence[int] | None = None, parameters: list[dict[str, str]] | None = None,
                 statuses: Sequence[str] = ("FINISHED",)) -> None:
    expected: dict[str, Any] = {"Sqls": sqls, "WorkgroupName": "streamrec-wg", "Database": "analytics",
                                "SecretArn": SECRET, "StatementName": ANY}
    if parameters is not None:
        expected["Parameters"] = parameters
    stubber.add_response("batch_execute_statement", {"Id": statement_id}, expected)
    for status in statuses:
        subs = [{"Id": f"{statement_id}:{i + 1}", "Status": status, "ResultRows": n}
                for i, n in enumerate(result_rows or [0] * len(sqls))]
        response = {"Id": statement_id, "Status": status, "SubStatements": subs}
        stubber.add_response("describe_statement", response, {"Id": statement_id})


def test_redshift_executor_sends_the_builders_statements(s3_settings: Settings) -> None:
    """STUB: there is no local Redshift, and moto's redshift-data only returns canned rows, so this test
    checks what the Redshift executor SENDS (through a botocore Stubber) against the SQL builders'
    output, and what it writes to S3 (the COPY manifests, on the moto server). Whether Redshift accepts
    the SQL is not tested here; the same statements run for real on PostgreSQL in the tests above."""
    lake = Lake(s3_settings.region(REGION).lake_uri, s3_settings.aws)
    lake.clean(DAY, events_of(DAY), files=2)
    lake.features(DAY, items_of(DAY), users_of(DAY))
    lake.recs(DAY, VERSION, recs_of(DAY, VERSION))
    client, stubber = stubbed_redshift()
    warehouse = open_warehouse(s3_settings, REGION, redshift_client=client)
    assert isinstance(warehouse, RedshiftDataWarehouse)
    warehouse.sleep = lambda seconds: None

    params = {"run_id": "run-1", "region": REGION, "dt": DAY.isoformat(), "model_version": VERSION}
    base = f"{lake.layout.base}/_warehouse/manifests/region={REGION}/dt={DAY}/run-1"
    expect_batch(stubber, sql.create_statements(LAKE_TABLES, "redshift"), "create-1")
    sent: dict[str, list[str]] = {}
    for i, table in enumerate(LAKE_TABLES):
        manifest = f"s3://{base}/{table.name}.manifest"
        copy = sql.copy_from_s3_sql(table, manifest, IAM_ROLE, manifest=True)
        statements = [s if step == sql.STEP_COPY else sql.bind_literals(
            s, {p: params[p] for p in table.load_params}, "redshift")
            for step, s in sql.load_statements(table, "redshift", copy)]
        sent[table.name] = statements
        # Sub-statement row counts: create stage, COPY, create load, fill load, delete stale, MERGE.
        assert [step for step, _ in sql.load_statements(table, "redshift", copy)] == [
            "create_stage", "copy", "create_load", "fill_load", "delete_stale", "merge"]
        expect_batch(stubber, statements, f"load-{i}", result_rows=[0, 5 + i, 0, 4 + i, 1, 4 + i],
                     statuses=("SUBMITTED", "STARTED", "FINISHED"))

    with stubber:
        report = warehouse.load_day(DAY, run_id="run-1", model_version=VERSION)
        stubber.assert_no_pending_responses()

    assert report.backend == "redshift"
    assert report.rows == {"clickstream_fact": 4, "item_dim": 5, "user_dim": 6, "daily_recs": 7}
    assert [t.staged for t in report.tables] == [5, 6, 7, 8]
    # What went out, beyond "equal to the builders": one transaction per table, the COPY from the
    # manifest, the load's values inlined as literals (no bind parameters next to the role ARN).
    recs = sent["daily_recs"]
    assert recs[1] == (f"COPY \"stage_daily_recs\" FROM 's3://{base}/daily_recs.manifest' "
                       f"IAM_ROLE '{IAM_ROLE}' FORMAT AS PARQUET SERIALIZETOJSON MANIFEST")
    assert "CAST('v20260310-abc123' AS VARCHAR(128)) AS \"model_version\"" in recs[3]
    assert ", s.\"item_ids\" AS e0 AT pos" in recs[3]
    assert all(":run_id" not in s and ":dt" not in s for s in recs)
    assert recs[-1].startswith('MERGE INTO "daily_recs" USING "load_daily_recs" AS s ON ')

    # The manifests name exactly the data files (no _SUCCESS, no summary) with their lengths.
    manifest = json.loads(lake.fs.open_input_stream(f"{base}/clickstream_fact.manifest").read())
    urls = [e["url"] for e in manifest["entries"]]
    assert urls == [f"s3://{lake.layout.partition('clean', REGION, DAY)}/part-0000{i}-x.c000.snappy.parquet"
                    for i in range(2)]
    assert all(e["mandatory"] and e["meta"]["content_length"] > 0 for e in manifest["entries"])


def test_redshift_record_run_and_failures(s3_settings: Settings) -> None:
    """STUB (see above): record_run sends bind parameters (the only batch that does), and a failed
    statement surfaces as one WarehouseError naming the statement."""
    client, stubber = stubbed_redshift()
    warehouse = open_warehouse(s3_settings, REGION, redshift_client=client)
    warehouse.sleep = lambda seconds: None
    record = PipelineRunRecord(run_id="us-east-1-2026-03-10", region=REGION, dt=DAY, phase="Succeeded",
                               model_version=VERSION, gate_promote=True, metrics={"recall@20": 0.31},
                               started_at=datetime(2026, 3, 11, 2, 0, tzinfo=UTC))
    values = {"run_id": "us-east-1-2026-03-10", "region": REGION, "dt": "2026-03-10", "phase": "Succeeded",
              "model_version": VERSION, "gate_promote": "true", "metrics": '{"recall@20": 0.31}',
              "synced": "{}", "started_at": "2026-03-11 02:00:00", "load_run_id": "us-east-1-2026-03-10"}
    statements = (sql.create_statements([PIPELINE_RUNS], "redshift")
                  + sql.record_run_statements(values, "redshift"))
    assert "JSON_PARSE(:metrics)" in statements[2] and "NULL" in statements[2]
    expect_batch(stubber, statements, "run-1",
                 parameters=[{"name": k, "value": v} for k, v in values.items()])

    lake = Lake(s3_settings.region(REGION).lake_uri, s3_settings.aws)
    lake.day(DAY, version=None)
    stubber.add_response("batch_execute_statement", {"Id": "create-2"}, None)
    stubber.add_response("describe_statement", {
        "Id": "create-2", "Status": "FAILED", "Error": "ERROR: permission denied for schema public",
        "SubStatements": [{"Id": "create-2:1", "Status": "FAILED",
                           "QueryString": 'CREATE TABLE IF NOT EXISTS "x"'}]},
        {"Id": "create-2"})
    with stubber:
        warehouse.record_run(record)
        with pytest.raises(WarehouseError,
                           match=r"failed: ERROR: permission denied for schema public at: CREATE"):
            warehouse.load_day(DAY, run_id="run-1", model_version=None)
        stubber.assert_no_pending_responses()


def test_a_backfills_loads_put_every_days_facts_and_the_last_days_rest(settings: Settings, lake: Lake,
                                                                        db: Any) -> None:
    from operators.warehouse.load import load_run_days

    for day in (DAY, NEXT_DAY):
        lake.day(day)
    reports = load_run_days(settings, REGION, [DAY, NEXT_DAY], run_id="run-backfill", model_version=VERSION)
    assert [(r.dt, set(r.rows)) for r in reports] == [
        (DAY.isoformat(), {"clickstream_fact"}),
        (NEXT_DAY.isoformat(), {"clickstream_fact", "item_dim", "user_dim", "daily_recs"})]
    assert rows(db, "SELECT dt, count(*) FROM clickstream_fact GROUP BY dt ORDER BY dt") == [
        (DAY, reports[0].rows["clickstream_fact"]), (NEXT_DAY, reports[1].rows["clickstream_fact"])]
    assert rows(db, "SELECT DISTINCT dt FROM item_dim") == [(NEXT_DAY,)]
