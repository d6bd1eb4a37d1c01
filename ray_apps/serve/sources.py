"""The serving path's I/O: Redis (answer cache and the consumer's last clicks), DynamoDB (batch
recommendations, the popularity list) and the in-memory popularity list. Each class is one dependency
behind the protocols of :mod:`ray_apps.serve.chain`."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from streamrec import online
from streamrec.online_store import POPULAR_PK, StoredRecs, parse_popular_item, parse_recs_item, popular_sort_key

logger = logging.getLogger(__name__)


class RedisOnline:
    """The answer cache and the consumer's last-N clicks, read in ONE round trip (a pipeline)."""

    def __init__(self, redis_url: str, region: str, *, socket_timeout_s: float = 0.5,
                 max_connections: int = 64) -> None:
        import redis.asyncio as aioredis

        self.region = region
        self.client = aioredis.Redis.from_url(redis_url, socket_timeout=socket_timeout_s,
                                              socket_connect_timeout=socket_timeout_s,
                                              max_connections=max_connections)

    async def fetch(self, key: str, user_id: str, recent_n: int) -> tuple[bytes | None, list[tuple[str, int]]]:
        pipe = self.client.pipeline(transaction=False)
        pipe.get(key)
        pipe.zrevrange(online.user_recent_key(self.region, user_id), 0, recent_n - 1, withscores=True)
        raw, pairs = await pipe.execute()
        return raw, [(_text(item), int(score)) for item, score in pairs]

    async def store(self, key: str, value: bytes, ttl_s: int) -> None:
        await self.client.set(key, value, ex=ttl_s)

    async def ping(self) -> bool:
        return bool(await self.client.ping())


class DynamoBatchStore:
    """Batch recommendations by (user, model version) from the region's recs table. boto3 is blocking,
    so calls run on a small thread pool; the caller's timeout abandons a slow call (its thread finishes
    on its own) and the breaker stops sending calls while DynamoDB is down."""

    def __init__(self, dynamodb: Any, table: str, *, threads: int = 8) -> None:
        self.dynamodb = dynamodb
        self.table = table
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dynamodb")

    async def get(self, user_id: str, model_version: str) -> StoredRecs | None:
        loop = asyncio.get_running_loop()
        response = await loop.run_in_executor(self.pool, lambda: self.dynamodb.get_item(
            TableName=self.table, Key={"user_id": {"S": user_id}, "model_version": {"S": model_version}}))
        item = response.get("Item")
        return None if item is None else parse_recs_item(item)

    async def ping(self) -> bool:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.pool, lambda: self.dynamodb.describe_table(TableName=self.table))
        return True


class PopularList:
    """The region's popularity list, held in memory so the last step of the request path never fails.

    Reloaded every ``refresh_s`` by a daemon thread from the live hourly counts the consumer keeps in
    Redis (last 24 hours, decayed) followed by the ETL's list in the DynamoDB features table (see
    :meth:`reload`). A reload that finds nothing keeps the previous list.
    """

    def __init__(self, *, region: str, redis_url: str, dynamodb: Any, features_table: str, top_k: int,
                 size: int, refresh_s: float) -> None:
        import redis

        self.region = region
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.dynamodb = dynamodb
        self.features_table = features_table
        self.top_k = top_k
        self.size = size
        self.refresh_s = refresh_s
        self.source = "none"
        self._items: tuple[tuple[str, ...], tuple[float, ...]] = ((), ())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def items(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        return self._items

    def reload(self) -> bool:
        """One reload; True when a non-empty list was found. The live counts lead (they know today's
        hits) and the ETL's list fills up to ``size`` behind them (a quiet hour has few live items)."""
        live: list[str] = []
        try:
            live = [item for item, _ in online.read_popular(self.redis, self.region, datetime.now(UTC),
                                                             k=self.size)]
        except Exception as exc:
            logger.warning("live popularity unavailable: %s", exc)
        daily: tuple[str, ...] = ()
        try:
            got = self.dynamodb.get_item(TableName=self.features_table,
                                         Key={"pk": {"S": POPULAR_PK}, "sk": {"S": popular_sort_key(self.top_k)}})
            if "Item" in got:
                daily = parse_popular_item(got["Item"])[0]
        except Exception as exc:
            logger.warning("popularity list unavailable from DynamoDB: %s", exc)
        merged = merge_popular(live, daily, self.size)
        if not merged:
            return False  # keep what we had
        self._items = (tuple(merged), reciprocal_rank_scores(len(merged)))
        self.source = "+".join(name for name, part in (("redis", live), ("dynamodb", daily)) if part)
        return True

    def start(self) -> None:
        self.reload()
        self._thread = threading.Thread(target=self._loop, name="popular-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.reload()


def merge_popular(first: list[str] | tuple[str, ...], then: list[str] | tuple[str, ...], size: int) -> list[str]:
    """``first`` in order, then the items of ``then`` not already listed, ``size`` at most."""
    out: list[str] = []
    seen: set[str] = set()
    for item in (*first, *then):
        if item not in seen:
            seen.add(item)
            out.append(item)
            if len(out) == size:
                break
    return out


def reciprocal_rank_scores(n: int) -> tuple[float, ...]:
    """Popularity answers are scored 1/rank: the live counts and the ETL's weighted 7-day counts are in
    different units, so only their order is comparable."""
    return tuple(1.0 / (rank + 1) for rank in range(n))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
