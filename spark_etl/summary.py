"""Run summaries and data-quality checks (pure: no Spark here).

Every job writes ``_run_summary.json`` next to its output: rows in and out per step, rows removed by
reason, step durations and the result of each data-quality check. The next day's run reads it as the
baseline of the row-count check. A failed run writes ``_run_summary.failed.json`` instead, so the
last good summary (and the output it describes) stays in place.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Iterator
from contextlib import contextmanager

SUMMARY_NAME = "_run_summary.json"
FAILED_SUMMARY_NAME = "_run_summary.failed.json"
SUMMARY_FORMAT = "streamrec-etl-run/1"


class DataQualityError(RuntimeError):
    """A data-quality check failed: the job wrote no output. The message names the check and the data."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"data-quality check {check!r} failed: {message}")
        self.check = check


@dataclass
class Step:
    name: str
    seconds: float
    rows_in: int | None = None
    rows_out: int | None = None


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class RunSummary:
    job: str
    region: str
    dt: str
    status: str = "running"
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    seconds: float = 0.0
    steps: list[Step] = field(default_factory=list)
    removed: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    @contextmanager
    def step(self, name: str) -> Iterator[Step]:
        """Time a step; the caller fills in its row counts."""
        record = Step(name, 0.0)
        t0 = time.perf_counter()
        try:
            yield record
        finally:
            record.seconds = round(time.perf_counter() - t0, 3)
            self.steps.append(record)

    def check(self, result: Check) -> None:
        """Record a check; raise if it failed (the caller records the failure and writes no output)."""
        self.checks.append(result)
        if not result.passed:
            raise DataQualityError(result.name, result.detail)

    def finish(self, status: str, error: str | None = None) -> None:
        self.status, self.error = status, error
        self.seconds = round(time.perf_counter() - self._t0, 3)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("_t0")
        return json.dumps({"format": SUMMARY_FORMAT, **data}, indent=2, sort_keys=False) + "\n"


def previous_outputs(summary_json: str | None) -> dict[str, int] | None:
    """Row counts of the previous successful run, or None when there is none to compare with."""
    if not summary_json:
        return None
    data = json.loads(summary_json)
    if data.get("status") != "succeeded":
        return None
    return {str(k): int(v) for k, v in data.get("outputs", {}).items()}


def row_drop_check(name: str, rows: int, previous: int | None, max_drop_share: float) -> Check:
    """Fail when ``rows`` fell by more than ``max_drop_share`` against the previous day's run."""
    if previous is None:
        return Check(f"row_drop:{name}", True, "no previous successful run to compare with")
    # Rounded so that 1 - 0.7 does not make exactly 30 of 100 rows fail; the message shows the
    # smallest row count that passes.
    floor = round(previous * (1 - max_drop_share), 9)
    detail = f"{name}: {rows} rows against {previous} the previous day (minimum {math.ceil(floor)} at a " \
             f"{max_drop_share:.0%} allowed drop)"
    return Check(f"row_drop:{name}", rows >= floor, detail)


def null_keys_check(name: str, nulls: dict[str, int]) -> Check:
    bad = {col: n for col, n in nulls.items() if n}
    if not bad:
        return Check(f"null_keys:{name}", True, f"no null {', '.join(nulls)}")
    listed = ", ".join(f"{col}: {n}" for col, n in sorted(bad.items()))
    return Check(f"null_keys:{name}", False, f"{name} has null key values ({listed})")


def schema_check(name: str, problems: list[str], where: str) -> Check:
    if not problems:
        return Check(f"schema:{name}", True, "matches the contract")
    return Check(f"schema:{name}", False, f"schema drift in {where}: " + "; ".join(problems))


def non_empty_check(name: str, rows: int, where: str) -> Check:
    return Check(f"non_empty:{name}", rows > 0, f"{rows} rows in {where}")
