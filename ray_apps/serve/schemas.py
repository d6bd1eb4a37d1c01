"""The HTTP API's request and response bodies: typed, so the OpenAPI document is complete.

Ids follow the event contract (:data:`streamrec.events.ID_PATTERN`: up to 128 characters of letters,
digits and ``_ . : -``), so any id the clickstream can carry can be asked about and nothing else can.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from streamrec.events import ID_PATTERN

MAX_K = 200
MAX_BATCH_USERS = 100
DEFAULT_K = 20

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


class Source(str, Enum):
    """Which step of the request path produced the items."""

    cache = "cache"
    batch = "batch"
    realtime = "realtime"
    popular = "popular"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoredItem(_Body):
    item_id: str
    score: float


class Recommendations(_Body):
    user_id: str
    items: list[ScoredItem]
    model_version: str | None = Field(description="the model version that ranked the items; null for "
                                                  "the popularity list before any model is loaded")
    source: Source
    generated_at: datetime = Field(description="when the items were computed (UTC); a cached answer keeps "
                                               "the time it was computed")


class BatchRequest(_Body):
    user_ids: list[Id] = Field(min_length=1, max_length=MAX_BATCH_USERS)
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K)
    exclude_seen: bool = True


class BatchResponse(_Body):
    results: list[Recommendations]


class SimilarItems(_Body):
    item_id: str
    items: list[ScoredItem]
    model_version: str


class Health(_Body):
    status: str


class Readiness(_Body):
    ready: bool
    model_version: str | None
    checks: dict[str, str] = Field(description="dependency → ok, or what is wrong")


class ErrorBody(_Body):
    detail: str


__all__ = [
    "BatchRequest", "BatchResponse", "DEFAULT_K", "ErrorBody", "Health", "Id", "MAX_BATCH_USERS", "MAX_K",
    "Readiness", "Recommendations", "ScoredItem", "SimilarItems", "Source",
]
