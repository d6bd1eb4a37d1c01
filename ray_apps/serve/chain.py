"""The request path for one user: Redis answer cache → DynamoDB batch recommendations → real-time
(user tower on the last clicks + ANN) → regional popularity, inside one deadline.

Every step runs under ``min(its own timeout, what is left of the request's deadline)`` and behind its
dependency's circuit breaker; a step that times out, fails or is switched off by its breaker is
skipped and counted in ``streamrec_serve_fallbacks_total``, and the next step answers. The breaker
hears the call's own outcome, not the request's impatience: a call the request stopped waiting for
runs on, and only an error or an answer slower than :data:`SLOW_CALL_S` counts against the dependency. The popularity
list lives in memory, so the last step cannot fail: no dependency outage turns into a 5xx.

Cache rules (see :mod:`ray_apps.serve.answers`): the key carries the model version; an entry records
the newest click it took into account, so a click after it makes it out of date (that is how a click a
few seconds ago changes the next answer); an entry older than ``cache_refresh_after_s`` is served and
recomputed in the background (stale-while-revalidate); concurrent misses for one key share one
computation; only answers for which every needed step answered are cached (a real-time timeout served
from batch recommendations is not, so the next request tries again). Answers are cached at
:data:`CACHE_DEPTH` items before exclusions, so requests with other ``k`` or ``exclude_seen`` share them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol, TypeVar

from ray_apps.serve.answers import (
    Answer, cache_key, cache_usable, clicked_since, history_oldest_first, needs_refresh, newest_click_ms,
)
from ray_apps.serve.breaker import CircuitBreaker
from ray_apps.serve.metrics import ServeMetrics
from streamrec.online_store import StoredRecs
from streamrec.settings import ServeSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")
CACHE_DEPTH = 100
_FAILED: Any = object()  # what _step returns for a skipped step (None is a valid "not found")
# A call that answers later than this is as good as failed for its circuit breaker (see Recommender._settle).
SLOW_CALL_S = 0.25


class OnlineCache(Protocol):
    async def fetch(self, key: str, user_id: str, recent_n: int) -> tuple[bytes | None, list[tuple[str, int]]]:
        """The cached answer under ``key`` and the user's last clicks (item, ms), newest first."""

    async def store(self, key: str, value: bytes, ttl_s: int) -> None: ...


class BatchStore(Protocol):
    async def get(self, user_id: str, model_version: str) -> StoredRecs | None: ...


class RealtimeQuery(NamedTuple):
    """One real-time request: recent items (oldest first), how many results, what to leave out, hour."""

    history: list[str]
    k: int
    exclude: list[str]
    hour: int | None


class Retrieval(Protocol):
    async def recommend(self, history: list[str], k: int, exclude: list[str],
                        hour: int | None) -> tuple[list[str], list[float], str]:
        """(item ids, scores, model version used) for a history given oldest first."""


class Popular(Protocol):
    def items(self) -> tuple[tuple[str, ...], tuple[float, ...]]: ...


class StepFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Recommender:
    region: str
    settings: ServeSettings
    cache: OnlineCache | None
    batch: BatchStore | None
    retrieval: Retrieval | None
    popular: Popular
    metrics: ServeMetrics
    now: Callable[[], datetime] = lambda: datetime.now(UTC)

    def __post_init__(self) -> None:
        s = self.settings
        self.breakers = {name: CircuitBreaker(name, s.breaker_failures, s.breaker_reset_s)
                         for name in ("cache", "batch", "realtime")}
        self._inflight: dict[str, asyncio.Task[tuple[Answer, bool]]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    async def recommend(self, user_id: str, k: int, exclude_seen: bool, model_version: str | None) -> Answer:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.deadline_ms / 1000
        key = cache_key(self.region, model_version, user_id)
        raw, recent, cache_ok = None, [], False
        if self.cache is not None:
            fetched = await self._step("cache", deadline, self.settings.cache_timeout_ms,
                                       lambda: self.cache.fetch(key, user_id, self.settings.recent_items))
            if fetched is not _FAILED:
                raw, recent = fetched
                cache_ok = True
        seen = [item for item, _ in recent] if exclude_seen else []
        cached = Answer.decode(raw) if raw is not None else None
        if cache_usable(cached, recent, k, seen):
            assert cached is not None
            stale = needs_refresh(cached, self.now(), self.settings.cache_refresh_after_s)
            self.metrics.cache.labels("stale" if stale else "hit").inc()
            if stale:
                await self._coalesced(key, lambda: self._compute(key, user_id, recent, model_version, deadline=None))
            return _as_cached(cached.top(k, seen))
        self.metrics.cache.labels(_miss_kind(cached, recent, cache_ok)).inc()
        answer, _ = await self._coalesced(
            key, lambda: self._compute(key, user_id, recent, model_version, deadline=deadline), deadline)
        return answer.top(k, seen)

    # ----------------------------------------------------------------------------------- internals

    async def _coalesced(self, key: str, compute: Callable[[], Awaitable[tuple[Answer, bool]]],
                         deadline: float | None = None) -> tuple[Answer, bool]:
        """Run ``compute`` once per key at a time; later callers wait for the running one. A background
        refresh (no deadline) is fire-and-forget."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(compute())
            self._inflight[key] = task
            task.add_done_callback(lambda _t, key=key: self._inflight.pop(key, None))
        elif deadline is not None:
            self.metrics.coalesced.inc()
        if deadline is None:
            return None  # type: ignore[return-value]  (background refresh: nobody waits)
        # shield: one caller's cancellation (client gone) must not cancel the others' computation.
        return await asyncio.shield(task)

    async def _compute(self, key: str, user_id: str, recent: list[tuple[str, int]],
                       model_version: str | None, *, deadline: float | None) -> tuple[Answer, bool]:
        """The answer from batch, real-time or popularity, and whether it is complete (cacheable)."""
        loop = asyncio.get_running_loop()
        if deadline is None:  # background refresh: a fresh budget of its own
            deadline = loop.time() + self.settings.deadline_ms / 1000
        complete = True
        stored: StoredRecs | None = None
        # A user with recent clicks may need the real-time answer: ask for it now, beside the batch read,
        # so the request waits for the slower of the two instead of their sum. It is dropped when the
        # batch recommendations turn out to be newer than every click.
        realtime_call = asyncio.ensure_future(self._realtime(recent, deadline)) if recent else None
        if model_version is None:
            self.metrics.fallbacks.labels("batch", "no_model").inc()
        elif self.batch is not None:
            got = await self._step("batch", deadline, self.settings.batch_timeout_ms,
                                   lambda: self.batch.get(user_id, model_version))
            if got is _FAILED:
                complete = False
            elif got is None:
                self.metrics.fallbacks.labels("batch", "not_found").inc()
            else:
                stored = got
        clicks = newest_click_ms(recent)
        if realtime_call is not None and stored is not None and not clicked_since(recent, stored.generated_at):
            realtime_call.cancel()  # the batch answer already knows every click
            realtime_call = None
        if realtime_call is not None:
            realtime = await realtime_call
            if realtime is not None:
                ids, scores, version = realtime
                answer = Answer(tuple(ids), tuple(scores), "realtime", version, self.now(), clicks)
                if complete:  # a failed batch read must not be papered over for a whole TTL
                    await self._store(key, answer)
                return answer, complete
            complete = False
        if stored is not None:
            answer = Answer(stored.item_ids, stored.scores, "batch", stored.model_version,
                            stored.generated_at, clicks)
        else:
            ids, scores = self.popular.items()
            answer = Answer(ids, scores, "popular", model_version, self.now(), clicks)
        if complete:
            await self._store(key, answer)
        return answer, complete

    async def _realtime(self, recent: list[tuple[str, int]], deadline: float) -> tuple[list[str], list[float], str] | None:
        if self.retrieval is None:
            return None
        history = history_oldest_first(recent)
        hour = self.now().hour
        got = await self._step("realtime", deadline, self.settings.realtime_timeout_ms,
                               lambda: self.retrieval.recommend(history, CACHE_DEPTH, history, hour))
        return None if got is _FAILED or got is None else got

    async def _store(self, key: str, answer: Answer) -> None:
        """Write the answer to the cache off the request path (the response does not wait for it)."""
        if self.cache is None or not self.breakers["cache"].allow():
            return
        stamped = dataclasses.replace(answer, cached_at=self.now())
        task = asyncio.ensure_future(self._store_now(key, stamped))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _store_now(self, key: str, answer: Answer) -> None:
        try:
            await asyncio.wait_for(self.cache.store(key, answer.encode(), self.settings.cache_ttl_s),
                                   self.settings.cache_timeout_ms / 1000 * 5)
            self.breakers["cache"].success()
        except Exception as exc:  # a failed cache write only costs a later recomputation
            self.breakers["cache"].failure()
            logger.debug("cache write failed: %r", exc)

    async def _step(self, name: str, deadline: float, timeout_ms: float,
                    call: Callable[[], Awaitable[T]]) -> T | object:
        """Run one dependency call inside the budget; ``_FAILED`` (and a fallback counted) when it is
        switched off, times out or raises."""
        remaining = min(timeout_ms / 1000, deadline - asyncio.get_running_loop().time())
        if remaining <= 0:  # the budget is spent: not the dependency's fault, its breaker is left alone
            self.metrics.fallbacks.labels(name, "deadline").inc()
            return _FAILED
        breaker = self.breakers[name]
        if not breaker.allow():
            self.metrics.fallbacks.labels(name, "circuit_open").inc()
            return _FAILED
        started = asyncio.get_running_loop().time()
        task = asyncio.ensure_future(call())
        try:
            # shield: this request stops waiting at its budget, the call itself runs on
            result = await asyncio.wait_for(asyncio.shield(task), remaining)
        except asyncio.CancelledError:  # the request no longer needs it (see _compute): the call runs on
            task.add_done_callback(lambda t: self._settle(name, t, started))  # and still reports to the breaker
            raise
        except asyncio.TimeoutError:
            if await _arrived(task):
                # The answer came in time, but a busy event loop ran this step's timer before the callbacks
                # that deliver it (both fall due in one loop iteration): that is the replica's lag, not the
                # dependency's, so the answer is used.
                self.metrics.late.labels(name).inc()
                breaker.success()
                return task.result()
            # Skipped for this request. Whether the DEPENDENCY is unhealthy is decided by the call's own
            # outcome: a replica whose event loop is busy misses a 10 ms budget with a healthy Redis,
            # and opening the breaker for that would send every request to the fallbacks.
            self.metrics.fallbacks.labels(name, "timeout").inc()
            task.add_done_callback(lambda t: self._settle(name, t, started))
            return _FAILED
        except Exception as exc:
            breaker.failure()
            self.metrics.fallbacks.labels(name, "error").inc()
            logger.warning("%s step failed: %s: %s", name, type(exc).__name__, exc)
            return _FAILED
        breaker.success()
        return result

    def _settle(self, name: str, task: asyncio.Future[Any], started: float) -> None:
        """The late outcome of a call a request stopped waiting for: an error, or an answer slower than
        :data:`SLOW_CALL_S`, counts against the dependency; an answer that was merely late does not."""
        breaker = self.breakers[name]
        if task.cancelled() or task.exception() is not None:
            breaker.failure()
        elif asyncio.get_running_loop().time() - started > SLOW_CALL_S:
            breaker.failure()
        else:
            breaker.success()


async def _arrived(task: asyncio.Future[Any]) -> bool:
    """Whether ``task`` has an answer once the loop has run the callbacks already due: one turn of the
    loop, so a call still waiting on its dependency is not waited for."""
    if not task.done():
        await asyncio.sleep(0)
    return task.done() and not task.cancelled() and task.exception() is None


def _as_cached(answer: Answer) -> Answer:
    return dataclasses.replace(answer, source="cache")


def _miss_kind(cached: Answer | None, recent: Sequence[tuple[str, int]], cache_ok: bool) -> str:
    if not cache_ok:
        return "error"
    if cached is not None and newest_click_ms(recent) > cached.clicks_ms:
        return "outdated"
    return "miss"
