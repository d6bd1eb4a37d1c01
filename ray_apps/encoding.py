"""Feature encoding for the two-tower model: raw columns → integer indices and floats, in bulk.

Everything here is pure and vectorised (numpy, pyarrow, pandas' hash kernel); it runs inside Ray Data
``map_batches`` over millions of rows at training and scoring time, and on one user at a time in the
serving path. The same function encodes the same value to the same index in every process, on every
machine and in every later release, because the model's embedding rows are addressed by these indices:

- string ids are hashed with SipHash-2-4 under a fixed key (``pandas.util.hash_array``), never with
  Python's ``hash()``, which is salted per process;
- each column is dictionary-encoded by Arrow first, so each distinct string is hashed once per batch
  (a batch of histories repeats the same popular items many times);
- index 0 of every table means "padding or unknown" (null, empty string, out-of-range hour, missing
  rank); a real value always lands in 1..buckets-1, so hashing never collides with padding.

The output of :func:`encode_examples`, :func:`encode_users` and :func:`encode_items` is a dict of numpy
arrays (int64 indices, float32 values) whose keys are the batch keys :class:`ray_apps.model.TwoTowerModel`
reads; ``torch.as_tensor`` turns each into a tensor without a copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from streamrec.events import EVENT_WEIGHTS

# SipHash key (exactly 16 bytes). Changing it, or the bucket rule in _buckets_of, re-addresses every
# embedding row: bump HASH_SCHEME with it so a model registry refuses to pair old weights with new ids.
HASH_KEY = "streamrec:ids:v1"
HASH_SCHEME = "siphash24-utf8:streamrec:ids:v1:mod-buckets-minus-1-plus-1"
PAD = 0  # the padding / unknown index in every table
HOURS = 24

# Batch keys: user tower inputs, item tower inputs and per-example loss inputs.
USER_KEYS = ("history", "history_len", "region", "device", "hour")  # + "user_id" when user_buckets > 0
ITEM_KEYS = ("item_id", "category", "pop_bucket")
LOSS_KEYS = ("weight",)  # + "log_q" when item counts are given

Batch = pa.Table | pa.RecordBatch | Mapping[str, Any]

# The Spark ETL's training-example schema (spark_etl writes it; encode_examples reads it).
EXAMPLE_SCHEMA = pa.schema([
    pa.field("user_id", pa.string()),
    pa.field("history", pa.list_(pa.string())),
    pa.field("item_id", pa.string()),
    pa.field("category", pa.string()),
    pa.field("event_type", pa.string()),
    pa.field("weight", pa.float64()),
    pa.field("ts", pa.timestamp("us", tz="UTC")),
    pa.field("device", pa.string()),
    pa.field("hour", pa.int32()),
    pa.field("region", pa.string()),
    pa.field("item_pop_rank", pa.int32()),
])


class EncodingConfig(Protocol):
    """What encoding needs from the model config (``ray_apps.model.TwoTowerConfig`` satisfies it)."""

    @property
    def id_buckets(self) -> int: ...
    @property
    def category_buckets(self) -> int: ...
    @property
    def pop_buckets(self) -> int: ...
    @property
    def user_buckets(self) -> int: ...
    @property
    def region_buckets(self) -> int: ...
    @property
    def device_buckets(self) -> int: ...
    @property
    def history_length(self) -> int: ...


@dataclass(frozen=True)
class EncodingParams:
    """An :class:`EncodingConfig` as a plain value. Ray Data ships it to its encode tasks, which then
    need neither torch nor the model module (``TwoTowerConfig`` would import both in every task)."""

    id_buckets: int
    category_buckets: int
    pop_buckets: int
    user_buckets: int
    region_buckets: int
    device_buckets: int
    history_length: int

    @classmethod
    def of(cls, config: EncodingConfig) -> EncodingParams:
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


# --------------------------------------------------------------------------- input normalisation


def _string_array(values: Any) -> pa.Array:
    """Any column of strings (Arrow, numpy, pandas, list, or one scalar) as one Arrow array."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        kind = values.type.value_type if pa.types.is_dictionary(values.type) else values.type
        # Hash the text of numeric ids, so 42 and "42" land in the same bucket.
        is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        return values if is_text else values.cast(pa.string())
    if isinstance(values, str) or values is None:
        values = [values]
    # from_pandas: NaN (pandas' missing marker in object columns) becomes null, not the string "nan".
    return pa.array(values, type=pa.string(), from_pandas=True)


