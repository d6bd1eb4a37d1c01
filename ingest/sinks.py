"""The consumer's durable outputs: raw lake + dead-letter Parquet files, and Redis online features.

Both are idempotent for a given batch (shard + sequence range), which is what lets the worker replay a
batch after a crash: files have deterministic names and overwrite; Redis recents use ZADD GT and the
popularity increments are guarded by a per-batch marker inside one script.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from ingest.buffer import FlushBatch, hour_partition
from streamrec.events import EVENT_WEIGHTS
from streamrec.lake import LakeLayout, batch_file_name, write_parquet_atomic
from streamrec.online import popularity_batch_marker, popularity_key, user_recent_key


class LakeSink:
    def __init__(self, layout: LakeLayout, fs: pafs.FileSystem, region: str) -> None:
        self.layout = layout
        self.fs = fs
        self.region = region

    def paths(self, batch: FlushBatch) -> list[str]:
        name = batch_file_name(batch.shard_id, batch.first_seq, batch.last_seq)
        out = []
        for dataset, tables in (("raw", batch.raw), ("dead_letter", batch.dead)):
            for bucket in sorted(tables):
                dt, hour = hour_partition(bucket)
                out.append(posixpath.join(self.layout.partition(dataset, self.region, dt, hour), name))
        return out

    def write(self, batch: FlushBatch) -> list[str]:
        name = batch_file_name(batch.shard_id, batch.first_seq, batch.last_seq)
        written = []
        for dataset, tables in (("raw", batch.raw), ("dead_letter", batch.dead)):
            for bucket, table in sorted(tables.items()):
                dt, hour = hour_partition(bucket)
                path = posixpath.join(self.layout.partition(dataset, self.region, dt, hour), name)
                write_parquet_atomic(self.fs, table, path)
                written.append(path)
        return written


# Applies one batch's popularity increments exactly once: the marker and the increments are one atomic
# step, so a replayed batch (same shard and sequence range) finds the marker and changes nothing.
_POPULARITY_SCRIPT = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) == false then return 0 end
local i = 3
for k = 2, #KEYS do
  local n = tonumber(ARGV[i]); i = i + 1
  for _ = 1, n do
    redis.call('ZINCRBY', KEYS[k], ARGV[i + 1], ARGV[i]); i = i + 2
  end
  redis.call('EXPIRE', KEYS[k], ARGV[2])
end
return 1
"""


# Updates many users' last-N sets in one round trip: ZADD GT never moves a timestamp backwards (so a
# replayed or late batch is harmless), then the set is trimmed to N and its TTL refreshed.
# Keys are declared, as scripts must; this targets a non-clustered Redis (ElastiCache with cluster mode
# disabled), see docs/ingest.md.
_RECENT_SCRIPT = """
local n = tonumber(ARGV[1])
local i = 3
for k = 1, #KEYS do
  local c = tonumber(ARGV[i]); i = i + 1
  redis.call('ZADD', KEYS[k], 'GT', unpack(ARGV, i, i + 2 * c - 1)); i = i + 2 * c
  redis.call('ZREMRANGEBYRANK', KEYS[k], 0, -(n + 1))
  redis.call('EXPIRE', KEYS[k], ARGV[2])
end
return #KEYS
"""

# Users per script call: large enough to amortise the round trip, small enough not to stall Redis.
_USERS_PER_CALL = 500


class RedisFeatureSink:
    def __init__(self, client: Any, region: str, *, recent_n: int, recent_ttl_s: int, popularity_ttl_s: int) -> None:
        self.client = client
        self.region = region
        self.recent_n = recent_n
        self.recent_ttl_s = recent_ttl_s
        self.popularity_ttl_s = popularity_ttl_s
        self._recent = client.register_script(_RECENT_SCRIPT)
        self._popularity = client.register_script(_POPULARITY_SCRIPT)

    def write(self, batch: FlushBatch) -> int:
        """Apply the batch; return the number of users whose recent items were updated."""
        latest: dict[str, dict[str, int]] = defaultdict(dict)
        weights: dict[int, dict[str, float]] = {}
        for bucket, table in batch.raw.items():
            pop: dict[str, float] = defaultdict(float)
            weights[bucket] = pop
            columns = (table.column(name) for name in ("user_id", "item_id", "ts", "event_type"))
            users, items, ts_col, types = columns
            ts_ms = ts_col.cast(pa.int64()).to_pylist()
            for user, item, ts, etype in zip(users.to_pylist(), items.to_pylist(), ts_ms, types.to_pylist()):
                seen = latest[user]
                if ts > seen.get(item, -1):
                    seen[item] = ts
                pop[item] += EVENT_WEIGHTS[etype]
        self._write_recent(latest)
        self._write_popularity(batch, weights)
        return len(latest)

    def _write_recent(self, latest: dict[str, dict[str, int]]) -> None:
        users = list(latest.items())
        n = self.recent_n
        for start in range(0, len(users), _USERS_PER_CALL):
            keys: list[str] = []
            args: list[Any] = [n, self.recent_ttl_s]
            for user, items in users[start:start + _USERS_PER_CALL]:
                if len(items) > n:  # only the newest N can survive the trim
                    items = dict(sorted(items.items(), key=lambda kv: kv[1], reverse=True)[:n])
                keys.append(user_recent_key(self.region, user))
                args.append(len(items))
                for item, ts in items.items():
                    args.append(ts)
                    args.append(item)
            self._recent(keys=keys, args=args)

    def _write_popularity(self, batch: FlushBatch, weights: dict[int, dict[str, float]]) -> None:
        if not weights:
            return
        keys = [popularity_batch_marker(self.region, batch.shard_id, batch.first_seq, batch.last_seq)]
        args: list[Any] = [self.popularity_ttl_s, self.popularity_ttl_s]
        for bucket, items in sorted(weights.items()):
            keys.append(popularity_key(self.region, bucket))
            args.append(len(items))
            for item, weight in items.items():
                args.append(item)
                args.append(weight)
        self._popularity(keys=keys, args=args)
