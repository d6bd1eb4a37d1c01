"""The PipelineRun state machine (operators/reconcile.py): every transition as a table of cases.

``decide`` is pure, so each case is a status before, what the controller observed, and what must come
out: the stage states, the actions, the retry delay or the failure. Every status it produces must be
valid for the CRD's status schema (checked with jsonschema, unknown fields refused).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from operators.children import ChildState
from operators.pipeline import STAGES, RunSpec, StageResult
from operators.reconcile import (
    CreateChild,
    Decision,
    DeleteChild,
    Failure,
    Observation,
    ReadResult,
    RunInProcess,
    Wait,
    cleanup_children,
    condition,
    decide,
    invalid,
    merge_patch,
    observation_plan,
    retry_delay,
    timestamp,
)
from streamrec.settings import PipelineSettings

CRD = Path(__file__).resolve().parents[2] / "charts/streamrec/crds/pipelineruns.streamrec.io.yaml"
RUN = "us-east-1-2026-11-25"
NOW = datetime(2026, 11, 26, 3, 0, 0, tzinfo=UTC)
EARLIER = "2026-11-26T02:00:00Z"
SPEC = RunSpec.from_manifest({"region": "us-east-1", "date": "2026-11-25"})
SETTINGS = PipelineSettings(etl_backend="spark-operator", max_attempts=3, retry_delay_s=60,
                            poll_interval_s=30)


# --------------------------------------------------------------------------- helpers


def _strict(schema: Any) -> Any:
    """The schema with additionalProperties: false on every object that lists its properties and
    does not preserve unknown fields (what the API server's pruning would silently drop)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def status_validator() -> jsonschema.Draft4Validator:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    return jsonschema.Draft4Validator(_strict(schema),
                                      format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)


VALIDATOR = status_validator()


