"""ingest.columns: validated record bytes → Arrow, in bulk, equal to what was validated."""

from __future__ import annotations

import pytest

from ingest.columns import events_table
from streamrec.events import canonical_json, parse_event

pytestmark = pytest.mark.unit

BASE = {"event_id": "6F1C1B5E-9A7E-4D0E-8A53-3D2C8F8D2F11", "user_id": "u1", "session_id": "s1",
        "item_id": "i1", "event_type": "click", "ts": "2026-11-26T08:00:00.000Z", "region": "us-east-1"}


def test_fields_and_context_become_columns_in_order() -> None:
    with_ctx = {**BASE, "item_id": "i2", "context": {"device": "app", "price": 3, "ip": "10.0.0.1"}}
    table = events_table([canonical_json(BASE), canonical_json(with_ctx)])
    rows = table.to_pylist()
    assert [r["item_id"] for r in rows] == ["i1", "i2"]
    assert rows[0]["event_id"] == BASE["event_id"].lower()
    assert rows[0]["context"] is None
    assert rows[1]["context"]["device"] == "app"
    assert rows[1]["context"]["price"] == 3.0  # an integer price is a float column value
    assert rows[1]["context"]["page"] is None


def test_pretty_printed_record_stays_one_row() -> None:
    pretty = b'{\n  "event_id": "6f1c1b5e-9a7e-4d0e-8a53-3d2c8f8d2f11",\r\n  "user_id": "u9", "session_id": "s",\n' \
             b' "item_id": "i", "event_type": "view", "ts": "2026-11-26T08:00:00Z", "region": "eu-west-1"}'
    parse_event(pretty)  # valid JSON, so valid input
    table = events_table([canonical_json(BASE), pretty])
    assert table.column("user_id").to_pylist() == ["u1", "u9"]


def test_repeated_key_keeps_the_validated_value() -> None:
    # Pydantic validates the last occurrence of a repeated key; Arrow refuses such input, and the batch
    # falls back to the validated models, so the lake never holds an unvalidated first value.
    repeated = canonical_json(BASE)[:-1] + b',"user_id":"u2"}'
    assert parse_event(repeated).user_id == "u2"
    table = events_table([canonical_json(BASE), repeated])
    assert table.column("user_id").to_pylist() == ["u1", "u2"]
    assert table.column("event_id").to_pylist() == [BASE["event_id"].lower()] * 2


def test_empty_batch() -> None:
    assert events_table([]).num_rows == 0