def _list_array(histories: Any) -> pa.Array:
    """A column of string lists as one Arrow list array (ListArray or LargeListArray)."""
    if isinstance(histories, pa.ChunkedArray):
        histories = histories.combine_chunks()
    if isinstance(histories, pa.Array):
        if not pa.types.is_list(histories.type) and not pa.types.is_large_list(histories.type):
            raise TypeError(f"history must be a list<string> column, got {histories.type}")
        return histories
    # Ray Data's numpy batches hold one ndarray per row; pandas holds lists or ndarrays. Arrow takes both.
    return pa.array(list(histories), type=pa.list_(pa.string()), from_pandas=True)


def _float_array(values: Any, size: int) -> np.ndarray:
    """A numeric column (or one scalar, broadcast) as float64 with NaN for null."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
    elif isinstance(values, (pd.Series, pd.api.extensions.ExtensionArray)):
        values = values.to_numpy(dtype=np.float64, na_value=np.nan)  # nullable ints hold pd.NA
    out = np.asarray(values if values is not None else np.nan, dtype=np.float64)
    return np.broadcast_to(out, (size,)) if out.ndim == 0 else out


def _column(batch: Batch, name: str) -> Any:
    names = batch.column_names if isinstance(batch, (pa.Table, pa.RecordBatch)) else batch.keys()
    if name not in names:
        raise KeyError(f"encoding needs column {name!r}; the batch has {sorted(names)}")
    return batch[name]


def _has_column(batch: Batch, name: str) -> bool:
    names = batch.column_names if isinstance(batch, (pa.Table, pa.RecordBatch)) else batch.keys()
    return name in names


# --------------------------------------------------------------------------- hashing


def _buckets_of(unique: np.ndarray, buckets: int) -> np.ndarray:
    """Distinct strings (object array) → indices in 1..buckets-1 (0 stays free for padding/unknown)."""
    hashed = pd.util.hash_array(unique, encoding="utf8", hash_key=HASH_KEY, categorize=False)
    return (hashed % np.uint64(buckets - 1)).astype(np.int64) + 1


def hash_ids(values: Any, buckets: int) -> np.ndarray:
    """Strings → int64 bucket indices in ``1..buckets-1``; null and "" → 0 (padding/unknown).

    ``values`` is an Arrow (chunked) array, numpy/pandas column, list, or one string. Deterministic
    across processes and machines (see the module docstring). ``buckets`` counts the padding row too,
    so it is the embedding table's size.
    """
    if buckets < 2:
        raise ValueError(f"buckets must be at least 2 (row 0 is padding), got {buckets}")
    array = _string_array(values)
    if len(array) == 0:
        return np.zeros(0, dtype=np.int64)
    encoded = array.dictionary_encode()
    dictionary = encoded.dictionary
    # One extra slot at the end of the lookup table catches nulls (their dictionary index is null).
    lookup = np.zeros(len(dictionary) + 1, dtype=np.int64)
    if len(dictionary):
        lookup[:-1] = _buckets_of(dictionary.to_numpy(zero_copy_only=False), buckets)
        empty = pc.equal(pc.binary_length(dictionary), 0).to_numpy(zero_copy_only=False)
        lookup[:-1][empty] = PAD
    indices = pc.fill_null(encoded.indices, len(dictionary)).to_numpy(zero_copy_only=False)
    return lookup[indices]


# --------------------------------------------------------------------------- features


def encode_histories(histories: Any, history_length: int, id_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Lists of item ids (oldest first) → ``(ids [B, N] int64, lengths [B] int64)``.

    Keeps the MOST RECENT ``history_length`` items of each list: row i holds them in chronological
    order in columns ``0..lengths[i]-1`` and padding (0) after. A null or empty list gives length 0.
    A null or empty id inside a list keeps its place and encodes as 0, so the model masks it.
    Vectorised: one gather of the kept values and one scatter, no per-row Python.
    """
    lists = _list_array(histories)
    rows = len(lists)
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    # offsets are absolute positions in lists.values (they honour a slice; .values does not).
    ends = lists.offsets.to_numpy(zero_copy_only=False)[1:].astype(np.int64)
    keep = np.minimum(lengths, history_length)
    total = int(keep.sum())
    row_of = np.repeat(np.arange(rows, dtype=np.int64), keep)
    col_of = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(keep) - keep, keep)
    source = np.repeat(ends - keep, keep) + col_of
    out = np.zeros((rows, history_length), dtype=np.int64)
    if total:
        out[row_of, col_of] = hash_ids(lists.values.take(pa.array(source)), id_buckets)
    return out, keep


