"""The retry schedule and the rate limit every writer shares (streamrec.pacing), as tables."""

from __future__ import annotations

import random
import threading

import pytest

from streamrec.pacing import TokenBucket, backoff_delay

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(
    "retry, uniform, expected",
    [
        (0, 1.0, 0.1),
        (1, 1.0, 0.2),
        (3, 1.0, 0.8),
        (3, 0.5, 0.4),
        (9, 1.0, 5.0),  # capped
        (29, 0.25, 1.25),
        (2, 0.0, 0.0),
        (10_000, 0.5, 2.5),  # no overflow however long the loop
    ],
)
def test_backoff_is_full_jitter_exponential_with_a_cap(retry: int, uniform: float, expected: float) -> None:
    assert backoff_delay(retry, 0.1, 5.0, uniform) == pytest.approx(expected)


def test_backoff_refuses_a_negative_retry() -> None:
    with pytest.raises(ValueError, match="retry"):
        backoff_delay(-1, 0.05, 1.0, 0.5)


def test_backoff_spreads_writers_over_the_whole_window() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(4, 0.05, 5.0, rng.random()) for _ in range(1000)]
    assert all(0 <= d < 0.8 for d in delays)
    # Full jitter: the draws cover [0, 0.8), not a band near the ceiling.
    assert min(delays) < 0.05 and max(delays) > 0.75
    assert len({round(d, 6) for d in delays}) > 990


# --------------------------------------------------------------------------- token bucket


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(
    "rate, reservations, waits",
    [
        # (seconds since start, n) → seconds to wait; a burst of ``rate`` is free, the rest paid in time.
        (100.0, [(0.0, 100), (0.0, 50)], [0.0, 0.5]),
        (100.0, [(0.0, 100), (1.0, 100)], [0.0, 0.0]),
        (100.0, [(0.0, 100), (0.5, 100)], [0.0, 0.5]),
        (10.0, [(0.0, 500)], [49.0]),  # larger than the burst: wait for the deficit, not refused
        (10.0, [(0.0, 10), (0.0, 10), (1.0, 10)], [0.0, 1.0, 1.0]),  # debt carries over
        (100.0, [(100.0, 100), (100.0, 100)], [0.0, 1.0]),  # idle time banks no more than the burst
    ],
)
def test_default_burst_is_one_second_of_rate(
    rate: float, reservations: list[tuple[float, int]], waits: list[float]
) -> None:
    clock = Clock()
    start = clock.t
    bucket = TokenBucket(rate, clock=clock)
    got = []
    for at, n in reservations:
        clock.t = start + at
        got.append(bucket.reserve(n))
    assert got == pytest.approx(waits)


def test_bucket_lets_the_burst_through_then_paces_at_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(100, 50, clock=clock)
    assert bucket.reserve(25) == 0 and bucket.reserve(25) == 0  # the burst
    assert bucket.reserve(25) == pytest.approx(0.25)  # 25 items at 100/s
    assert bucket.reserve(25) == pytest.approx(0.50)  # queued behind the previous reservation
    clock.t += 0.5
    assert bucket.reserve(25) == pytest.approx(0.25)
    clock.t += 10  # idle time refills only up to the burst
    assert bucket.reserve(50) == 0
    assert bucket.reserve(1) == pytest.approx(0.01)


def test_bucket_rate_bound_over_a_window() -> None:
    """Callers that sleep what reserve() says send at most burst + rate * T items in T seconds."""
    clock = Clock()
    bucket = TokenBucket(200, 25, clock=clock)
    start, sent = clock.t, 0
    for _ in range(200):
        clock.t += bucket.reserve(25)
        sent += 25
        assert sent <= 25 + 200 * (clock.t - start) + 1e-6
    assert clock.t - start == pytest.approx((sent - 25) / 200)


def test_bucket_reservations_from_many_threads_add_up() -> None:
    """Writer threads share one bucket: every token taken is accounted for, none twice."""
    clock = Clock()
    bucket = TokenBucket(100, 100, clock=clock)
    waits: list[float] = []
    lock = threading.Lock()

    def writer() -> None:
        for _ in range(50):
            wait = bucket.reserve(1)
            with lock:
                waits.append(wait)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 400 tokens at a frozen clock: 100 free, then 300 in debt, one each 10 ms.
    assert sorted(waits) == pytest.approx([0.0] * 100 + [i / 100 for i in range(1, 301)])


def test_bucket_limits() -> None:
    assert TokenBucket(0).reserve(10**9) == 0  # rate 0: unlimited
    assert TokenBucket(1000).burst == 1000 and TokenBucket(0.5).burst == 1.0
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(-1)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(10, 0)
