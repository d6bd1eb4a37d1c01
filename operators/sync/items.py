"""The pure half of the DynamoDB sync: rows → low-level DynamoDB items, batches of at most 25, the
retry schedule and the write-rate limiter's arithmetic. No I/O here (see :mod:`operators.sync.dynamodb`).

Item layouts:

- recs table: :func:`streamrec.online_store.recs_item` (what serving parses) plus ``expires_at``
  (N, epoch seconds: ``generated_at`` + ``sync.recs_ttl_days``; the table's TTL attribute);
- features table: one item per row of the ETL's ``keys/`` export, every column one attribute (typed by
  its Arrow type, see :func:`attribute_converter`; a null column is left out of the item);
- features table, the sync marker of a model version's recs (:func:`marker_item`)::

      pk "synced#<version>", sk "dt#<YYYY-MM-DD>", model_version S, dt S, items N, files N,
      input_id S, completed_at S

  written once every file of (version, day) is in; the promoted-version pointer
  (:func:`streamrec.online_store.pointer_item`) can only move to a version whose marker exists with the
  item count the promotion step names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa

from streamrec.online_store import recs_item

# DynamoDB's limit on requests per BatchWriteItem call (moto does not enforce it: we do).
MAX_BATCH_ITEMS = 25
MARKER_PK_PREFIX = "synced#"
RECS_KEY = ("user_id", "model_version")
FEATURES_KEY = ("pk", "sk")
# Columns a recs file must have (ray_apps.score.RECS_SCHEMA).
RECS_COLUMNS = ("user_id", "item_ids", "scores", "source", "model_version", "generated_at")

Item = dict[str, Any]
Converter = Callable[[Any], "dict[str, Any] | None"]


class ItemError(ValueError):
    """A row cannot become a DynamoDB item (the message names the column and the value)."""


# --------------------------------------------------------------------------- attribute values


def number(value: int | float) -> dict[str, str]:
    """A DynamoDB N value: integers exactly, floats by ``repr`` (shortest round-trip form, as
    :func:`streamrec.online_store.recs_item` writes them). DynamoDB has no NaN or infinity."""
    if isinstance(value, bool):
        raise ItemError(f"{value!r} is a boolean, not a number")
    if isinstance(value, int):
        return {"N": str(value)}
    f = float(value)
    if not math.isfinite(f):
        raise ItemError(f"{value!r} is not a finite number (DynamoDB cannot store it)")
    return {"N": repr(f)}


def _iso(value: datetime) -> str:
    if value.tzinfo is None:  # Spark and pyarrow timestamps without a zone are UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def attribute_converter(dtype: pa.DataType) -> Converter:
    """A function from one Python value of an Arrow column (``to_pylist``) to a DynamoDB attribute
    value, None for a null: string → S, integer/float → N, bool → BOOL, timestamp → S (ISO 8601 UTC, the
    spelling ``generated_at`` has), date → S (YYYY-MM-DD), list → L (a null element → NULL)."""
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return lambda v: None if v is None else {"S": v}
    if pa.types.is_boolean(dtype):
        return lambda v: None if v is None else {"BOOL": bool(v)}
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype):
        return lambda v: None if v is None else number(v)
    if pa.types.is_timestamp(dtype):
        return lambda v: None if v is None else {"S": _iso(v)}
    if pa.types.is_date(dtype):
        return lambda v: None if v is None else {"S": v.isoformat()}
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        inner = attribute_converter(dtype.value_type)

        def convert_list(v: Any) -> dict[str, Any] | None:
            if v is None:
                return None
            return {"L": [inner(x) or {"NULL": True} for x in v]}

        return convert_list
    raise ItemError(f"no DynamoDB attribute type for Arrow type {dtype}")


def key_items(table: pa.Table | pa.RecordBatch) -> list[Item]:
    """Rows of the ETL's ``keys/`` export → features-table items (every column an attribute)."""
    names = table.schema.names
    for key in FEATURES_KEY:
        if key not in names:
            raise ItemError(f"keys rows need a {key!r} column (columns: {', '.join(names)})")
    converters = []
    for name in names:
        try:
            converters.append((name, attribute_converter(table.schema.field(name).type)))
        except ItemError as exc:
            raise ItemError(f"column {name!r}: {exc}") from None
    columns = [(name, conv, table.column(name).to_pylist()) for name, conv in converters]
    items: list[Item] = []
    for row in range(table.num_rows):
        item: Item = {}
        for name, conv, values in columns:
            try:
                value = conv(values[row])
            except ItemError as exc:
                raise ItemError(f"column {name!r}, row {row}: {exc}") from None
            if value is not None:
                item[name] = value
        for key in FEATURES_KEY:
            if not item.get(key, {}).get("S"):
                raise ItemError(f"row {row} has no {key} (null or empty): every keys row is one item")
        items.append(item)
    return items