def hour_index(hour: Any, size: int | None = None) -> np.ndarray:
    """Hour of day 0..23 → index 1..24; null, NaN or out of range → 0 (unknown)."""
    values = _float_array(hour, size if size is not None else 1)
    valid = np.isfinite(values) & (values >= 0) & (values < HOURS) & (values == np.floor(values))
    return np.where(valid, np.nan_to_num(values) + 1, PAD).astype(np.int64)


def popularity_bucket(rank: Any, pop_buckets: int, size: int | None = None) -> np.ndarray:
    """Popularity rank (1 = most popular) → log2 bucket: rank 1 → 1, 2-3 → 2, 4-7 → 3, ...

    Capped at ``pop_buckets - 1`` (the long tail shares the last bucket); null or rank < 1 → 0. Log
    buckets because the difference between rank 1 and 10 matters, between 10,001 and 10,010 it does not.
    """
    values = _float_array(rank, size if size is not None else 1)
    valid = np.isfinite(values) & (values >= 1)
    # frexp gives rank = m * 2**e with m in [0.5, 1), so e = floor(log2(rank)) + 1 exactly, no float log.
    _, exponent = np.frexp(np.where(valid, values, 1.0))
    return np.where(valid, np.minimum(exponent, pop_buckets - 1), PAD).astype(np.int64)


def event_weights(event_type: Any, weight: Any = None) -> np.ndarray:
    """Per-example loss weight: the ``weight`` column where present, else EVENT_WEIGHTS[event_type].

    Unknown event types weigh 1 (a view) rather than failing a whole training batch.
    """
    types = _string_array(event_type)
    fallback = np.ones(len(types), dtype=np.float64)
    for name, value in EVENT_WEIGHTS.items():
        fallback[pc.fill_null(pc.equal(types, name), False).to_numpy(zero_copy_only=False)] = value
    if weight is None:
        return fallback.astype(np.float32)
    given = _float_array(weight, len(types))
    return np.where(np.isfinite(given), given, fallback).astype(np.float32)


# --------------------------------------------------------------------------- log-Q


def item_counts(item_ids: np.ndarray, id_buckets: int) -> np.ndarray:
    """Occurrences of each hashed item id (int64 [id_buckets]); shards' counts add up."""
    return np.bincount(np.asarray(item_ids, dtype=np.int64), minlength=id_buckets).astype(np.int64)


