"""The clickstream event contract: strict validation, canonical JSON, per-field reasons.

An event is what the website sends for one interaction. Validation is strict (no type coercion, no
unknown fields) so that schema drift is caught at the edge and dead-lettered with a reason, instead of
leaking into the lake. The canonical encoding (sorted keys, no spaces, UTC timestamps with millisecond
precision, absent optionals omitted) makes the same event encode to the same bytes everywhere.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError, WithJsonSchema

EventType = Literal["view", "click", "add_to_cart", "purchase"]
EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")
# How much one event of each type says about preference: used by popularity and the training loss.
EVENT_WEIGHTS: dict[str, float] = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0}
Device = Literal["desktop", "mobile", "tablet", "app", "other"]

# Ids are opaque but bounded: they become Redis keys, DynamoDB keys and URL path segments.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Region = Annotated[str, StringConstraints(pattern=r"^[a-z]{2}(-gov)?-[a-z]+-\d$")]
ShortText = Annotated[str, StringConstraints(max_length=512)]

DEFAULT_MAX_RECORD_BYTES = 8 * 1024

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
EventId = Annotated[str, StringConstraints(pattern=UUID_PATTERN)]

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_MAX_MS = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - _EPOCH) // _MS


def _ts_to_ms(value: Any) -> int:
    """RFC 3339 text with a timezone → epoch milliseconds (UTC).

    The model keeps ``ts`` as an integer because every consumer of an event needs epoch time, and
    converting pydantic's timezone objects costs more per record than validating the whole event.
    """
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 timestamp with a timezone, e.g. 2026-11-26T08:00:00.000Z")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"not a valid date or time: {exc}") from None
    ms = (parsed - _EPOCH) // _MS
    if not 0 <= ms <= _MAX_MS:
        raise ValueError("must lie between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z in UTC")
    return ms


EpochMs = Annotated[
    int,
    BeforeValidator(_ts_to_ms),
    WithJsonSchema({"type": "string", "format": "date-time", "examples": ["2026-11-26T08:00:00.000Z"]}),
]


class EventContext(BaseModel):
    """Optional context. ``ip`` and ``user_agent`` are personal data: the consumer hashes them."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    device: Device | None = None
    page: ShortText | None = None
    referrer: ShortText | None = None
    price: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)] | None = None
    category: Annotated[str, StringConstraints(max_length=128)] | None = None
    ip: Annotated[str, StringConstraints(max_length=64)] | None = None
    user_agent: ShortText | None = None


class ClickEvent(BaseModel):
    """One interaction. ``event_id`` (a UUID) is the dedup key; ``ts`` is client time, held as epoch ms UTC."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    event_id: EventId
    user_id: Id
    session_id: Id
    item_id: Id
    event_type: EventType
    ts: EpochMs
    region: Region
    context: EventContext | None = None


# The validator itself, without BaseModel.model_validate_json's Python wrapper (this runs per record);
# it raises pydantic's ValidationError, see classify_error.
validate_json = ClickEvent.__pydantic_validator__.validate_json


class InvalidEvent(ValueError):
    """A record that breaks the contract. ``reason`` is a stable code; ``detail`` names the fields."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _field_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(record)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def classify_error(exc: ValidationError, data: bytes) -> InvalidEvent:
    """Turn a validation failure into the dead-letter reason code and a detail naming the fields."""
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        # The JSON parser also rejects bad UTF-8; tell the two apart for the dead-letter reason.
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as uexc:
            return InvalidEvent("invalid_utf8", str(uexc))
        return InvalidEvent("malformed_json", first["msg"])
    if first["type"] == "model_type" and not first["loc"]:
        return InvalidEvent("not_an_object", "record must be a JSON object")
    return InvalidEvent("schema", _field_errors(exc))


def oversize(data: bytes, max_bytes: int) -> InvalidEvent:
    return InvalidEvent("oversize", f"record is {len(data)} bytes, limit {max_bytes}")


def parse_event(data: bytes, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> ClickEvent:
    """Decode and validate one record; raise :class:`InvalidEvent` with a reason code.

    Reason codes: ``oversize``, ``invalid_utf8``, ``malformed_json``, ``not_an_object``, ``schema``.
    """
    if len(data) > max_bytes:
        raise oversize(data, max_bytes)
    try:
        return validate_json(data)
    except ValidationError as exc:
        raise classify_error(exc, data) from None


def format_ts(ts: datetime | int) -> str:
    """RFC 3339 UTC with milliseconds (from a datetime or epoch ms): the one spelling streamrec writes."""
    if isinstance(ts, int):
        ts = _EPOCH + ts * _MS
    ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def event_to_dict(event: ClickEvent) -> dict[str, Any]:
    out: dict[str, Any] = {
        "event_id": event.event_id.lower(),
        "user_id": event.user_id,
        "session_id": event.session_id,
        "item_id": event.item_id,
        "event_type": event.event_type,
        "ts": format_ts(event.ts),
        "region": event.region,
    }
    if event.context is not None:
        ctx = event.context.model_dump(exclude_none=True)
        if ctx:
            out["context"] = ctx
    return out


def canonical_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_event(event: ClickEvent) -> bytes:
    """Canonical JSON bytes of an event (what producers put on the stream)."""
    return canonical_json(event_to_dict(event))
