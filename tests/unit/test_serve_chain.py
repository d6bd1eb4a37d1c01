"""The request path's orchestration (ray_apps/serve/chain.py) with in-memory dependencies.

These stand-ins are not mocks of a server: they implement the chain's small protocols in memory so the
ordering, deadline, coalescing and caching rules can be driven exactly (slow, failing, absent). The
same chain against real Ray Serve, redis-server and moto is tests/integration/test_serve.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from ray_apps.serve.answers import Answer, cache_key
from ray_apps.serve.chain import Recommender
from ray_apps.serve.metrics import ServeMetrics
from streamrec.online_store import StoredRecs
from streamrec.settings import ServeSettings

pytestmark = pytest.mark.unit
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
MS = int(NOW.timestamp() * 1000)
REGION = "eu-west-1"


@dataclass
class Cache:
    entries: dict[str, bytes] = field(default_factory=dict)
    clicks: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    fail: bool = False
    delay: float = 0.0

    async def fetch(self, key: str, user_id: str, recent_n: int) -> tuple[bytes | None, list[tuple[str, int]]]:
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("redis down")
        return self.entries.get(key), sorted(self.clicks.get(user_id, []), key=lambda p: -p[1])[:recent_n]

    async def store(self, key: str, value: bytes, ttl_s: int) -> None:
        if self.fail:
            raise ConnectionError("redis down")
        self.entries[key] = value


@dataclass
class Batch:
    recs: dict[tuple[str, str], StoredRecs] = field(default_factory=dict)
    delay: float = 0.0
    calls: int = 0

    async def get(self, user_id: str, model_version: str) -> StoredRecs | None:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return self.recs.get((user_id, model_version))


@dataclass
class Retrieval:
    delay: float = 0.0
    calls: int = 0

    async def recommend(self, history: list[str], k: int, exclude: list[str],
                        hour: int | None) -> tuple[list[str], list[float], str]:
        self.calls += 1
        await asyncio.sleep(self.delay)
        ids = [f"near-{history[-1]}-{i}" for i in range(k)]
        return ids, [1.0 - i / 1000 for i in range(k)], "v1"


class Popular:
    def items(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        return ("p1", "p2", "p3", "p4"), (1.0, 0.5, 0.33, 0.25)


def make(cache: Cache | None = None, batch: Batch | None = None, retrieval: Retrieval | None = None,
         **settings: float) -> Recommender:
    s = ServeSettings(**{"deadline_ms": 200, "cache_timeout_ms": 50, "batch_timeout_ms": 50,
                         "realtime_timeout_ms": 80, "breaker_failures": 2, **settings})
    return Recommender(REGION, s, cache, batch, retrieval, Popular(), ServeMetrics(), now=lambda: NOW)


def stored(user: str, ids: str, at: datetime = NOW - timedelta(hours=1)) -> StoredRecs:
    items = tuple(ids.split())
    return StoredRecs(user, "v1", items, tuple(1.0 - i / 10 for i in range(len(items))), "model", at)


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_sources_in_order() -> None:
    cache = Cache(clicks={"clicker": [("x", MS - 10)]})
    batch = Batch(recs={("known", "v1"): stored("known", "a b c")})
    r = make(cache, batch, Retrieval())

    async def go() -> list[str]:
        first = await r.recommend("known", 2, True, "v1")
        await asyncio.sleep(0)  # the cache write runs off the request path
        second = await r.recommend("known", 2, True, "v1")
        realtime = await r.recommend("clicker", 2, True, "v1")
        popular = await r.recommend("stranger", 2, True, "v1")
        return [first.source, second.source, realtime.source, popular.source]

    assert run(go()) == ["batch", "cache", "realtime", "popular"]


def test_slow_batch_is_skipped_and_the_answer_is_not_cached() -> None:
    cache = Cache()
    batch = Batch(recs={("u", "v1"): stored("u", "a b")}, delay=0.2)
    r = make(cache, batch)

    async def go() -> Answer:
        answer = await r.recommend("u", 2, True, "v1")
        await asyncio.sleep(0.01)
        return answer

    answer = run(go())
    assert answer.source == "popular"
    assert cache.entries == {}  # incomplete: the next request asks DynamoDB again


def test_realtime_timeout_falls_back_to_batch_and_is_not_cached() -> None:
    cache = Cache(clicks={"u": [("x", MS - 10)]})
    batch = Batch(recs={("u", "v1"): stored("u", "a b")})
    r = make(cache, batch, Retrieval(delay=0.5))
    answer = run(r.recommend("u", 2, True, "v1"))
    assert (answer.source, answer.item_ids) == ("batch", ("a", "b"))
    assert cache.entries == {}


def test_redis_down_opens_the_breaker_and_batch_still_answers() -> None:
    cache = Cache(fail=True)
    batch = Batch(recs={("u", "v1"): stored("u", "a b")})
    r = make(cache, batch)

    async def go() -> list[str]:
        return [(await r.recommend("u", 2, True, "v1")).source for _ in range(4)]

    assert run(go()) == ["batch"] * 4
    text = r.metrics.registry.get_sample_value(
        "streamrec_serve_fallbacks_total", {"step": "cache", "reason": "circuit_open"})
    assert text == 2  # two failures opened it; the next two requests skipped Redis


def test_concurrent_misses_for_one_user_share_one_computation() -> None:
    batch = Batch(recs={("u", "v1"): stored("u", "a b")}, delay=0.02)
    r = make(Cache(), batch)

    async def go() -> list[Answer]:
        return await asyncio.gather(*[r.recommend("u", 2, True, "v1") for _ in range(10)])

    answers = run(go())
    assert {a.item_ids for a in answers} == {("a", "b")}
    assert batch.calls == 1


def test_a_click_after_a_cached_answer_recomputes() -> None:
    cache = Cache()
    cache.entries[cache_key(REGION, "v1", "u")] = Answer(("a", "b"), (1.0, 0.9), "batch", "v1", NOW, MS - 100).encode()
    retrieval = Retrieval()
    r = make(cache, Batch(recs={("u", "v1"): stored("u", "a b")}), retrieval)
    assert run(r.recommend("u", 2, True, "v1")).source == "cache"
    cache.clicks["u"] = [("y", MS - 50)]
    answer = run(r.recommend("u", 2, True, "v1"))
    assert answer.source == "realtime" and answer.item_ids[0] == "near-y-0"


def test_exclude_seen_applies_to_every_source() -> None:
    cache = Cache(clicks={"u": [("p1", MS - 10**7)]})
    r = make(cache, Batch())
    answer = run(r.recommend("u", 2, True, None))  # no model, no retriever: popular, minus the clicked p1
    assert (answer.source, answer.item_ids) == ("popular", ("p2", "p3"))
    assert run(r.recommend("u", 2, False, None)).item_ids == ("p1", "p2")


def test_no_model_version_skips_batch_and_answers_popular() -> None:
    batch = Batch()
    r = make(Cache(), batch)
    answer = run(r.recommend("u", 3, False, None))
    assert (answer.source, answer.item_ids, answer.model_version) == ("popular", ("p1", "p2", "p3"), None)
    assert batch.calls == 0


def test_staleness_counts_from_caching_not_from_the_batch_time() -> None:
    cache = Cache()
    batch = Batch(recs={("u", "v1"): stored("u", "a b", at=NOW - timedelta(hours=6))})
    r = make(cache, batch)

    async def go() -> None:
        await r.recommend("u", 2, True, "v1")
        await asyncio.sleep(0.01)
        assert (await r.recommend("u", 2, True, "v1")).source == "cache"
        await asyncio.sleep(0.01)

    run(go())
    assert batch.calls == 1  # a 6-hour-old batch answer cached just now is fresh: no background refresh
    hits = r.metrics.registry.get_sample_value("streamrec_serve_cache_lookups_total", {"result": "hit"})
    assert hits == 1


def test_a_realtime_answer_is_not_cached_when_the_batch_read_failed() -> None:
    cache = Cache(clicks={"u": [("x", MS - 10)]})
    r = make(cache, Batch(delay=0.2), Retrieval())

    async def go() -> Answer:
        answer = await r.recommend("u", 2, True, "v1")
        await asyncio.sleep(0.01)
        return answer

    assert run(go()).source == "realtime"
    assert cache.entries == {}


def test_a_late_but_healthy_dependency_does_not_open_its_breaker() -> None:
    cache = Cache(delay=0.08)  # later than the 50 ms budget, well under SLOW_CALL_S
    batch = Batch(recs={("u", "v1"): stored("u", "a b")})
    r = make(cache, batch)

    async def go() -> list[str]:
        sources = []
        for _ in range(4):
            sources.append((await r.recommend("u", 2, True, "v1")).source)
            await asyncio.sleep(0.1)  # the abandoned calls finish and report their outcome
        return sources

    assert run(go()) == ["batch"] * 4
    assert r.breakers["cache"].state.value == "closed"
    timeouts = r.metrics.registry.get_sample_value("streamrec_serve_fallbacks_total",
                                                   {"step": "cache", "reason": "timeout"})
    assert timeouts == 4


def test_an_answer_that_arrived_while_the_loop_was_busy_is_used_not_timed_out() -> None:
    """A replica whose event loop is blocked past a step's timeout finds the dependency's answer and the
    step's timer due in the same loop turn; the timer runs first. The answer had arrived, so it is used
    (counted as late), not thrown away for a fallback."""
    import time

    key = cache_key(REGION, "v1", "u")
    cache = Cache(entries={key: Answer(("a", "b", "c"), (3.0, 2.0, 1.0), "batch", "v1", NOW, 0).encode()},
                  delay=0.001)
    r = make(cache, Batch(), cache_timeout_ms=10)

    async def go() -> Answer:
        async def hog() -> None:  # another request's CPU work: blocks the loop for 30 ms
            await asyncio.sleep(0)
            time.sleep(0.03)

        hogging = asyncio.ensure_future(hog())
        answer = await r.recommend("u", 2, True, "v1")
        await hogging
        return answer

    answer = run(go())
    assert answer.source == "cache" and list(answer.item_ids) == ["a", "b"]
    assert r.metrics.registry.get_sample_value("streamrec_serve_late_answers_total", {"step": "cache"}) == 1
    assert r.metrics.registry.get_sample_value("streamrec_serve_fallbacks_total",
                                               {"step": "cache", "reason": "timeout"}) is None


def test_the_batch_read_and_the_realtime_call_run_side_by_side() -> None:
    """A user who clicked after their batch recommendations waits for the slower of DynamoDB and the
    retriever, not for both in turn."""
    import time

    cache = Cache(clicks={"u": [("x", MS - 10)]})
    batch = Batch(recs={("u", "v1"): stored("u", "a b")}, delay=0.04)
    retrieval = Retrieval(delay=0.04)
    r = make(cache, batch, retrieval)
    started = time.perf_counter()
    answer = run(r.recommend("u", 2, True, "v1"))
    elapsed = time.perf_counter() - started
    assert answer.source == "realtime" and retrieval.calls == batch.calls == 1
    assert elapsed < 0.075, elapsed  # one 40 ms wait, not two


def test_a_batch_newer_than_every_click_drops_the_realtime_call_and_its_breaker_hears_the_outcome() -> None:
    cache = Cache(clicks={"u": [("x", MS - 2 * 3_600_000)]})  # clicked before the batch was computed
    batch = Batch(recs={("u", "v1"): stored("u", "a b c")}, delay=0.01)
    retrieval = Retrieval(delay=0.03)
    r = make(cache, batch, retrieval)
    r.breakers["realtime"]._opened_at = -1e9  # long open: half-open, the next call is its trial

    async def go() -> Answer:
        answer = await r.recommend("u", 2, True, "v1")
        await asyncio.sleep(0.05)  # the dropped call finishes on its own
        return answer

    answer = run(go())
    assert (answer.source, answer.item_ids) == ("batch", ("a", "b"))  # x excluded, not in the list anyway
    assert retrieval.calls == 1
    assert r.breakers["realtime"].state.value == "closed"  # the trial's success was heard, not lost