def log_q(item_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """log of each example's item sampling probability, count / total, for the loss's log-Q correction.

    In-batch negatives are drawn with the training data's item frequencies (rows, not weights), so
    popular items are over-represented as negatives; subtracting log q from their logits undoes that.
    An id never counted (not in the training data) gets count 1 so the log stays finite.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("item counts are all zero: count the training data's item ids first")
    ids = np.asarray(item_ids, dtype=np.int64)
    return (np.log(np.maximum(counts[ids], 1.0)) - np.log(total)).astype(np.float32)


# --------------------------------------------------------------------------- whole batches


def encode_users(
    histories: Any,
    region: Any,
    device: Any,
    hour: Any,
    user_id: Any = None,
    *,
    config: EncodingConfig,
) -> dict[str, np.ndarray]:
    """User-tower inputs: ``history``, ``history_len``, ``region``, ``device``, ``hour`` (+ ``user_id``).

    ``histories`` is one list of recent item ids per user (oldest first; an empty list works: the tower
    falls back to context). ``region``, ``device`` and ``hour`` are columns or single values that apply
    to every user, which is what the serving path has. ``user_id`` is encoded only when the config has a
    user table (``user_buckets > 0``); None there means "unknown user" (index 0).
    """
    history, lengths = encode_histories(histories, config.history_length, config.id_buckets)
    size = len(lengths)
    out = {
        "history": history,
        "history_len": lengths,
        "region": _broadcast(hash_ids(region, config.region_buckets), size),
        "device": _broadcast(hash_ids(device, config.device_buckets), size),
        "hour": _broadcast(hour_index(hour, size), size),
    }
    if config.user_buckets > 0:
        ids = np.zeros(size, np.int64) if user_id is None else hash_ids(user_id, config.user_buckets)
        out["user_id"] = _broadcast(ids, size)
    return out


def encode_items(
    item_id: Any, category: Any, popularity_rank: Any, *, config: EncodingConfig
) -> dict[str, np.ndarray]:
    """Item-tower inputs: ``item_id``, ``category``, ``pop_bucket`` (all int64 [B])."""
    ids = hash_ids(item_id, config.id_buckets)
    return {
        "item_id": ids,
        "category": _broadcast(hash_ids(category, config.category_buckets), len(ids)),
        "pop_bucket": _broadcast(popularity_bucket(popularity_rank, config.pop_buckets, len(ids)), len(ids)),
    }


def encode_examples(
    table_or_batch: Batch, config: EncodingConfig, counts: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Training examples (the Spark ETL's columns) → the model's batch dict of numpy arrays.

    Reads ``history, item_id, category, event_type, weight, device, hour, region, item_pop_rank`` and,
    when the config has a user table, ``user_id``; ``ts`` is not a feature. ``weight`` may be absent or
    null (then the event type decides). Returns USER_KEYS + ITEM_KEYS + ``weight`` (float32), and
    ``log_q`` (float32) when ``counts`` (from :func:`item_counts` over the training data) is given.
    Accepts a pyarrow Table or RecordBatch, or a dict of numpy arrays / a pandas DataFrame (the three
    Ray Data batch formats).
    """
    batch = table_or_batch
    user_id = _column(batch, "user_id") if config.user_buckets > 0 else None
    out = encode_users(
        _column(batch, "history"), _column(batch, "region"), _column(batch, "device"), _column(batch, "hour"),
        user_id, config=config,
    )
    out.update(encode_items(
        _column(batch, "item_id"), _column(batch, "category"), _column(batch, "item_pop_rank"), config=config
    ))
    weight = _column(batch, "weight") if _has_column(batch, "weight") else None
    out["weight"] = event_weights(_column(batch, "event_type"), weight)
    if counts is not None:
        out["log_q"] = log_q(out["item_id"], counts)
    return out


def encoded_row_bytes(config: EncodingConfig, *, log_q: bool = True) -> int:
    """Bytes one training example takes once encoded (:func:`encode_examples`' arrays): what holding an
    encoded split in Ray's object store costs per row. The padded history dominates (8 bytes an item)."""
    # No rows: any non-zero counts make encode_examples add its log-Q column.
    counts = np.ones(1, dtype=np.int64) if log_q else None
    encoded = encode_examples(EXAMPLE_SCHEMA.empty_table(), config, counts)
    return sum(a.dtype.itemsize * int(np.prod(a.shape[1:], dtype=np.int64)) for a in encoded.values())


def _broadcast(values: np.ndarray, size: int) -> np.ndarray:
    """One encoded scalar repeated for every row (serving passes one region for all users)."""
    if len(values) == size:
        return values
    if len(values) == 1:
        return np.full(size, values[0], dtype=values.dtype)
    raise ValueError(f"column has {len(values)} values for {size} rows")


def examples_table(columns: Mapping[str, Sequence[Any]]) -> pa.Table:
    """A Table of :data:`EXAMPLE_SCHEMA`'s types from Python columns (tests, tools); absent ones left out."""
    return pa.table({name: pa.array(columns[name], type=EXAMPLE_SCHEMA.field(name).type)
                     for name in EXAMPLE_SCHEMA.names if name in columns})
