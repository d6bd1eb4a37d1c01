"""The PipelineRun controller against the kmock Kubernetes emulator, in the style of kopf's own
examples/09-testing-kmock: the operator runs as a task in the test's event loop, the test plays the
cluster's other actors and watches the emulator's objects.

What is real: kopf (watch-stream, create/resume/timer/delete handlers, the finalizer), the controller's
Kubernetes client speaking HTTP to the emulator, the state machine, the child manifests, and the stage
result files in a lake (a local folder; moto S3 for the EMR case).

What is faked, on purpose, because these tests exercise orchestration and not the stages themselves
(the real stage functions are tested in their own modules): the bodies of the in-process stages (sync,
promote) and the ETL's result reader are fast fakes; no KubeRay or Spark operator runs, so the test
plays them, writing a stage's result file and patching the child's status in the emulator; the EMR on
EKS API is an in-memory fake (moto's EMR job runs never finish).

No test sleeps for a fixed time: each waits for a condition in the emulator, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import kmock as kmock_lib
import kopf
import pytest
import yaml
from prometheus_client import REGISTRY

from operators.controller import Controller, KubeClient, build_registry, configure_kopf
from operators.pipeline import RunSpec, StageResult, child_name
from operators.stages import STAGE_FUNCTIONS, StageError, write_result
from streamrec.settings import RegionSettings, Settings

pytestmark = pytest.mark.asyncio

NS = "streamrec"
REGION = "us-east-1"
PRUNS = "streamrec.io/v1alpha1/pipelineruns"
RAYJOBS = "ray.io/v1/rayjobs"
SPARKAPPS = "sparkoperator.k8s.io/v1beta2/sparkapplications"
RUNS_PATH = f"/apis/streamrec.io/v1alpha1/namespaces/{NS}/pipelineruns"
# The test's own requests to the emulator use a new connection each: a stopping operator cancels every
# task started after it (kopf's run_tasks), the emulator's handlers of pooled connections included.
ONE_SHOT = {"Connection": "close"}
CRD = Path(__file__).resolve().parents[2] / "charts/streamrec/crds/pipelineruns.streamrec.io.yaml"
TRAIN_OUTPUTS = {"version": "v20261125-1", "gate": {"promote": True, "reason": "lift 12% over popular"},
                 "previous_version": None}
SYNC_OUTPUTS = {"dynamodb_keys": {"items_written": 90, "items_skipped": 10},
                "dynamodb_recs": {"items_written": 40, "items_skipped": 0},
                "warehouse": {"rows": {"events": 1000, "recs": 40}}, "version": "v20261125-1"}


# --------------------------------------------------------------------------- fakes and harness


@dataclass
class FakeStages:
    """Fast stand-ins for the in-process stage bodies and the ETL's result reader."""

    sync_failures: int = 0
    calls: list[str] = field(default_factory=list)
    recorded: list[tuple[str, str, list[str]]] = field(default_factory=list)

    def sync(self, settings: Settings, spec: RunSpec, done: Mapping[str, StageResult]) -> StageResult:
        self.calls.append("sync")
        if self.sync_failures:
            self.sync_failures -= 1
            raise StageError("DynamoDB throttled (fake)")
        assert done["score"].outputs["users"] == 40  # earlier stages' results are read from the lake
        return StageResult("sync", SYNC_OUTPUTS, "synced (fake)")

    def promote(self, settings: Settings, spec: RunSpec, done: Mapping[str, StageResult]) -> StageResult:
        self.calls.append("promote")
        return StageResult("promote", {"promoted": True, "version": done["train"].outputs["version"]},
                           "promoted (fake)")

    def record(self, settings: Settings, spec: RunSpec, done: Mapping[str, StageResult], phase: str,
               started: datetime, finished: datetime) -> None:
        """Stands in for the warehouse's pipeline_runs upsert (tested on PostgreSQL elsewhere)."""
        self.recorded.append((spec.run_id, phase, sorted(done)))

    def etl_result(self, settings: Settings, spec: RunSpec) -> StageResult:
        self.calls.append("etl_result")
        return StageResult("etl", {"clean_rows": 1000, "days": len(spec.etl_days)}, "cleaned (fake)")