def expires_at(generated_at: datetime, ttl_days: int) -> int:
    """The TTL attribute: ``generated_at`` + ``ttl_days``, in epoch seconds."""
    if generated_at.tzinfo is None:
        generated_at = generated_at.replace(tzinfo=UTC)
    return int((generated_at + timedelta(days=ttl_days)).timestamp())


def recs_items(table: pa.Table | pa.RecordBatch, *, ttl_days: int, model_version: str | None = None) -> list[Item]:
    """Rows of a scoring output (:data:`ray_apps.score.RECS_SCHEMA`) → recs-table items. With
    ``model_version`` a row of another version is an error (a folder holds one version)."""
    missing = [c for c in RECS_COLUMNS if c not in table.schema.names]
    if missing:
        raise ItemError(f"recs rows lack column(s) {', '.join(missing)}")
    cols = {c: table.column(c).to_pylist() for c in RECS_COLUMNS}
    items: list[Item] = []
    for row in range(table.num_rows):
        user, version, generated = cols["user_id"][row], cols["model_version"][row], cols["generated_at"][row]
        if not user or not version or generated is None:
            raise ItemError(f"recs row {row} lacks user_id, model_version or generated_at")
        if model_version is not None and version != model_version:
            raise ItemError(f"recs row {row} (user {user!r}) is of version {version!r}, not {model_version!r}")
        if generated.tzinfo is None:
            generated = generated.replace(tzinfo=UTC)
        try:
            items.append(recs_item(user, version, cols["item_ids"][row] or (), cols["scores"][row] or (),
                                   cols["source"][row] or "model", generated,
                                   expires_at=expires_at(generated, ttl_days)))
        except ValueError as exc:
            raise ItemError(f"recs row {row}: {exc}") from None
    return items


# --------------------------------------------------------------------------- batches


def item_key(item: Mapping[str, Any], key: Sequence[str]) -> tuple[str, ...]:
    return tuple(str(next(iter(item[k].values()))) for k in key)


def batches(items: Iterable[Item], key: Sequence[str], size: int = MAX_BATCH_ITEMS) -> Iterator[list[Item]]:
    """``items`` in order, cut into lists of at most ``size`` (at most 25, DynamoDB's limit).

    DynamoDB refuses a batch that puts one key twice; an input that repeats a key inside one batch is
    an error here (every input row is one distinct item), named with the key."""
    if not 1 <= size <= MAX_BATCH_ITEMS:
        raise ValueError(f"batch size must be 1..{MAX_BATCH_ITEMS}, got {size}")
    batch: list[Item] = []
    seen: set[tuple[str, ...]] = set()
    for item in items:
        k = item_key(item, key)
        if k in seen:
            raise ItemError(f"the input holds key {k} twice (every row must be a distinct item)")
        seen.add(k)
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch, seen = [], set()
    if batch:
        yield batch


def put_requests(items: Sequence[Item]) -> list[dict[str, Any]]:
    if len(items) > MAX_BATCH_ITEMS:
        raise ValueError(f"{len(items)} items in one BatchWriteItem call; DynamoDB takes {MAX_BATCH_ITEMS} at most")
    return [{"PutRequest": {"Item": item}} for item in items]


def unprocessed_puts(response: Mapping[str, Any], table: str) -> list[Item]:
    """The items of a BatchWriteItem response's ``UnprocessedItems`` for ``table`` (to send again)."""
    requests = (response.get("UnprocessedItems") or {}).get(table) or []
    return [r["PutRequest"]["Item"] for r in requests if "PutRequest" in r]


# --------------------------------------------------------------------------- the sync marker


def marker_key(version: str, day: date) -> Item:
    return {"pk": {"S": f"{MARKER_PK_PREFIX}{version}"}, "sk": {"S": f"dt#{day.isoformat()}"}}


def marker_item(version: str, day: date, *, items: int, files: int, input_id: str,
                completed_at: datetime) -> Item:
    """The features-table item that says every recs item of (version, day) is in the recs table."""
    return {
        **marker_key(version, day),
        "model_version": {"S": version},
        "dt": {"S": day.isoformat()},
        "items": {"N": str(items)},
        "files": {"N": str(files)},
        "input_id": {"S": input_id},
        "completed_at": {"S": _iso(completed_at)},
    }


__all__ = [
    "FEATURES_KEY", "MAX_BATCH_ITEMS", "RECS_COLUMNS", "RECS_KEY", "Item", "ItemError",
    "attribute_converter", "backoff_delay", "batches", "expires_at", "item_key", "key_items", "marker_item",
    "marker_key", "number", "put_requests", "recs_items", "unprocessed_puts",
]