def assert_valid(status: Mapping[str, Any]) -> None:
    errors = sorted(VALIDATOR.iter_errors(status), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies a status patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out


def child(stage: str, attempt: int = 1, job: str = "") -> str:
    return f"{RUN}-{stage}{'-' + job if job else ''}-{attempt}"


DONE = {"state": "Succeeded", "attempts": 1, "startedAt": EARLIER, "finishedAt": EARLIER}


def running(attempt: int = 1, children: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    return {"state": "Running", "attempts": attempt, "startedAt": EARLIER, "children": list(children),
            **extra}


def pending(attempts: int = 0, **extra: Any) -> dict[str, Any]:
    return {"state": "Pending", "attempts": attempts, **extra}


def st(**stages: dict[str, Any]) -> dict[str, Any]:
    """A running run's status: the given stages, the others Pending."""
    return {"phase": "Running", "stages": {s: stages.get(s, pending()) for s in STAGES}}


def result(stage: str, skipped: bool = False, **outputs: Any) -> StageResult:
    return StageResult(stage, outputs, f"{stage} done", skipped)


TRAIN_OUTPUTS = {"version": "v20261125-1", "gate": {"promote": True, "reason": "lift 12% over popular",
                                                      "metric": "recall_at_20", "promoted": None}}
SYNC_OUTPUTS = {"dynamodb_keys": {"items_written": 90, "items_skipped": 10},
                "dynamodb_recs": {"items_written": 50, "items_skipped": 0},
                "warehouse": {"rows": {"events": 1000, "recs": 50}}, "version": "v20261125-1"}


def render(action: Any) -> str:
    if isinstance(action, CreateChild):
        return f"create {action.child.kind} {action.child.name}"
    if isinstance(action, DeleteChild):
        return f"delete {action.child.kind} {action.child.name}"
    if isinstance(action, RunInProcess):
        return f"run {action.stage}"
    if isinstance(action, ReadResult):
        return f"read {action.stage}"
    if isinstance(action, Wait):
        return "wait"
    raise AssertionError(action)


def run_decide(status: Mapping[str, Any], *, results: Mapping[str, StageResult] | None = None,
               children: Mapping[str, str | ChildState] | None = None, failures: Mapping[str, Failure] | None = None,
               spec: RunSpec = SPEC, settings: PipelineSettings = SETTINGS, now: datetime = NOW) -> Decision:
    states = {name: phase if isinstance(phase, ChildState) else ChildState(phase, f"{name} is {phase}")
              for name, phase in (children or {}).items()}
    observed = Observation(RUN, 3, dict(results or {}), states, dict(failures or {}))
    before = copy.deepcopy(dict(status))
    decision = decide(spec, status, observed, now, settings)
    assert dict(status) == before, "decide must not modify its input"
    assert_valid(decision.status)
    assert apply_merge_patch(before, decision.patch) == decision.status, "the patch must produce the status"
    return decision


# --------------------------------------------------------------------------- the transition table


@dataclass
class Case:
    name: str
    status: dict[str, Any]
    expect_states: dict[str, str]
    expect_actions: list[str]
    results: dict[str, StageResult] = field(default_factory=dict)
    children: dict[str, str] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    spec: RunSpec = SPEC
    settings: PipelineSettings = SETTINGS
    phase: str = "Running"
    retry_in: float | None = None
    attempts: dict[str, int] = field(default_factory=dict)
    recorded: dict[str, list[str]] = field(default_factory=dict)


TRAIN_RUNNING = st(etl=DONE, train=running(1, (child("train"),)))
SYNC_RUNNING = st(etl=DONE, train=DONE, score=DONE, sync=running(1))

CASES = [
    Case("a new run starts the ETL's clean job as a SparkApplication", {},
         {"etl": "Running", "train": "Pending", "promote": "Pending"},
         [f"create SparkApplication {child('etl', 1, 'clean')}"],
         attempts={"etl": 1}, recorded={"etl": [child("etl", 1, "clean")]}),
    Case("with the emr backend the ETL job is an EMR job run", {},
         {"etl": "Running"}, [f"create EmrJobRun {child('etl', 1, 'clean')}"],
         settings=SETTINGS.model_copy(update={"etl_backend": "emr"})),
    Case("stages not requested are skipped and the first requested one starts", {},
         {"etl": "Skipped", "train": "Running", "score": "Pending", "sync": "Skipped", "promote": "Skipped"},
         [f"create RayJob {child('train')}"],
         spec=RunSpec.from_manifest({"region": "us-east-1", "date": "2026-11-25",
                                     "stages": ["score", "train"]})),
    Case("a running ETL job: wait", st(etl=running(1, (child("etl", 1, "clean"),))),
         {"etl": "Running"}, ["wait"], children={child("etl", 1, "clean"): "Running"}),
    Case("clean completed: features starts", st(etl=running(1, (child("etl", 1, "clean"),))),
         {"etl": "Running"}, [f"create SparkApplication {child('etl', 1, 'features')}"],
         children={child("etl", 1, "clean"): "Succeeded"},
         recorded={"etl": [child("etl", 1, "clean"), child("etl", 1, "features")]}),
    Case("features completed: keys starts",
         st(etl=running(1, (child("etl", 1, "clean"), child("etl", 1, "features")))),
         {"etl": "Running"}, [f"create SparkApplication {child('etl', 1, 'keys')}"],
         children={child("etl", 1, "features"): "Succeeded"}),
    Case("keys completed: read the ETL's outputs from the lake",
         st(etl=running(1, (child("etl", 1, "clean"), child("etl", 1, "features"), child("etl", 1, "keys")))),
         {"etl": "Running"}, ["read etl"], children={child("etl", 1, "keys"): "Succeeded"}),
    Case("the ETL's result is in: etl succeeds and training starts at once",
         st(etl=running(1, (child("etl", 1, "clean"), child("etl", 1, "features"), child("etl", 1, "keys")))),
         {"etl": "Succeeded", "train": "Running"}, [f"create RayJob {child('train')}"],
         results={"etl": result("etl", clean_rows=10)}, children={child("etl", 1, "keys"): "Succeeded"}),
    Case("a recorded child that is not there is created again under the same name",
         st(etl=running(1, (child("etl", 1, "clean"),))),
         {"etl": "Running"}, [f"create SparkApplication {child('etl', 1, 'clean')}"],
         children={child("etl", 1, "clean"): "Missing"}, attempts={"etl": 1}),
    Case("a running RayJob: wait", TRAIN_RUNNING, {"train": "Running"}, ["wait"],
         children={child("train"): "Running"}),
    Case("a failed RayJob: retry after retry_delay_s", TRAIN_RUNNING, {"train": "Pending"}, [],
         children={child("train"): "Failed"}, retry_in=60, attempts={"train": 1}),
    Case("a RayJob that succeeded without writing its result is a failed attempt", TRAIN_RUNNING,
         {"train": "Pending"}, [], children={child("train"): "Succeeded"}, retry_in=60),
    Case("a failed ETL job fails the ETL attempt",
         st(etl=running(1, (child("etl", 1, "clean"), child("etl", 1, "features")))),
         {"etl": "Pending"}, [], children={child("etl", 1, "features"): "Failed"}, retry_in=60),
    Case("the second failure doubles the delay",
         st(etl=DONE, train=running(2, (child("train", 1), child("train", 2)))),
         {"train": "Pending"}, [], children={child("train", 2): "Failed"}, retry_in=120,
         attempts={"train": 2}),
    Case("the last attempt's failure fails the stage and the run",
         st(etl=DONE, train=running(3, (child("train", 1), child("train", 2), child("train", 3)))),
         {"train": "Failed", "score": "Pending"}, [], children={child("train", 3): "Failed"}, phase="Failed",
         attempts={"train": 3}),
    Case("a retry that is not due yet: wait for it",
         st(etl=DONE, train=pending(1, retryAt=timestamp(NOW + timedelta(seconds=30), millis=True),
                                    children=[child("train")])),
         {"train": "Pending"}, ["wait"], retry_in=30),
    Case("a retry that is due: the next attempt is a new child",
         st(etl=DONE, train=pending(1, retryAt=timestamp(NOW - timedelta(seconds=1), millis=True),
                                    children=[child("train")], startedAt=EARLIER)),
         {"train": "Running"}, [f"create RayJob {child('train', 2)}"], attempts={"train": 2},
         recorded={"train": [child("train", 1), child("train", 2)]}),
    Case("a stage whose result file exists (local mode ran it) succeeds without a child", {},
         {"etl": "Succeeded", "train": "Running"}, [f"create RayJob {child('train')}"],
         results={"etl": result("etl")}, attempts={"etl": 0}),
    Case("every result file exists: the run succeeds with nothing to create", {},
         {s: "Succeeded" for s in STAGES}, [], phase="Succeeded",
         results={"etl": result("etl"), "train": result("train", **TRAIN_OUTPUTS), "score": result("score"),
                  "sync": result("sync", **SYNC_OUTPUTS), "promote": result("promote")}),
    Case("the result arrives while its child runs: the stage is done and the child deleted", TRAIN_RUNNING,
         {"train": "Succeeded", "score": "Running"},
         [f"delete RayJob {child('train')}", f"create RayJob {child('score')}"],
         results={"train": result("train", **TRAIN_OUTPUTS)}, children={child("train"): "Running"}),
    Case("sync runs in the controller", st(etl=DONE, train=DONE, score=DONE), {"sync": "Running"},
         ["run sync"], attempts={"sync": 1}),
    Case("sync's result: it succeeds and promote runs", SYNC_RUNNING,
         {"sync": "Succeeded", "promote": "Running"}, ["run promote"],
         results={"sync": result("sync", **SYNC_OUTPUTS)}),
    Case("sync raised StageError: retry", SYNC_RUNNING, {"sync": "Pending"}, [],
         failures={"sync": Failure("throttled")}, retry_in=60),
    Case("a stage that refuses its input fails the run at once", SYNC_RUNNING, {"sync": "Failed"}, [],
         failures={"sync": Failure("no recs for version v1", permanent=True)}, phase="Failed",
         attempts={"sync": 1}),
    Case("an in-process stage found running was interrupted by a restart: a failed attempt", SYNC_RUNNING,
         {"sync": "Pending"}, [], retry_in=60),
    Case("a stage with nothing to do is Skipped",
         st(etl=DONE, train=DONE, score=running(1, (child("score"),))),
         {"score": "Skipped", "sync": "Running"}, ["run sync"],
         results={"score": result("score", skipped=True, version=None)},
         children={child("score"): "Succeeded"}),
    Case("the ETL's outputs could not be read: a failed attempt",
         st(etl=running(1, (child("etl", 1, "clean"), child("etl", 1, "features"), child("etl", 1, "keys")))),
         {"etl": "Pending"}, [], children={child("etl", 1, "keys"): "Succeeded"},
         failures={"etl": Failure("no run summary")}, retry_in=60),
    Case("a finished run: nothing to do", {**st(**{s: DONE for s in STAGES}), "phase": "Succeeded"},
         {s: "Succeeded" for s in STAGES}, [], phase="Succeeded"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_transition(case: Case) -> None:
    decision = run_decide(case.status, results=case.results, children=case.children, failures=case.failures,
                          spec=case.spec, settings=case.settings)
    stages = decision.status["stages"]
    assert {s: stages[s]["state"] for s in case.expect_states} == case.expect_states
    assert [render(a) for a in decision.actions] == case.expect_actions
    assert decision.phase == case.phase
    assert decision.retry_in == case.retry_in
    assert (decision.failed is not None) == (case.phase == "Failed")
    for stage, attempts in case.attempts.items():
        assert stages[stage]["attempts"] == attempts
    for stage, names in case.recorded.items():
        assert stages[stage]["children"] == names


# --------------------------------------------------------------------------- details of the transitions


def test_a_retry_is_recorded_with_its_time_and_reason() -> None:
    decision = run_decide(TRAIN_RUNNING, children={child("train"): "Failed"})
    train = decision.status["stages"]["train"]
    assert train["retryAt"] == "2026-11-26T03:01:00.000Z"
    assert train["attempts"] == 1 and train["children"] == [child("train")]
    assert f"{child('train')} is Failed" in train["message"] and "attempt 2" in train["message"]
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "StageRetrying")]
    assert condition(decision.status, "Progressing")["reason"] == "RetryScheduled"
    assert condition(decision.status, "Ready")["status"] == "False"


def test_starting_the_retry_clears_retry_at_in_the_patch() -> None:
    before = st(etl=DONE, train=pending(1, retryAt="2026-11-26T02:59:00.000Z", children=[child("train")],
                                        startedAt=EARLIER))
    decision = run_decide(before)
    assert decision.patch["stages"]["train"]["retryAt"] is None
    assert decision.status["stages"]["train"]["startedAt"] == EARLIER  # the stage's first start is kept


@pytest.mark.parametrize("attempt,delay", [(1, 60), (2, 120), (3, 240), (5, 960)])
def test_retry_delay_doubles_per_attempt(attempt: int, delay: float) -> None:
    assert retry_delay(SETTINGS, attempt) == delay


def test_permanent_failure_after_max_attempts_says_why() -> None:
    before = st(etl=DONE, train=running(3, (child("train", 1), child("train", 2), child("train", 3))))
    decision = run_decide(before, children={child("train", 3): "Failed"})
    assert decision.failed == f"stage train failed after 3 attempt(s): {child('train', 3)} is Failed"
    failed = condition(decision.status, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "AttemptsExhausted")
    assert failed["message"] == decision.failed
    assert condition(decision.status, "Ready")["status"] == "False"
    assert condition(decision.status, "Progressing")["status"] == "False"
    assert decision.status["stages"]["train"]["finishedAt"] == "2026-11-26T03:00:00Z"
    assert "retryAt" not in decision.status["stages"]["train"]
    assert decision.status["currentStage"] == "train"


def test_a_refusal_fails_with_reason_stage_refused() -> None:
    decision = run_decide(SYNC_RUNNING, failures={"sync": Failure("no recs", permanent=True)})
    assert decision.failed == "stage sync refused: no recs"
    assert condition(decision.status, "Failed")["reason"] == "StageRefused"
    assert decision.status["stages"]["sync"]["message"] == "refused: no recs"


def test_a_child_that_refused_its_input_fails_the_run_on_its_first_attempt() -> None:
    refused = ChildState("Failed", f"{child('train')} FAILED; refused: no features", permanent=True)
    decision = run_decide(TRAIN_RUNNING, children={child("train"): refused})
    assert decision.failed == f"stage train refused: {child('train')} FAILED; refused: no features"
    assert condition(decision.status, "Failed")["reason"] == "StageRefused"
    assert decision.status["stages"]["train"]["attempts"] == 1 and not decision.actions


def test_a_successful_run_reports_model_gate_and_counts() -> None:
    decision = run_decide({}, results={"etl": result("etl"), "train": result("train", **TRAIN_OUTPUTS),
                                       "score": result("score"), "sync": result("sync", **SYNC_OUTPUTS),
                                       "promote": result("promote", promoted=True)})
    status = decision.status
    assert status["phase"] == "Succeeded"
    assert status["modelVersion"] == "v20261125-1"
    assert status["gate"] == {"promote": True, "reason": "lift 12% over popular", "metric": "recall_at_20"}
    assert status["synced"] == {"dynamodb_keys": 100, "dynamodb_recs": 50, "warehouse_events": 1000,
                                "warehouse_recs": 50}
    assert status["stages"]["train"]["outputs"]["version"] == "v20261125-1"
    assert status["observedGeneration"] == 3
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Succeeded")
    assert "model v20261125-1 (promoted)" in ready["message"]
    assert condition(status, "Failed")["status"] == "False"
    assert [e.reason for e in decision.events][-1] == "Succeeded"


def test_conditions_keep_their_transition_time_while_unchanged() -> None:
    first = run_decide({})
    later = NOW + timedelta(minutes=5)
    second = run_decide(first.status, children={child("etl", 1, "clean"): "Running"}, now=later)
    for kind in ("Ready", "Progressing", "Failed"):
        assert condition(second.status, kind)["lastTransitionTime"] == "2026-11-26T03:00:00Z"
    done = run_decide(second.status, now=later, results={s: result(s) for s in STAGES},
                      children={child("etl", 1, "clean"): "Running"})
    assert condition(done.status, "Ready")["lastTransitionTime"] == timestamp(later)
    assert condition(done.status, "Failed")["lastTransitionTime"] == "2026-11-26T03:00:00Z"


def test_polling_an_unchanged_child_patches_nothing() -> None:
    first = run_decide({}, children={})
    polled = run_decide(first.status, children={child("etl", 1, "clean"): "Running"})
    again = run_decide(polled.status, children={child("etl", 1, "clean"): "Running"},
                       now=NOW + timedelta(seconds=30))
    assert again.patch == {}
    assert [render(a) for a in again.actions] == ["wait"]


def test_a_finished_run_is_left_alone() -> None:
    done = {**st(**{s: DONE for s in STAGES}), "phase": "Failed"}
    decision = run_decide(done, results={"etl": result("etl")})
    assert decision.patch == {} and decision.actions == () and decision.events == ()


def test_an_invalid_spec_fails_the_run() -> None:
    decision = invalid({}, "spec.region: 'mars' is not an AWS region name", NOW, generation=1)
    assert decision.phase == "Failed" and decision.failed.startswith("spec.region")
    assert condition(decision.status, "Failed")["reason"] == "InvalidSpec"
    assert decision.status["observedGeneration"] == 1
    assert_valid(decision.status)
    assert invalid(decision.status, "again", NOW).patch == {}


def test_backfill_runs_the_same_stages() -> None:
    backfill = RunSpec.from_manifest({"region": "us-east-1", "date": "2026-11-01", "endDate": "2026-11-25"})
    decision = run_decide({}, spec=backfill)
    assert [render(a) for a in decision.actions] == [f"create SparkApplication {child('etl', 1, 'clean')}"]


def test_events_say_what_started() -> None:
    decision = run_decide({})
    assert [(e.type, e.reason) for e in decision.events] == [("Normal", "StageStarted")]
    assert child("etl", 1, "clean") in decision.events[0].message


# --------------------------------------------------------------------------- what to observe, what to delete


def test_observation_plan_asks_for_the_current_child_and_open_results() -> None:
    status = st(etl=running(1, (child("etl", 1, "clean"), child("etl", 1, "features"))))
    plan = observation_plan(SPEC, status, RUN, SETTINGS)
    assert [c.name for c in plan.children] == [child("etl", 1, "features")]
    assert plan.results == STAGES
    plan = observation_plan(SPEC, st(etl=DONE, train=running(2, (child("train", 1), child("train", 2)))), RUN,
                            SETTINGS)
    assert [(c.kind, c.name) for c in plan.children] == [("RayJob", child("train", 2))]
    assert plan.results == ("train", "score", "sync", "promote")
    assert observation_plan(SPEC, {"phase": "Succeeded"}, RUN, SETTINGS).children == ()
    assert observation_plan(SPEC, {}, RUN, SETTINGS).results == STAGES


def test_cleanup_covers_every_recorded_child_of_every_attempt() -> None:
    etl_children = [child("etl", 1, j) for j in ("clean", "features", "keys")]
    status = st(etl=DONE | {"attempts": 1, "children": etl_children},
                train=pending(2, children=[child("train", 1), child("train", 2)]), sync=running(1))
    names = [(c.kind, c.name) for c in cleanup_children(SPEC, status, RUN, SETTINGS)]
    assert names == [*(("SparkApplication", name) for name in etl_children),
                     ("RayJob", child("train", 1)), ("RayJob", child("train", 2))]


def test_merge_patch_round_trips() -> None:
    old = {"a": 1, "b": {"c": 2, "d": [1, 2]}, "e": "x"}
    new = {"a": 1, "b": {"c": 3, "d": [1]}, "f": {"g": True}}
    patch = merge_patch(old, new)
    assert patch == {"e": None, "b": {"c": 3, "d": [1]}, "f": {"g": True}}
    assert apply_merge_patch(old, patch) == new
    assert merge_patch(new, new) == {}


def test_the_status_check_is_strict() -> None:
    """The schema check above would catch a misspelt field or a bad timestamp."""
    status = run_decide({}).status
    status["stages"]["etl"]["retryat"] = "soon"
    assert list(VALIDATOR.iter_errors(status))
    status = run_decide({}).status
    status["stages"]["etl"]["startedAt"] = "yesterday"
    assert list(VALIDATOR.iter_errors(status))
