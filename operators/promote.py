"""Promotion: move a region from the serving version to a new one, in an order a reader can't notice.

1. Pre-warm: the most active users' batch answers are written to the Redis cache under the NEW
   version's keys (``recs:{region}:{version}:{user}``), so the first requests after the flip are cache
   hits; the old version's entries stay until their TTL (requests in flight still read them).
2. The DynamoDB pointer (features table) flips, refusing unless every recs item of the version is in.
3. The registry's promoted pointer flips last; Serve polls it and swaps its model atomically, and from
   then on reads the new version's recs and cache keys. A crash between steps leaves the region
   serving the previous version; the stage's rerun repeats every step idempotently.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from streamrec.lake import LakeLayout, filesystem
from streamrec.settings import Settings

logger = logging.getLogger(__name__)

ACTIVITY_COLUMNS = ("n_view", "n_click", "n_add_to_cart", "n_purchase")


class PromotionError(RuntimeError):
    """Promotion could not complete; the region still serves the previous version."""


@dataclass(frozen=True)
class PromotionReport:
    version: str
    previous: str | None
    prewarmed: int
    prewarm_skipped_recent_click: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def most_active_users(users: pa.Table, limit: int) -> list[str]:
    """The ``limit`` users with the most events (ties: most recently seen, then user id), for
    pre-warming; pure, so the choice is tested with a table."""
    if limit <= 0 or users.num_rows == 0:
        return []
    activity = np.zeros(users.num_rows, dtype=np.int64)
    for name in ACTIVITY_COLUMNS:
        activity += users.column(name).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    last_seen = pc.cast(users.column("last_seen"), pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    ids = users.column("user_id").to_pylist()
    order = np.lexsort((np.array(ids, dtype=object).astype(str), -last_seen, -activity))
    return [ids[i] for i in order[:limit]]


def prewarm(settings: Settings, region: str, day: date, version: str, *, now: datetime | None = None) -> tuple[int, int]:
    """Write the most active users' batch answers for ``version`` to the cache; (written, skipped).

    A user who clicked after the batch was computed is skipped: Serve would answer them in real time,
    so a cached batch answer would be wrong for them."""
    import redis

    from ray_apps.serve.answers import Answer, cache_key, clicked_since, newest_click_ms
    from streamrec.online import user_recent_key

    limit = settings.sync.prewarm_users
    if limit == 0:
        return 0, 0
    rs = settings.region(region)
    layout = LakeLayout(rs.lake_uri)
    fs = filesystem(rs.lake_uri, endpoint_url=settings.aws.endpoint_url, region=region)
    users_path = posixpath.join(layout.partition("features", region, day), "users")
    users = pads.dataset(users_path, filesystem=fs, format="parquet").to_table(
        columns=["user_id", "last_seen", *ACTIVITY_COLUMNS])
    chosen = most_active_users(users, limit)
    if not chosen:
        return 0, 0
    recs_path = posixpath.join(layout.partition("recs", region, day), f"model_version={version}")
    recs = pads.dataset(recs_path, filesystem=fs, format="parquet").to_table(
        columns=["user_id", "item_ids", "scores", "generated_at"],
        filter=pc.field("user_id").isin(pa.array(chosen, pa.string())))
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    client = redis.Redis.from_url(rs.redis_url, socket_timeout=5)
    written = skipped = 0
    try:
        rows = recs.to_pylist()
        for start in range(0, len(rows), 500):
            chunk = rows[start:start + 500]
            read = client.pipeline(transaction=False)
            for row in chunk:
                read.zrevrange(user_recent_key(region, row["user_id"]), 0, settings.serve.recent_items - 1,
                               withscores=True)
            recents = read.execute()
            write = client.pipeline(transaction=False)
            for row, pairs in zip(chunk, recents):
                recent = [(_text(item), int(score)) for item, score in pairs]
                generated = row["generated_at"].astimezone(UTC)
                if clicked_since(recent, generated):
                    skipped += 1
                    continue
                answer = Answer(tuple(row["item_ids"]), tuple(float(s) for s in row["scores"]), "batch", version,
                                generated, newest_click_ms(recent), moment)
                write.set(cache_key(region, version, row["user_id"]), answer.encode(), ex=settings.serve.cache_ttl_s)
                written += 1
            write.execute()
    except redis.RedisError as exc:
        # The cache is an optimisation: promotion goes on with a cold cache rather than not at all.
        logger.warning("pre-warming the cache for %s %s failed after %d entries: %s", region, version, written, exc)
    finally:
        client.close()
    return written, skipped


def promote(settings: Settings, region: str, day: date, version: str, decision: Mapping[str, Any], *,
            synced_items: int) -> PromotionReport:
    """Pre-warm, flip the DynamoDB pointer, then the registry pointer (see the module docstring)."""
    from operators.sync.dynamodb import SyncError, publish_pointer
    from ray_apps.registry import ModelRegistry, RegistryError

    registry = ModelRegistry.from_settings(settings, region)
    current = registry.promotion()
    if current is not None and current.version == version:
        logger.info("%s already serves %s", region, version)
    written, skipped = prewarm(settings, region, day, version)
    try:
        publish_pointer(settings, region, version, day=day, items=synced_items)
        record = registry.promote(version, dict(decision))
    except (SyncError, RegistryError) as exc:
        raise PromotionError(f"promoting {version} in {region} failed: {exc}") from None
    return PromotionReport(version, record.previous if record.version == version else None, written, skipped)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


__all__ = ["PromotionError", "PromotionReport", "most_active_users", "prewarm", "promote"]
