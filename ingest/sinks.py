"""The consumer's durable outputs: raw lake + dead-letter Parquet files, and Redis online features.

Both are idempotent for a given batch (shard + sequence range), which is what lets the worker replay a
batch after a crash: files have deterministic names and overwrite; Redis recents use ZADD GT and the
popularity increments are guarded by a per-batch marker inside one script.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from ingest.buffer import FlushBatch, hour_partition
from streamrec.events import EVENT_WEIGHTS
from streamrec.lake import LakeLayout, batch_file_name, write_parquet_atomic
from streamrec.online import popularity_batch_marker, popularity_key, user_recent_key


# Dictionary-encode only the raw columns whose values repeat within a batch: trying it on unique ids
# (event_id, sequence numbers, hashes) costs time and makes the file larger.
_DICTIONARY_COLUMNS = {"raw": ["user_id", "item_id", "event_type", "client_region", "device", "page",
                               "referrer", "category", "shard_id"]}


class LakeSink:
    def __init__(self, layout: LakeLayout, fs: pafs.FileSystem, region: str) -> None:
        self.layout = layout
        self.fs = fs
        self.region = region

    def check(self) -> None:
        """Fail now if the lake root cannot be reached (a missing bucket, no permission, a bad path)."""
        info = self.fs.get_file_info(self.layout.base)
        if self.layout.scheme == "file" and info.type == pafs.FileType.NotFound:
            self.fs.create_dir(self.layout.base, recursive=True)

    def files(self, batch: FlushBatch) -> list[tuple[str, str, pa.Table]]:
        """(dataset, path, table) of every file a batch writes: one per dataset and receive hour, all
        under the same deterministic name."""
        name = batch_file_name(batch.shard_id, batch.first_seq, batch.last_seq)
        out = []
        for dataset, tables in (("raw", batch.raw), ("dead_letter", batch.dead)):
            for bucket, table in sorted(tables.items()):
                dt, hour = hour_partition(bucket)
                out.append((dataset, posixpath.join(self.layout.partition(dataset, self.region, dt, hour), name), table))
        return out

    def paths(self, batch: FlushBatch) -> list[str]:
        return [path for _, path, _ in self.files(batch)]

    def write(self, batch: FlushBatch) -> list[str]:
        written = []
        for dataset, path, table in self.files(batch):
            write_parquet_atomic(self.fs, table, path, use_dictionary=_DICTIONARY_COLUMNS.get(dataset, True))
            written.append(path)
        return written


# Applies one batch's popularity increments exactly once: the marker and the increments are one atomic
# step, so a replayed batch (same shard and sequence range) finds the marker and changes nothing.
# KEYS = marker, then one bucket key per hour; ARGV = TTL, then per bucket "item weight item weight ...".
_POPULARITY_SCRIPT = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) == false then return 0 end
for k = 2, #KEYS do
  for item, weight in string.gmatch(ARGV[k], '(%S+) (%S+)') do
    redis.call('ZINCRBY', KEYS[k], weight, item)
  end
  redis.call('EXPIRE', KEYS[k], ARGV[1])
end
return 1
"""

# Updates many users' last-N sets in one round trip: ZADD GT never moves a timestamp backwards (so a
# replayed or late batch is harmless), then the set is trimmed to N and its TTL refreshed.
# ARGV = N, TTL, then per key "ts item ts item ...". Pairs travel as one string per user, built by
# Arrow, because encoding two arguments per event in the client costs more than the rest of the sink.
# Keys are declared, as scripts must; this targets a non-clustered Redis (ElastiCache with cluster mode
# disabled), see docs/ingest.md.
_RECENT_SCRIPT = """
local n = tonumber(ARGV[1])
for k = 1, #KEYS do
  local pairs = {}
  for ts, item in string.gmatch(ARGV[2 + k], '(%d+) (%S+)') do
    pairs[#pairs + 1] = ts; pairs[#pairs + 1] = item
  end
  redis.call('ZADD', KEYS[k], 'GT', unpack(pairs))
  redis.call('ZREMRANGEBYRANK', KEYS[k], 0, -(n + 1))
  redis.call('EXPIRE', KEYS[k], ARGV[2])
end
return #KEYS
"""

