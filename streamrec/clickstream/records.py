"""The unit every producer emits and every sink consumes, and a tally of what passed through."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

RecordKind = Literal["valid", "bot", "malformed", "duplicate"]
RECORD_KINDS: tuple[RecordKind, ...] = ("valid", "bot", "malformed", "duplicate")


@dataclass(frozen=True, slots=True)
class GeneratedRecord:
    """One record as a producer sends it.

    ``kind`` and ``reason`` are the producer's own label (never on the wire), so a test or the demo can
    account for every record the consumer accepts, dead-letters or deduplicates. ``reason`` names the
    defect of a malformed record (e.g. ``bad_uuid``) and is None otherwise.
    """

    region: str
    partition_key: str
    data: bytes
    kind: RecordKind
    reason: str | None = None


@dataclass
class RecordTally:
    """Counts of records by kind and malformed reason, filled while records stream through."""

    by_kind: Counter[str] = field(default_factory=Counter)
    malformed_reasons: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def count(self, records: Iterable[GeneratedRecord]) -> Iterator[GeneratedRecord]:
        """Pass records through unchanged, counting each one (lazily: nothing is buffered)."""
        for record in records:
            self.by_kind[record.kind] += 1
            if record.kind == "malformed":
                self.malformed_reasons[record.reason or "unknown"] += 1
            yield record


def report_progress(
    records: Iterable[GeneratedRecord], progress: Callable[[int], None], every: int = 500
) -> Iterator[GeneratedRecord]:
    """Pass records through, calling ``progress(n)`` every ``every`` records and once at the end."""
    n = 0
    for record in records:
        yield record
        n += 1
        if n == every:
            progress(n)
            n = 0
    if n:
        progress(n)
