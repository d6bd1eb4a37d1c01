"""The PipelineRun state machine, pure: (spec, status, what the controller observed, now) → a Decision.

:func:`decide` is the whole policy of the controller; :mod:`operators.controller` only observes (child
objects, result files), applies the decision's status, performs its actions and feeds their outcomes
back. Being pure, every transition is tested with a table of cases (tests/unit/test_reconcile.py).

The rules
---------
- Stages run in pipeline order, one at a time. A stage not in ``spec.stages`` is ``Skipped``.
- A stage whose result file exists is done, whoever ran it (a child, the controller, or ``streamrec
  pipeline run`` in local mode): it is marked ``Succeeded`` (``Skipped`` if the stage said it had
  nothing to do) without creating anything, and a child still running for it is deleted.
- Starting an attempt records it in the status first (``attempts``, ``children``), then creates the
  children, whose names are deterministic (run, stage, attempt, ETL job): a controller that stopped
  in between finds the child, or creates the one it recorded, never a second one.
- ``etl`` runs its three jobs (clean, features, keys) one after the other, each a child; when the last
  one completes, its outputs are read from the lake (:class:`ReadResult`). ``train`` and ``score`` are
  one RayJob each, which writes the stage's result file. ``sync`` and ``promote`` run in the
  controller (:class:`RunInProcess`); one found ``Running`` at the start of a step was interrupted (the
  controller stopped), which counts as a failed attempt.
- A failed attempt is retried after ``retry_delay_s * 2**(attempt-1)`` (``retryAt``), as a new child;
  after ``max_attempts`` attempts, or at once when the stage refused its input, the stage and the run
  are ``Failed`` for good.
- Conditions: ``Ready`` (True once every stage is done), ``Progressing`` (True while the run works or
  waits to retry), ``Failed`` (True with the reason: InvalidSpec, StageRefused, AttemptsExhausted).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from operators.children import (
    ETL_JOBS,
    FAILED,
    IN_PROCESS_STAGES,
    MISSING,
    RAY_STAGES,
    SUCCEEDED,
    ChildRef,
    ChildState,
    stage_children,
)
from operators.pipeline import STAGES, RunSpec, StageResult
from streamrec.settings import PipelineSettings

# Run phases and stage states (the CRD's enums).
PENDING, RUNNING_, SUCCEEDED_, FAILED_, SKIPPED = "Pending", "Running", "Succeeded", "Failed", "Skipped"
TERMINAL_PHASES = (SUCCEEDED_, FAILED_)
DONE_STATES = (SUCCEEDED_, SKIPPED)

READY, PROGRESSING, FAILED_CONDITION = "Ready", "Progressing", "Failed"
# Reasons of the Failed condition.
INVALID_SPEC, STAGE_REFUSED, ATTEMPTS_EXHAUSTED = "InvalidSpec", "StageRefused", "AttemptsExhausted"


# --------------------------------------------------------------------------- observations and actions


@dataclass(frozen=True)
class Failure:
    """An attempt's failure seen by the controller itself (an in-process stage raised, or the ETL's
    outputs could not be read); ``permanent`` when retrying cannot help (StageRefused)."""

    message: str
    permanent: bool = False


@dataclass(frozen=True)
class Observation:
    """What the controller saw for one run: its name and generation, the result files found (by
    stage), the state of the children :func:`observation_plan` asked for (by name), and the failures
    of what it just ran."""

    run_name: str
    generation: int | None = None
    results: Mapping[str, StageResult] = field(default_factory=dict)
    children: Mapping[str, ChildState] = field(default_factory=dict)
    failures: Mapping[str, Failure] = field(default_factory=dict)


@dataclass(frozen=True)
class CreateChild:
    """Create this child unless it exists (GET by name, then POST; a 409 counts as found)."""

    child: ChildRef


@dataclass(frozen=True)
class DeleteChild:
    """Delete (Kubernetes) or cancel (EMR) this child; gone already is fine."""

    child: ChildRef
    reason: str


@dataclass(frozen=True)
class RunInProcess:
    """Run the stage function here, then write its result file (sync, promote)."""

    stage: str


@dataclass(frozen=True)
class ReadResult:
    """Derive the stage's result from what its children wrote to the lake, and write its result file
    (the ETL: its jobs' run summaries)."""

    stage: str


@dataclass(frozen=True)
class Wait:
    """Nothing to do until a child changes (poll again) or until ``seconds`` from now (a retry)."""

    seconds: float | None
    reason: str


Action = CreateChild | DeleteChild | RunInProcess | ReadResult | Wait


@dataclass(frozen=True)
class Event:
    """A Kubernetes event to post on the run (``kubectl describe prun``)."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    status: dict[str, Any]
    patch: dict[str, Any]
    actions: tuple[Action, ...] = ()
    events: tuple[Event, ...] = ()
    # A stage failed (or waits for its retry): reconcile again in this many seconds.
    retry_in: float | None = None
    # The run failed for good: the reason (also in the Failed condition).
    failed: str | None = None

    @property
    def phase(self) -> str:
        return str(self.status.get("phase", PENDING))

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL_PHASES


@dataclass(frozen=True)
class ObservationPlan:
    """What to look at before deciding: result files (by stage) and children."""

    results: tuple[str, ...]
    children: tuple[ChildRef, ...]


# --------------------------------------------------------------------------- time


def timestamp(when: datetime, *, millis: bool = False) -> str:
    """RFC 3339 in UTC with a Z, as Kubernetes writes it (milliseconds for retryAt)."""
    text = when.astimezone(UTC).isoformat(timespec="milliseconds" if millis else "seconds")
    return text.replace("+00:00", "Z")


def parse_timestamp(text: str) -> datetime:
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def retry_delay(settings: PipelineSettings, attempt: int) -> float:
    """Seconds before the attempt after ``attempt`` (the first retry waits ``retry_delay_s``)."""
    return float(settings.retry_delay_s) * 2 ** (attempt - 1)


# --------------------------------------------------------------------------- planning observations


def _attempt_children(run_name: str, stage: str, entry: Mapping[str, Any], backend: str) -> list[ChildRef]:
    return stage_children(run_name, stage, int(entry.get("attempts", 0)), backend)


def current_etl_child(run_name: str, entry: Mapping[str, Any], backend: str) -> ChildRef:
    """The ETL job the current attempt is at: the last one it recorded (earlier ones completed
    before it was created), else the first."""
    expected = _attempt_children(run_name, "etl", entry, backend)
    recorded = set(entry.get("children") or ())
    current = expected[0]
    for child in expected:
        if child.name in recorded:
            current = child
    return current


def observation_plan(spec: RunSpec, status: Mapping[str, Any], run_name: str,
                     settings: PipelineSettings) -> ObservationPlan:
    """The result files and children :func:`decide` needs: the results of every requested stage not
    done yet, and the current child of the stage that runs (children before results: a child seen
    succeeded has written its result before)."""
    if status.get("phase") in TERMINAL_PHASES:
        return ObservationPlan((), ())
    stages = status.get("stages") or {}
    results = tuple(s for s in spec.stages if (stages.get(s) or {}).get("state") not in DONE_STATES)
    children: list[ChildRef] = []
    for stage in spec.stages:
        entry = stages.get(stage) or {}
        if entry.get("state") != RUNNING_:
            continue
        if stage == "etl":
            children.append(current_etl_child(run_name, entry, settings.etl_backend))
        elif stage in RAY_STAGES:
            children.extend(_attempt_children(run_name, stage, entry, settings.etl_backend))
    return ObservationPlan(results, tuple(children))


def cleanup_children(spec: RunSpec | None, status: Mapping[str, Any], run_name: str,
                     settings: PipelineSettings) -> list[ChildRef]:
    """Every child the run may have created, for its deletion: each attempt's children of each stage
    (including ones it recorded but may not have created)."""
    out: list[ChildRef] = []
    for stage, entry in (status.get("stages") or {}).items():
        if stage not in STAGES or stage in IN_PROCESS_STAGES:
            continue
        recorded = set((entry or {}).get("children") or ())
        for attempt in range(1, int((entry or {}).get("attempts", 0)) + 1):
            for child in stage_children(run_name, stage, attempt, settings.etl_backend):
                if child.name in recorded:
                    out.append(child)
    return out


# --------------------------------------------------------------------------- the state machine


def decide(spec: RunSpec, status: Mapping[str, Any], observed: Observation, now: datetime,
           settings: PipelineSettings) -> Decision:
    """The next status and actions of a run (see the module docstring for the rules)."""
    old = dict(status or {})
    if old.get("phase") in TERMINAL_PHASES:
        return Decision(copy.deepcopy(old), {})
    step = _Step(spec, observed, now, settings, _initial(old, spec))
    step.run()
    new = step.status
    new["observedGeneration"] = observed.generation if observed.generation is not None else new.get(
        "observedGeneration")
    new = _clean(new)
    _set_conditions(new, now, step.failed_reason, step.failed)
    return Decision(new, merge_patch(old, new), tuple(step.actions), tuple(step.events), step.retry_in,
                    step.failed)


def invalid(status: Mapping[str, Any], message: str, now: datetime,
            generation: int | None = None) -> Decision:
    """The run cannot start: its spec (or the settings it names) is wrong. Fails it for good."""
    old = dict(status or {})
    if old.get("phase") in TERMINAL_PHASES:
        return Decision(copy.deepcopy(old), {})
    new = copy.deepcopy(old)
    new["phase"] = FAILED_
    if generation is not None:
        new["observedGeneration"] = generation
    _set_conditions(new, now, INVALID_SPEC, message)
    return Decision(new, merge_patch(old, new), (), (Event("Warning", INVALID_SPEC, message),), None, message)


def _initial(status: Mapping[str, Any], spec: RunSpec) -> dict[str, Any]:
    new = copy.deepcopy(dict(status))
    stages = new.setdefault("stages", {})
    for stage in STAGES:
        if stage not in stages:
            stages[stage] = ({"state": PENDING, "attempts": 0} if stage in spec.stages else
                             {"state": SKIPPED, "attempts": 0, "message": "not requested (spec.stages)"})
    new["phase"] = RUNNING_
    return new


class _Step:
    """One decision, stage by stage (a class only to share its accumulators)."""

    def __init__(self, spec: RunSpec, observed: Observation, now: datetime, settings: PipelineSettings,
                 status: dict[str, Any]) -> None:
        self.spec, self.observed, self.now, self.settings, self.status = spec, observed, now, settings, status
        self.actions: list[Action] = []
        self.events: list[Event] = []
        self.retry_in: float | None = None
        self.failed: str | None = None
        self.failed_reason: str | None = None

    # -- the walk over the stages

    def run(self) -> None:
        stages = self.status["stages"]
        for stage in STAGES:
            entry = stages[stage]
            if entry["state"] in DONE_STATES:
                continue
            self.status["currentStage"] = stage
            if entry["state"] == FAILED_:  # a run is failed with its stage; defensive
                self._fail_run(stage, entry, entry.get("message", "failed"), ATTEMPTS_EXHAUSTED)
                return
            result = self.observed.results.get(stage)
            if result is not None:
                self._finish(stage, entry, result)
                continue
            failure = self.observed.failures.get(stage)
            if failure is None and entry["state"] == RUNNING_:
                failure = self._poll(stage, entry)
            if failure is not None:
                self._attempt_failed(stage, entry, failure)
                return
            if entry["state"] == PENDING:
                retry_at = entry.get("retryAt")
                if retry_at and self.now < parse_timestamp(retry_at):
                    wait = (parse_timestamp(retry_at) - self.now).total_seconds()
                    next_attempt = int(entry.get("attempts", 0)) + 1
                    self.actions.append(Wait(wait, f"stage {stage}: attempt {next_attempt} at {retry_at}"))
                    self.retry_in = wait
                    return
                self._start(stage, entry)
            return
        self.status["phase"] = SUCCEEDED_
        self.events.append(Event("Normal", "Succeeded", _summary(self.status)))

    # -- transitions

    def _of(self, attempt: int) -> str:
        return f"attempt {attempt}/{self.settings.max_attempts}"

    def _start(self, stage: str, entry: dict[str, Any]) -> None:
        attempt = int(entry.get("attempts", 0)) + 1
        entry.update(state=RUNNING_, attempts=attempt)
        entry.setdefault("startedAt", timestamp(self.now))
        entry.pop("retryAt", None)
        entry.pop("finishedAt", None)
        of = self._of(attempt)
        if stage in IN_PROCESS_STAGES:
            self.actions.append(RunInProcess(stage))
            entry["message"] = f"{of}: running in the controller"
        else:
            child = stage_children(self.observed.run_name, stage, attempt, self.settings.etl_backend)[0]
            self._create(entry, child)
            entry["message"] = f"{of}: {child.kind} {child.name}"
        self.events.append(Event("Normal", "StageStarted", f"stage {stage} {entry['message']}"))

    def _create(self, entry: dict[str, Any], child: ChildRef) -> None:
        recorded = list(entry.get("children") or [])
        if child.name not in recorded:
            recorded.append(child.name)
        entry["children"] = recorded
        self.actions.append(CreateChild(child))

    def _poll(self, stage: str, entry: dict[str, Any]) -> Failure | None:
        """A running stage: what its child says (None while it runs; the next action is recorded)."""
        if stage in IN_PROCESS_STAGES:
            # Nothing ran it in this step (its outcome would be observed): the controller stopped
            # while it ran.
            return Failure("interrupted: the controller stopped while the stage ran in it")
        backend = self.settings.etl_backend
        if stage == "etl":
            child = current_etl_child(self.observed.run_name, entry, backend)
        else:
            child = _attempt_children(self.observed.run_name, stage, entry, backend)[0]
        state = self.observed.children.get(child.name, ChildState(MISSING))
        if state.phase == MISSING:
            # Recorded, but not there: created by nobody yet (the controller stopped in between) or
            # deleted by someone. The same name again, so never a second one.
            self._create(entry, child)
            return None
        if state.phase == FAILED:
            return Failure(state.message, permanent=state.permanent)
        if state.phase == SUCCEEDED:
            if stage != "etl":
                return Failure(f"{state.message} but wrote no result file for the stage")
            index = ETL_JOBS.index(child.job)
            if index + 1 < len(ETL_JOBS):
                following = stage_children(self.observed.run_name, "etl", child.attempt, backend)[index + 1]
                self._create(entry, following)
                entry["message"] = f"{self._of(child.attempt)}: {following.kind} {following.name}"
                self.events.append(Event("Normal", "EtlJobStarted",
                                         f"{state.message}; started {following.name}"))
            else:
                entry["message"] = f"{self._of(child.attempt)}: {state.message}; reading the ETL outputs"
                self.actions.append(ReadResult(stage))
            return None
        entry["message"] = f"{self._of(child.attempt)}: {state.message}"
        self.actions.append(Wait(None, state.message))
        return None

    def _finish(self, stage: str, entry: dict[str, Any], result: StageResult) -> None:
        for child in self._active_children(stage, entry):
            self.actions.append(DeleteChild(child, f"stage {stage} is done: {result.message}"))
        entry.update(state=SKIPPED if result.skipped else SUCCEEDED_, message=result.message,
                     outputs=dict(result.outputs))
        entry.setdefault("startedAt", timestamp(self.now))
        entry["finishedAt"] = timestamp(self.now)
        entry.pop("retryAt", None)
        if stage == "train":
            version = result.outputs.get("version")
            if version:
                self.status["modelVersion"] = str(version)
            gate = result.outputs.get("gate")
            if isinstance(gate, Mapping):
                self.status["gate"] = dict(gate)
        if stage == "sync":
            from operators.stages import synced_counts

            self.status["synced"] = synced_counts({"sync": result})
        verb = "skipped" if result.skipped else "succeeded"
        self.events.append(Event("Normal", f"Stage{verb.capitalize()}",
                                 f"stage {stage} {verb}: {result.message}"))

    def _active_children(self, stage: str, entry: Mapping[str, Any]) -> list[ChildRef]:
        if entry.get("state") != RUNNING_:
            return []
        candidates = _attempt_children(self.observed.run_name, stage, entry, self.settings.etl_backend)
        return [c for c in candidates
                if self.observed.children.get(c.name, ChildState(MISSING)).active]

    def _attempt_failed(self, stage: str, entry: dict[str, Any], failure: Failure) -> None:
        attempt = int(entry.get("attempts", 0)) or 1
        limit = self.settings.max_attempts
        if failure.permanent or attempt >= limit:
            why = "refused" if failure.permanent else f"attempt {attempt}/{limit} failed"
            entry["message"] = f"{why}: {failure.message}"
            reason = STAGE_REFUSED if failure.permanent else ATTEMPTS_EXHAUSTED
            self._fail_run(stage, entry, failure.message, reason)
            return
        delay = retry_delay(self.settings, attempt)
        retry_at = timestamp(self.now + timedelta(seconds=delay), millis=True)
        message = f"attempt {attempt}/{limit} failed: {failure.message}; attempt {attempt + 1} at {retry_at}"
        entry.update(state=PENDING, retryAt=retry_at, message=message)
        self.retry_in = delay
        self.events.append(Event("Warning", "StageRetrying", f"stage {stage} {entry['message']}"))

    def _fail_run(self, stage: str, entry: dict[str, Any], message: str, reason: str) -> None:
        entry["state"] = FAILED_
        entry["finishedAt"] = timestamp(self.now)
        entry.pop("retryAt", None)
        attempts = int(entry.get("attempts", 0))
        self.status["phase"] = FAILED_
        self.failed_reason = reason
        self.failed = (f"stage {stage} refused: {message}" if reason == STAGE_REFUSED else
                       f"stage {stage} failed after {attempts} attempt(s): {message}")
        self.events.append(Event("Warning", "StageFailed", self.failed))


# --------------------------------------------------------------------------- conditions and patches


def _summary(status: Mapping[str, Any]) -> str:
    parts = []
    if status.get("modelVersion"):
        gate = status.get("gate") or {}
        verdict = "" if "promote" not in gate else (
            " (promoted)" if gate.get("promote") else " (not promoted)")
        parts.append(f"model {status['modelVersion']}{verdict}")
    synced = status.get("synced") or {}
    if synced:
        parts.append(f"{sum(synced.values()):,} items/rows synced")
    done = [s for s, e in (status.get("stages") or {}).items() if e.get("state") == SUCCEEDED_]
    text = "all stages done" + (f" ({', '.join(done)})" if done else "")
    return text + ("; " + "; ".join(parts) if parts else "")


def _set_conditions(status: dict[str, Any], now: datetime, failed_reason: str | None,
                    failed: str | None) -> None:
    phase = status.get("phase")
    stage = status.get("currentStage")
    entry = (status.get("stages") or {}).get(stage) or {}
    if phase == SUCCEEDED_:
        message = _summary(status)
        wanted = [(READY, "True", "Succeeded", message), (PROGRESSING, "False", "Succeeded", message),
                  (FAILED_CONDITION, "False", "Succeeded", message)]
    elif phase == FAILED_:
        reason = failed_reason or _condition(status, FAILED_CONDITION).get("reason") or ATTEMPTS_EXHAUSTED
        message = (failed or _condition(status, FAILED_CONDITION).get("message")
                   or entry.get("message", "failed"))
        wanted = [(READY, "False", reason, message), (PROGRESSING, "False", reason, message),
                  (FAILED_CONDITION, "True", reason, message)]
    else:
        waiting = entry.get("state") == PENDING and entry.get("retryAt")
        reason = "RetryScheduled" if waiting else "StageRunning"
        message = f"stage {stage}: {entry.get('message', 'starting')}" if stage else "starting"
        wanted = [(READY, "False", reason, message), (PROGRESSING, "True", reason, message),
                  (FAILED_CONDITION, "False", reason, message)]
    conditions = [dict(c) for c in status.get("conditions") or []]
    for kind, value, reason, message in wanted:
        current = next((c for c in conditions if c.get("type") == kind), None)
        if current is None:
            current = {"type": kind}
            conditions.append(current)
        changed = current.get("status") != value or "lastTransitionTime" not in current
        since = timestamp(now) if changed else current["lastTransitionTime"]
        current.clear()
        current.update(type=kind, status=value, reason=reason, message=message[:1024],
                       lastTransitionTime=since)
    order = {READY: 0, PROGRESSING: 1, FAILED_CONDITION: 2}
    status["conditions"] = sorted(conditions, key=lambda c: order.get(c.get("type", ""), 9))


def _condition(status: Mapping[str, Any], kind: str) -> dict[str, Any]:
    return next((dict(c) for c in status.get("conditions") or [] if c.get("type") == kind), {})


def condition(status: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The condition of this type in ``status`` ({} if none)."""
    return _condition(status, kind)


def _clean(value: Any) -> Any:
    """Without None values: a merge patch reads null as "delete", and the API server drops them."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value if v is not None]
    return value


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new`` (nested objects merged, lists and
    scalars replaced, removed keys set to null); {} when they are equal."""
    patch: dict[str, Any] = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif key not in old or before != value:
            patch[key] = copy.deepcopy(value)
    return patch


__all__ = [
    "ATTEMPTS_EXHAUSTED", "Action", "CreateChild", "Decision", "DeleteChild", "Event", "Failure",
    "INVALID_SPEC", "Observation", "ObservationPlan", "ReadResult", "RunInProcess", "STAGE_REFUSED",
    "TERMINAL_PHASES", "Wait", "cleanup_children", "condition", "current_etl_child", "decide", "invalid",
    "merge_patch", "observation_plan",
    "parse_timestamp", "retry_delay", "timestamp",
]
