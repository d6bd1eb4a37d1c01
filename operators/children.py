"""The PipelineRun's child objects: what the controller creates for a stage, and how to read their state.

Pure functions, no I/O: settings and a run in, a Kubernetes manifest (or an EMR on EKS StartJobRun
request) out; a child object (or job run) in, a :class:`ChildState` out. The controller
(:mod:`operators.controller`) does the creating and reading; :mod:`operators.reconcile` decides when.

Which child runs which stage
----------------------------
- ``etl``: three jobs in order, ``clean`` (every day of the run), then ``features`` and ``keys`` (the
  run's day), each an EMR on EKS job run (``pipeline.etl_backend: emr``) or a Spark operator
  ``SparkApplication`` (``spark-operator``) running spark_etl/main.py with its usual arguments.
- ``train``, ``score``: a KubeRay ``RayJob`` whose entrypoint is ``streamrec pipeline stage <stage>``
  (the same stage function as local mode; it writes the stage's result file), on a Ray cluster with a
  CPU-less head and one worker group on the R5 nodes.
- ``sync``, ``promote``: no child; the controller runs the stage function itself.

Every child's name is :func:`operators.pipeline.child_name` of the run, stage, attempt (and ETL job),
shortened with a hash where an operator wants shorter names (:func:`kube_child_name`), so a restarted
controller finds the child it created instead of creating a second one; a retry is the next attempt,
hence a new name.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from operators.pipeline import API_GROUP, API_VERSION, KIND, RunSpec, child_name
from streamrec.settings import Settings

RAYJOB_API_VERSION = "ray.io/v1"
RAYJOB_PLURAL = "rayjobs"
SPARK_API_VERSION = "sparkoperator.k8s.io/v1beta2"
SPARK_PLURAL = "sparkapplications"

# Child kinds (EmrJobRun is not a Kubernetes object: an EMR on EKS job run, found by its name).
RAYJOB, SPARK_APPLICATION, EMR_JOB_RUN = "RayJob", "SparkApplication", "EmrJobRun"
KUBE_KINDS: dict[str, tuple[str, str]] = {
    RAYJOB: (RAYJOB_API_VERSION, RAYJOB_PLURAL),
    SPARK_APPLICATION: (SPARK_API_VERSION, SPARK_PLURAL),
}

ETL_JOBS: tuple[str, ...] = ("clean", "features", "keys")
RAY_STAGES: tuple[str, ...] = ("train", "score")
IN_PROCESS_STAGES: tuple[str, ...] = ("sync", "promote")

# Where the streamrec.yaml ConfigMap is mounted in every Ray pod (the stage command's --config).
CONFIG_DIR = "/etc/streamrec"
CONFIG_PATH = f"{CONFIG_DIR}/streamrec.yaml"
# The Spark image's entry point (spark_etl/Dockerfile.emr puts spark_etl/main.py there).
SPARK_ENTRY_POINT = "local:///opt/streamrec/main.py"
SPARK_VERSION = "4.0.0"
# Every Ray pod runs as this non-root user (the rayproject images' "ray" user).
RUN_AS_USER = 1000

# Child phases, as the state machine sees them.
MISSING, PENDING, RUNNING, SUCCEEDED, FAILED = "Missing", "Pending", "Running", "Succeeded", "Failed"

_LABEL_VALUE_MAX = 63
_DNS_LABEL_MAX = 63
# Longest child names the operators accept (see kube_child_name); EMR job run names take 64.
NAME_LIMITS = {RAYJOB: 47, SPARK_APPLICATION: 56, EMR_JOB_RUN: 63}
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


# --------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class RunRef:
    """The PipelineRun a child belongs to (its owner)."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        # controller=true: `kubectl get rayjob -o yaml` names the run; blockOwnerDeletion: a foreground
        # deletion of the run waits for its children.
        return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


@dataclass(frozen=True)
class ChildRef:
    """One child of a run: its kind, deterministic name, and the stage/attempt/ETL job it runs."""

    kind: str
    name: str
    stage: str
    attempt: int
    job: str = ""


@dataclass(frozen=True)
class ChildState:
    """A child as the state machine sees it: Missing, Pending, Running, Succeeded or Failed."""

    phase: str
    message: str = ""
    permanent: bool = False  # Failed, and retrying cannot help (the stage refused its input)

    @property
    def active(self) -> bool:
        return self.phase in (PENDING, RUNNING)