class FakeEmr:
    """The emr-containers calls the controller makes, in memory, with StartJobRun's idempotency."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.cancelled: list[str] = []
        self._lock = threading.Lock()

    def start_job_run(self, **request: Any) -> dict[str, Any]:
        with self._lock:
            self.requests.append(request)
            for run in self.runs.values():
                if run["clientToken"] == request["clientToken"]:
                    return {"id": run["id"], "name": run["name"]}
            job_id = f"000000{len(self.runs) + 1:04d}"
            self.runs[job_id] = {"id": job_id, "name": request["name"], "state": "PENDING",
                                 "tags": request["tags"], "clientToken": request["clientToken"],
                                 "createdAt": datetime.now(UTC),
                                 "virtualClusterId": request["virtualClusterId"]}
            return {"id": job_id, "name": request["name"]}

    def list_job_runs(self, *, virtualClusterId: str, name: str, createdAfter: datetime,
                      **_: Any) -> dict[str, Any]:
        with self._lock:
            return {"jobRuns": [dict(r) for r in self.runs.values()
                                if r["name"] == name and r["createdAt"] >= createdAfter]}

    def cancel_job_run(self, *, id: str, virtualClusterId: str) -> dict[str, Any]:
        with self._lock:
            self.runs[id]["state"] = "CANCELLED"
            self.cancelled.append(self.runs[id]["name"])
            return {"id": id}

    def set_state(self, name: str, state: str) -> None:
        with self._lock:
            next(r for r in self.runs.values() if r["name"] == name)["state"] = state

    def started(self, name: str) -> bool:
        return any(r["name"] == name for r in self.runs.values())


@pytest.fixture
def emulator(kmock: kmock_lib.KubernetesEmulator) -> kmock_lib.KubernetesEmulator:
    kmock.resources.load_bundled()  # namespaces, events, CRDs: what kopf discovers at start-up
    verbs = {"get", "list", "watch", "create", "patch", "delete"}
    for resource, kind in ((PRUNS, "PipelineRun"), (RAYJOBS, "RayJob"), (SPARKAPPS, "SparkApplication")):
        kmock.resources[resource] = kmock.ResourceInfo(kind=kind, namespaced=True, verbs=verbs,
                                                       subresources={"status"})
    return kmock


def make_settings(lake_uri: str, **pipeline: Any) -> Settings:
    return Settings(regions={REGION: RegionSettings.default_for(REGION, lake_uri)},
                    pipeline={"etl_backend": "spark-operator", "max_attempts": 2, "retry_delay_s": 0.05,
                              "poll_interval_s": 0.05, **pipeline})


def make_controller(emulator: Any, settings: Settings, fakes: FakeStages,
                    emr: FakeEmr | None = None) -> Controller:
    from kubernetes import client

    config = client.Configuration()
    config.host = str(emulator.url).rstrip("/")
    # A short read timeout: a call in flight when a test stops the operator must not outlive the test.
    return Controller(settings, kube=KubeClient(client.ApiClient(config), request_timeout=(2.0, 5.0)),
                      emr_client=(lambda region: emr) if emr is not None else None,
                      stage_functions={**STAGE_FUNCTIONS, "sync": fakes.sync, "promote": fakes.promote},
                      etl_result=fakes.etl_result, record=fakes.record)


@contextlib.asynccontextmanager
async def operator(emulator: Any, controller: Controller) -> AsyncIterator[None]:
    """The controller's kopf operator, running in this event loop until the block ends."""
    settings = kopf.OperatorSettings()
    configure_kopf(settings)  # scanning disabled: kmock 0.8 cannot list namespaces
    # kmock keeps an object's resourceVersion as created, so kopf would wait its whole consistency
    # timeout (5 s) for the version it patched after each of its own patches.
    settings.persistence.consistency_timeout = 0.1
    # A prompt shutdown: workers get 0.5 s to drain their queue, timers 0.1 s to notice the stop.
    settings.queueing.exit_timeout = 0.5
    settings.background.instant_exit_timeout = 0.1
    registry = build_registry(controller,
                              login=lambda **_: kopf.ConnectionInfo(server=str(emulator.url), insecure=True))
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(kopf.operator(registry=registry, settings=settings, standalone=True,
                                             clusterwide=False, namespaces=[NS], stop_flag=stop,
                                             ready_flag=ready))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiter], timeout=20, return_when=asyncio.FIRST_COMPLETED)
    assert ready.is_set(), "the operator did not start"
    try:
        yield
    finally:
        # Stop it like Kubernetes does: SIGTERM (the stop flag), and let kopf finish its own shutdown.
        # (Cancelling it instead leaves its watchers and an orphaned timer half-cancelled in this loop,
        # and closing the loop then waits on them forever: a 600 s hang seen under CPU load.)
        stop.set()
        done, _ = await asyncio.wait([task], timeout=30)
        assert done, "the operator did not stop within 30 s of its stop flag"