# Users per script call: large enough to amortise the round trip, small enough not to stall Redis.
_USERS_PER_CALL = 500
_TYPES = pa.array(list(EVENT_WEIGHTS), pa.string())
_WEIGHTS = pa.array(list(EVENT_WEIGHTS.values()), pa.float64())


def _pairs(left: pa.Array, right: pa.Array) -> pa.Array:
    """Element-wise "left right" strings."""
    return pc.binary_join_element_wise(left.cast(pa.string()), right.cast(pa.string()), " ")


def latest_per_user(events: pa.Table, n: int) -> tuple[list[str], list[str]]:
    """Each user's newest ``n`` distinct items: (users, per user "ts item ts item ..." newest first).

    Aggregated in Arrow rather than per record in Python: this runs for every flushed batch.
    """
    latest = (events.group_by(["user_id", "item_id"]).aggregate([("ts", "max")])
              .sort_by([("user_id", "ascending"), ("ts_max", "descending")]))
    users = latest.column("user_id").combine_chunks()
    rows = len(users)
    if rows == 0:
        return [], []
    change = np.flatnonzero(
        pc.not_equal(users.slice(1), users.slice(0, rows - 1)).to_numpy(zero_copy_only=False)) + 1
    starts = np.concatenate(([0], change))
    counts = np.diff(np.concatenate((starts, [rows])))
    if counts.max() > n:  # only the newest N of a user can survive the trim
        rank = np.arange(rows) - np.repeat(starts, counts)
        latest = latest.filter(pa.array(rank < n))
        counts = np.minimum(counts, n)
    pairs = _pairs(latest.column("ts_max").cast(pa.int64()).combine_chunks(),
                   latest.column("item_id").combine_chunks())
    offsets = pa.array(np.concatenate(([0], np.cumsum(counts))), pa.int32())
    per_user = pc.binary_join(pa.ListArray.from_arrays(offsets, pairs), " ")
    return users.take(pa.array(starts)).to_pylist(), per_user.to_pylist()


def weighted_counts(events: pa.Table) -> str:
    """Event-type-weighted interaction count per item, as "item weight item weight ..."."""
    weights = pc.take(_WEIGHTS, pc.index_in(events.column("event_type"), _TYPES))
    agg = pa.table({"item_id": events.column("item_id"), "w": weights}).group_by("item_id").aggregate([("w", "sum")])
    if agg.num_rows == 0:
        return ""
    joined = _pairs(agg.column("item_id").combine_chunks(), agg.column("w_sum").combine_chunks())
    return " ".join(joined.to_pylist())


class RedisFeatureSink:
    def __init__(self, client: Any, region: str, *, recent_n: int, recent_ttl_s: int, popularity_ttl_s: int) -> None:
        self.client = client
        self.region = region
        self.recent_n = recent_n
        self.recent_ttl_s = recent_ttl_s
        self.popularity_ttl_s = popularity_ttl_s
        self._recent = client.register_script(_RECENT_SCRIPT)
        self._popularity = client.register_script(_POPULARITY_SCRIPT)

    def ping(self) -> None:
        self.client.ping()

    def write(self, batch: FlushBatch) -> int:
        """Apply the batch; return the number of users whose recent items were updated."""
        if not batch.raw:
            return 0
        events = pa.concat_tables(t.select(["user_id", "item_id", "ts"]) for t in batch.raw.values())
        users = self._write_recent(events)
        self._write_popularity(batch)
        return users

    def _write_recent(self, events: pa.Table) -> int:
        users, pairs = latest_per_user(events, self.recent_n)
        for a in range(0, len(users), _USERS_PER_CALL):
            keys = [user_recent_key(self.region, u) for u in users[a:a + _USERS_PER_CALL]]
            self._recent(keys=keys, args=[self.recent_n, self.recent_ttl_s, *pairs[a:a + _USERS_PER_CALL]])
        return len(users)

    def _write_popularity(self, batch: FlushBatch) -> None:
        keys = [popularity_batch_marker(self.region, batch.shard_id, batch.first_seq, batch.last_seq)]
        args: list[Any] = [self.popularity_ttl_s]
        for bucket, table in sorted(batch.raw.items()):
            keys.append(popularity_key(self.region, bucket))
            args.append(weighted_counts(table))
        self._popularity(keys=keys, args=args)