def etl_kind(backend: str) -> str:
    return EMR_JOB_RUN if backend == "emr" else SPARK_APPLICATION


def kube_child_name(kind: str, run_name: str, stage: str, attempt: int, job: str = "") -> str:
    """:func:`operators.pipeline.child_name`, fitted to what the child's operator accepts: KubeRay
    wants a RayJob name of at most 47 characters (it appends 6 for the RayCluster) and the Spark
    operator at most 56 (``<name>-driver``, ``<name>-ui-svc``), both DNS-1035 labels (a letter first).
    A name that does not fit keeps a hash of the full one, so names stay deterministic and distinct."""
    name = child_name(run_name, stage, attempt, job)
    limit = NAME_LIMITS.get(kind, _DNS_LABEL_MAX)
    if len(name) <= limit and name[:1].isalpha():
        return name
    suffix = "-".join(p for p in (stage, job, str(attempt)) if p)
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 2
    prefix = re.sub(r"[^a-z0-9-]", "-", run_name.lower())[:keep].strip("-")
    if not prefix[:1].isalpha():
        prefix = ("r-" + prefix)[:keep].rstrip("-")
    return f"{prefix}-{digest}-{suffix}"


def stage_children(run_name: str, stage: str, attempt: int, backend: str) -> list[ChildRef]:
    """Every child an attempt at ``stage`` may create, in the order it creates them (none for the
    stages the controller runs itself)."""
    if stage == "etl":
        kind = etl_kind(backend)
        return [ChildRef(kind, kube_child_name(kind, run_name, "etl", attempt, job), "etl", attempt, job)
                for job in ETL_JOBS]
    if stage in RAY_STAGES:
        return [ChildRef(RAYJOB, kube_child_name(RAYJOB, run_name, stage, attempt), stage, attempt)]
    return []


def label_value(text: str) -> str:
    """``text`` as a label value (63 characters at most; a longer one keeps a hash suffix)."""
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", text).strip("-_.")
    if len(value) > _LABEL_VALUE_MAX:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        value = f"{value[:_LABEL_VALUE_MAX - 9].rstrip('-_.')}-{digest}"
    return value


def labels(run: RunRef, stage: str, job: str = "") -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "streamrec",
        "app.kubernetes.io/component": f"pipeline-{stage}",
        "app.kubernetes.io/part-of": "streamrec",
        "app.kubernetes.io/managed-by": "streamrec-controller",
        "streamrec.io/run": label_value(run.name),
        "streamrec.io/stage": stage,
    }
    if job:
        out["streamrec.io/etl-job"] = job
    return out


def run_selector(run: RunRef) -> str:
    """The label selector of every Kubernetes child of ``run``."""
    return f"streamrec.io/run={label_value(run.name)}"


def _metadata(run: RunRef, child: ChildRef) -> dict[str, Any]:
    return {
        "name": child.name,
        "namespace": run.namespace,
        "labels": labels(run, child.stage, child.job),
        "annotations": {"streamrec.io/attempt": str(child.attempt)},
        "ownerReferences": [run.owner_reference()],
    }


# --------------------------------------------------------------------------- RayJob (train, score)


def refusal_key(run: RunRef, child: ChildRef) -> str:
    """Names one attempt of one run object (see :func:`operators.pipeline.stage_refusal_path`)."""
    return f"{run.uid}-{child.name}"


def stage_command(stage: str, spec: RunSpec, refusal: str) -> list[str]:
    """``streamrec pipeline stage <stage> ...`` for ``spec`` (the RayJob's entrypoint, as arguments);
    ``refusal``: the key under which the stage records a refusal of its input."""
    manifest = spec.to_manifest()
    args = ["streamrec", "pipeline", "stage", stage, "--region", spec.region, "--date", manifest["date"],
            "--refusal-key", refusal]
    if "endDate" in manifest:
        args += ["--end-date", manifest["endDate"]]
    if spec.overrides:
        args += ["--overrides", json.dumps({k: dict(v) for k, v in spec.overrides.items()}, sort_keys=True,
                                           separators=(",", ":"))]
    return args + ["--config", CONFIG_PATH]


