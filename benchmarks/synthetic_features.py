"""Synthetic Spark-ETL feature tables for the training and scoring benchmarks (no Spark needed).

The tables have the ETL's schemas (``ray_apps.encoding.EXAMPLE_SCHEMA``, ``spark_etl.schemas.USERS`` and
``ITEMS``) and are written where the ETL writes them (``features/region=R/dt=D/{examples/split=train,
users,items}``, see :mod:`streamrec.lake`), one Parquet file per ``etl.max_rows_per_file`` rows with row
groups of about ``etl.row_group_bytes``, sorted the way the ETL sorts them (examples by user and time).

Item popularity is Zipf-distributed (exponent ``ZIPF_A``) over the catalogue; item ids are a random
permutation of ``item-NNNNNN`` over popularity ranks (hashing sees no rank order). Training examples come
from per-user click sequences: each example's ``history`` is the same user's previous items (at most
``history_length``, oldest first), as the ETL builds it. Quality is never measured on these tables: the
item sequences are independent draws, so there is nothing for a model to learn.

Everything is vectorised numpy/pyarrow: 200k examples with 50-item histories build in about a second.
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from streamrec.events import EVENT_WEIGHTS

ZIPF_A = 1.0
EVENT_MIX = {"view": 0.70, "click": 0.20, "add_to_cart": 0.07, "purchase": 0.03}
DEVICES = ("desktop", "mobile", "tablet", "app", "other")
DEVICE_MIX = (0.35, 0.45, 0.08, 0.10, 0.02)
CATEGORIES = 500
TS = pa.timestamp("us", tz="UTC")
_LIST = pa.list_(pa.string())


@dataclass(frozen=True)
class Catalogue:
    """Item ids by popularity rank (``ids[r]`` has rank r + 1) and the Zipf probabilities of the ranks."""

    ids: pa.Array  # string [N]
    probs: np.ndarray  # float64 [N], sums to 1
    categories: pa.Array  # string [N], aligned with ids

    def __len__(self) -> int:
        return len(self.ids)

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` rank positions (0-based) drawn with the Zipf probabilities."""
        return rng.choice(len(self.probs), size=size, p=self.probs)


def catalogue(items: int, seed: int = 0) -> Catalogue:
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, items + 1, dtype=np.float64)
    probs = ranks ** -ZIPF_A
    probs /= probs.sum()
    width = max(6, len(str(items - 1)))
    names = np.array([f"item-{i:0{width}d}" for i in range(items)], dtype=object)[rng.permutation(items)]
    names_of_categories = np.array([f"cat-{i:03d}" for i in range(CATEGORIES)], dtype=object)
    cats = names_of_categories[rng.integers(0, CATEGORIES, items)]
    return Catalogue(pa.array(names, pa.string()), probs, pa.array(cats, pa.string()))


def _timestamps(moment: datetime, n: int) -> pa.Array:
    return pa.array(np.full(n, int(moment.timestamp() * 1_000_000)), pa.int64()).cast(TS)


def _lists(values: pa.Array, offsets: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), values)


