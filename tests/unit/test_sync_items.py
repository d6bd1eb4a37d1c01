"""Pure rules of the DynamoDB sync: rows → items, batches of at most 25, the marker and pointer codecs,
checkpoints and the report (the backoff schedule and the token bucket are in test_pacing)."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from operators.sync.checkpoint import Checkpoint, CheckpointStore, checkpoint_name
from operators.sync.dynamodb import SyncReport
from operators.sync.items import (
    FEATURES_KEY,
    MAX_BATCH_ITEMS,
    RECS_KEY,
    ItemError,
    attribute_converter,
    batches,
    expires_at,
    key_items,
    marker_item,
    marker_key,
    number,
    put_requests,
    recs_items,
    unprocessed_puts,
)
from streamrec.online_store import (
    PointerInfo,
    parse_pointer_item,
    parse_popular_item,
    parse_recs_item,
    pointer_item,
    recs_item,
)

pytestmark = pytest.mark.unit
T0 = datetime(2026, 11, 27, 0, 0, tzinfo=UTC)
DAY = date(2026, 11, 26)
RECS_SCHEMA = pa.schema([  # ray_apps.score.RECS_SCHEMA, spelled out: a change there must fail here
    pa.field("user_id", pa.string()), pa.field("item_ids", pa.list_(pa.string())),
    pa.field("scores", pa.list_(pa.float32())), pa.field("source", pa.string()),
    pa.field("model_version", pa.string()), pa.field("generated_at", pa.timestamp("us", tz="UTC")),
])


def test_recs_schema_matches_scoring() -> None:
    from ray_apps.score import RECS_SCHEMA as SCORED

    assert SCORED.equals(RECS_SCHEMA)


# --------------------------------------------------------------------------- attribute values

CONVERSIONS = {
    "string": (pa.string(), "a", {"S": "a"}),
    "empty string": (pa.string(), "", {"S": ""}),
    "int32": (pa.int32(), 7, {"N": "7"}),
    "int64 big": (pa.int64(), 2**62, {"N": str(2**62)}),
    "double": (pa.float64(), 0.1, {"N": "0.1"}),
    "float32": (pa.float32(), 0.5, {"N": "0.5"}),
    "bool": (pa.bool_(), True, {"BOOL": True}),
    "timestamp utc": (pa.timestamp("us", tz="UTC"), T0, {"S": "2026-11-27T00:00:00+00:00"}),
    "timestamp naive is utc": (pa.timestamp("us"), T0.replace(tzinfo=None), {"S": "2026-11-27T00:00:00+00:00"}),
    "date": (pa.date32(), DAY, {"S": "2026-11-26"}),
    "list of strings": (pa.list_(pa.string()), ["a", "b"], {"L": [{"S": "a"}, {"S": "b"}]}),
    "list keeps order": (pa.list_(pa.string()), ["b", "a"], {"L": [{"S": "b"}, {"S": "a"}]}),
    "list of doubles": (pa.list_(pa.float64()), [1.5, 2.0], {"L": [{"N": "1.5"}, {"N": "2.0"}]}),
    "null element": (pa.list_(pa.string()), ["a", None], {"L": [{"S": "a"}, {"NULL": True}]}),
    "empty list": (pa.list_(pa.string()), [], {"L": []}),
    "null": (pa.string(), None, None),
    "null list": (pa.list_(pa.string()), None, None),
}


@pytest.mark.parametrize("case", CONVERSIONS, ids=list(CONVERSIONS))
def test_attribute_converter(case: str) -> None:
    dtype, value, expected = CONVERSIONS[case]
    assert attribute_converter(dtype)(value) == expected


def test_unsupported_types_and_numbers_are_refused() -> None:
    with pytest.raises(ItemError, match="struct"):
        attribute_converter(pa.struct([("a", pa.int32())]))
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ItemError, match="finite"):
            number(bad)
    with pytest.raises(ItemError, match="boolean"):
        number(True)
    assert number(3) == {"N": "3"} and number(2.5) == {"N": "2.5"}


# --------------------------------------------------------------------------- keys rows → items


def popular_table() -> pa.Table:
    return pa.table({"pk": ["popular"], "sk": ["top3"], "item_ids": [["i1", "i2", "i3"]],
                     "scores": [[3.0, 2.5, 1.0]], "dt": ["2026-11-26"]})


def test_key_items_popular_round_trips_through_the_serving_parser() -> None:
    (item,) = key_items(popular_table())
    assert item["pk"] == {"S": "popular"} and item["sk"] == {"S": "top3"}
    assert parse_popular_item(item) == (("i1", "i2", "i3"), (3.0, 2.5, 1.0))


def test_key_items_map_every_column_and_leave_nulls_out() -> None:
    table = pa.table({
        "pk": ["item#a", "item#b"], "sk": ["meta", "meta"], "item_id": ["a", "b"],
        "category": ["shoes", None], "popularity_rank": pa.array([1, 2], pa.int32()),
        "pop_7d": [9.5, 0.0], "first_seen": pa.array([T0, T0], pa.timestamp("us", tz="UTC")),
        "dt": ["2026-11-26"] * 2,
    })
    first, second = key_items(table)
    assert first == {"pk": {"S": "item#a"}, "sk": {"S": "meta"}, "item_id": {"S": "a"},
                     "category": {"S": "shoes"}, "popularity_rank": {"N": "1"}, "pop_7d": {"N": "9.5"},
                     "first_seen": {"S": "2026-11-27T00:00:00+00:00"}, "dt": {"S": "2026-11-26"}}
    assert "category" not in second and second["pop_7d"] == {"N": "0.0"}


@pytest.mark.parametrize("table, message", [
    (pa.table({"pk": ["x"]}), "'sk' column"),
    (pa.table({"pk": ["x", None], "sk": ["s", "s"]}), "row 1 has no pk"),
    (pa.table({"pk": ["x"], "sk": [""]}), "row 0 has no sk"),
    (pa.table({"pk": ["x"], "sk": ["s"], "v": [math.nan]}), "column 'v', row 0"),
], ids=["no sk column", "null pk", "empty sk", "NaN value"])
def test_key_items_refuse_rows_that_are_not_items(table: pa.Table, message: str) -> None:
    with pytest.raises(ItemError, match=message):
        key_items(table)


# --------------------------------------------------------------------------- recs rows → items


def recs_table(version: str = "v1", users: int = 3) -> pa.Table:
    return pa.table({
        "user_id": [f"u{i}" for i in range(users)],
        "item_ids": [[f"i{i}", "i9"] for i in range(users)],
        "scores": [[0.75, 0.5] for _ in range(users)],
        "source": ["model"] * (users - 1) + ["popular"],
        "model_version": [version] * users,
        "generated_at": [T0] * users,
    }, schema=RECS_SCHEMA)


def test_recs_items_are_the_serving_layout_with_a_ttl() -> None:
    items = recs_items(recs_table(), ttl_days=7, model_version="v1")
    assert len(items) == 3
    stored = parse_recs_item(items[2])
    assert (stored.user_id, stored.model_version, stored.item_ids, stored.scores, stored.source) == \
        ("u2", "v1", ("i2", "i9"), (0.75, 0.5), "popular")
    assert stored.generated_at == T0
    assert items[0]["expires_at"] == {"N": str(int((T0 + timedelta(days=7)).timestamp()))}
    # exactly recs_item's layout plus the TTL attribute
    expected = recs_item("u0", "v1", ["i0", "i9"], [0.75, 0.5], "model", T0, expires_at=expires_at(T0, 7))
    assert items[0] == expected and set(expected) - set(recs_item("u0", "v1", [], [], "model", T0)) == {"expires_at"}


def test_recs_items_refuse_a_row_of_another_version() -> None:
    with pytest.raises(ItemError, match="version 'v2', not 'v1'"):
        recs_items(recs_table("v2"), ttl_days=7, model_version="v1")
    with pytest.raises(ItemError, match="lack column"):
        recs_items(recs_table().drop_columns(["generated_at"]), ttl_days=7)


def test_expires_at_counts_days_from_generation() -> None:
    assert expires_at(T0, 1) - int(T0.timestamp()) == 86_400
    assert expires_at(T0.replace(tzinfo=None), 1) == expires_at(T0, 1)


# --------------------------------------------------------------------------- batches


def keyed(n: int) -> list[dict]:
    return [{"pk": {"S": f"k{i}"}, "sk": {"S": "s"}} for i in range(n)]


@pytest.mark.parametrize("n, sizes", [(0, []), (1, [1]), (25, [25]), (26, [25, 1]), (60, [25, 25, 10])])
def test_batches_hold_at_most_25_items_in_order(n: int, sizes: list[int]) -> None:
    out = list(batches(keyed(n), FEATURES_KEY))
    assert [len(b) for b in out] == sizes
    assert [i for b in out for i in b] == keyed(n)


def test_batch_size_is_capped_at_dynamodbs_limit() -> None:
    assert MAX_BATCH_ITEMS == 25
    with pytest.raises(ValueError, match="1..25"):
        list(batches(keyed(30), FEATURES_KEY, size=26))
    with pytest.raises(ValueError, match="26 items in one BatchWriteItem"):
        put_requests(keyed(26))
    assert [len(b) for b in batches(keyed(30), FEATURES_KEY, size=10)] == [10, 10, 10]


def test_a_key_twice_in_one_batch_is_an_input_error() -> None:
    items = keyed(3) + keyed(1)
    with pytest.raises(ItemError, match=r"\('k0', 's'\) twice"):
        list(batches(items, FEATURES_KEY))
    # in different batches DynamoDB accepts it (the later put wins)
    assert len(list(batches(keyed(25) + keyed(1), FEATURES_KEY))) == 2
    recs = [{"user_id": {"S": "u"}, "model_version": {"S": v}} for v in ("a", "b")]
    assert len(list(batches(recs, RECS_KEY))) == 1  # same user, two versions: two keys


def test_unprocessed_puts_reads_the_tables_items() -> None:
    items = keyed(2)
    response = {"UnprocessedItems": {"t": put_requests(items), "other": put_requests(keyed(1))}}
    assert unprocessed_puts(response, "t") == items
    assert unprocessed_puts({"UnprocessedItems": {}}, "t") == [] == unprocessed_puts({}, "t")


# --------------------------------------------------------------------------- marker and pointer


def test_marker_item_layout() -> None:
    item = marker_item("v2", DAY, items=120, files=3, input_id="abc", completed_at=T0)
    assert {k: item[k] for k in ("pk", "sk")} == marker_key("v2", DAY) == \
        {"pk": {"S": "synced#v2"}, "sk": {"S": "dt#2026-11-26"}}
    assert item["items"] == {"N": "120"} and item["model_version"] == {"S": "v2"}


def test_pointer_item_round_trip() -> None:
    info = PointerInfo("v2", DAY, 120, T0, 3, "v1")
    item = pointer_item(info)
    assert item["pk"] == {"S": "pointer"} and item["sk"] == {"S": "model"}
    assert parse_pointer_item(item) == info
    first = PointerInfo("v1", DAY, 5, T0, 1)
    assert "previous_version" not in pointer_item(first) and parse_pointer_item(pointer_item(first)) == first
    with pytest.raises(ValueError, match="malformed pointer"):
        parse_pointer_item({"pk": {"S": "pointer"}})


# --------------------------------------------------------------------------- checkpoints and report


def test_checkpoint_validity_and_round_trip() -> None:
    cp = Checkpoint("users/part-0.parquet", 100, 10, 10, "id1", "t", "2026-11-26T00:00:00+00:00")
    assert Checkpoint.from_json(cp.to_json()) == cp
    assert cp.matches(size=100, rows=10, input_id="id1", table="t")
    for changed in ({"size": 101}, {"rows": 11}, {"input_id": "id2"}, {"table": "u"}):
        assert not cp.matches(**{"size": 100, "rows": 10, "input_id": "id1", "table": "t", **changed})
    assert checkpoint_name("users/part-0.parquet") == "users__part-0.parquet.json"


def test_checkpoint_store_is_atomic_and_tolerates_junk(tmp_path: Path) -> None:
    store = CheckpointStore(pafs.LocalFileSystem(), str(tmp_path / "cp"))
    assert store.load("a.parquet") is None
    cp = Checkpoint("a.parquet", 1, 2, 2, "x", "t", "now")
    store.save(cp)
    assert store.load("a.parquet") == cp and store.names() == ["a.parquet.json"]
    assert sorted(p.name for p in (tmp_path / "cp").iterdir()) == ["a.parquet.json"]  # no temp files left
    (tmp_path / "cp" / "b.parquet.json").write_text("{not json")
    (tmp_path / "cp" / "c.parquet.json").write_text(json.dumps({"format": "other"}))
    assert store.load("b.parquet") is None and store.load("c.parquet") is None


def test_report_shares_are_of_the_writer_threads_time() -> None:
    report = SyncReport("recs", "us-east-1", "2026-11-26", "t", "v1", items_written=1000, seconds=2.0,
                        backoff_seconds=2.0, rate_wait_seconds=1.0, workers=4)
    data = report.to_json()
    assert data["items_per_s"] == 500.0 and data["backoff_share"] == 0.25 and data["rate_wait_share"] == 0.125
    assert {"items_written", "items_skipped", "files", "seconds", "backoff_seconds", "throttled_retries",
            "calls"} <= set(data)
    json.dumps(data)