def _restricted_container() -> dict[str, Any]:
    """The container securityContext of the Pod Security "restricted" profile, plus a read-only root."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "privileged": False,
            "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _restricted_pod() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _ray_pod(settings: Settings, run: RunRef, child: ChildRef, *, container: str, cpu: str, memory: str,
             gpus: int = 0, r5: bool = False) -> dict[str, Any]:
    tpl = settings.pipeline.rayjob
    resources: dict[str, Any] = {"cpu": cpu, "memory": memory}
    limits = dict(resources)
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    spec: dict[str, Any] = {
        "serviceAccountName": tpl.service_account,
        "securityContext": _restricted_pod(),
        "containers": [{
            "name": container,
            "image": tpl.image,
            "imagePullPolicy": "IfNotPresent",
            # Ray writes its session files under /tmp; the root filesystem is read-only.
            "env": [{"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"}, *map(dict, tpl.env)],
            "resources": {"requests": resources, "limits": limits},
            "securityContext": _restricted_container(),
            "volumeMounts": [
                {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                {"name": "dshm", "mountPath": "/dev/shm"},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }],
        "volumes": [
            {"name": "config", "configMap": {"name": tpl.config_map}},
            # Ray's object store lives in /dev/shm; a container's default 64 MiB would force spilling.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": tpl.shm_size}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if r5:
        spec["nodeSelector"] = dict(tpl.node_selector)
        spec["tolerations"] = [dict(t) for t in tpl.tolerations]
    return {"metadata": {"labels": labels(run, child.stage)}, "spec": spec}


def rayjob(settings: Settings, spec: RunSpec, run: RunRef, child: ChildRef) -> dict[str, Any]:
    """The KubeRay RayJob running one attempt of ``child.stage`` (train or score)."""
    if child.stage not in RAY_STAGES:
        raise ValueError(f"stage {child.stage!r} does not run as a RayJob "
                         f"(those do: {', '.join(RAY_STAGES)})")
    tpl = settings.pipeline.rayjob
    head = _ray_pod(settings, run, child, container="ray-head", cpu=tpl.head_cpu, memory=tpl.head_memory)
    worker = _ray_pod(settings, run, child, container="ray-worker", cpu=tpl.worker_cpu,
                      memory=tpl.worker_memory, gpus=tpl.worker_gpus, r5=True)
    submitter = {
        "metadata": {"labels": labels(run, child.stage)},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": tpl.service_account,
            "securityContext": _restricted_pod(),
            "containers": [{
                "name": "ray-job-submitter",
                "image": tpl.image,
                "env": [{"name": "HOME", "value": "/tmp"}],
                "resources": {"requests": {"cpu": "200m", "memory": "256Mi"},
                              "limits": {"cpu": "1", "memory": "1Gi"}},
                "securityContext": _restricted_container(),
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }
    return {
        "apiVersion": RAYJOB_API_VERSION,
        "kind": RAYJOB,
        "metadata": _metadata(run, child),
        "spec": {
            "entrypoint": shlex.join(stage_command(child.stage, spec, refusal_key(run, child))),
            "submissionMode": "K8sJobMode",
            "submitterPodTemplate": submitter,
            # The controller retries a failed attempt itself, as a new RayJob: KubeRay must not.
            "backoffLimit": 0,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": tpl.ttl_seconds_after_finished,
            "activeDeadlineSeconds": tpl.active_deadline_seconds,
            "rayClusterSpec": {
                "enableInTreeAutoscaling": False,
                "headGroupSpec": {
                    # No tasks on the head: the work goes to the R5 workers.
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": head,
                },
                "workerGroupSpecs": [{
                    "groupName": "r5",
                    "replicas": tpl.worker_replicas,
                    "minReplicas": tpl.worker_replicas,
                    "maxReplicas": tpl.worker_replicas,
                    "rayStartParams": {},
                    "template": worker,
                }],
            },
        },
    }


# --------------------------------------------------------------------------- ETL jobs: EMR or Spark operator


def etl_days(spec: RunSpec, job: str) -> tuple[date, date | None]:
    """The (first day, last day or None) an ETL job processes: ``clean`` every day of a backfill,
    ``features`` and ``keys`` the run's day only."""
    if job not in ETL_JOBS:
        raise ValueError(f"ETL job must be one of {', '.join(ETL_JOBS)}, got {job!r}")
    if job == "clean" and spec.start_day is not None:
        return spec.start_day, spec.day
    return spec.day, None


