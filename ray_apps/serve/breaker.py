"""A circuit breaker per dependency: after ``failures`` consecutive failures the dependency is skipped
for ``reset_s`` seconds, then one trial call decides whether it is back (half-open).

Why: a dependency that times out costs its whole timeout on every request; skipping it while it is
down keeps the fallbacks inside the request's deadline. Pure state and an injected clock, so the tests
drive it with a table of events and no sleeps. Not thread-safe by design: each Serve replica runs its
handlers on one asyncio event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum


class State(str, Enum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


@dataclass
class CircuitBreaker:
    name: str
    failures: int = 5
    reset_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _consecutive: int = field(default=0, init=False)
    _opened_at: float | None = field(default=None, init=False)
    _trial_running: bool = field(default=False, init=False)

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return State.closed
        if self.clock() - self._opened_at >= self.reset_s:
            return State.half_open
        return State.open

    def allow(self) -> bool:
        """May a call go out now? In half-open state exactly one trial call is let through."""
        state = self.state
        if state is State.closed:
            return True
        if state is State.half_open and not self._trial_running:
            self._trial_running = True
            return True
        return False

    def success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._trial_running = False

    def failure(self) -> None:
        self._consecutive += 1
        if self._trial_running or self._consecutive >= self.failures:
            self._opened_at = self.clock()  # (re)open: a failed trial waits a whole reset period again
        self._trial_running = False
