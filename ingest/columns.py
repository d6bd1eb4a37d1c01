"""Accepted records → Arrow columns, in bulk.

Each record was already validated by the event contract; what is left is to lay the fields out as
columns. Doing that in Python (one list per field, then ``pa.array``) costs more per record than the
validation itself, so the accepted records' bytes are handed to Arrow's C++ JSON reader in one call.

The two parsers can disagree on one thing only: an object that repeats a key. Pydantic keeps the last
value (the one it validated); Arrow refuses the whole input. In that rare case the batch is laid out
from the validated models instead, so the lake always holds exactly what was validated.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from streamrec.events import ClickEvent, validate_json

CONTEXT_FIELDS = ("device", "page", "referrer", "price", "category", "ip", "user_agent")
EVENT_SCHEMA = pa.schema([
    pa.field("event_id", pa.string()),
    pa.field("user_id", pa.string()),
    pa.field("session_id", pa.string()),
    pa.field("item_id", pa.string()),
    pa.field("event_type", pa.string()),
    pa.field("region", pa.string()),
    pa.field("context", pa.struct([
        pa.field(name, pa.float64() if name == "price" else pa.string()) for name in CONTEXT_FIELDS
    ])),
])
_PARSE = pajson.ParseOptions(explicit_schema=EVENT_SCHEMA, unexpected_field_behavior="ignore",
                             newlines_in_values=False)


def _one_line(data: bytes) -> bytes:
    # A valid JSON text has no raw newline inside a string, so any newline is whitespace between tokens
    # and may become a space; that keeps one record per line.
    return data.replace(b"\n", b" ").replace(b"\r", b" ") if b"\n" in data or b"\r" in data else data


def events_table(records: list[bytes]) -> pa.Table:
    """The EVENT_SCHEMA table of validated records, in order (event_id lower-cased)."""
    if not records:
        return EVENT_SCHEMA.empty_table()
    payload = b"\n".join(records)
    if payload.count(b"\n") != len(records) - 1 or b"\r" in payload:  # rare: a pretty-printed record
        payload = b"\n".join(map(_one_line, records))
    try:
        table = pajson.read_json(io.BytesIO(payload), parse_options=_PARSE,
                                 read_options=pajson.ReadOptions(block_size=max(1 << 20, len(payload) + 1)))
    except pa.ArrowInvalid:
        table = _from_models([validate_json(r) for r in records])
    else:
        table = table.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)
    return table.set_column(0, "event_id", pc.utf8_lower(table.column("event_id")))


def _from_models(events: list[ClickEvent]) -> pa.Table:
    """Slow path: the same table built field by field from the validated models."""
    contexts = [e.context.model_dump() if e.context is not None else None for e in events]
    return pa.table({
        "event_id": [e.event_id for e in events],
        "user_id": [e.user_id for e in events],
        "session_id": [e.session_id for e in events],
        "item_id": [e.item_id for e in events],
        "event_type": [e.event_type for e in events],
        "region": [e.region for e in events],
        "context": pa.array(contexts, EVENT_SCHEMA.field("context").type),
    }, schema=EVENT_SCHEMA)