def emr_client_token(run: RunRef, child: ChildRef) -> str:
    """StartJobRun's idempotency token: one per run object (its uid) and child, so a repeated start
    reaches the job run already started, and a recreated run (new uid) starts its own."""
    return hashlib.sha256(f"streamrec-pipelinerun|{run.uid}|{child.name}".encode()).hexdigest()[:40]


def emr_tags(run: RunRef, child: ChildRef) -> dict[str, str]:
    return {"streamrec-run": run.name[:256], "streamrec-run-uid": run.uid, "streamrec-stage": child.stage,
            "streamrec-attempt": str(child.attempt)}


def emr_request(settings: Settings, spec: RunSpec, run: RunRef, child: ChildRef) -> dict[str, Any]:
    """The StartJobRun request of one ETL job of one attempt, validated against botocore's model.

    spark_etl/emr.py builds it; the controller names the job run after the child (so it is found by
    name) and tags it with the run. Raises ValueError naming a missing or wrong ``emr.*`` setting."""
    from spark_etl.emr import start_job_run_request, validate_request

    first, last = etl_days(spec, child.job)
    request = start_job_run_request(settings, spec.region, child.job, first, last,
                                     client_token=emr_client_token(run, child))
    request["name"] = child.name
    request["tags"] = {**request.get("tags", {}), **emr_tags(run, child)}
    validate_request(request)
    return request


def _node_selector(selector: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in selector.split(","))):
        key, _, value = part.partition("=")
        out[key] = value
    return out


def spark_conf(settings: Settings) -> dict[str, str]:
    """Spark properties of a SparkApplication: dynamic allocation sized like the EMR runs (emr.*),
    shuffle tracking (no external shuffle service on Kubernetes), then ``settings.spark.conf``."""
    emr = settings.emr
    conf = {
        "spark.dynamicAllocation.enabled": "true",
        "spark.dynamicAllocation.shuffleTracking.enabled": "true",
        "spark.dynamicAllocation.minExecutors": str(emr.min_executors),
        "spark.dynamicAllocation.maxExecutors": str(emr.max_executors),
        "spark.executor.memoryOverheadFactor": "0.1",
        "spark.driver.memoryOverheadFactor": "0.1",
        "spark.kubernetes.executor.request.cores": f"{emr.executor_cores * 900}m",
    }
    conf.update(settings.spark.conf)
    return conf


def spark_application(settings: Settings, spec: RunSpec, run: RunRef, child: ChildRef) -> dict[str, Any]:
    """The Spark operator SparkApplication of one ETL job of one attempt: spark_etl/main.py from the
    Spark image, with the same arguments as the EMR job run."""
    from spark_etl.emr import entry_point_arguments

    first, last = etl_days(spec, child.job)
    pipeline, emr = settings.pipeline, settings.emr
    pod_labels = labels(run, "etl", child.job)
    security = _restricted_container()
    security["readOnlyRootFilesystem"] = False  # Spark writes its scratch space and conf under the image
    common: dict[str, Any] = {
        "labels": pod_labels,
        "serviceAccount": pipeline.spark_service_account,
        "podSecurityContext": _restricted_pod(),
        "securityContext": security,
    }
    executor: dict[str, Any] = {
        **common,
        "cores": emr.executor_cores,
        "memory": emr.executor_memory,
        "instances": max(emr.min_executors, 1),
        "tolerations": [dict(t) for t in emr.tolerations],  # the R5 node group's taint, as on EMR
    }
    selector = _node_selector(emr.node_selector)
    if selector:
        executor["nodeSelector"] = selector
    return {
        "apiVersion": SPARK_API_VERSION,
        "kind": SPARK_APPLICATION,
        "metadata": _metadata(run, child),
        "spec": {
            "type": "Python",
            "pythonVersion": "3",
            "mode": "cluster",
            "image": pipeline.spark_image,
            "imagePullPolicy": "IfNotPresent",
            "mainApplicationFile": SPARK_ENTRY_POINT,
            "arguments": entry_point_arguments(settings, spec.region, child.job, first, last),
            "sparkVersion": SPARK_VERSION,
            "sparkConf": spark_conf(settings),
            # The controller retries a failed attempt itself, as a new SparkApplication. No
            # timeToLiveSeconds either: the object must outlive the run's poll of it.
            "restartPolicy": {"type": "Never"},
            "driver": {**common, "cores": emr.driver_cores, "memory": emr.driver_memory},
            "executor": executor,
        },
    }


