"""The PipelineRun controller: kopf handlers and their I/O around the pure state machine.

Every handler calls one idempotent step, :meth:`Controller.reconcile`:

1. GET the run (fresh, not kopf's cached body) and parse its spec; a wrong spec fails the run.
2. Observe what :func:`operators.reconcile.observation_plan` asks for: the current children (RayJob,
   SparkApplication by name; EMR job runs by name and the run's uid tag), then the result files.
3. :func:`operators.reconcile.decide`; patch the status it returns (before acting: the intent is
   recorded first), post its events, perform its actions. Running a stage in-process (sync, promote)
   or reading the ETL's outputs changes what is observed, so the step decides again at once.

Handlers: ``on.create`` and ``on.resume`` start or resume a run; a timer every
``pipeline.poll_interval_s`` polls it while it is active, and raises ``kopf.TemporaryError(delay=)``
while a failed stage waits for its retry and ``kopf.PermanentError`` when the run has failed;
``on.delete`` (kopf's finalizer) deletes the run's RayJobs and SparkApplications and cancels its EMR
job runs, which also carry owner references so Kubernetes collects them if the finalizer is removed.
Steps of one run are serialised by a lock, so the handlers never race each other.

Everything that does I/O is injectable (:class:`Controller`'s arguments): the Kubernetes client, the
EMR on EKS client factory, the stage functions and the ETL result reader, so tests run the
orchestration against the kmock emulator with fast fakes for the stage bodies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from operators import metrics
from operators.children import (
    EMR_JOB_RUN,
    FAILED,
    KUBE_KINDS,
    RAYJOB,
    SPARK_APPLICATION,
    ChildRef,
    ChildState,
    RunRef,
    emr_job_run_state,
    emr_request,
    kube_manifest,
    rayjob_state,
    refusal_key,
    run_selector,
    spark_application_state,
)
from operators.local import Recorder, settings_for_run
from operators.pipeline import API_GROUP, API_VERSION, PLURAL, STAGES, RunSpec, SpecError, StageResult
from operators.reconcile import (
    TERMINAL_PHASES,
    CreateChild,
    Decision,
    DeleteChild,
    Event,
    Failure,
    Observation,
    ReadResult,
    RunInProcess,
    cleanup_children,
    decide,
    invalid,
    observation_plan,
    parse_timestamp,
)
from operators.stages import (
    STAGE_FUNCTIONS,
    StageError,
    StageFn,
    StageRefused,
    etl_result,
    read_refusal,
    read_result,
    record_run,
    write_result,
)
from spark_etl.emr import upload_pod_template
from streamrec.settings import Settings, SettingsError

logger = logging.getLogger(__name__)

RUN_API_VERSION = f"{API_GROUP}/{API_VERSION}"
FINALIZER = "streamrec.io/finalizer"
ANNOTATION_PREFIX = "streamrec.io"
# Rounds of decide → act in one step (each in-process stage or ETL read is one); bounds a step.
MAX_ROUNDS = 2 * len(STAGES) + 2
_EMR_ACTIVE = ("PENDING", "SUBMITTED", "RUNNING")


# --------------------------------------------------------------------------- Kubernetes and EMR clients


class KubeClient:
    """The few custom-object calls the controller makes, on the official client (synchronous: the
    controller calls it through ``asyncio.to_thread``). Without ``api_client`` it uses the client's
    default configuration, which kopf's ``login_via_client`` sets (in-cluster, else kubeconfig).

    Every call has a (connect, read) timeout: the client's default is none, and a call stuck on a dead
    connection would hold its worker thread, and the operator's shutdown, forever."""

    def __init__(self, api_client: Any | None = None, request_timeout: tuple[float, float] = (5.0, 30.0)) -> None:
        self._api_client = api_client
        self._api: Any = None
        self.request_timeout = request_timeout

    @property
    def api(self) -> Any:
        if self._api is None:
            from kubernetes import client

            self._api = client.CustomObjectsApi(self._api_client or client.ApiClient())
        return self._api

    @staticmethod
    def _split(api_version: str) -> tuple[str, str]:
        group, _, version = api_version.rpartition("/")
        return group, version

    def get(self, api_version: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        group, version = self._split(api_version)
        try:
            return self.api.get_namespaced_custom_object(group, version, namespace, plural, name,
                                                   _request_timeout=self.request_timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, api_version: str, plural: str, namespace: str, body: Mapping[str, Any]) -> bool:
        """True if created, False if an object with that name exists (409)."""
        from kubernetes.client.exceptions import ApiException

        group, version = self._split(api_version)
        try:
            self.api.create_namespaced_custom_object(group, version, namespace, plural, dict(body),
                                                     field_validation="Strict",
                                                     _request_timeout=self.request_timeout)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def delete(self, api_version: str, plural: str, namespace: str, name: str) -> bool:
        """True if deleted, False if it was not there."""
        from kubernetes.client.exceptions import ApiException

        group, version = self._split(api_version)
        try:
            self.api.delete_namespaced_custom_object(group, version, namespace, plural, name,
                                                     propagation_policy="Background",
                                                     _request_timeout=self.request_timeout)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def list(self, api_version: str, plural: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        """Objects matching ``selector``; [] where the kind is not installed (404)."""
        from kubernetes.client.exceptions import ApiException

        group, version = self._split(api_version)
        try:
            found = self.api.list_namespaced_custom_object(group, version, namespace, plural,
                                                           label_selector=selector,
                                                           _request_timeout=self.request_timeout)
        except ApiException as exc:
            if exc.status == 404:
                return []
            raise
        return list(found.get("items") or [])

    def close(self) -> None:
        """Close the pooled connections (at the operator's exit)."""
        if self._api is not None:
            self._api.api_client.close()
            self._api = None

    def patch_status(self, api_version: str, plural: str, namespace: str, name: str,
                     patch: Mapping[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the status subresource; None if the object is gone."""
        from kubernetes.client.exceptions import ApiException

        group, version = self._split(api_version)
        try:
            return self.api.patch_namespaced_custom_object_status(group, version, namespace, plural, name,
                                                                  {"status": dict(patch)},
                                                                  _request_timeout=self.request_timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise


def _api_error(exc: Exception) -> tuple[int | None, str]:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None) or type(exc).__name__
    body = getattr(exc, "body", None)
    detail = ""
    if body:
        try:
            import json

            detail = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            detail = str(body)[:300]
    return status, " ".join(f"{status or ''} {reason} {detail}".split())


# --------------------------------------------------------------------------- the controller


@dataclass
class _Outcomes:
    results: dict[str, StageResult] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.results or self.failures)


class Controller:
    """The PipelineRun controller's state and I/O (one per process; handlers call its methods).

    ``kube``: a :class:`KubeClient`; ``emr_client(region)``: an emr-containers client (default: the
    streamrec AWS client factory); ``stage_functions``: the in-process stages by name (default:
    :data:`operators.stages.STAGE_FUNCTIONS`); ``etl_result``: reads the ETL's outputs from the lake
    after its jobs complete; ``clock``: now, timezone-aware."""

    def __init__(
        self,
        settings: Settings,
        *,
        kube: KubeClient | None = None,
        emr_client: Callable[[str], Any] | None = None,
        stage_functions: Mapping[str, StageFn] | None = None,
        etl_result: Callable[[Settings, RunSpec], StageResult] = etl_result,
        record: Recorder | None = record_run,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.record = record
        self.kube = kube or KubeClient()
        self._emr_factory = emr_client or self._default_emr_client
        self._emr_clients: dict[str, Any] = {}
        self._s3_clients: dict[str, Any] = {}
        self.stage_functions = dict(stage_functions or STAGE_FUNCTIONS)
        self.etl_result = etl_result
        self.clock = clock
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.steps = 0
        self.last_step_monotonic: float | None = None

    # -- plumbing

    def _default_emr_client(self, region: str) -> Any:
        from streamrec.aws import client

        return client("emr-containers", region, self.settings.aws)

    def emr(self, region: str) -> Any:
        if region not in self._emr_clients:
            self._emr_clients[region] = self._emr_factory(region)
        return self._emr_clients[region]

    def s3(self, region: str) -> Any:
        if region not in self._s3_clients:
            from streamrec.aws import client

            self._s3_clients[region] = client("s3", region, self.settings.aws)
        return self._s3_clients[region]

    def _lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    @staticmethod
    async def _io(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def stats(self) -> dict[str, Any]:
        """For kopf's liveness/probe endpoint."""
        last = self.last_step_monotonic
        idle = None if last is None else round(time.monotonic() - last, 1)
        return {"steps": self.steps, "seconds_since_last_step": idle, "runs_known": len(self._locks)}

    # -- the step

    async def reconcile(self, namespace: str, name: str) -> Decision | None:
        """One idempotent step of the run ``namespace/name``; the last decision, or None when the run is
        gone or being deleted."""
        async with self._lock(namespace, name):
            self.steps += 1
            self.last_step_monotonic = time.monotonic()
            obj = await self._io(self.kube.get, RUN_API_VERSION, PLURAL, namespace, name)
            if obj is None or obj.get("metadata", {}).get("deletionTimestamp"):
                return None
            meta = obj["metadata"]
            run = RunRef(name, namespace, str(meta.get("uid", "")))
            status: dict[str, Any] = dict(obj.get("status") or {})
            generation = meta.get("generation")
            region = _region_of(obj)
            if status.get("phase") in TERMINAL_PHASES:
                metrics.run_seen_finished(region, status)
                return Decision(status, {})
            try:
                spec = RunSpec.from_manifest(obj.get("spec") or {})
                self.settings.region(spec.region)
                settings = settings_for_run(self.settings, spec)
            except (SpecError, SettingsError) as exc:
                decision = invalid(status, str(exc), self.clock(), generation)
                if await self._apply(obj, decision):  # invalid() fails the run for good
                    metrics.run_finished(region, decision.status)
                return decision
            observed = await self._observe(run, spec, status, settings, obj, generation)
            decision = Decision(status, {})
            for _ in range(MAX_ROUNDS):
                decision = decide(spec, status, observed, self.clock(), settings.pipeline)
                if not await self._apply(obj, decision):
                    return None  # deleted meanwhile
                status = decision.status
                outcomes = await self._perform(decision, run, spec, settings, obj)
                if not outcomes.changed:
                    break
                observed = replace(observed, results={**observed.results, **outcomes.results},
                                   failures={**observed.failures, **outcomes.failures})
            if decision.status.get("phase") in TERMINAL_PHASES:
                metrics.run_finished(spec.region, decision.status)
                await self._record(spec, settings, observed.results, decision.status, meta)
            return decision

    async def _record(self, spec: RunSpec, settings: Settings, results: Mapping[str, StageResult],
                      status: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        """The finished run into the warehouse's pipeline_runs (once: a terminal run is not stepped
        again); a failure is logged, the run's outcome stands."""
        if self.record is None:
            return
        for stage in STAGES:  # a step observes only the results it needs; the record wants them all
            if stage not in results:
                found = await self._io(read_result, settings, spec, stage)
                if found is not None:
                    results = {**results, stage: found}
        created = meta.get("creationTimestamp")
        started = parse_timestamp(created) if created else self.clock()
        try:
            await self._io(self.record, settings, spec, results, str(status["phase"]), started, self.clock())
        except Exception as exc:
            logger.warning("recording run %s in the warehouse failed: %s", spec.run_id, exc)

    async def _observe(self, run: RunRef, spec: RunSpec, status: Mapping[str, Any], settings: Settings,
                       obj: Mapping[str, Any], generation: int | None) -> Observation:
        plan = observation_plan(spec, status, run.name, settings.pipeline)
        children: dict[str, ChildState] = {}
        for child in plan.children:  # children first: one seen succeeded wrote its result before
            children[child.name] = await self._child_state(child, run, spec, settings, obj)
        results: dict[str, StageResult] = {}
        for stage in plan.results:
            found = await self._io(read_result, settings, spec, stage)
            if found is not None:
                results[stage] = found
        return Observation(run.name, generation, results, children)

    async def _apply(self, obj: Mapping[str, Any], decision: Decision) -> bool:
        """Patch the decision's status and post its events; False if the run is gone."""
        meta = obj["metadata"]
        if decision.patch:
            patched = await self._io(self.kube.patch_status, RUN_API_VERSION, PLURAL, meta["namespace"],
                                     meta["name"], decision.patch)
            if patched is None:
                logger.info("pipelinerun %s/%s is gone", meta["namespace"], meta["name"])
                return False
        for event in decision.events:
            self._post(obj, event)
        metrics.events_posted(_region_of(obj), [event.reason for event in decision.events])
        return True

    def _post(self, obj: Mapping[str, Any], event: Event) -> None:
        meta = obj["metadata"]
        level = logging.WARNING if event.type == "Warning" else logging.INFO
        logger.log(level, "%s: %s", event.reason, event.message,
                   extra={"run": meta["name"], "namespace": meta["namespace"], "reason": event.reason})
        import kopf

        try:
            kopf.event(dict(obj), type=event.type, reason=event.reason, message=event.message[:1024])
        except LookupError:  # outside a running operator (a direct call in a test or a script)
            pass

    # -- actions

    async def _perform(self, decision: Decision, run: RunRef, spec: RunSpec, settings: Settings,
                       obj: Mapping[str, Any]) -> _Outcomes:
        out = _Outcomes()
        for action in decision.actions:
            if isinstance(action, CreateChild):
                failure = await self._create_child(action.child, run, spec, settings, obj)
                if failure is not None:
                    out.failures[action.child.stage] = failure
            elif isinstance(action, DeleteChild):
                await self._delete_child(action.child, run, spec, settings, obj)
            elif isinstance(action, RunInProcess):
                await self._run_in_process(action.stage, spec, settings, out)
            elif isinstance(action, ReadResult):
                await self._read_result(action.stage, spec, settings, out)
        return out

    async def _run_in_process(self, stage: str, spec: RunSpec, settings: Settings, out: _Outcomes) -> None:
        done: dict[str, StageResult] = {}
        for earlier in STAGES[:STAGES.index(stage)]:
            found = await self._io(read_result, settings, spec, earlier)
            if found is not None:
                done[earlier] = found
        fn = self.stage_functions[stage]
        try:
            result = await self._io(fn, settings, spec, done)
            await self._io(write_result, settings, spec, result)
        except StageRefused as exc:
            out.failures[stage] = Failure(str(exc), permanent=True)
        except StageError as exc:
            out.failures[stage] = Failure(str(exc))
        except Exception as exc:  # a bug or an unexpected service error: an attempt that failed
            logger.exception("stage %s raised", stage, extra={"run_id": spec.run_id})
            out.failures[stage] = Failure(f"{type(exc).__name__}: {exc}")
        else:
            out.results[stage] = result

    async def _read_result(self, stage: str, spec: RunSpec, settings: Settings, out: _Outcomes) -> None:
        if stage != "etl":  # only the ETL's result is derived by the controller
            raise ValueError(f"no result reader for stage {stage}")
        try:
            result = await self._io(self.etl_result, settings, spec)
            await self._io(write_result, settings, spec, result)
        except StageError as exc:
            out.failures[stage] = Failure(str(exc), permanent=isinstance(exc, StageRefused))
        else:
            out.results[stage] = result

    async def _create_child(self, child: ChildRef, run: RunRef, spec: RunSpec, settings: Settings,
                            obj: Mapping[str, Any]) -> Failure | None:
        """Create ``child`` unless it exists; a Failure when it cannot be built or is refused."""
        if child.kind == EMR_JOB_RUN:
            if await self._find_job_run(child, run, spec, settings, obj) is not None:
                return None
            try:
                request = emr_request(settings, spec, run, child)
            except ValueError as exc:
                return Failure(f"cannot build the EMR job run {child.name}: {exc}", permanent=True)
            # The request names the pod template (the R5 tolerations) by its content hash: put it first.
            await self._io(upload_pod_template, self.s3(spec.region), settings, spec.region)
            job_run = await self._io(lambda: self.emr(spec.region).start_job_run(**request))
            logger.info("started EMR job run %s (%s)", child.name, job_run.get("id"),
                        extra={"run": run.name, "stage": child.stage})
            return None
        api_version, plural = KUBE_KINDS[child.kind]
        existing = await self._io(self.kube.get, api_version, plural, run.namespace, child.name)
        if existing is not None:
            if not _owned_by(existing, run):
                logger.warning("%s %s belongs to an earlier run of the same name; waiting for the garbage "
                               "collector to remove it", child.kind, child.name, extra={"run": run.name})
            return None
        try:
            manifest = kube_manifest(settings, spec, run, child)
        except ValueError as exc:
            return Failure(f"cannot build {child.kind} {child.name}: {exc}", permanent=True)
        try:
            created = await self._io(self.kube.create, api_version, plural, run.namespace, manifest)
        except Exception as exc:
            status, text = _api_error(exc)
            if status in (400, 422):  # the API server refuses the object: a bug or a missing CRD field
                return Failure(f"the API server refused {child.kind} {child.name}: {text}", permanent=True)
            raise
        if created:
            logger.info("created %s %s", child.kind, child.name,
                        extra={"run": run.name, "stage": child.stage})
        return None

    async def _delete_child(self, child: ChildRef, run: RunRef, spec: RunSpec | None, settings: Settings,
                            obj: Mapping[str, Any]) -> bool:
        if child.kind == EMR_JOB_RUN:
            if spec is None:
                return False
            job_run = await self._find_job_run(child, run, spec, settings, obj)
            if job_run is None or job_run.get("state") not in _EMR_ACTIVE:
                return False
            await self._io(lambda: self.emr(spec.region).cancel_job_run(
                id=job_run["id"], virtualClusterId=settings.emr.virtual_cluster_id))
            logger.info("cancelled EMR job run %s (%s)", child.name, job_run["id"], extra={"run": run.name})
            return True
        api_version, plural = KUBE_KINDS[child.kind]
        deleted = await self._io(self.kube.delete, api_version, plural, run.namespace, child.name)
        if deleted:
            logger.info("deleted %s %s", child.kind, child.name, extra={"run": run.name})
        return bool(deleted)

    # -- observing children

    async def _child_state(self, child: ChildRef, run: RunRef, spec: RunSpec, settings: Settings,
                           obj: Mapping[str, Any]) -> ChildState:
        if child.kind == EMR_JOB_RUN:
            return emr_job_run_state(await self._find_job_run(child, run, spec, settings, obj))
        api_version, plural = KUBE_KINDS[child.kind]
        found = await self._io(self.kube.get, api_version, plural, run.namespace, child.name)
        if found is not None and not _owned_by(found, run):
            return ChildState("Pending", f"{child.kind} {child.name} of an earlier run of the same name is "
                                         "still there (waiting for the garbage collector)")
        if child.kind != RAYJOB:
            return spark_application_state(found)
        state = rayjob_state(found)
        if state.phase == FAILED:  # refused its input (recorded by the stage command)? then no retry
            refused = await self._io(read_refusal, settings, spec, refusal_key(run, child))
            if refused is not None:
                state = ChildState(FAILED, f"{state.message}; refused: {refused}", permanent=True)
        return state

    async def _find_job_run(self, child: ChildRef, run: RunRef, spec: RunSpec, settings: Settings,
                            obj: Mapping[str, Any]) -> dict[str, Any] | None:
        """The EMR job run of ``child`` started for this run object (name and uid tag), newest first."""
        created = obj.get("metadata", {}).get("creationTimestamp")
        query: dict[str, Any] = {"virtualClusterId": settings.emr.virtual_cluster_id, "name": child.name}
        if created:  # job runs of an earlier run of the same name are older; an hour covers clock skew
            query["createdAfter"] = parse_timestamp(created) - timedelta(hours=1)

        def find() -> dict[str, Any] | None:
            client = self.emr(spec.region)
            matches: list[dict[str, Any]] = []
            token: str | None = None
            while True:
                page = client.list_job_runs(**query, **({"nextToken": token} if token else {}))
                matches += [j for j in page.get("jobRuns", []) if j.get("name") == child.name
                            and (j.get("tags") or {}).get("streamrec-run-uid") == run.uid]
                token = page.get("nextToken")
                if not token:
                    break
            matches.sort(key=lambda j: str(j.get("createdAt", "")), reverse=True)
            return matches[0] if matches else None

        return await self._io(find)

    # -- deletion

    async def cleanup(self, namespace: str, name: str, body: Mapping[str, Any]) -> list[str]:
        """Delete the run's Kubernetes children and cancel its active EMR job runs; the names handled."""
        meta = body.get("metadata") or {}
        run = RunRef(name, namespace, str(meta.get("uid", "")))
        status = body.get("status") or {}
        try:
            spec: RunSpec | None = RunSpec.from_manifest(body.get("spec") or {})
        except SpecError:
            spec = None
        settings = self.settings
        if spec is not None:
            try:
                settings = settings_for_run(self.settings, spec)
            except SpecError:
                pass
        recorded = cleanup_children(spec, status, name, settings.pipeline)
        # The kinds this configuration creates (the chart grants RBAC on SparkApplications only with
        # the spark-operator backend), and any kind the run recorded.
        kinds = {RAYJOB} | {c.kind for c in recorded if c.kind in KUBE_KINDS}
        if settings.pipeline.etl_backend == "spark-operator":
            kinds.add(SPARK_APPLICATION)
        handled: list[str] = []
        for kind in sorted(kinds):
            api_version, plural = KUBE_KINDS[kind]
            names = {c.name for c in recorded if c.kind == kind}
            for found in await self._list_children(api_version, plural, run):
                names.add(found["metadata"]["name"])
            for child_name in sorted(names):
                child = ChildRef(kind, child_name, "", 0)
                if await self._delete_child(child, run, spec, settings, body):
                    handled.append(child_name)
        for child in recorded:
            if child.kind == EMR_JOB_RUN and await self._delete_child(child, run, spec, settings, body):
                handled.append(child.name)
        self._locks.pop((namespace, name), None)
        return handled

    async def _list_children(self, api_version: str, plural: str, run: RunRef) -> list[dict[str, Any]]:
        """The run's children of one kind found by label (owned by this run object); [] when listing is
        not allowed (the recorded children are still deleted by name, and owner references let
        Kubernetes collect the rest)."""
        try:
            found = await self._io(self.kube.list, api_version, plural, run.namespace, run_selector(run))
        except Exception as exc:
            status, text = _api_error(exc)
            if status != 403:
                raise
            logger.warning("cannot list %s to clean up run %s: %s", plural, run.name, text,
                           extra={"run": run.name})
            return []
        return [obj for obj in found if _owned_by(obj, run)]

    # -- kopf wiring

    async def handle(self, namespace: str, name: str, *, poll: bool) -> None:
        """A handler's body: one step; from the timer (``poll``) a retry waiting raises TemporaryError
        (kopf calls again after its delay), and a failed run raises PermanentError from any handler."""
        import kopf

        try:
            decision = await self.reconcile(namespace, name)
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
        if decision is None:
            return
        if decision.failed:
            raise kopf.PermanentError(decision.failed)
        if poll and decision.retry_in is not None:
            stage = decision.status.get("currentStage", "")
            message = (decision.status.get("stages", {}).get(stage) or {}).get("message", "retry scheduled")
            raise kopf.TemporaryError(f"stage {stage}: {message}", delay=max(decision.retry_in, 0.0))


def configure_kopf(settings: Any) -> None:
    """kopf's settings for this controller: our finalizer name, handler progress in annotations (the
    CRD's status schema has no room for kopf's), warnings posted as events, no cluster scanning (the
    controller watches one namespace it is told, and needs no RBAC to list namespaces or CRDs)."""
    import kopf

    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def _active(status: Mapping[str, Any], meta: Mapping[str, Any], **_: Any) -> bool:
    return status.get("phase") not in TERMINAL_PHASES and not meta.get("deletionTimestamp")


def _region_of(obj: Mapping[str, Any]) -> str:
    """The run's spec.region as a metrics label, read before (or without) the spec validating."""
    return str((obj.get("spec") or {}).get("region") or "")


def _owned_by(obj: Mapping[str, Any], run: RunRef) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == run.uid for r in refs) or not refs


def build_registry(controller: Controller, *, login: Callable[..., Any] | None = None) -> Any:
    """A kopf registry with the controller's handlers for ``pipelineruns.v1alpha1.streamrec.io``.

    ``login`` replaces kopf's ``login_via_client`` (in-cluster service account, else kubeconfig)."""
    import kopf

    registry = kopf.OperatorRegistry()
    resource = (API_GROUP, API_VERSION, PLURAL)
    kopf.on.login(registry=registry)(login or kopf.login_via_client)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings)

    @kopf.on.cleanup(registry=registry)
    def close(**_: Any) -> None:
        controller.kube.close()

    @kopf.on.create(*resource, registry=registry)
    async def start_run(name: str, namespace: str, **_: Any) -> None:
        await controller.handle(namespace, name, poll=False)

    @kopf.on.resume(*resource, registry=registry)
    async def resume_run(name: str, namespace: str, **_: Any) -> None:
        await controller.handle(namespace, name, poll=False)

    interval = controller.settings.pipeline.poll_interval_s

    @kopf.timer(*resource, registry=registry, interval=interval, when=_active)
    async def poll_run(name: str, namespace: str, **_: Any) -> None:
        await controller.handle(namespace, name, poll=True)

    @kopf.on.delete(*resource, registry=registry)
    async def delete_run(name: str, namespace: str, body: kopf.Body, **_: Any) -> None:
        handled = await controller.cleanup(namespace, name, dict(body))
        logger.info("pipelinerun %s/%s deleted; children removed: %s", namespace, name,
                    ", ".join(handled) or "none", extra={"run": name, "namespace": namespace})

    @kopf.on.update(*resource, registry=registry, field="spec")
    def spec_changed(body: kopf.Body, **_: Any) -> None:
        kopf.warn(body, reason="SpecChangeIgnored",
                  message="a PipelineRun's spec is read when it starts; to run it again with this spec, "
                          "delete the run and create it again (finished stages are not redone)")

    @kopf.on.probe(registry=registry, id="controller")
    def probe(**_: Any) -> dict[str, Any]:
        return controller.stats()

    return registry


def run(settings: Settings, *, namespace: str, liveness_port: int = 8080, metrics_port: int | None = None,
        controller: Controller | None = None) -> None:
    """Run the controller until SIGINT/SIGTERM: standalone (one replica, no peering), watching
    PipelineRuns in ``namespace``, liveness at ``http://0.0.0.0:<liveness_port>/healthz``, Prometheus
    metrics at ``http://0.0.0.0:<metrics_port>/metrics`` (none when ``metrics_port`` is None)."""
    import kopf

    if metrics_port is not None:
        metrics.serve(metrics_port)
    controller = controller or Controller(settings)
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings)
    kopf.run(
        registry=build_registry(controller),
        settings=kopf_settings,
        standalone=True,
        clusterwide=False,
        namespaces=[namespace],
        liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz",
    )


__all__ = ["Controller", "FINALIZER", "KubeClient", "build_registry", "configure_kopf", "run"]
