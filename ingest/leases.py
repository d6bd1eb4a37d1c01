"""Lease decisions, the heart of the KCL model, as pure functions.

A lease is one shard's row in the lease table: who owns it, a counter the owner bumps on every renewal,
the checkpoint, and the shard's parents. Expiry is judged the way the KCL does it, by watching the
counter with the local monotonic clock (a lease whose counter has not moved for ``lease_duration`` is
expired), so workers never compare wall clocks with each other.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

TRIM_HORIZON = "TRIM_HORIZON"
SHARD_END = "SHARD_END"


@dataclass(frozen=True)
class Lease:
    shard_id: str
    owner: str | None = None
    counter: int = 0
    checkpoint: str = TRIM_HORIZON
    parents: tuple[str, ...] = ()
    # A batch whose files may have been written but not yet checkpointed: (first_seq, last_seq).
    pending: tuple[str, str] | None = None

    @property
    def finished(self) -> bool:
        return self.checkpoint == SHARD_END


def read_start(lease: Lease) -> tuple[str, str | None]:
    """Where a new owner starts reading (shard iterator type, sequence number): at the first record of
    a pending batch (to rewrite exactly its files), else after the checkpoint, else the oldest record."""
    if lease.pending is not None:
        return "AT_SEQUENCE_NUMBER", lease.pending[0]
    if lease.checkpoint == TRIM_HORIZON:
        return "TRIM_HORIZON", None
    return "AFTER_SEQUENCE_NUMBER", lease.checkpoint


@dataclass
class ExpiryTracker:
    """Remembers when each lease's counter or owner was last seen to change (local monotonic time)."""

    duration: float
    # shard id -> (counter, owner, when this counter/owner was first seen)
    _seen: dict[str, tuple[int, str | None, float]] = field(default_factory=dict)

    def observe(self, leases: list[Lease], now: float) -> set[str]:
        """Record this scan; return the ids of expired leases (owned, counter unchanged too long)."""
        expired = set()
        for lease in leases:
            prev = self._seen.get(lease.shard_id)
            if prev is None or prev[0] != lease.counter or prev[1] != lease.owner:
                # A lease seen for the first time gets a full duration before it can expire.
                self._seen[lease.shard_id] = (lease.counter, lease.owner, now)
            elif lease.owner is not None and now - prev[2] >= self.duration:
                expired.add(lease.shard_id)
        return expired


def eligible(leases: list[Lease]) -> list[Lease]:
    """Leases that may be processed now: not finished, and every parent has reached SHARD_END.

    A parent missing from the table (trimmed from the stream and cleaned up) counts as finished.
    """
    by_id = {lease.shard_id: lease for lease in leases}
    return [
        lease for lease in leases
        if not lease.finished and all(by_id[p].finished for p in lease.parents if p in by_id)
    ]


@dataclass(frozen=True)
class TakePlan:
    take: tuple[str, ...] = ()
    steal: str | None = None


def plan_takes(worker_id: str, leases: list[Lease], expired: set[str], rng: random.Random | None = None,
               held: set[str] | None = None) -> TakePlan:
    """Which leases ``worker_id`` should acquire to reach its fair share.

    Fair share = ceil(eligible leases / live workers). Free or expired leases are taken first; only when
    none are left does the worker steal one lease from the most loaded worker, and only if that worker
    is above the fair share (or at it while we need more than one), so leases converge without churn.

    ``held`` is what this worker is actually processing (default: every lease in its name). A lease in
    our name that we do not hold is an orphan of an earlier process with the same worker id (a pod
    restarted under a fixed id): it is taken back like a free lease, replaying its pending range.
    """
    rng = rng or random.Random()
    candidates = eligible(leases)
    if not candidates:
        return TakePlan()
    held = {l.shard_id for l in candidates if l.owner == worker_id} if held is None else held
    orphans = {l.shard_id for l in candidates if l.owner == worker_id and l.shard_id not in held}
    live = Counter(l.owner for l in candidates
                   if l.owner is not None and l.shard_id not in expired and l.shard_id not in orphans)
    workers = set(live) | {worker_id}
    target = math.ceil(len(candidates) / len(workers))
    need = target - live.get(worker_id, 0)
    if need <= 0:
        return TakePlan()
    # Our own expired leases that we hold are still ours to renew, not to take.
    free = [l.shard_id for l in candidates
            if l.owner is None or l.shard_id in orphans or (l.shard_id in expired and l.owner != worker_id)]
    if free:
        rng.shuffle(free)
        return TakePlan(take=tuple(sorted(free[:need])))
    others = [(count, owner) for owner, count in live.items() if owner != worker_id]
    if not others:
        return TakePlan()
    top_count = max(c for c, _ in others)
    most_loaded = sorted(o for c, o in others if c == top_count)[0]
    if top_count > target or (top_count == target and need > 1):
        victims = sorted(l.shard_id for l in candidates if l.owner == most_loaded and l.shard_id not in expired)
        return TakePlan(steal=rng.choice(victims))
    return TakePlan()
