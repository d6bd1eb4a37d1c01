"""A bounded window of recently seen event ids.

Producers retry, so the same event can arrive twice, usually seconds apart and always on the same shard
(the partition key is the user id). A window of the last N ids per shard lease catches those cheaply;
the Spark ETL dedups exactly across files and days, so the window only needs to be good, not perfect.
"""

from __future__ import annotations

from collections import deque


class DedupWindow:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: set[str] = set()
        self._order: deque[str] = deque()

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: str) -> bool:
        return key in self._seen

    def add(self, key: str) -> bool:
        """Remember ``key``; return False if it was already in the window (a duplicate)."""
        if key in self._seen:
            return False
        if self.capacity <= 0:
            return True
        self._seen.add(key)
        self._order.append(key)
        if len(self._order) > self.capacity:
            self._seen.discard(self._order.popleft())
        return True