async def until(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Wait for ``check()`` to be truthy (polling the emulator's state), at most ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := check()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.01)
    return value


def get(emulator: Any, resource: str, name: str) -> dict[str, Any] | None:
    try:
        obj = emulator.objects[resource, NS, name]
    except KeyError:
        return None
    return None if obj.deleted else obj.raw


def status(emulator: Any, name: str) -> dict[str, Any]:
    return (get(emulator, PRUNS, name) or {}).get("status") or {}


def stage(emulator: Any, name: str, stage_name: str) -> dict[str, Any]:
    return (status(emulator, name).get("stages") or {}).get(stage_name) or {}


def condition(emulator: Any, name: str, kind: str) -> dict[str, Any]:
    return next((c for c in status(emulator, name).get("conditions") or [] if c["type"] == kind), {})


def posts(emulator: Any, resource: str) -> list[str]:
    """Names of the objects POSTed to ``resource``, in order (a second POST of a name = a duplicate)."""
    return [r.data["metadata"]["name"] for r in emulator[emulator.resource(resource), emulator.method.POST]]


async def create_run(emulator: Any, name: str, **spec: Any) -> RunSpec:
    body = {"apiVersion": "streamrec.io/v1alpha1", "kind": "PipelineRun",
            "metadata": {"name": name, "namespace": NS, "uid": str(uuid.uuid4()), "resourceVersion": "1",
                         "generation": 1,
                         "creationTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
            "spec": {"region": REGION, **spec}}
    response = await emulator.post(RUNS_PATH, json=body, headers=ONE_SHOT)
    assert response.status == 200, await response.text()
    return RunSpec.from_manifest(body["spec"])


def complete_spark(emulator: Any, name: str) -> None:
    emulator.objects[SPARKAPPS, NS, name].patch({"status": {"applicationState": {"state": "COMPLETED"}}})


def finish_rayjob(emulator: Any, settings: Settings, spec: RunSpec, name: str,
                  result: StageResult | None) -> None:
    """Play KubeRay: the job (``streamrec pipeline stage``) writes its result file and succeeds, or
    (no result) fails."""
    if result is not None:
        write_result(settings, spec, result)
        emulator.objects[RAYJOBS, NS, name].patch(
            {"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}})
    else:
        emulator.objects[RAYJOBS, NS, name].patch(
            {"status": {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
                        "message": "Job entrypoint command failed with exit code 1"}})


def assert_status_valid(emulator: Any, name: str) -> None:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    validator = jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
              for e in validator.iter_errors(status(emulator, name))]
    assert not errors, errors


def assert_no_server_errors(emulator: Any) -> None:
    """Every error the emulator answered was a Kubernetes API error (404, 409), none a crash."""
    unexpected = [e for e in emulator.errors if not isinstance(e, kmock_lib.KubernetesError)]
    assert not unexpected, unexpected


def events(emulator: Any, name: str) -> list[str]:
    """Reasons of the events posted about run ``name`` (from the request log: kmock 0.8 stores objects
    by name and ignores generateName, so it answers 409 to every event after the first)."""
    return [r.data["reason"] for r in emulator[emulator.resource("v1/events"), emulator.method.POST]
            if (r.data.get("involvedObject") or {}).get("name") == name]


# --------------------------------------------------------------------------- tests


def metric(name: str, **labels: str) -> float:
    """A sample of the controller's Prometheus metrics (operators/metrics.py, process-wide: tests
    compare before and after)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_run_creates_its_children_in_order_and_succeeds(emulator: Any, tmp_path: Path) -> None:
    """Creation → each child with the expected spec → status transitions as children complete →
    sync retried once in the controller → Succeeded with the model version, gate and counts."""
    succeeded_before = metric("streamrec_pipeline_runs_finished_total", region="us-east-1", phase="Succeeded")
    retries_before = metric("streamrec_pipeline_events_total", region="us-east-1", reason="StageRetrying")
    settings = make_settings(f"file://{tmp_path / 'lake'}")
    fakes = FakeStages(sync_failures=1)
    run = "us-east-1-2026-11-25"
    async with operator(emulator, make_controller(emulator, settings, fakes)):
        spec = await create_run(emulator, run, date="2026-11-25")

        for job in ("clean", "features", "keys"):
            name = child_name(run, "etl", 1, job)
            app = await until(lambda: get(emulator, SPARKAPPS, name), f"SparkApplication {name}")
            assert app["spec"]["arguments"][:2] == ["--job", job]
            assert app["metadata"]["ownerReferences"][0]["name"] == run
            assert stage(emulator, run, "etl")["state"] == "Running"
            assert condition(emulator, run, "Progressing")["status"] == "True"
            complete_spark(emulator, name)

        train = await until(lambda: get(emulator, RAYJOBS, f"{run}-train-1"), "the training RayJob")
        assert stage(emulator, run, "etl")["state"] == "Succeeded"
        assert stage(emulator, run, "etl")["outputs"] == {"clean_rows": 1000, "days": 1}
        uid = train["metadata"]["ownerReferences"][0]["uid"]
        assert train["spec"]["entrypoint"] == ("streamrec pipeline stage train --region us-east-1 "
                                               f"--date 2026-11-25 --refusal-key {uid}-{run}-train-1 "
                                               "--config /etc/streamrec/streamrec.yaml")
        assert train["metadata"]["labels"]["streamrec.io/stage"] == "train"
        finish_rayjob(emulator, settings, spec, f"{run}-train-1", StageResult("train", TRAIN_OUTPUTS, "ok"))

        await until(lambda: get(emulator, RAYJOBS, f"{run}-score-1"), "the scoring RayJob")
        assert status(emulator, run)["modelVersion"] == "v20261125-1"
        finish_rayjob(emulator, settings, spec, f"{run}-score-1", StageResult("score", {"users": 40}, "ok"))

        await until(lambda: status(emulator, run).get("phase") == "Succeeded", "the run to succeed")
        await until(lambda: "Succeeded" in events(emulator, run), "the Succeeded event")

    final = status(emulator, run)
    assert {s: e["state"] for s, e in final["stages"].items()} == {s: "Succeeded" for s in final["stages"]}
    assert final["stages"]["sync"]["attempts"] == 2  # failed once (StageError), retried after retryAt
    assert final["gate"] == {"promote": True, "reason": "lift 12% over popular"}
    assert final["synced"] == {"dynamodb_keys": 100, "dynamodb_recs": 40, "warehouse_events": 1000,
                               "warehouse_recs": 40}
    assert condition(emulator, run, "Ready")["status"] == "True"
    assert condition(emulator, run, "Failed")["status"] == "False"
    assert fakes.calls == ["etl_result", "sync", "sync", "promote"]
    # The finished run was recorded in the warehouse once, with every stage's result.
    assert fakes.recorded == [("us-east-1-2026-11-25", "Succeeded", ["etl", "promote", "score", "sync", "train"])]
    assert posts(emulator, SPARKAPPS) == [child_name(run, "etl", 1, j) for j in ("clean", "features", "keys")]
    assert posts(emulator, RAYJOBS) == [f"{run}-train-1", f"{run}-score-1"]
    assert {"StageStarted", "StageRetrying", "StageSucceeded"} <= set(events(emulator, run))
    # The run counted once as finished, its sync retry as one StageRetrying event (the chart's alerts).
    assert metric("streamrec_pipeline_runs_finished_total", region="us-east-1",
                  phase="Succeeded") == succeeded_before + 1
    assert metric("streamrec_pipeline_events_total", region="us-east-1",
                  reason="StageRetrying") == retries_before + 1
    assert metric("streamrec_pipeline_stage_duration_seconds_count", region="us-east-1", stage="train",
                  state="Succeeded") >= 1
    assert_status_valid(emulator, run)
    assert_no_server_errors(emulator)


async def test_a_failing_child_is_retried_then_the_run_fails(emulator: Any, tmp_path: Path) -> None:
    """A failed RayJob → retry as attempt 2 (a new child) after retryAt → failed again → the run is
    Failed for good (max_attempts 2), with the reason in its Failed condition."""
    failed_before = metric("streamrec_pipeline_runs_finished_total", region="us-east-1", phase="Failed")
    settings = make_settings(f"file://{tmp_path / 'lake'}")
    run = "us-east-1-2026-11-24"
    fakes = FakeStages()
    async with operator(emulator, make_controller(emulator, settings, fakes)):
        spec = await create_run(emulator, run, date="2026-11-24", stages=["train"])
        await until(lambda: get(emulator, RAYJOBS, f"{run}-train-1"), "attempt 1")
        finish_rayjob(emulator, settings, spec, f"{run}-train-1", None)

        await until(lambda: get(emulator, RAYJOBS, f"{run}-train-2"), "attempt 2, a new RayJob")
        history = emulator.objects[PRUNS, NS, run].history
        waited = [v["status"]["stages"]["train"] for v in history
                  if v is not None and v.get("status", {}).get("stages", {}).get("train", {}).get("retryAt")]
        assert waited and waited[0]["state"] == "Pending" and waited[0]["attempts"] == 1
        assert "exit code 1" in waited[0]["message"]
        assert stage(emulator, run, "train")["children"] == [f"{run}-train-1", f"{run}-train-2"]
        finish_rayjob(emulator, settings, spec, f"{run}-train-2", None)

        await until(lambda: status(emulator, run).get("phase") == "Failed", "the run to fail")
        await until(lambda: "StageFailed" in events(emulator, run), "the StageFailed event")
        failed = condition(emulator, run, "Failed")

    assert (failed["status"], failed["reason"]) == ("True", "AttemptsExhausted")
    assert failed["message"].startswith(f"stage train failed after 2 attempt(s): RayJob {run}-train-2 FAILED")
    assert stage(emulator, run, "train")["state"] == "Failed"
    assert condition(emulator, run, "Ready")["status"] == "False"
    assert posts(emulator, RAYJOBS) == [f"{run}-train-1", f"{run}-train-2"]
    assert "StageFailed" in events(emulator, run)
    assert fakes.recorded == [(run, "Failed", [])]
    assert metric("streamrec_pipeline_runs_finished_total", region="us-east-1",
                  phase="Failed") == failed_before + 1
    assert_status_valid(emulator, run)
    assert_no_server_errors(emulator)


async def test_a_rayjob_that_refused_its_input_fails_the_run_without_a_retry(emulator: Any,
                                                                          tmp_path: Path) -> None:
    """The RayJob's entrypoint, run for real (``streamrec pipeline stage train ... --refusal-key K``, as
    the job's driver would) on a lake with no features, refuses and records it; KubeRay reports the job
    FAILED; the controller reads the refusal and fails the run as StageRefused, with no attempt 2."""
    import shlex

    import typer
    from typer.testing import CliRunner

    from streamrec.cli import pipeline as pipeline_cli

    settings = make_settings(f"file://{tmp_path / 'lake'}")
    config = tmp_path / "streamrec.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    run = "us-east-1-2026-11-20"
    fakes = FakeStages()
    async with operator(emulator, make_controller(emulator, settings, fakes)):
        await create_run(emulator, run, date="2026-11-20", stages=["train"])
        job = await until(lambda: get(emulator, RAYJOBS, f"{run}-train-1"), "attempt 1")
        args = shlex.split(job["spec"]["entrypoint"])
        assert args[:4] == ["streamrec", "pipeline", "stage", "train"] and "--refusal-key" in args
        args[args.index("--config") + 1] = str(config)
        root = typer.Typer()
        root.add_typer(pipeline_cli.app, name="pipeline")
        result = await asyncio.to_thread(CliRunner().invoke, root, args[1:])
        assert result.exit_code == 1, result.output
        emulator.objects[RAYJOBS, NS, f"{run}-train-1"].patch(
            {"status": {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
                        "message": "Job entrypoint command failed with exit code 1"}})
        await until(lambda: status(emulator, run).get("phase") == "Failed", "the run to fail")
        failed = condition(emulator, run, "Failed")

    assert (failed["status"], failed["reason"]) == ("True", "StageRefused")
    assert "features" in failed["message"] and "refused" in failed["message"]
    assert posts(emulator, RAYJOBS) == [f"{run}-train-1"]  # no second attempt
    assert_status_valid(emulator, run)
    assert_no_server_errors(emulator)


async def test_a_restarted_controller_resumes_without_duplicate_children(emulator: Any,
                                                                         tmp_path: Path) -> None:
    """The controller stops mid-run (twice: during the ETL, during training); each new one resumes
    from the status and the children it finds, and creates every child exactly once."""
    settings = make_settings(f"file://{tmp_path / 'lake'}")
    fakes = FakeStages()
    run = "us-east-1-2026-11-23"
    clean, features, keys = (child_name(run, "etl", 1, j) for j in ("clean", "features", "keys"))
    async with operator(emulator, make_controller(emulator, settings, fakes)):
        spec = await create_run(emulator, run, date="2026-11-23", stages=["etl", "train"])
        await until(lambda: get(emulator, SPARKAPPS, clean), "the clean job")
    complete_spark(emulator, clean)  # finishes while no controller runs

    second = make_controller(emulator, settings, fakes)
    async with operator(emulator, second):
        await until(lambda: get(emulator, SPARKAPPS, features), "the features job, from the new controller")
        complete_spark(emulator, features)
        await until(lambda: get(emulator, SPARKAPPS, keys), "the keys job")
        complete_spark(emulator, keys)
        await until(lambda: get(emulator, RAYJOBS, f"{run}-train-1"), "the training RayJob")

    third = make_controller(emulator, settings, fakes)
    async with operator(emulator, third):
        # Let the new controller look at the run (and the running RayJob) before it finishes.
        await until(lambda: third.steps >= 3, "the third controller's first steps")
        finish_rayjob(emulator, settings, spec, f"{run}-train-1", StageResult("train", TRAIN_OUTPUTS, "ok"))
        await until(lambda: status(emulator, run).get("phase") == "Succeeded", "the run to succeed")

    assert posts(emulator, SPARKAPPS) == [clean, features, keys]
    assert posts(emulator, RAYJOBS) == [f"{run}-train-1"]
    assert stage(emulator, run, "etl")["attempts"] == 1 and stage(emulator, run, "train")["attempts"] == 1
    assert fakes.calls == ["etl_result"]
    assert_status_valid(emulator, run)
    assert_no_server_errors(emulator)


async def test_deleting_a_run_deletes_its_children(emulator: Any, tmp_path: Path) -> None:
    """Deletion goes through the controller's finalizer: the run's RayJob and SparkApplication are
    deleted, then the run itself is released."""
    settings = make_settings(f"file://{tmp_path / 'lake'}")
    ray_run, etl_run = "us-east-1-2026-11-22", "us-east-1-2026-11-21"
    async with operator(emulator, make_controller(emulator, settings, FakeStages())):
        await create_run(emulator, ray_run, date="2026-11-22", stages=["train"])
        await create_run(emulator, etl_run, date="2026-11-21")
        await until(lambda: get(emulator, RAYJOBS, f"{ray_run}-train-1"), "the RayJob")
        clean = child_name(etl_run, "etl", 1, "clean")
        await until(lambda: get(emulator, SPARKAPPS, clean), "the SparkApplication")
        assert get(emulator, PRUNS, ray_run)["metadata"]["finalizers"] == ["streamrec.io/finalizer"]

        for run in (ray_run, etl_run):
            response = await emulator.delete(f"{RUNS_PATH}/{run}", headers=ONE_SHOT)
            assert response.status == 200
        await until(lambda: get(emulator, PRUNS, ray_run) is None and get(emulator, PRUNS, etl_run) is None,
                    "both runs to be released by the finalizer")

    assert get(emulator, RAYJOBS, f"{ray_run}-train-1") is None
    assert get(emulator, SPARKAPPS, clean) is None
    assert_no_server_errors(emulator)


async def test_emr_backend_runs_the_etl_as_job_runs_and_cancels_them_on_deletion(
        emulator: Any, tmp_path: Path, moto_server: Any) -> None:
    """With etl_backend emr: the three ETL jobs are EMR on EKS job runs named after the children and
    started once each (a restart finds them by name and run uid); deleting a run cancels its job run."""
    from streamrec.aws import client

    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        aws={"endpoint_url": moto_server.url, "access_key_id": "testing", "secret_access_key": "testing"},
        regions={REGION: RegionSettings.default_for(REGION, f"s3://{bucket}/lake")},
        emr={"virtual_cluster_id": "abc123def456ghi789", "log_uri": "s3://streamrec-logs/emr",
             "execution_role_arn": "arn:aws:iam::123456789012:role/streamrec-emr-job",
             "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/streamrec-spark:1a2b3c4"},
        pipeline={"etl_backend": "emr", "max_attempts": 2, "retry_delay_s": 0.05, "poll_interval_s": 0.05})
    client("s3", REGION, settings.aws).create_bucket(Bucket=bucket)
    emr, fakes = FakeEmr(), FakeStages()
    run, doomed = "us-east-1-2026-11-20", "us-east-1-2026-11-19"
    clean, features, keys = (child_name(run, "etl", 1, j) for j in ("clean", "features", "keys"))
    async with operator(emulator, make_controller(emulator, settings, fakes, emr)):
        await create_run(emulator, run, date="2026-11-01", endDate="2026-11-20", stages=["etl"])
        await until(lambda: emr.started(clean), "the clean job run")
    emr.set_state(clean, "COMPLETED")

    async with operator(emulator, make_controller(emulator, settings, fakes, emr)):  # a restart
        await until(lambda: emr.started(features), "the features job run")
        emr.set_state(features, "COMPLETED")
        await until(lambda: emr.started(keys), "the keys job run")
        emr.set_state(keys, "COMPLETED")
        await until(lambda: status(emulator, run).get("phase") == "Succeeded", "the run to succeed")

        await create_run(emulator, doomed, date="2026-11-19", stages=["etl"])
        doomed_clean = child_name(doomed, "etl", 1, "clean")
        await until(lambda: emr.started(doomed_clean), "the second run's job run")
        await emulator.delete(f"{RUNS_PATH}/{doomed}", headers=ONE_SHOT)
        await until(lambda: get(emulator, PRUNS, doomed) is None, "the second run to be released")

    assert [r["name"] for r in emr.requests] == [clean, features, keys, doomed_clean]  # each started once
    first = emr.requests[0]
    assert first["jobDriver"]["sparkSubmitJobDriver"]["entryPointArguments"][:8] == [
        "--job", "clean", "--region", REGION, "--date", "2026-11-01", "--end-date", "2026-11-20"]
    assert first["tags"]["streamrec-run-uid"] == get(emulator, PRUNS, run)["metadata"]["uid"]
    assert len({r["clientToken"] for r in emr.requests}) == 4
    assert emr.cancelled == [doomed_clean]
    assert stage(emulator, run, "etl")["outputs"] == {"clean_rows": 1000, "days": 20}
    assert_no_server_errors(emulator)


async def test_an_invalid_run_fails_with_the_field_named(emulator: Any, tmp_path: Path) -> None:
    settings = make_settings(f"file://{tmp_path / 'lake'}")
    async with operator(emulator, make_controller(emulator, settings, FakeStages())):
        await create_run(emulator, "bad", date="2026-11-25", overrides={"train": {"epochz": 5}})
        await until(lambda: status(emulator, "bad").get("phase") == "Failed", "the run to fail")
    failed = condition(emulator, "bad", "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.overrides" in failed["message"]
    assert "epochz" in failed["message"]
    assert posts(emulator, RAYJOBS) == [] and posts(emulator, SPARKAPPS) == []
    assert_no_server_errors(emulator)
