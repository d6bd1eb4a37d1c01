"""ingest.sinks aggregation (pure, Arrow): what one batch writes to the Redis online features."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ingest.sinks import latest_per_user, weighted_counts

pytestmark = pytest.mark.unit


def events(rows: list[tuple[str, str, int, str]]) -> pa.Table:
    users, items, ts, types = zip(*rows) if rows else ((), (), (), ())
    return pa.table({"user_id": pa.array(users, pa.string()), "item_id": pa.array(items, pa.string()),
                     "ts": pa.array(ts, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
                     "event_type": pa.array(types, pa.string())})


def test_latest_per_user_keeps_each_items_newest_time_newest_first() -> None:
    table = events([("u2", "a", 5, "view"), ("u1", "a", 1, "view"), ("u1", "b", 3, "click"),
                    ("u1", "a", 7, "purchase"), ("u2", "b", 2, "view")])
    users, pairs = latest_per_user(table, n=10)
    assert users == ["u1", "u2"]
    assert pairs == ["7 a 3 b", "5 a 2 b"]


def test_latest_per_user_caps_each_user_at_n() -> None:
    table = events([("u1", f"i{k}", k, "view") for k in range(5)] + [("u2", "x", 1, "view")])
    users, pairs = latest_per_user(table, n=3)
    assert users == ["u1", "u2"]
    assert pairs == ["4 i4 3 i3 2 i2", "1 x"]


def test_latest_per_user_of_nothing() -> None:
    assert latest_per_user(events([]), n=3) == ([], [])


def test_weighted_counts_use_event_type_weights() -> None:
    table = events([("u1", "a", 1, "view"), ("u2", "a", 1, "purchase"), ("u1", "b", 1, "add_to_cart"),
                    ("u3", "b", 1, "click")])
    pairs = weighted_counts(table).split(" ")
    assert {item: float(w) for item, w in zip(pairs[::2], pairs[1::2])} == {"a": 1.0 + 8.0, "b": 4.0 + 2.0}
