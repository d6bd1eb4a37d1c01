"""Pure rules of the serving path: circuit breaker, cached answers, list arithmetic, DynamoDB layouts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ray_apps.serve.answers import (
    Answer, cache_key, cache_usable, clicked_since, history_oldest_first, needs_refresh, top_k,
)
from ray_apps.serve.breaker import CircuitBreaker, State
from streamrec.online_store import parse_popular_item, parse_recs_item, recs_item

pytestmark = pytest.mark.unit
T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
MS0 = int(T0.timestamp() * 1000)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# (events, expected state after them, whether a call is allowed then); f = failure, s = success,
# a = allow() taken, +N = N seconds pass. Threshold 3 failures, reset after 5 s.
BREAKER_CASES = {
    "closed at start": ("", State.closed, True),
    "two failures stay closed": ("f f", State.closed, True),
    "three failures open": ("f f f", State.open, False),
    "a success resets the count": ("f f s f f", State.closed, True),
    "open until the reset time": ("f f f +4.9", State.open, False),
    "half-open after it": ("f f f +5", State.half_open, True),
    "one trial only": ("f f f +5 a", State.half_open, False),
    "trial success closes": ("f f f +5 a s", State.closed, True),
    "trial failure reopens for a whole period": ("f f f +5 a f +4", State.open, False),
    "and half-opens again after it": ("f f f +5 a f +5", State.half_open, True),
}


@pytest.mark.parametrize("case", BREAKER_CASES, ids=list(BREAKER_CASES))
def test_circuit_breaker(case: str) -> None:
    events, state, allowed = BREAKER_CASES[case]
    clock = Clock()
    breaker = CircuitBreaker("dep", failures=3, reset_s=5, clock=clock)
    for event in events.split():
        if event == "f":
            breaker.failure()
        elif event == "s":
            breaker.success()
        elif event == "a":
            assert breaker.allow()
        else:
            clock.t += float(event[1:])
    assert breaker.state is state
    assert breaker.allow() is allowed


def answer(ids: str, clicks_ms: int = MS0, generated_at: datetime = T0) -> Answer:
    items = tuple(ids.split())
    return Answer(items, tuple(float(-i) for i in range(len(items))), "batch", "v1", generated_at, clicks_ms)


def test_cached_answer_round_trips_and_garbage_is_a_miss() -> None:
    a = answer("a b c")
    assert Answer.decode(a.encode()) == a
    for raw in (b"", b"{", b"[]", b'{"f": 99}', b'{"f": 1, "i": ["a"], "s": []}'):
        assert Answer.decode(raw) is None


def test_cache_key_holds_region_version_and_user() -> None:
    assert cache_key("eu-west-1", "v7", "u1") == "recs:eu-west-1:v7:u1"
    assert cache_key("eu-west-1", None, "u1") == "recs:eu-west-1:-:u1"


@pytest.mark.parametrize(("ids", "k", "exclude", "expected"), [
    ("a b c d", 2, "", "a b"),
    ("a b c d", 2, "a", "b c"),
    ("a b c d", 10, "b", "a c d"),
    ("a b", 2, "a b", ""),
])
def test_top_k_skips_exclusions_in_rank_order(ids: str, k: int, exclude: str, expected: str) -> None:
    got, scores = top_k(ids.split(), [float(i) for i in range(len(ids.split()))], k, exclude.split())
    assert got == tuple(expected.split())
    assert len(scores) == len(got)


# (cached answer, recent clicks as (item, ms after T0), k, exclude, usable?)
CACHE_CASES = {
    "no entry": (None, [], 2, [], False),
    "no clicks since": (answer("a b c"), [("x", 0)], 2, [], True),
    "a click after it": (answer("a b c"), [("x", 1)], 2, [], False),
    "enough left after exclusions": (answer("a b c"), [], 2, ["a"], True),
    "too few left after exclusions": (answer("a b c"), [], 3, ["a"], False),
    "short list, nothing excluded": (answer("a b"), [], 5, [], True),
}


@pytest.mark.parametrize("case", CACHE_CASES, ids=list(CACHE_CASES))
def test_cache_usable(case: str) -> None:
    cached, recent, k, exclude, usable = CACHE_CASES[case]
    assert cache_usable(cached, [(i, MS0 + d) for i, d in recent], k, exclude) is usable


def test_refresh_and_click_times() -> None:
    assert not needs_refresh(answer("a"), T0 + timedelta(seconds=300), 300)
    assert needs_refresh(answer("a"), T0 + timedelta(seconds=301), 300)
    assert clicked_since([("a", MS0 + 1)], T0)
    assert not clicked_since([("a", MS0)], T0)
    assert not clicked_since([], T0)
    assert history_oldest_first([("c", 3), ("a", 1), ("b", 2)]) == ["a", "b", "c"]


def test_recs_item_round_trip() -> None:
    item = recs_item("u1", "v1", ["a", "b"], [0.5, 0.25], "model", T0)
    got = parse_recs_item(item)
    assert (got.user_id, got.model_version, got.item_ids, got.scores, got.source, got.generated_at) == \
        ("u1", "v1", ("a", "b"), (0.5, 0.25), "model", T0)
    with pytest.raises(ValueError, match="malformed recs item"):
        parse_recs_item({**item, "scores": {"L": [{"N": "1"}]}})
    with pytest.raises(ValueError, match="malformed recs item"):
        parse_recs_item({"user_id": {"S": "u1"}})
    with pytest.raises(ValueError, match="timezone"):
        recs_item("u1", "v1", [], [], "model", datetime(2026, 1, 1))


def test_popular_item() -> None:
    item = {"pk": {"S": "popular"}, "sk": {"S": "top100"}, "item_ids": {"L": [{"S": "a"}]},
            "scores": {"L": [{"N": "3.5"}]}}
    assert parse_popular_item(item) == (("a",), (3.5,))
    with pytest.raises(ValueError, match="malformed popularity item"):
        parse_popular_item({"item_ids": {"L": []}})


def test_popular_merge_puts_live_counts_first_and_fills_from_the_daily_list() -> None:
    from ray_apps.serve.sources import merge_popular, reciprocal_rank_scores

    assert merge_popular(["x", "a"], ["a", "b", "c"], 3) == ["x", "a", "b"]
    assert merge_popular([], ["a", "b"], 5) == ["a", "b"]
    assert merge_popular(["a"], [], 5) == ["a"]
    assert reciprocal_rank_scores(3) == (1.0, 0.5, 1 / 3)
