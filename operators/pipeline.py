"""The daily pipeline's definition: its stages, a run's spec and identity, and where stage results live.

One definition, two executors: :mod:`operators.local` runs the stages in-process (``streamrec pipeline
run``), :mod:`operators.controller` runs them as Kubernetes children of a ``PipelineRun``. Both read
and write the same stage result files, so a stage finished by one is finished for the other, and a
rerun skips what is already done (each result file is written last, after the stage's durable
writes: it is the stage's checkpoint).

Everything here is pure: no I/O, so the rules are tested with tables of cases.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from streamrec.lake import LakeLayout

API_GROUP = "streamrec.io"
API_VERSION = "v1alpha1"
KIND = "PipelineRun"
PLURAL = "pipelineruns"

STAGES: tuple[str, ...] = ("etl", "train", "score", "sync", "promote")
# Settings sections a PipelineRun may override for itself (the CRD's spec.overrides).
OVERRIDABLE = ("train", "gate", "score", "sync")
# A backfill longer than this is almost certainly a typo in endDate.
MAX_BACKFILL_DAYS = 366
_REGION_RE = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
_DNS_LABEL_MAX = 63


class SpecError(ValueError):
    """A PipelineRun spec (or its command-line equivalent) is wrong; the message names the field."""


@dataclass(frozen=True)
class RunSpec:
    """What one pipeline run processes: a region, its day (the training cutoff) and, for a backfill,
    the first day the ETL cleans; which stages; per-run settings overrides."""

    region: str
    day: date
    start_day: date | None = None  # backfill: clean start_day..day, then the rest for day
    stages: tuple[str, ...] = STAGES
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _REGION_RE.match(self.region):
            raise SpecError(f"spec.region: {self.region!r} is not an AWS region name (e.g. us-east-1)")
        if self.start_day is not None:
            if self.start_day > self.day:
                raise SpecError(f"spec.endDate: {self.day} is before spec.date {self.start_day}")
            if (self.day - self.start_day).days >= MAX_BACKFILL_DAYS:
                raise SpecError(f"spec.endDate: a backfill spans at most {MAX_BACKFILL_DAYS} days")
        if not self.stages:
            raise SpecError("spec.stages: name at least one stage")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise SpecError(f"spec.stages: unknown stage(s) {', '.join(unknown)} (stages: {', '.join(STAGES)})")
        # Pipeline order, whatever order they were listed in, without repeats.
        object.__setattr__(self, "stages", tuple(s for s in STAGES if s in self.stages))
        bad = [k for k in self.overrides if k not in OVERRIDABLE]
        if bad:
            raise SpecError(f"spec.overrides: cannot override {', '.join(bad)} (allowed: {', '.join(OVERRIDABLE)})")

    @property
    def etl_days(self) -> list[date]:
        """The days the ETL cleans (features and keys are built for :attr:`day` only)."""
        first = self.start_day or self.day
        return [first + timedelta(days=i) for i in range((self.day - first).days + 1)]

    @property
    def run_id(self) -> str:
        """Deterministic identity of the run's work: the same region and days give the same id, so a
        recreated or retried run finds the results of the first one."""
        rid = f"{self.region}-{self.day.isoformat()}"
        return rid if self.start_day is None else f"{rid}-from-{self.start_day.isoformat()}"

    @classmethod
    def from_manifest(cls, spec: Mapping[str, Any]) -> RunSpec:
        """From a PipelineRun's ``spec`` (camelCase, as the CRD defines it)."""
        if not isinstance(spec, Mapping):
            raise SpecError("spec: expected an object")
        region = spec.get("region")
        if not isinstance(region, str):
            raise SpecError("spec.region: required (an AWS region name)")
        first = _day(spec.get("date"), "spec.date")
        end = spec.get("endDate")
        last = _day(end, "spec.endDate") if end is not None else None
        stages = spec.get("stages") or STAGES
        if not isinstance(stages, Sequence) or isinstance(stages, str):
            raise SpecError("spec.stages: expected a list of stage names")
        overrides = spec.get("overrides") or {}
        if not isinstance(overrides, Mapping) or not all(isinstance(v, Mapping) for v in overrides.values()):
            raise SpecError("spec.overrides: expected an object of settings sections")
        if last is None:
            return cls(region, first, None, tuple(stages), dict(overrides))
        return cls(region, last, first, tuple(stages), dict(overrides))

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"region": self.region}
        if self.start_day is None:
            out["date"] = self.day.isoformat()
        else:
            out["date"], out["endDate"] = self.start_day.isoformat(), self.day.isoformat()
        if self.stages != STAGES:
            out["stages"] = list(self.stages)
        if self.overrides:
            out["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        return out


def _day(value: Any, key: str) -> date:
    if not isinstance(value, str):
        raise SpecError(f"{key}: required, YYYY-MM-DD")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise SpecError(f"{key}: {value!r} is not a date (YYYY-MM-DD)") from None


def daily_run_name(region: str, day: date) -> str:
    """The name the CronJob gives the day's PipelineRun (``kubectl get prun us-east-1-2026-11-25``)."""
    return f"{region}-{day.isoformat()}"


def child_name(run_name: str, stage: str, attempt: int, part: str = "") -> str:
    """A child object's name, deterministic from the run, stage, attempt (and part, e.g. the ETL job),
    so a restarted controller finds the child it created instead of creating a second one.

    Kubernetes names are DNS labels (63 characters); a long run name is shortened with a hash suffix
    that keeps names unique."""
    suffix = "-".join(p for p in (stage, part, str(attempt)) if p)
    name = f"{run_name}-{suffix}".lower()
    if len(name) <= _DNS_LABEL_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    keep = _DNS_LABEL_MAX - len(suffix) - len(digest) - 2
    return f"{run_name[:keep].rstrip('-')}-{digest}-{suffix}".lower()


def stage_result_path(layout: LakeLayout, spec: RunSpec, stage: str) -> str:
    """Where a stage's result (its outputs, JSON) is written once the stage's work is durable."""
    return posixpath.join(layout.partition("runs", spec.region, spec.day), spec.run_id, f"{stage}.json")


def stage_refusal_path(layout: LakeLayout, spec: RunSpec, child_key: str) -> str:
    """Where a stage run as a child job (a RayJob) records that it REFUSED its input, so the controller can
    fail the run at once instead of retrying the job. ``child_key`` names one attempt of one run object
    (the run's uid and the child's name), so a record never outlives the attempt it is about."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in child_key)
    return posixpath.join(layout.partition("runs", spec.region, spec.day), spec.run_id, "refusals", f"{safe}.json")


def settings_overrides(base: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``base`` (a settings document) with each overridden section's keys replaced, one level deep
    (``{train: {epochs: 5}}`` changes only train.epochs)."""
    out = dict(base)
    for section, values in overrides.items():
        out[section] = {**dict(base.get(section) or {}), **dict(values)}
    return out


@dataclass(frozen=True)
class StageResult:
    """A finished stage: its outputs (counts, the model version, the gate decision) and a one-line
    message. ``skipped`` means the stage had nothing to do (e.g. nothing to promote)."""

    stage: str
    outputs: Mapping[str, Any]
    message: str = ""
    skipped: bool = False

    def to_json(self) -> bytes:
        return json.dumps({"stage": self.stage, "outputs": dict(self.outputs), "message": self.message,
                           "skipped": self.skipped}, sort_keys=True, default=str).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> StageResult:
        data = json.loads(raw)
        return cls(str(data["stage"]), dict(data.get("outputs") or {}), str(data.get("message") or ""),
                   bool(data.get("skipped")))


__all__ = [
    "API_GROUP", "API_VERSION", "KIND", "OVERRIDABLE", "PLURAL", "RunSpec", "STAGES", "SpecError",
    "StageResult", "child_name", "daily_run_name", "settings_overrides", "stage_refusal_path", "stage_result_path",
]
