"""The clickstream event contract (streamrec.events): what is accepted, how it is encoded, and the
reason code + offending field of everything that is rejected."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest

from streamrec.events import (
    DEFAULT_MAX_RECORD_BYTES,
    EVENT_TYPES,
    EVENT_WEIGHTS,
    ClickEvent,
    InvalidEvent,
    canonical_json,
    encode_event,
    event_to_dict,
    format_ts,
    parse_event,
)

pytestmark = pytest.mark.unit

EVENT_ID = "6f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f"

BASE: dict[str, Any] = {
    "event_id": EVENT_ID,
    "user_id": "u-42",
    "session_id": "s.42:1",
    "item_id": "sku_1001",
    "event_type": "view",
    "ts": "2026-11-26T08:15:30.123Z",
    "region": "us-east-1",
}

FULL_CONTEXT: dict[str, Any] = {
    "device": "mobile",
    "page": "/p/sku_1001",
    "referrer": "https://example.com/search?q=shoes",
    "price": 19.99,
    "category": "shoes",
    "ip": "203.0.113.7",
    "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
}


def event(**changes: Any) -> dict[str, Any]:
    """BASE with fields replaced; a value of ``...`` removes the field."""
    out = dict(BASE)
    for key, value in changes.items():
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def raw(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------------
# valid events

VALID = [
    pytest.param(event(), "2026-11-26T08:15:30.123Z", id="minimal-no-context"),
    pytest.param(event(context=FULL_CONTEXT), "2026-11-26T08:15:30.123Z", id="full-context"),
    pytest.param(event(context={"device": "app"}), "2026-11-26T08:15:30.123Z", id="partial-context"),
    pytest.param(event(context=None), "2026-11-26T08:15:30.123Z", id="context-null"),
    pytest.param(event(context={}), "2026-11-26T08:15:30.123Z", id="context-empty"),
    pytest.param(event(ts="2026-11-26T10:15:30.123+02:00"), "2026-11-26T08:15:30.123Z", id="positive-offset"),
    pytest.param(
        event(ts="2026-11-25T23:45:30-08:30"), "2026-11-26T08:15:30.000Z", id="negative-offset-day-change"
    ),
    pytest.param(event(ts="2026-11-26T08:15:30+00:00"), "2026-11-26T08:15:30.000Z", id="zero-offset"),
    pytest.param(
        event(ts="2026-11-26T08:15:30.123456Z"), "2026-11-26T08:15:30.123Z", id="microseconds-truncated"
    ),
    pytest.param(
        event(ts="2026-11-26T08:15:30.9999Z"), "2026-11-26T08:15:30.999Z", id="sub-ms-not-rounded-up"
    ),
    pytest.param(event(event_id=EVENT_ID.upper()), "2026-11-26T08:15:30.123Z", id="uppercase-uuid"),
    pytest.param(event(context={"price": 5}), "2026-11-26T08:15:30.123Z", id="integer-price"),
    pytest.param(event(context={"price": 0}), "2026-11-26T08:15:30.123Z", id="zero-price"),
    pytest.param(event(user_id="a" * 128), "2026-11-26T08:15:30.123Z", id="id-at-max-length"),
    pytest.param(event(region="us-gov-west-1"), "2026-11-26T08:15:30.123Z", id="gov-region"),
    pytest.param(
        event(context={"page": "é" * 512}), "2026-11-26T08:15:30.123Z", id="non-ascii-page-at-limit"
    ),
] + [pytest.param(event(event_type=t), "2026-11-26T08:15:30.123Z", id=f"type-{t}") for t in EVENT_TYPES]


@pytest.mark.parametrize(("obj", "utc_ts"), VALID)
def test_valid_events_parse_and_normalise_ts_to_utc(obj: dict[str, Any], utc_ts: str) -> None:
    parsed = parse_event(raw(obj))
    assert isinstance(parsed, ClickEvent)
    assert UUID(str(parsed.event_id)) == UUID(EVENT_ID)
    assert parsed.user_id == obj["user_id"]
    assert parsed.event_type == obj["event_type"]
    assert format_ts(parsed.ts) == utc_ts
    out = event_to_dict(parsed)
    assert out["ts"] == utc_ts
    assert out["event_id"] == EVENT_ID  # canonical spelling: lower case, hyphenated


@pytest.mark.parametrize(("obj", "utc_ts"), VALID)
def test_canonical_encoding_round_trip_is_byte_stable(obj: dict[str, Any], utc_ts: str) -> None:
    first = encode_event(parse_event(raw(obj)))
    second = encode_event(parse_event(first))
    assert second == first
    assert event_to_dict(parse_event(first)) == event_to_dict(parse_event(raw(obj)))
    decoded = json.loads(first)
    # Sorted keys at every level, no spaces, absent optionals omitted.
    assert list(decoded) == sorted(decoded)
    if "context" in decoded:
        assert list(decoded["context"]) == sorted(decoded["context"])
        assert decoded["context"], "an empty context is omitted, not written as {}"
    assert b": " not in first and b", " not in first
    assert first == canonical_json(decoded)


def test_context_fields_survive_encoding() -> None:
    decoded = json.loads(encode_event(parse_event(raw(event(context=FULL_CONTEXT)))))
    assert decoded["context"] == FULL_CONTEXT
    # Absent / empty contexts are omitted entirely.
    assert "context" not in json.loads(encode_event(parse_event(raw(event(context={})))))
    assert "context" not in json.loads(encode_event(parse_event(raw(event(context=None)))))


def test_canonical_json_sorts_keys_and_keeps_unicode() -> None:
    assert canonical_json({"b": 1, "a": {"d": "é", "c": None}}) == '{"a":{"c":null,"d":"é"},"b":1}'.encode()


def test_format_ts_converts_offsets_and_keeps_milliseconds() -> None:
    ts = datetime(2026, 3, 1, 0, 30, 0, 7000, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    assert format_ts(ts) == "2026-02-28T19:00:00.007Z"
    assert format_ts(datetime(2026, 3, 1, 0, 0, 0, 999999, tzinfo=UTC)) == "2026-03-01T00:00:00.999Z"


def test_event_weights_cover_every_type() -> None:
    assert set(EVENT_WEIGHTS) == set(EVENT_TYPES)
    assert (
        EVENT_WEIGHTS["purchase"]
        > EVENT_WEIGHTS["add_to_cart"]
        > EVENT_WEIGHTS["click"]
        > EVENT_WEIGHTS["view"]
    )


# ---------------------------------------------------------------------------------------------------
# invalid records: (raw bytes, reason code, text the detail must contain)

VALID_BYTES = raw(BASE)

INVALID = [
    # size, encoding, syntax, shape
    pytest.param(b"x" * (DEFAULT_MAX_RECORD_BYTES + 1), "oversize", "8193 bytes", id="oversize-garbage"),
    pytest.param(
        raw(
            event(
                context={
                    "page": "p" * 500,
                    "referrer": "r" * 500,
                    "user_agent": "a" * 500,
                    "category": "c" * 100,
                }
            )
        )[:-1]
        + b" " * 7000
        + b"}",
        "oversize",
        "limit 8192",
        id="oversize-valid-json",
    ),
    pytest.param(
        VALID_BYTES.replace(b"u-42", b"u-\xff\xfe"), "invalid_utf8", "0xff", id="invalid-utf8-in-string"
    ),
    pytest.param(b"\xff\xfe{}", "invalid_utf8", "0xff", id="invalid-utf8-leading"),
    pytest.param(b"{bad json", "malformed_json", "Invalid JSON", id="malformed"),
    pytest.param(VALID_BYTES[:-1], "malformed_json", "Invalid JSON", id="truncated"),
    pytest.param(b"", "malformed_json", "Invalid JSON", id="empty"),
    pytest.param(VALID_BYTES + b"{}", "malformed_json", "Invalid JSON", id="trailing-garbage"),
    pytest.param(b"[1, 2]", "not_an_object", "JSON object", id="array"),
    pytest.param(b'"a string"', "not_an_object", "JSON object", id="string"),
    pytest.param(b"null", "not_an_object", "JSON object", id="null"),
    pytest.param(b"42", "not_an_object", "JSON object", id="number"),
    # missing fields
    *[
        pytest.param(raw(event(**{f: ...})), "schema", f"{f}: Field required", id=f"missing-{f}")
        for f in ("event_id", "user_id", "session_id", "item_id", "event_type", "ts", "region")
    ],
    # wrong types (strict: no coercion)
    pytest.param(
        raw(event(user_id=42)), "schema", "user_id: Input should be a valid string", id="user_id-int"
    ),
    pytest.param(raw(event(item_id=None)), "schema", "item_id", id="item_id-null"),
    pytest.param(raw(event(session_id=["s1"])), "schema", "session_id", id="session_id-list"),
    pytest.param(raw(event(context={"price": "1"})), "schema", "context.price", id="price-string-strict"),
    pytest.param(raw(event(context={"price": "abc"})), "schema", "context.price", id="price-string"),
    pytest.param(raw(event(context={"price": True})), "schema", "context.price", id="price-bool"),
    pytest.param(
        raw(event(context={"price": -0.01})),
        "schema",
        "context.price: Input should be greater than or equal to 0",
        id="price-negative",
    ),
    pytest.param(raw(event(context={"price": 1e10})), "schema", "context.price", id="price-too-large"),
    pytest.param(VALID_BYTES[:-1] + b',"context":{"price":NaN}}', "schema", "context.price", id="price-nan"),
    pytest.param(raw(event(context={"device": "watch"})), "schema", "context.device", id="unknown-device"),
    pytest.param(raw(event(context={"page": "p" * 513})), "schema", "context.page", id="page-too-long"),
    pytest.param(
        raw(event(context={"category": "c" * 129})), "schema", "context.category", id="category-too-long"
    ),
    pytest.param(raw(event(context={"ip": "1" * 65})), "schema", "context.ip", id="ip-too-long"),
    pytest.param(raw(event(context=[1])), "schema", "context", id="context-not-object"),
    pytest.param(
        raw(event(context={"nope": 1})),
        "schema",
        "context.nope: Extra inputs are not permitted",
        id="unknown-context-field",
    ),
    # ids, enums, uuids
    pytest.param(raw(event(event_id="not-a-uuid")), "schema", "event_id", id="bad-uuid"),
    pytest.param(raw(event(event_id=EVENT_ID[:-1])), "schema", "event_id", id="uuid-too-short"),
    pytest.param(raw(event(event_id=12345)), "schema", "event_id", id="uuid-int"),
    pytest.param(raw(event(event_type="hover")), "schema", "event_type", id="unknown-event-type"),
    pytest.param(raw(event(event_type="VIEW")), "schema", "event_type", id="event-type-wrong-case"),
    pytest.param(raw(event(user_id="u 1")), "schema", "user_id: String should match pattern", id="id-space"),
    pytest.param(raw(event(user_id="u/1")), "schema", "user_id", id="id-slash"),
    pytest.param(raw(event(user_id="-u1")), "schema", "user_id", id="id-leading-dash"),
    pytest.param(raw(event(user_id="u1\n")), "schema", "user_id", id="id-trailing-newline"),
    pytest.param(raw(event(user_id="")), "schema", "user_id", id="id-empty"),
    pytest.param(raw(event(item_id="i" * 129)), "schema", "item_id", id="id-too-long"),
    pytest.param(raw(event(session_id="sé")), "schema", "session_id", id="id-non-ascii"),
    pytest.param(raw(event(region="US-EAST-1")), "schema", "region", id="region-upper"),
    pytest.param(raw(event(region="mars")), "schema", "region", id="region-nonsense"),
    pytest.param(raw(event(region="us-east")), "schema", "region", id="region-no-number"),
    # timestamps
    pytest.param(raw(event(ts="2026-11-26T08:15:30")), "schema", "ts", id="ts-naive"),
    pytest.param(raw(event(ts="2026-11-26")), "schema", "ts", id="ts-date-only"),
    pytest.param(raw(event(ts=1764144930)), "schema", "ts", id="ts-epoch-int"),
    pytest.param(raw(event(ts="yesterday")), "schema", "ts", id="ts-text"),
    pytest.param(raw(event(ts="2026-02-30T00:00:00Z")), "schema", "ts", id="ts-impossible-date"),
    pytest.param(raw(event(ts="2026-11-26T08:15:30.1234567Z")), "schema", "ts", id="ts-nanoseconds"),
    pytest.param(raw(event(ts="2026-11-26T23:59:60Z")), "schema", "ts", id="ts-leap-second"),
    pytest.param(raw(event(ts="２０２６-11-26T08:15:30Z")), "schema", "ts", id="ts-non-ascii-digits"),
    # unknown top-level field
    pytest.param(
        raw(event(extra="x")), "schema", "extra: Extra inputs are not permitted", id="unknown-field"
    ),
]


@pytest.mark.parametrize(("data", "reason", "detail"), INVALID)
def test_invalid_records_have_reason_and_name_the_field(data: bytes, reason: str, detail: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(data)
    assert info.value.reason == reason
    assert detail in info.value.detail
    assert str(info.value).startswith(f"{reason}: ")


def test_several_schema_errors_are_all_named() -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw(event(user_id=1, item_id=..., region="nowhere")))
    assert info.value.reason == "schema"
    for field in ("user_id", "item_id", "region"):
        assert field in info.value.detail


def test_size_limit_is_configurable_and_inclusive() -> None:
    data = raw(BASE)
    assert parse_event(data, max_bytes=len(data)).user_id == "u-42"
    with pytest.raises(InvalidEvent) as info:
        parse_event(data, max_bytes=len(data) - 1)
    assert info.value.reason == "oversize"


@pytest.mark.parametrize(
    "ts",
    [
        "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
    ],
)
def test_every_accepted_event_can_be_canonically_encoded(ts: str) -> None:
    """A timestamp whose UTC form is outside datetime's range was once accepted and then made
    encode_event raise OverflowError; it must be rejected as a schema error on ``ts`` (or encode)."""
    data = raw(event(ts=ts))
    try:
        parsed = parse_event(data)
    except InvalidEvent as exc:
        assert exc.reason == "schema" and "ts" in exc.detail
        return
    encoded = encode_event(parsed)
    assert encode_event(parse_event(encoded)) == encoded
