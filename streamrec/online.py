"""Redis online features: key names and readers shared by the consumer (writer) and serving (reader).

- ``ur:{region}:{user_id}`` sorted set: member = item id, score = last interaction time (ms). Written
  with ZADD GT, so replays and out-of-order batches never move a timestamp backwards; capped to the
  last N items.
- ``pop:{<region>}:{YYYYMMDDHH}`` sorted set: member = item id, score = event-type-weighted count in that
  receive hour. The region is a hash tag so one batch's buckets and its idempotency marker share a
  cluster slot (the increment script touches them atomically).
- ``popbatch:{<region>}:{shard}:{first}-{last}``: marker that a batch's popularity was applied.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any


def user_recent_key(region: str, user_id: str) -> str:
    return f"ur:{region}:{user_id}"


def popularity_key(region: str, hour_bucket: int) -> str:
    """Key of the popularity bucket for an hour (``hour_bucket`` = epoch ms // 3,600,000)."""
    stamp = datetime.fromtimestamp(hour_bucket * 3600, UTC).strftime("%Y%m%d%H")
    return f"pop:{{{region}}}:{stamp}"


def popularity_batch_marker(region: str, shard_id: str, first_seq: str, last_seq: str) -> str:
    return f"popbatch:{{{region}}}:{shard_id}:{first_seq}-{last_seq}"


def read_recent(client: Any, region: str, user_id: str, n: int = 50) -> list[tuple[str, int]]:
    """A user's last ``n`` distinct items, newest first, with their interaction times (ms)."""
    pairs = client.zrevrange(user_recent_key(region, user_id), 0, n - 1, withscores=True)
    return [(_s(item), int(score)) for item, score in pairs]


def read_popular(client: Any, region: str, now: datetime, *, hours: int = 24, half_life_hours: float = 6.0,
                 k: int = 100) -> list[tuple[str, float]]:
    """Top ``k`` items over the last ``hours`` hourly buckets, older hours decayed exponentially."""
    now_bucket = int(now.timestamp()) // 3600
    totals: dict[str, float] = {}
    pipe = client.pipeline(transaction=False)
    for age in range(hours):
        pipe.zrange(popularity_key(region, now_bucket - age), 0, -1, withscores=True)
    for age, members in enumerate(pipe.execute()):
        weight = math.pow(0.5, age / half_life_hours)
        for item, score in members:
            key = _s(item)
            totals[key] = totals.get(key, 0.0) + weight * score
    return sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


__all__ = [
    "popularity_batch_marker", "popularity_key", "read_popular", "read_recent", "user_recent_key",
]