def kube_manifest(settings: Settings, spec: RunSpec, run: RunRef, child: ChildRef) -> dict[str, Any]:
    """The manifest of a Kubernetes child (a RayJob or a SparkApplication)."""
    if child.kind == RAYJOB:
        return rayjob(settings, spec, run, child)
    if child.kind == SPARK_APPLICATION:
        return spark_application(settings, spec, run, child)
    raise ValueError(f"{child.kind} is not a Kubernetes object")


# --------------------------------------------------------------------------- reading a child's state

# KubeRay: status.jobStatus is Ray's job state, status.jobDeploymentStatus KubeRay's own.
_RAY_FAILED_JOB = ("FAILED", "STOPPED")
_RAY_FAILED_DEPLOYMENT = ("Failed", "ValidationFailed")
_RAY_WAITING_DEPLOYMENT = ("", "New", "Initializing", "Waiting", "Suspended", "Suspending")
_SPARK_FAILED = ("FAILED", "SUBMISSION_FAILED")
_SPARK_WAITING = ("", "NEW", "SUBMITTED", "PENDING_RERUN")
_EMR_WAITING = ("PENDING", "SUBMITTED")
_EMR_FAILED = ("FAILED", "CANCELLED")


def _why(*parts: Any) -> str:
    return ": ".join(str(p) for p in parts if p) or "no reason given"


def rayjob_state(obj: Mapping[str, Any] | None) -> ChildState:
    if obj is None:
        return ChildState(MISSING)
    name = obj.get("metadata", {}).get("name", "")
    status = obj.get("status") or {}
    job, deployment = status.get("jobStatus") or "", status.get("jobDeploymentStatus") or ""
    if job == "SUCCEEDED":
        return ChildState(SUCCEEDED, f"RayJob {name} succeeded")
    if job in _RAY_FAILED_JOB or deployment in _RAY_FAILED_DEPLOYMENT:
        return ChildState(FAILED, f"RayJob {name} {job or deployment}: "
                                  f"{_why(status.get('reason'), status.get('message'))}")
    if deployment in _RAY_WAITING_DEPLOYMENT and job in ("", "PENDING"):
        return ChildState(PENDING, f"RayJob {name} {deployment or 'created'}")
    return ChildState(RUNNING, f"RayJob {name} {job or deployment}")


def spark_application_state(obj: Mapping[str, Any] | None) -> ChildState:
    if obj is None:
        return ChildState(MISSING)
    name = obj.get("metadata", {}).get("name", "")
    app = (obj.get("status") or {}).get("applicationState") or {}
    state = app.get("state") or ""
    if state == "COMPLETED":
        return ChildState(SUCCEEDED, f"SparkApplication {name} completed")
    if state in _SPARK_FAILED:
        return ChildState(FAILED, f"SparkApplication {name} {state}: {_why(app.get('errorMessage'))}")
    if state in _SPARK_WAITING:
        return ChildState(PENDING, f"SparkApplication {name} {state or 'created'}")
    return ChildState(RUNNING, f"SparkApplication {name} {state}")


def emr_job_run_state(job_run: Mapping[str, Any] | None) -> ChildState:
    if job_run is None:
        return ChildState(MISSING)
    label = f"EMR job run {job_run.get('name', '')} ({job_run.get('id', '?')})"
    state = job_run.get("state", "")
    if state == "COMPLETED":
        return ChildState(SUCCEEDED, f"{label} completed")
    if state in _EMR_FAILED:
        why = _why(job_run.get("failureReason"), job_run.get("stateDetails"))
        return ChildState(FAILED, f"{label} {state}: {why}")
    if state in _EMR_WAITING:
        return ChildState(PENDING, f"{label} {state}")
    return ChildState(RUNNING, f"{label} {state}")


__all__ = [
    "CONFIG_PATH", "ChildRef", "ChildState", "EMR_JOB_RUN", "ETL_JOBS", "IN_PROCESS_STAGES", "KUBE_KINDS",
    "NAME_LIMITS", "RAYJOB", "RAY_STAGES", "RunRef", "SPARK_APPLICATION", "emr_client_token",
    "emr_job_run_state", "emr_request", "etl_days", "etl_kind", "kube_child_name", "kube_manifest",
    "label_value", "labels", "rayjob", "rayjob_state", "run_selector", "spark_application",
    "refusal_key", "spark_application_state", "stage_children", "stage_command",
]
