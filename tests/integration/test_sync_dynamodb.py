"""The DynamoDB sync against a real moto server: scored recs and the ETL's keys written with parallel
BatchWriteItem of at most 25 items (moto does not enforce the limit: a botocore hook counts the items of
every call), throttling injected by botocore hooks, a process killed in the middle of a sync, reruns,
the write-rate limit, and the versioned pointer.

Inputs are written with pyarrow in the exact layouts scoring and the ETL produce (no Spark or Ray here).
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from benchmarks.sync import Throttle  # the fault injector, shared with the benchmark
from operators.sync.checkpoint import CheckpointStore, keys_folder, recs_folder
from operators.sync.dynamodb import (
    PointerRefusedError,
    SyncInputError,
    SyncStalledError,
    publish_pointer,
    read_pointer,
    sync_client,
    sync_keys,
    sync_recs,
)
from operators.sync.items import expires_at, recs_items
from ray_apps.score import RECS_SCHEMA, SUMMARY_FILE, ScoreSummary, output_folder
from streamrec.aws import client
from streamrec.devstack.provision import provision_region
from streamrec.devstack.service import ServiceHandle
from streamrec.lake import LakeLayout, filesystem
from streamrec.online_store import parse_popular_item
from streamrec.settings import Settings, load_settings

pytestmark = pytest.mark.integration
REGION = "us-east-1"
DAY = date(2026, 11, 26)
GENERATED = datetime(2026, 11, 27, tzinfo=UTC)
# Quick retries: the tests inject many refusals and need not wait for them.
FAST_SYNC = {"backoff_base_s": 0.005, "backoff_max_s": 0.02, "dynamodb_items_per_s": 0}


# --------------------------------------------------------------------------- settings and inputs


@pytest.fixture
def make_settings(tmp_path: Path, moto_server: ServiceHandle) -> Callable[..., Settings]:
    """Provisioned settings with unique table names (only the moto server is needed)."""

    def make(*, lake: str = "file", **sync: Any) -> Settings:
        suffix = uuid.uuid4().hex[:8]
        lake_uri = f"file://{tmp_path / f'lake-{suffix}'}" if lake == "file" else \
            f"s3://streamrec-lake-{REGION}/lake-{suffix}"
        document = {
            "environment": "local",
            "aws": {"endpoint_url": moto_server.url, "access_key_id": "testing", "secret_access_key": "testing"},
            "regions": {REGION: {
                "stream_name": f"clicks-{suffix}", "shard_count": 1, "lake_uri": lake_uri,
                "tables": {"leases": f"leases-{suffix}", "recs": f"recs-{suffix}", "features": f"features-{suffix}"},
            }},
            "sync": {**FAST_SYNC, **sync},
        }
        path = tmp_path / f"streamrec-{suffix}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        settings = load_settings(path)
        provision_region(settings, REGION)
        return settings

    return make


def lake(settings: Settings) -> tuple[LakeLayout, Any]:
    aws = settings.aws
    uri = settings.region(REGION).lake_uri
    return LakeLayout(uri), filesystem(uri, endpoint_url=aws.endpoint_url, region=REGION,
                                       access_key=aws.access_key_id, secret_key=aws.secret_access_key)


def ensure_dir(fs: Any, path: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):  # S3 has no folders
        fs.create_dir(path, recursive=True)


def write_recs(settings: Settings, version: str, file_users: list[int], *, day: date = DAY, seed: int = 0) -> pa.Table:
    """Scoring's output for (day, version): one part file per entry of ``file_users`` and the summary
    last. Returns every row."""
    layout, fs = lake(settings)
    folder = output_folder(layout, REGION, day, version)
    rng = random.Random(f"{seed}-{version}")
    ensure_dir(fs, folder)
    tables, files, start = [], [], 0
    for n, users in enumerate(file_users):
        ids = [f"u{start + i:05d}" for i in range(users)]
        start += users
        items = [[f"i{rng.randrange(500)}" for _ in range(10)] for _ in ids]
        table = pa.table({
            "user_id": ids, "item_ids": items,
            "scores": [sorted((rng.random() for _ in range(10)), reverse=True) for _ in ids],
            "source": ["popular" if i % 7 == 0 else "model" for i in range(users)],
            "model_version": [version] * users, "generated_at": [GENERATED] * users,
        }, schema=RECS_SCHEMA)
        name = f"part-{n:05d}-0.parquet"
        pq.write_table(table, posixpath.join(folder, name), filesystem=fs)
        files.append({"path": name, "rows": users})
        tables.append(table)
    total = sum(file_users)
    summary = ScoreSummary(region=REGION, dt=day.isoformat(), model_version=version,
                           generated_at=GENERATED.isoformat(), users=total, model_scored=total, popular_fallback=0,
                           seconds=1.0, users_per_second=float(total), output=layout.to_uri(folder), files=files)
    with fs.open_output_stream(posixpath.join(folder, SUMMARY_FILE)) as out:
        out.write(summary.to_json().encode())
    return pa.concat_tables(tables)


def expected_recs(settings: Settings, rows: pa.Table) -> dict[tuple[str, str], dict]:
    items = recs_items(rows, ttl_days=settings.sync.recs_ttl_days)
    return {(i["user_id"]["S"], i["model_version"]["S"]): i for i in items}


def scan(settings: Settings, table: str) -> list[dict]:
    ddb = client("dynamodb", REGION, settings.aws)
    out, kwargs = [], {"TableName": table, "ConsistentRead": True}
    while True:
        page = ddb.scan(**kwargs)
        out.extend(page["Items"])
        if "LastEvaluatedKey" not in page:
            return out
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def recs_in_table(settings: Settings) -> dict[tuple[str, str], dict]:
    items = scan(settings, settings.region(REGION).tables.recs)
    table = {(i["user_id"]["S"], i["model_version"]["S"]): i for i in items}
    assert len(table) == len(items)
    return table


KEYS_TABLES = {
    "popular": pa.schema([("pk", pa.string()), ("sk", pa.string()), ("item_ids", pa.list_(pa.string())),
                          ("scores", pa.list_(pa.float64())), ("dt", pa.string())]),
    "items": pa.schema([("pk", pa.string()), ("sk", pa.string()), ("item_id", pa.string()),
                        ("category", pa.string()), ("popularity_rank", pa.int32()), ("pop_7d", pa.float64()),
                        ("first_seen", pa.timestamp("us", tz="UTC")), ("dt", pa.string())]),
    "users": pa.schema([("pk", pa.string()), ("sk", pa.string()), ("user_id", pa.string()),
                        ("item_ids", pa.list_(pa.string())), ("last_seen", pa.timestamp("us", tz="UTC")),
                        ("dt", pa.string())]),
}


def write_keys(settings: Settings, *, items: int = 80, users: int = 45, item_files: int = 2,
               status: str = "succeeded", summary_rows: dict[str, int] | None = None) -> dict[str, pa.Table]:
    """The ETL's export_keys output as Spark writes it: part files (with _SUCCESS markers) per table
    and ``_run_summary.json`` in the day's folder."""
    layout, fs = lake(settings)
    folder = layout.partition("keys", REGION, DAY)
    dt = DAY.isoformat()
    seen = datetime(2026, 11, 20, 8, 30, tzinfo=UTC)
    tables = {
        "popular": pa.table({"pk": ["popular"], "sk": ["top5"], "item_ids": [[f"i{i}" for i in range(5)]],
                             "scores": [[50.0, 40.5, 30.0, 20.25, 10.0]], "dt": [dt]}, schema=KEYS_TABLES["popular"]),
        "items": pa.table({"pk": [f"item#i{i}" for i in range(items)], "sk": ["meta"] * items,
                           "item_id": [f"i{i}" for i in range(items)],
                           "category": [None if i % 5 == 0 else f"c{i % 3}" for i in range(items)],
                           "popularity_rank": list(range(1, items + 1)), "pop_7d": [100.0 / (i + 1) for i in range(items)],
                           "first_seen": [seen] * items, "dt": [dt] * items}, schema=KEYS_TABLES["items"]),
        "users": pa.table({"pk": [f"user#u{i}" for i in range(users)], "sk": ["recent"] * users,
                           "user_id": [f"u{i}" for i in range(users)],
                           "item_ids": [[f"i{j}" for j in range(i % 4 + 1)] for i in range(users)],
                           "last_seen": [seen] * users, "dt": [dt] * users}, schema=KEYS_TABLES["users"]),
    }
    for name, table in tables.items():
        parts = item_files if name == "items" else 1
        step = -(-table.num_rows // parts)
        for n in range(parts):
            path = posixpath.join(folder, name, f"part-{n:05d}-{uuid.uuid4()}-c000.snappy.parquet")
            ensure_dir(fs, posixpath.dirname(path))
            pq.write_table(table.slice(n * step, step), path, filesystem=fs)
        with fs.open_output_stream(posixpath.join(folder, name, "_SUCCESS")) as out:
            out.write(b"")
    summary = {"format": "streamrec-etl-run/1", "job": "keys", "region": REGION, "dt": dt, "status": status,
               "outputs": summary_rows or {name: t.num_rows for name, t in tables.items()}}
    with fs.open_output_stream(posixpath.join(folder, "_run_summary.json")) as out:
        out.write(json.dumps(summary).encode())
    return tables


# --------------------------------------------------------------------------- botocore hooks


class Calls:
    """Counts the items of every BatchWriteItem call a client makes (as our code sent them)."""

    def __init__(self, ddb: Any) -> None:
        self.lock = threading.Lock()
        self.sizes: list[int] = []
        self.operations: list[str] = []
        ddb.meta.events.register("provide-client-params.dynamodb.BatchWriteItem", self._batch)
        ddb.meta.events.register("provide-client-params.dynamodb.*", self._any)

    def _batch(self, params: dict, **_: Any) -> None:
        with self.lock:
            self.sizes.append(sum(len(v) for v in params["RequestItems"].values()))

    def _any(self, model: Any, **_: Any) -> None:
        with self.lock:
            self.operations.append(model.name)


def dynamodb(settings: Settings) -> Any:
    """A client configured as the sync's own (for hooks)."""
    return sync_client(settings, REGION)


# --------------------------------------------------------------------------- recs


def test_sync_recs_writes_every_user_in_batches_of_at_most_25(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(dynamodb_workers=4)
    rows = write_recs(settings, "v1", [130, 77, 1, 60])
    ddb = dynamodb(settings)
    calls = Calls(ddb)

    report = sync_recs(settings, REGION, DAY, "v1", dynamodb=ddb)

    assert recs_in_table(settings) == expected_recs(settings, rows)  # exactly these items, nothing else
    assert max(calls.sizes) == 25 and sum(calls.sizes) == 268
    # batches are cut per file: 130 → 6 calls, 77 → 4, 1 → 1, 60 → 3
    assert sorted(calls.sizes) == sorted([25] * 5 + [5] + [25] * 3 + [2] + [1] + [25, 25, 10])
    assert (report.items_written, report.items_skipped, report.expected_items) == (268, 0, 268)
    assert (report.files, report.files_skipped, report.calls) == (4, 0, 14)
    assert report.max_items_per_call == 25 and report.throttled_retries == 0 and report.backoff_seconds == 0
    # the TTL attribute is set and the table's TTL is on
    item = recs_in_table(settings)[("u00000", "v1")]
    assert int(item["expires_at"]["N"]) == expires_at(GENERATED, settings.sync.recs_ttl_days) == \
        int((GENERATED + timedelta(days=7)).timestamp())
    ttl = ddb.describe_time_to_live(TableName=settings.region(REGION).tables.recs)["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expires_at"}
    # one checkpoint per input file, each with its file's item count
    layout, fs = lake(settings)
    store = CheckpointStore(fs, recs_folder(layout, REGION, DAY, "v1"))
    assert [store.load(f"part-{n:05d}-0.parquet").items for n in range(4)] == [130, 77, 1, 60]


def test_rerun_of_a_finished_sync_writes_nothing(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    rows = write_recs(settings, "v1", [60, 40])
    sync_recs(settings, REGION, DAY, "v1")
    ddb = dynamodb(settings)
    calls = Calls(ddb)

    again = sync_recs(settings, REGION, DAY, "v1", dynamodb=ddb)

    assert (again.items_written, again.items_skipped, again.files_skipped, again.calls) == (0, 100, 2, 0)
    assert calls.sizes == [] and "PutItem" not in calls.operations  # not even the marker is rewritten
    assert recs_in_table(settings) == expected_recs(settings, rows)


def test_a_rescored_output_is_synced_again(make_settings: Callable[..., Settings]) -> None:
    """Checkpoints belong to one scoring run: a new summary (scoring rerun) invalidates them."""
    settings = make_settings()
    write_recs(settings, "v1", [30], seed=1)
    sync_recs(settings, REGION, DAY, "v1")
    rows = write_recs(settings, "v1", [30, 5], seed=2)
    report = sync_recs(settings, REGION, DAY, "v1")
    assert (report.items_written, report.items_skipped) == (35, 0)
    assert recs_in_table(settings) == expected_recs(settings, rows)


CRASHING_SYNC = textwrap.dedent("""
    import os, sys, threading
    from datetime import date
    from operators.sync.dynamodb import sync_client, sync_recs
    from streamrec.settings import load_settings

    settings = load_settings(sys.argv[1])
    crash_at = int(sys.argv[2])
    ddb = sync_client(settings, "us-east-1")
    lock, calls = threading.Lock(), [0]

    def crash(**kwargs):
        with lock:
            calls[0] += 1
            if calls[0] == crash_at:
                os._exit(17)  # the pod is killed: no cleanup, no finally, calls in flight abandoned

    ddb.meta.events.register("before-call.dynamodb.BatchWriteItem", crash)
    sync_recs(settings, "us-east-1", date.fromisoformat(sys.argv[3]), sys.argv[4], dynamodb=ddb)
    print("finished without crashing")
""")


def test_a_sync_killed_midway_resumes_and_ends_with_exactly_the_expected_items(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings(dynamodb_workers=2)
    rows = write_recs(settings, "v1", [100] * 6)  # 4 calls per file, 24 in all; the 19th kills the process
    config = next(tmp_path.glob("streamrec-*.yaml"))
    proc = subprocess.run([sys.executable, "-c", CRASHING_SYNC, str(config), "19", DAY.isoformat(), "v1"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 17, proc.stdout + proc.stderr

    partial = recs_in_table(settings)
    assert 0 < len(partial) < 600
    layout, fs = lake(settings)
    done_before = CheckpointStore(fs, recs_folder(layout, REGION, DAY, "v1")).names()
    assert 1 <= len(done_before) < 6

    ddb = dynamodb(settings)
    calls = Calls(ddb)
    report = sync_recs(settings, REGION, DAY, "v1", dynamodb=ddb)

    assert recs_in_table(settings) == expected_recs(settings, rows)
    assert report.files_skipped == len(done_before) and report.items_skipped == 100 * len(done_before)
    assert report.items_written + report.items_skipped == 600
    assert sum(calls.sizes) == report.items_written == 100 * (6 - len(done_before))  # resumed, not restarted
    assert max(calls.sizes) <= 25


def test_throttling_slows_the_sync_but_loses_no_write(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(dynamodb_workers=4)
    rows = write_recs(settings, "v1", [200, 150, 50])
    ddb = dynamodb(settings)
    calls = Calls(ddb)
    throttle = Throttle(ddb, share=0.2, error_every=5, seed=3)

    report = sync_recs(settings, REGION, DAY, "v1", dynamodb=ddb)

    assert recs_in_table(settings) == expected_recs(settings, rows)
    assert throttle.held_back > 50 and throttle.errors > 5
    assert report.unprocessed_items == throttle.held_back
    assert report.throttle_errors == throttle.errors
    assert report.throttled_retries >= throttle.errors and report.backoff_seconds > 0
    assert report.items_written == 400 and report.calls == len(calls.sizes)
    assert max(calls.sizes) <= 25
    # every item was sent until acknowledged: sent = written + held back + refused with an error
    assert sum(calls.sizes) > 400 + throttle.held_back


def test_a_batch_refused_for_too_long_fails_clearly_and_resumes(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(max_stalled_rounds=3)
    rows = write_recs(settings, "v1", [40, 40])
    ddb = dynamodb(settings)
    Throttle(ddb, share=1.0)
    with pytest.raises(SyncStalledError, match=r"refused \d+ items for recs-\w+ 3 rounds in a row.*nothing was lost"):
        sync_recs(settings, REGION, DAY, "v1", dynamodb=ddb)
    with pytest.raises(PointerRefusedError, match="not completely synced"):
        publish_pointer(settings, REGION, "v1", day=DAY, items=80)

    report = sync_recs(settings, REGION, DAY, "v1")  # capacity is back
    assert report.items_written == 80
    assert recs_in_table(settings) == expected_recs(settings, rows)


def test_the_write_rate_limit_paces_the_writers(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(dynamodb_items_per_s=400, dynamodb_burst_s=0.25, dynamodb_workers=4)
    write_recs(settings, "v1", [300, 300])
    started = time.perf_counter()
    report = sync_recs(settings, REGION, DAY, "v1")
    elapsed = time.perf_counter() - started
    # 600 items at 400/s after a burst of 100 cannot take less than 1.25 s (a lower bound only: a slow
    # machine takes longer, never shorter)
    assert elapsed >= (600 - 100) / 400
    assert report.rate_wait_seconds > 0 and report.items_written == 600


def test_an_incomplete_scoring_output_is_refused(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    layout, fs = lake(settings)
    with pytest.raises(SyncInputError, match="no complete scoring output for v1.*run the score stage"):
        sync_recs(settings, REGION, DAY, "v1")
    write_recs(settings, "v1", [10, 10])
    folder = output_folder(layout, REGION, DAY, "v1")
    fs.delete_file(posixpath.join(folder, "part-00001-0.parquet"))
    with pytest.raises(SyncInputError, match="part-00001-0.parquet is missing"):
        sync_recs(settings, REGION, DAY, "v1")
    with fs.open_output_stream(posixpath.join(folder, "part-00001-0.parquet")) as out:
        out.write(b"not parquet")
    with pytest.raises(SyncInputError, match="part-00001-0.parquet is not readable Parquet"):
        sync_recs(settings, REGION, DAY, "v1")
    assert recs_in_table(settings) == {}


def test_sync_recs_with_the_lake_on_s3(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(lake="s3")
    rows = write_recs(settings, "v1", [30, 30])
    first = sync_recs(settings, REGION, DAY, "v1")
    again = sync_recs(settings, REGION, DAY, "v1")
    assert (first.items_written, again.items_written, again.items_skipped) == (60, 0, 60)
    assert recs_in_table(settings) == expected_recs(settings, rows)


# --------------------------------------------------------------------------- keys


def test_sync_keys_loads_every_row_as_a_features_item(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    tables = write_keys(settings, items=80, users=45, item_files=3)
    ddb = dynamodb(settings)
    calls = Calls(ddb)

    report = sync_keys(settings, REGION, DAY, dynamodb=ddb)

    assert (report.items_written, report.expected_items, report.files) == (126, 126, 5)
    assert max(calls.sizes) <= 25 and sum(calls.sizes) == 126
    items = {(i["pk"]["S"], i["sk"]["S"]): i for i in scan(settings, settings.region(REGION).tables.features)}
    assert set(items) == {(pk, sk) for t in tables.values()
                          for pk, sk in zip(t.column("pk").to_pylist(), t.column("sk").to_pylist())}
    assert parse_popular_item(items[("popular", "top5")]) == (
        ("i0", "i1", "i2", "i3", "i4"), (50.0, 40.5, 30.0, 20.25, 10.0))  # what serving reads
    item = dict(items[("item#i1", "meta")])
    assert float(item.pop("pop_7d")["N"]) == 50.0  # DynamoDB may spell the number "50"
    assert item == {
        "pk": {"S": "item#i1"}, "sk": {"S": "meta"}, "item_id": {"S": "i1"}, "category": {"S": "c1"},
        "popularity_rank": {"N": "2"}, "first_seen": {"S": "2026-11-20T08:30:00+00:00"}, "dt": {"S": "2026-11-26"}}
    assert "category" not in items[("item#i0", "meta")]  # null: left out
    assert items[("user#u3", "recent")]["item_ids"] == {"L": [{"S": "i0"}, {"S": "i1"}, {"S": "i2"}, {"S": "i3"}]}

    again = sync_keys(settings, REGION, DAY)
    assert (again.items_written, again.items_skipped, again.files_skipped) == (0, 126, 5)
    layout, fs = lake(settings)
    assert len(CheckpointStore(fs, keys_folder(layout, REGION, DAY)).names()) == 5


@pytest.mark.parametrize("case, kwargs, message", [
    ("failed ETL", {"status": "failed"}, "did not succeed"),
    ("rows missing", {"summary_rows": {"popular": 1, "items": 81, "users": 45}}, "holds 80 rows but"),
], ids=["failed", "row-count"])
def test_an_incomplete_keys_export_is_refused(make_settings: Callable[..., Settings], case: str,
                                              kwargs: dict, message: str) -> None:
    settings = make_settings()
    with pytest.raises(SyncInputError, match="no complete keys export"):
        sync_keys(settings, REGION, DAY)
    write_keys(settings, **kwargs)
    with pytest.raises(SyncInputError, match=message):
        sync_keys(settings, REGION, DAY)
    assert scan(settings, settings.region(REGION).tables.features) == []


# --------------------------------------------------------------------------- versions and the pointer


class Crash(Exception):
    pass


def test_the_pointer_moves_only_to_a_completely_synced_version(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(dynamodb_workers=2)
    v1 = write_recs(settings, "v1", [50, 50])
    sync_recs(settings, REGION, DAY, "v1")
    assert read_pointer(settings, REGION) is None
    publish_pointer(settings, REGION, "v1", day=DAY, items=100)
    first = read_pointer(settings, REGION)
    assert first is not None and (first.model_version, first.dt, first.items, first.revision,
                                  first.previous_version) == ("v1", DAY, 100, 1, None)

    # v2's sync stops halfway: the pointer cannot move, readers keep getting all of v1
    v2 = write_recs(settings, "v2", [50, 50, 50], seed=9)
    ddb = dynamodb(settings)
    count = [0]

    def fail(**_: Any) -> None:
        count[0] += 1
        if count[0] > 3:
            raise Crash("the pod went away")

    ddb.meta.events.register("before-call.dynamodb.BatchWriteItem", fail)
    with pytest.raises(Crash):
        sync_recs(settings, REGION, DAY, "v2", dynamodb=ddb)
    with pytest.raises(PointerRefusedError, match="v2 is not completely synced"):
        publish_pointer(settings, REGION, "v2", day=DAY, items=150)
    pointer = read_pointer(settings, REGION)
    assert pointer == first
    table = recs_in_table(settings)
    assert {k: v for k, v in table.items() if k[1] == pointer.model_version} == expected_recs(settings, v1)
    assert 0 < sum(1 for k in table if k[1] == "v2") < 150

    # finished: the pointer moves only with the count the sync reported
    report = sync_recs(settings, REGION, DAY, "v2")
    synced = report.items_written + report.items_skipped
    assert synced == 150
    with pytest.raises(PointerRefusedError, match="synced with 150 items, not 149"):
        publish_pointer(settings, REGION, "v2", day=DAY, items=149)
    with pytest.raises(PointerRefusedError, match="not completely synced"):
        publish_pointer(settings, REGION, "v2", day=DAY + timedelta(days=1), items=150)
    publish_pointer(settings, REGION, "v2", day=DAY, items=synced)
    second = read_pointer(settings, REGION)
    assert second is not None and (second.model_version, second.items, second.revision,
                                   second.previous_version) == ("v2", 150, 2, "v1")
    table = recs_in_table(settings)
    assert {k: v for k, v in table.items() if k[1] == "v2"} == expected_recs(settings, v2)
    assert {k: v for k, v in table.items() if k[1] == "v1"} == expected_recs(settings, v1)  # until its TTL

    publish_pointer(settings, REGION, "v2", day=DAY, items=150)  # the same again: a no-op
    assert read_pointer(settings, REGION) == second
    publish_pointer(settings, REGION, "v1", day=DAY, items=100)  # a rollback is a move like any other
    back = read_pointer(settings, REGION)
    assert back is not None and (back.model_version, back.revision, back.previous_version) == ("v1", 3, "v2")


def test_two_promoters_cannot_interleave(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    for version in ("v1", "v2", "v3"):
        write_recs(settings, version, [10])
        sync_recs(settings, REGION, DAY, version)
    publish_pointer(settings, REGION, "v1", day=DAY, items=10)
    ddb = client("dynamodb", REGION, settings.aws)

    def other_promoter_first(**_: Any) -> None:
        ddb.meta.events.unregister("before-call.dynamodb.TransactWriteItems", other_promoter_first)
        publish_pointer(settings, REGION, "v3", day=DAY, items=10)  # between our read and our write

    ddb.meta.events.register("before-call.dynamodb.TransactWriteItems", other_promoter_first)
    with pytest.raises(PointerRefusedError, match="moved while v2 was being published"):
        publish_pointer(settings, REGION, "v2", day=DAY, items=10, dynamodb=ddb)
    pointer = read_pointer(settings, REGION)
    assert pointer is not None and (pointer.model_version, pointer.revision) == ("v3", 2)
