"""The ETL's data contracts: the raw input it accepts and the explicit schema of every output.

Outputs are written by selecting exactly these columns with these types, so a change to a job that
alters a table's shape fails in the tests instead of reaching training or the online store.
"""

from __future__ import annotations

from pyspark.sql.types import (
    ArrayType,
    DataType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)


def _schema(*fields: tuple[str, DataType, bool]) -> StructType:
    return StructType([StructField(name, dtype, nullable) for name, dtype, nullable in fields])


_S, _TS, _D, _I, _L = StringType(), TimestampType(), DoubleType(), IntegerType(), LongType()
# Element nullability is not part of the contract: Spark cannot cast a list to "no null elements".
_LIST = ArrayType(StringType())

# What the consumer writes (ingest.buffer.RAW_SCHEMA), minus the hive partition columns dt and hour.
RAW = _schema(
    ("event_id", _S, False), ("user_id", _S, False), ("session_id", _S, False), ("item_id", _S, False),
    ("event_type", _S, False), ("ts", _TS, False), ("client_region", _S, False), ("device", _S, True),
    ("page", _S, True), ("referrer", _S, True), ("price", _D, True), ("category", _S, True),
    ("ip_hash", _S, True), ("ua_hash", _S, True), ("received_at", _TS, False), ("shard_id", _S, False),
    ("sequence_number", _S, False),
)
RAW_KEYS: tuple[str, ...] = ("event_id", "user_id", "item_id", "event_type", "ts")

# clean/region=R/dt=D: one row per distinct human event of day D (event time, UTC).
CLEAN = _schema(
    ("event_id", _S, False), ("user_id", _S, False), ("item_id", _S, False), ("event_type", _S, False),
    ("event_weight", _D, False), ("ts", _TS, False), ("category", _S, True), ("price", _D, True),
    ("device", _S, True), ("page", _S, True), ("referrer", _S, True), ("client_region", _S, False),
    ("client_session_id", _S, False), ("session_id", _S, False), ("session_position", _I, False),
    ("received_at", _TS, False),
)

# features/region=R/dt=D/items: the catalogue as seen in the 30 days up to D.
ITEMS = _schema(
    ("item_id", _S, False), ("category", _S, True), ("first_seen", _TS, False), ("last_seen", _TS, False),
    ("pop_1d", _D, False), ("pop_7d", _D, False), ("pop_30d", _D, False), ("events_30d", _L, False),
    ("popularity_rank", _I, False),
)

# features/region=R/dt=D/users: every user active in the 30 days up to D.
USERS = _schema(
    ("user_id", _S, False), ("last_items", _LIST, False), ("purchased_items", _LIST, False),
    ("n_view", _L, False), ("n_click", _L, False), ("n_add_to_cart", _L, False), ("n_purchase", _L, False),
    ("first_seen", _TS, False), ("last_seen", _TS, False), ("device", _S, True),
)

# features/region=R/dt=D/examples/split={train,eval}: one row per interaction. `history` holds the
# user's items strictly before `ts` (oldest first); `item_pop_rank` is the item's rank by weighted
# popularity over the 7 days before the cutoff day, so evaluation sees no popularity from its own day.
EXAMPLES = _schema(
    ("user_id", _S, False), ("history", _LIST, False), ("item_id", _S, False), ("category", _S, True),
    ("event_type", _S, False), ("weight", _D, False), ("ts", _TS, False), ("device", _S, True),
    ("hour", _I, False), ("region", _S, False), ("item_pop_rank", _I, True),
)

# keys/region=R/dt=D/{popular,items,users}: DynamoDB items for the features table (pk, sk) as they
# will be written, one typed column per attribute.
KEYS_POPULAR = _schema(
    ("pk", _S, False), ("sk", _S, False), ("item_ids", _LIST, False),
    ("scores", ArrayType(DoubleType()), False), ("dt", _S, False),
)
KEYS_ITEMS = _schema(
    ("pk", _S, False), ("sk", _S, False), ("item_id", _S, False), ("category", _S, True),
    ("popularity_rank", _I, False), ("pop_7d", _D, False), ("first_seen", _TS, False), ("dt", _S, False),
)
KEYS_USERS = _schema(
    ("pk", _S, False), ("sk", _S, False), ("user_id", _S, False), ("item_ids", _LIST, False),
    ("last_seen", _TS, False), ("dt", _S, False),
)

FEATURE_TABLES: dict[str, StructType] = {"items": ITEMS, "users": USERS, "examples": EXAMPLES}
KEY_TABLES: dict[str, StructType] = {"popular": KEYS_POPULAR, "items": KEYS_ITEMS, "users": KEYS_USERS}


def describe(schema: StructType) -> dict[str, str]:
    """Column name → Spark type string (nullability ignored: Parquet readers make every column nullable)."""
    return {f.name: f.dataType.simpleString() for f in schema.fields}


def drift(actual: StructType, contract: StructType) -> list[str]:
    """Differences between a dataset's schema and its contract, one readable line each."""
    have, want = describe(actual), describe(contract)
    problems = [f"missing column {name} ({kind})" for name, kind in want.items() if name not in have]
    problems += [f"column {name} is {have[name]}, expected {kind}"
                 for name, kind in want.items() if name in have and have[name] != kind]
    problems += [f"unexpected column {name} ({kind})" for name, kind in have.items() if name not in want]
    return problems
