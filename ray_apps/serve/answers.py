"""Pure pieces of the request path: cache keys, the cached answer's codec and freshness rules, and the
list arithmetic (exclusions, top-k) every source shares. No I/O, so the rules are tested as tables."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

CACHE_FORMAT = 2


def cache_key(region: str, model_version: str | None, user_id: str) -> str:
    """``recs:{region}:{model_version}:{user_id}``: a new model version never reads an old answer."""
    return f"recs:{region}:{model_version or '-'}:{user_id}"


@dataclass(frozen=True)
class Answer:
    """Ranked items and where they came from. ``clicks_ms`` is the newest click the answer took into
    account (0 = none): a later click makes a cached answer out of date. ``cached_at`` is when it was
    written to the cache (what staleness is measured from: a batch answer's ``generated_at`` is the
    daily batch's time, hours old by design)."""

    item_ids: tuple[str, ...]
    scores: tuple[float, ...]
    source: str
    model_version: str | None
    generated_at: datetime
    clicks_ms: int = 0
    cached_at: datetime | None = None

    def top(self, k: int, exclude: Iterable[str] = ()) -> Answer:
        ids, scores = top_k(self.item_ids, self.scores, k, exclude)
        return Answer(ids, scores, self.source, self.model_version, self.generated_at, self.clicks_ms,
                      self.cached_at)

    def encode(self) -> bytes:
        return json.dumps({
            "f": CACHE_FORMAT, "i": list(self.item_ids), "s": [round(s, 6) for s in self.scores],
            "src": self.source, "v": self.model_version, "g": self.generated_at.isoformat(),
            "c": self.clicks_ms, "a": self.cached_at.isoformat() if self.cached_at else None,
        }, separators=(",", ":")).encode()

    @staticmethod
    def decode(raw: bytes | str) -> Answer | None:
        """None for anything that is not a well-formed cache entry of this format (treated as a miss)."""
        try:
            d = json.loads(raw)
            if not isinstance(d, dict) or d.get("f") != CACHE_FORMAT or len(d["i"]) != len(d["s"]):
                return None
            return Answer(tuple(map(str, d["i"])), tuple(map(float, d["s"])), str(d["src"]), d["v"],
                          datetime.fromisoformat(d["g"]), int(d["c"]),
                          datetime.fromisoformat(d["a"]) if d.get("a") else None)
        except (ValueError, KeyError, TypeError):
            return None


def top_k(item_ids: Sequence[str], scores: Sequence[float], k: int,
          exclude: Iterable[str] = ()) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The first ``k`` items (lists are ranked) that are not in ``exclude``."""
    banned = set(exclude)
    ids: list[str] = []
    out_scores: list[float] = []
    for item, score in zip(item_ids, scores):
        if item in banned:
            continue
        ids.append(item)
        out_scores.append(float(score))
        if len(ids) == k:
            break
    return tuple(ids), tuple(out_scores)


def newest_click_ms(recent: Sequence[tuple[str, int]]) -> int:
    return max((ms for _, ms in recent), default=0)


def history_oldest_first(recent: Sequence[tuple[str, int]]) -> list[str]:
    """Redis gives the last-N newest first; the user tower reads histories oldest first."""
    return [item for item, _ in sorted(recent, key=lambda p: (p[1], p[0]))]


def cache_usable(cached: Answer | None, recent: Sequence[tuple[str, int]], k: int,
                 exclude: Iterable[str]) -> bool:
    """A cached answer serves a request when no click came after it and it still has ``k`` items once
    the exclusions are applied."""
    if cached is None or newest_click_ms(recent) > cached.clicks_ms:
        return False
    return len(top_k(cached.item_ids, cached.scores, k, exclude)[0]) >= min(k, len(cached.item_ids))


def needs_refresh(cached: Answer, now: datetime, refresh_after_s: float) -> bool:
    """Has the entry sat in the cache longer than ``refresh_after_s`` (stale-while-revalidate)?"""
    return (now - (cached.cached_at or cached.generated_at)).total_seconds() > refresh_after_s


def clicked_since(recent: Sequence[tuple[str, int]], moment: datetime) -> bool:
    """Has the user clicked after ``moment`` (e.g. when their batch recommendations were computed)?"""
    return newest_click_ms(recent) > int(moment.astimezone(UTC).timestamp() * 1000)


__all__ = ["Answer", "cache_key", "cache_usable", "clicked_since", "history_oldest_first", "needs_refresh",
           "newest_click_ms", "top_k"]
