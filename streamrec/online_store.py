"""DynamoDB item layouts of the online store, written by the sync step and read by serving.

Recs table (key: ``user_id``, ``model_version``; see :func:`streamrec.tables.recs_table_spec`), one item
per user and model version::

    user_id S, model_version S, item_ids L<S>, scores L<N>, source S (model | popular),
    generated_at S (ISO 8601 UTC), expires_at N (epoch seconds; the table's TTL attribute, set by sync)

Features table (``pk``, ``sk``), the regional popularity list of the ETL's export_keys job::

    pk "popular", sk "top<K>", item_ids L<S>, scores L<N>, dt S

and the region's promoted-version pointer, written only by ``operators.sync.dynamodb.publish_pointer``
(after every recs item of that version is in; see docs/sync.md)::

    pk "pointer", sk "model", model_version S, dt S, items N, published_at S, revision N,
    previous_version S (absent for the first version)

Encoded to and from DynamoDB's low-level attribute format here, so the writer and the reader cannot
drift apart and the hot read path needs no boto3 resource layer (its Decimal conversions cost more than
the request).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

POPULAR_PK = "popular"
POINTER_PK = "pointer"
POINTER_SK = "model"


def popular_sort_key(top_k: int) -> str:
    return f"top{top_k}"


@dataclass(frozen=True)
class StoredRecs:
    """One user's precomputed recommendations (or a popularity list: then ``user_id`` is empty)."""

    user_id: str
    model_version: str
    item_ids: tuple[str, ...]
    scores: tuple[float, ...]
    source: str
    generated_at: datetime


def _number(value: float) -> dict[str, str]:
    return {"N": repr(float(value))}


def recs_item(user_id: str, model_version: str, item_ids: Sequence[str], scores: Sequence[float],
              source: str, generated_at: datetime, *, expires_at: int | None = None) -> dict[str, Any]:
    """The recs-table item (low-level attribute values) for one user's batch recommendations.
    ``expires_at`` (epoch seconds) is the TTL attribute: DynamoDB deletes the item some time after it."""
    if len(item_ids) != len(scores):
        raise ValueError(f"{len(item_ids)} item ids but {len(scores)} scores for user {user_id!r}")
    if generated_at.tzinfo is None:
        raise ValueError("generated_at must be timezone-aware (UTC)")
    item = {
        "user_id": {"S": user_id},
        "model_version": {"S": model_version},
        "item_ids": {"L": [{"S": i} for i in item_ids]},
        "scores": {"L": [_number(s) for s in scores]},
        "source": {"S": source},
        "generated_at": {"S": generated_at.astimezone(UTC).isoformat()},
    }
    if expires_at is not None:
        item["expires_at"] = {"N": str(int(expires_at))}
    return item


def parse_recs_item(item: Mapping[str, Any]) -> StoredRecs:
    """The inverse of :func:`recs_item`; a malformed item raises ValueError naming what is wrong."""
    try:
        ids = tuple(v["S"] for v in item["item_ids"]["L"])
        scores = tuple(float(v["N"]) for v in item["scores"]["L"])
        generated = datetime.fromisoformat(item["generated_at"]["S"])
        out = StoredRecs(item["user_id"]["S"], item["model_version"]["S"], ids, scores,
                         item.get("source", {}).get("S", "model"), generated)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed recs item: {type(exc).__name__}: {exc}") from None
    if len(ids) != len(scores):
        raise ValueError(f"malformed recs item: {len(ids)} item ids but {len(scores)} scores")
    return out


def parse_popular_item(item: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(item ids, scores) of the features table's popularity list item."""
    try:
        ids = tuple(v["S"] for v in item["item_ids"]["L"])
        scores = tuple(float(v["N"]) for v in item["scores"]["L"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed popularity item: {type(exc).__name__}: {exc}") from None
    if len(ids) != len(scores):
        raise ValueError(f"malformed popularity item: {len(ids)} item ids but {len(scores)} scores")
    return ids, scores


@dataclass(frozen=True)
class PointerInfo:
    """The region's promoted model version as the online store knows it: every one of its ``items``
    recs items of day ``dt`` was in the recs table before the pointer moved to it."""

    model_version: str
    dt: date
    items: int
    published_at: datetime
    revision: int
    previous_version: str | None = None


def pointer_key() -> dict[str, Any]:
    return {"pk": {"S": POINTER_PK}, "sk": {"S": POINTER_SK}}


def pointer_item(info: PointerInfo) -> dict[str, Any]:
    if info.published_at.tzinfo is None:
        raise ValueError("published_at must be timezone-aware (UTC)")
    item = {
        **pointer_key(),
        "model_version": {"S": info.model_version},
        "dt": {"S": info.dt.isoformat()},
        "items": {"N": str(info.items)},
        "published_at": {"S": info.published_at.astimezone(UTC).isoformat()},
        "revision": {"N": str(info.revision)},
    }
    if info.previous_version:
        item["previous_version"] = {"S": info.previous_version}
    return item


def parse_pointer_item(item: Mapping[str, Any]) -> PointerInfo:
    """The inverse of :func:`pointer_item`; a malformed item raises ValueError."""
    try:
        return PointerInfo(
            model_version=item["model_version"]["S"],
            dt=date.fromisoformat(item["dt"]["S"]),
            items=int(item["items"]["N"]),
            published_at=datetime.fromisoformat(item["published_at"]["S"]),
            revision=int(item["revision"]["N"]),
            previous_version=item.get("previous_version", {}).get("S"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed pointer item: {type(exc).__name__}: {exc}") from None


__all__ = ["POINTER_PK", "POINTER_SK", "POPULAR_PK", "PointerInfo", "StoredRecs", "parse_pointer_item",
           "parse_popular_item", "parse_recs_item", "pointer_item", "pointer_key", "popular_sort_key", "recs_item"]
