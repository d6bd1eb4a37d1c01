"""How fast writers may go: full-jitter exponential backoff between retries, and a token bucket for a
steady rate. Shared by the clickstream publisher (Kinesis PutRecords), the DynamoDB sync writers and
the consumer's Redis retries, so that every retry loop in the project follows one schedule."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def backoff_delay(retry: int, base_s: float, cap_s: float, uniform: float) -> float:
    """Seconds to wait before retry number ``retry`` (0 = the first retry).

    "Full jitter" (AWS Architecture Blog, *Exponential Backoff and Jitter*): ``uniform`` (a draw in
    [0, 1)) times min(cap_s, base_s * 2**retry), so writers throttled together spread out instead of
    retrying in lockstep. The exponent is bounded, so a very long retry loop cannot overflow."""
    if retry < 0:
        raise ValueError("retry must be >= 0")
    return uniform * min(cap_s, base_s * 2.0 ** min(retry, 62))


class TokenBucket:
    """``rate`` units a second, at most ``burst`` at once (default: one second's worth, at least 1).

    :meth:`reserve` takes ``n`` tokens and returns how long the caller must wait before sending them.
    The bucket may go into debt, so a request larger than the burst still goes through (paid for by
    waiting), callers are served in arrival order, and the long-run rate is exactly ``rate`` whatever
    the request sizes: over any T seconds, callers that sleep what it says send at most
    ``burst + rate * T``. ``rate`` 0 means unlimited. Thread-safe; ``clock`` is injectable for tests."""

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate, 1.0))
        if self.burst <= 0:
            raise ValueError("burst must be > 0")
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = threading.Lock()

    def reserve(self, n: int) -> float:
        if self.rate == 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


__all__ = ["TokenBucket", "backoff_delay"]