def _windows(lengths: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Flat indexes of the windows ``[ends[i] - lengths[i], ends[i])``, concatenated."""
    total = int(lengths.sum())
    starts = np.repeat(ends - lengths - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return starts + np.arange(total)


def examples_table(rows: int, cat: Catalogue, *, users: int | None = None, region: str = "us-east-1",
                   day: date = date(2026, 11, 25), train_days: int = 14, history_length: int = 50,
                   seed: int = 0) -> pa.Table:
    """``rows`` training examples (EXAMPLE_SCHEMA, no ``split`` column: the ETL writes it as the
    ``split=train`` folder), sorted by user and time like the ETL's output."""
    from ray_apps.encoding import EXAMPLE_SCHEMA

    rng = np.random.default_rng(seed + 1)
    users = users or max(1, rows // 40)
    # Activity per user is skewed (lognormal), every row belongs to one user; rows sorted by user.
    activity = rng.lognormal(0.0, 1.0, users)
    owner = np.sort(rng.choice(users, size=rows, p=activity / activity.sum()))
    first_row = np.searchsorted(owner, owner, side="left")
    position = np.arange(rows) - first_row  # the row's index within its user's sequence
    item_rank = cat.draw(rng, rows)
    hist_len = np.minimum(position, history_length)
    history = _lists(cat.ids.take(pa.array(item_rank[_windows(hist_len, np.arange(rows))])),
                     np.concatenate([[0], np.cumsum(hist_len)]))
    # Timestamps: increasing within a user, spread over the train days before `day`.
    start = datetime.combine(day - timedelta(days=train_days), datetime.min.time(), tzinfo=UTC)
    span_us = train_days * 86_400_000_000
    offsets = rng.integers(0, span_us, rows)
    order = np.lexsort((offsets, owner))  # rows are sorted by owner already: ascending time per user
    ts_us = int(start.timestamp() * 1_000_000) + offsets[order]
    event_names = list(EVENT_MIX)
    event_code = rng.choice(len(event_names), size=rows, p=list(EVENT_MIX.values()))
    events = np.array(event_names, dtype=object)[event_code]
    weight = np.array([EVENT_WEIGHTS[e] for e in event_names], dtype=np.float64)[event_code]
    device = np.array(DEVICES, dtype=object)[rng.choice(len(DEVICES), size=users, p=DEVICE_MIX)][owner]
    ts = pa.array(ts_us, pa.int64()).cast(TS)
    user_names = np.array([f"user-{u:08d}" for u in range(users)], dtype=object)
    table = pa.table({
        "user_id": pa.array(user_names[owner], pa.string()),
        "history": history,
        "item_id": cat.ids.take(pa.array(item_rank)),
        "category": cat.categories.take(pa.array(item_rank)),
        "event_type": pa.array(events, pa.string()),
        "weight": pa.array(weight, pa.float64()),
        "ts": ts,
        "device": pa.array(device, pa.string()),
        "hour": pa.array(((ts_us // 3_600_000_000) % 24).astype(np.int32), pa.int32()),
        "region": pa.array(np.full(rows, region, dtype=object), pa.string()),
        "item_pop_rank": pa.array((item_rank + 1).astype(np.int32), pa.int32()),
    })
    return table.cast(EXAMPLE_SCHEMA)


def items_table(cat: Catalogue, *, day: date = date(2026, 11, 25), events: int = 1_000_000) -> pa.Table:
    """The items table (spark_etl.schemas.ITEMS), ranked by 7-day popularity = the Zipf rank."""
    n = len(cat)
    pop_7d = np.maximum(cat.probs * events, 1.0)
    ts = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
    return pa.table({
        "item_id": cat.ids,
        "category": cat.categories,
        "first_seen": _timestamps(ts - timedelta(days=30), n),
        "last_seen": _timestamps(ts, n),
        "pop_1d": pa.array(pop_7d / 7), "pop_7d": pa.array(pop_7d), "pop_30d": pa.array(pop_7d * 4),
        "events_30d": pa.array(np.ceil(pop_7d * 3).astype(np.int64)),
        "popularity_rank": pa.array(np.arange(1, n + 1, dtype=np.int32)),
    })


def users_table(users: int, cat: Catalogue, *, day: date = date(2026, 11, 25), history_length: int = 50,
                purchase_share: float = 0.4, mean_purchases: float = 4.0, purchased_max: int = 200,
                seed: int = 0) -> pa.Table:
    """The users table (spark_etl.schemas.USERS), sorted by user id like the ETL's output.

    Every user was active (the ETL's users are the 30 days' active users), so ``last_items`` has 1 to
    ``history_length`` items (a quarter of users at the cap); ``purchase_share`` of users bought
    something, a geometric number of items with mean ``mean_purchases`` (capped at ``purchased_max``),
    drawn from their own history first, then from the catalogue (Zipf).
    """
    rng = np.random.default_rng(seed + 2)
    n_hist = np.minimum(rng.geometric(1.0 / (history_length / 2), users), history_length)
    last_items = _lists(cat.ids.take(pa.array(cat.draw(rng, int(n_hist.sum())))),
                        np.concatenate([[0], np.cumsum(n_hist)]))
    buys = rng.random(users) < purchase_share
    n_bought = np.where(buys, np.minimum(rng.geometric(1.0 / mean_purchases, users), purchased_max), 0)
    bought = cat.draw(rng, int(n_bought.sum()))
    purchased = _lists(cat.ids.take(pa.array(bought)), np.concatenate([[0], np.cumsum(n_bought)]))
    device = np.array(DEVICES, dtype=object)[rng.choice(len(DEVICES), size=users, p=DEVICE_MIX)]
    ts = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
    views = rng.poisson(20, users).astype(np.int64) + n_hist
    zeros = np.zeros(users, dtype=np.int64)
    return pa.table({
        "user_id": pa.array([f"user-{u:08d}" for u in range(users)], pa.string()),
        "last_items": last_items,
        "purchased_items": purchased,
        "n_view": pa.array(views), "n_click": pa.array(views // 4), "n_add_to_cart": pa.array(zeros + n_bought),
        "n_purchase": pa.array(n_bought.astype(np.int64)),
        "first_seen": _timestamps(ts - timedelta(days=20), users),
        "last_seen": _timestamps(ts, users),
        "device": pa.array(device, pa.string()),
    })


def write_parquet(fs: pafs.FileSystem, table: pa.Table, folder: str, *, max_rows_per_file: int = 1_000_000,
                  row_group_bytes: int = 16 * 1024 * 1024, files: int | None = None) -> list[str]:
    """Write ``table`` as the ETL does: ``part-NNNNN.parquet`` files of at most ``max_rows_per_file`` rows
    (or exactly ``files`` files), snappy, row groups of about ``row_group_bytes`` (uncompressed)."""
    fs.create_dir(folder, recursive=True)
    count = files or max(1, math.ceil(table.num_rows / max_rows_per_file))
    per_file = max(1, math.ceil(table.num_rows / count))
    bytes_per_row = max(1, table.nbytes // max(table.num_rows, 1))
    group_rows = max(1024, row_group_bytes // bytes_per_row)
    paths = []
    for i in range(count):
        part = table.slice(i * per_file, per_file)
        if part.num_rows == 0:
            break
        path = posixpath.join(folder, f"part-{i:05d}.parquet")
        pq.write_table(part, path, filesystem=fs, compression="snappy", row_group_size=group_rows)
        paths.append(path)
    return paths
