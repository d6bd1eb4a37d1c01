"""The controller's child objects (operators/children.py): built right, valid for their operators.

The RayJob and SparkApplication manifests are checked against the CRD schemas KubeRay v1.7.0 and the
Spark operator v2.5.2 install (vendored in tests/unit/schemas/, see its README), with unknown fields
refused; the EMR request against botocore's model; the RayJob's entrypoint against the real
``streamrec pipeline stage`` command line and the SparkApplication's arguments against
spark_etl/main.py's parser.
"""

from __future__ import annotations

import json
import re
import shlex
from datetime import date
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from operators.children import (
    CONFIG_PATH,
    EMR_JOB_RUN,
    NAME_LIMITS,
    RAYJOB,
    SPARK_APPLICATION,
    ChildRef,
    RunRef,
    emr_client_token,
    emr_job_run_state,
    emr_request,
    etl_days,
    kube_child_name,
    kube_manifest,
    label_value,
    labels,
    rayjob,
    rayjob_state,
    spark_application,
    spark_application_state,
    stage_children,
    refusal_key,
    stage_command,
)
from operators.pipeline import RunSpec, child_name
from streamrec.settings import RegionSettings, Settings

SCHEMAS = Path(__file__).parent / "schemas"
REGION = "us-east-1"
RUN = RunRef("us-east-1-2026-11-25", "streamrec", "0d6f4c1e-5b7a-4c8e-9a51-2f3d1c0b9e77")
SPEC = RunSpec.from_manifest({"region": REGION, "date": "2026-11-25"})
BACKFILL = RunSpec.from_manifest({
    "region": REGION, "date": "2026-11-01", "endDate": "2026-11-25",
    "overrides": {"train": {"epochs": 5}, "gate": {"min_lift_over_popular": 0.1}}})
GOOD_EMR = {
    "virtual_cluster_id": "abc123def456ghi789",
    "execution_role_arn": "arn:aws:iam::123456789012:role/streamrec-emr-job",
    "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/streamrec-spark:1a2b3c4",
    "log_uri": "s3://streamrec-logs/emr",
}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def make_settings(**pipeline: Any) -> Settings:
    return Settings(regions={REGION: RegionSettings.default_for(REGION, "s3://streamrec-lake/us")},
                    emr=GOOD_EMR, pipeline=pipeline)


SETTINGS = make_settings()


def ray_child(stage: str = "train", attempt: int = 1) -> ChildRef:
    return stage_children(RUN.name, stage, attempt, "spark-operator")[0]


def etl_child(job: str = "clean", attempt: int = 1, backend: str = "spark-operator") -> ChildRef:
    return next(c for c in stage_children(RUN.name, "etl", attempt, backend) if c.job == job)


# --------------------------------------------------------------------------- schema checks


def _strict(schema: Any) -> Any:
    """additionalProperties: false wherever the schema lists properties and keeps no unknown fields
    (tests/unit/schemas/README.md), so a misspelt field fails."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        if out.get("nullable"):
            out["type"] = [out.get("type", "object"), "null"]
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _validator(file: str) -> tuple[str, str, jsonschema.Draft4Validator]:
    doc = json.loads((SCHEMAS / file).read_text())
    return (f"{doc['group']}/{doc['version']}", doc["kind"],
            jsonschema.Draft4Validator(_strict(doc["openAPIV3Schema"])))


VALIDATORS = {kind: (api, v) for api, kind, v in (_validator("ray.io_v1_rayjob.json"),
                                                  _validator("sparkoperator.k8s.io_v1beta2_sparkapplication.json"))}


def assert_valid_custom_resource(obj: dict[str, Any]) -> None:
    api_version, validator = VALIDATORS[obj["kind"]]
    assert obj["apiVersion"] == api_version
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{'.'.join(map(str, e.path))}: {e.message[:200]}" for e in errors)
    meta = obj["metadata"]
    assert DNS_1035.match(meta["name"]) and len(meta["name"]) <= NAME_LIMITS[obj["kind"]]
    assert meta["namespace"] == RUN.namespace
    for key, value in meta["labels"].items():
        assert len(value) <= 63 and re.match(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$", value), key


def test_the_schema_check_catches_mistakes() -> None:
    obj = rayjob(SETTINGS, SPEC, RUN, ray_child())
    obj["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParamz"] = {}
    with pytest.raises(AssertionError, match="rayStartParamz"):
        assert_valid_custom_resource(obj)
    obj = spark_application(SETTINGS, SPEC, RUN, etl_child())
    obj["spec"]["driver"]["cores"] = "two"
    with pytest.raises(AssertionError, match="cores"):
        assert_valid_custom_resource(obj)


# --------------------------------------------------------------------------- RayJob


@pytest.mark.parametrize("stage", ["train", "score"])
@pytest.mark.parametrize("spec", [SPEC, BACKFILL], ids=["daily", "backfill-with-overrides"])
def test_rayjob_is_valid_for_kuberay(stage: str, spec: RunSpec) -> None:
    assert_valid_custom_resource(rayjob(SETTINGS, spec, RUN, ray_child(stage)))


def test_rayjob_with_gpu_workers_is_valid() -> None:
    settings = make_settings(rayjob={"worker_gpus": 1})
    obj = rayjob(settings, SPEC, RUN, ray_child())
    assert_valid_custom_resource(obj)
    worker = obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in worker["resources"]["requests"]


def _parse_streamrec(args: list[str]) -> dict[str, Any]:
    """The parameters the real ``streamrec`` command line gives the command ``args`` name."""
    import typer

    from streamrec.cli import app

    command: Any = typer.main.get_command(app)  # typer's own (vendored) click objects
    ctx = command.make_context("streamrec", list(args), resilient_parsing=True)
    rest = list(args)
    while hasattr(command, "resolve_command"):  # a group: descend to the sub-command
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
    return dict(ctx.params)


def test_rayjob_entrypoint_is_the_pipeline_stage_command() -> None:
    obj = rayjob(SETTINGS, SPEC, RUN, ray_child("score"))
    args = shlex.split(obj["spec"]["entrypoint"])
    key = refusal_key(RUN, ray_child("score"))
    assert args == ["streamrec", "pipeline", "stage", "score", "--region", REGION, "--date", "2026-11-25",
                    "--refusal-key", key, "--config", CONFIG_PATH]
    params = _parse_streamrec(args[1:])
    assert params["name"] == "score" and params["region"] == REGION and params["day"] == "2026-11-25"
    assert str(params["config"]) == CONFIG_PATH and params["end_day"] is None and params["overrides"] is None
    assert params["refusal_key"] == key and RUN.uid in key and ray_child("score").name in key


def test_rayjob_entrypoint_carries_backfill_and_overrides_through_the_shell() -> None:
    args = shlex.split(rayjob(SETTINGS, BACKFILL, RUN, ray_child())["spec"]["entrypoint"])
    assert args == stage_command("train", BACKFILL, refusal_key(RUN, ray_child()))
    params = _parse_streamrec(args[1:])
    assert (params["day"], params["end_day"]) == ("2026-11-01", "2026-11-25")
    assert json.loads(params["overrides"]) == {"gate": {"min_lift_over_popular": 0.1}, "train": {"epochs": 5}}


def test_rayjob_metadata_names_labels_and_owner() -> None:
    obj = rayjob(SETTINGS, SPEC, RUN, ray_child("train", 2))
    meta = obj["metadata"]
    assert meta["name"] == child_name(RUN.name, "train", 2) == "us-east-1-2026-11-25-train-2"
    assert meta["labels"]["streamrec.io/run"] == RUN.name
    assert meta["labels"]["streamrec.io/stage"] == "train"
    assert meta["labels"]["app.kubernetes.io/name"] == "streamrec"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "streamrec-controller"
    assert meta["ownerReferences"] == [{"apiVersion": "streamrec.io/v1alpha1", "kind": "PipelineRun",
                                        "name": RUN.name, "uid": RUN.uid, "controller": True,
                                        "blockOwnerDeletion": True}]
    for template in _templates(obj):
        assert template["metadata"]["labels"]["streamrec.io/run"] == RUN.name


def _templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = obj["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"]),
            obj["spec"]["submitterPodTemplate"]]


def test_rayjob_lifecycle_settings() -> None:
    settings = make_settings(rayjob={"ttl_seconds_after_finished": 120, "active_deadline_seconds": 3600})
    spec = rayjob(settings, SPEC, RUN, ray_child())["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 120
    assert spec["activeDeadlineSeconds"] == 3600
    assert spec["backoffLimit"] == 0  # the controller retries, as a new RayJob


def test_rayjob_workers_run_on_the_r5_group_and_the_head_does_no_work() -> None:
    tpl = SETTINGS.pipeline.rayjob
    cluster = rayjob(SETTINGS, SPEC, RUN, ray_child())["spec"]["rayClusterSpec"]
    [group] = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == tpl.worker_replicas
    assert group["template"]["spec"]["nodeSelector"] == {"streamrec.io/node-group": "r5"}
    assert group["template"]["spec"]["tolerations"] == [
        {"key": "streamrec.io/memory-optimized", "operator": "Exists", "effect": "NoSchedule"}]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"] == {"cpu": tpl.worker_cpu, "memory": tpl.worker_memory}
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nodeSelector" not in head["template"]["spec"]


def test_ray_pods_mount_shm_config_and_are_restricted() -> None:
    obj = rayjob(make_settings(rayjob={"shm_size": "24Gi", "config_map": "cfg"}), SPEC, RUN, ray_child())
    for template in _templates(obj):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
    for template in _templates(obj)[:2]:  # head and workers
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "24Gi"}
        assert volumes["config"]["configMap"] == {"name": "cfg"}
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["/dev/shm"]["name"] == "dshm"
        assert mounts["/etc/streamrec"] == {"name": "config", "mountPath": "/etc/streamrec", "readOnly": True}
        assert pod["serviceAccountName"] == SETTINGS.pipeline.rayjob.service_account


# --------------------------------------------------------------------------- SparkApplication and EMR


@pytest.mark.parametrize("job", ["clean", "features", "keys"])
@pytest.mark.parametrize("spec", [SPEC, BACKFILL], ids=["daily", "backfill"])
def test_spark_application_is_valid_and_runs_the_etl_entry_point(job: str, spec: RunSpec) -> None:
    from spark_etl.emr import entry_point_arguments
    from spark_etl.main import parse_args

    obj = spark_application(SETTINGS, spec, RUN, etl_child(job))
    assert_valid_custom_resource(obj)
    first, last = etl_days(spec, job)
    assert obj["spec"]["arguments"] == entry_point_arguments(SETTINGS, REGION, job, first, last)
    args = parse_args(obj["spec"]["arguments"])
    assert (args.job, args.date, args.end_date) == (job, first, last)
    assert obj["spec"]["mainApplicationFile"] == "local:///opt/streamrec/main.py"
    assert obj["spec"]["image"] == SETTINGS.pipeline.spark_image
    assert obj["spec"]["restartPolicy"] == {"type": "Never"}
    assert "timeToLiveSeconds" not in obj["spec"]  # the object must stay for the controller to read
    assert obj["spec"]["driver"]["serviceAccount"] == SETTINGS.pipeline.spark_service_account
    executor = obj["spec"]["executor"]  # on the R5 node group: its label, and its taint tolerated
    assert executor["nodeSelector"] == {"streamrec.io/node-group": "r5"}
    assert executor["tolerations"] == [dict(t) for t in SETTINGS.emr.tolerations] == [
        {"key": "streamrec.io/memory-optimized", "operator": "Exists", "effect": "NoSchedule"}]
    assert obj["metadata"]["labels"]["streamrec.io/etl-job"] == job
    assert obj["metadata"]["ownerReferences"][0]["uid"] == RUN.uid


def test_etl_days_clean_the_whole_backfill_and_build_features_for_its_last_day() -> None:
    assert etl_days(BACKFILL, "clean") == (date(2026, 11, 1), date(2026, 11, 25))
    assert etl_days(BACKFILL, "features") == (date(2026, 11, 25), None)
    assert etl_days(SPEC, "clean") == (date(2026, 11, 25), None)
    with pytest.raises(ValueError, match="ETL job"):
        etl_days(SPEC, "all")


def test_emr_request_is_named_after_the_child_and_tagged_with_the_run() -> None:
    child = etl_child("clean", 2, backend="emr")
    request = emr_request(SETTINGS, BACKFILL, RUN, child)  # validated against botocore's model inside
    assert request["name"] == child.name == "us-east-1-2026-11-25-etl-clean-2"
    assert request["clientToken"] == emr_client_token(RUN, child)
    assert request["tags"]["streamrec-run-uid"] == RUN.uid and request["tags"]["streamrec-attempt"] == "2"
    args = request["jobDriver"]["sparkSubmitJobDriver"]["entryPointArguments"]
    assert args[:8] == ["--job", "clean", "--region", REGION, "--date", "2026-11-01",
                        "--end-date", "2026-11-25"]


def test_emr_client_token_is_per_run_object_and_child() -> None:
    first, second = etl_child("clean", 1, "emr"), etl_child("clean", 2, "emr")
    assert emr_client_token(RUN, first) == emr_client_token(RUN, first)
    assert emr_client_token(RUN, first) != emr_client_token(RUN, second)
    recreated = RunRef(RUN.name, RUN.namespace, "another-uid")
    assert emr_client_token(RUN, first) != emr_client_token(recreated, first)


def test_emr_request_names_a_missing_setting() -> None:
    settings = Settings(regions={REGION: RegionSettings.default_for(REGION, "s3://lake/us")})
    with pytest.raises(ValueError, match="emr.virtual_cluster_id"):
        emr_request(settings, SPEC, RUN, etl_child("clean", backend="emr"))


def test_kube_manifest_dispatches_on_kind() -> None:
    assert kube_manifest(SETTINGS, SPEC, RUN, ray_child())["kind"] == RAYJOB
    assert kube_manifest(SETTINGS, SPEC, RUN, etl_child())["kind"] == SPARK_APPLICATION
    with pytest.raises(ValueError, match="not a Kubernetes object"):
        kube_manifest(SETTINGS, SPEC, RUN, etl_child(backend="emr"))
    with pytest.raises(ValueError, match="RayJob"):
        rayjob(SETTINGS, SPEC, RUN, ChildRef(RAYJOB, "x", "sync", 1))


# --------------------------------------------------------------------------- names


def test_children_of_an_attempt_in_order() -> None:
    assert [(c.kind, c.name) for c in stage_children("r", "etl", 1, "emr")] == [
        (EMR_JOB_RUN, "r-etl-clean-1"), (EMR_JOB_RUN, "r-etl-features-1"), (EMR_JOB_RUN, "r-etl-keys-1")]
    assert [(c.kind, c.name) for c in stage_children("r", "score", 3, "emr")] == [(RAYJOB, "r-score-3")]
    assert stage_children("r", "sync", 1, "emr") == []


@pytest.mark.parametrize("run_name", ["ap-southeast-1-2026-11-25-from-2026-11-01", "backfill-" + "a" * 80,
                                      "2026-11-25-by-hand"])
def test_child_names_fit_what_each_operator_accepts(run_name: str) -> None:
    """KubeRay refuses RayJob names over 47 characters, the Spark operator's pods and services need
    names of at most 56; both must start with a letter. Names stay deterministic and distinct."""
    run = RunRef(run_name, "streamrec", "uid")
    for backend in ("emr", "spark-operator"):
        names = set()
        for stage in ("etl", "train", "score"):
            for attempt in (1, 2):
                children = stage_children(run_name, stage, attempt, backend)
                assert children == stage_children(run_name, stage, attempt, backend)  # deterministic
                for child in children:
                    assert len(child.name) <= NAME_LIMITS[child.kind] and DNS_1035.match(child.name), child
                    names.add(child.name)
                    if child.kind != EMR_JOB_RUN:
                        assert_valid_custom_resource(kube_manifest(SETTINGS, SPEC, run, child))
        assert len(names) == 3 * 2 + 2 * 2  # one per ETL job, stage and attempt
    assert stage_children(run_name, "train", 1, "emr") != stage_children(run_name + "-b", "train", 1, "emr")


def test_short_child_names_are_the_pipelines_child_names() -> None:
    assert kube_child_name(RAYJOB, RUN.name, "train", 1) == child_name(RUN.name, "train", 1)
    keys = kube_child_name(SPARK_APPLICATION, RUN.name, "etl", 1, "keys")
    assert keys == child_name(RUN.name, "etl", 1, "keys")


def test_long_run_names_give_valid_distinct_labels() -> None:
    long_a, long_b = "backfill-" + "a" * 80 + "-x", "backfill-" + "a" * 80 + "-y"
    run = RunRef(long_a, "streamrec", "uid")
    assert label_value(long_a) != label_value(long_b) and len(label_value(long_a)) <= 63
    assert labels(run, "train")["streamrec.io/run"] == label_value(long_a)
    assert_valid_custom_resource(rayjob(SETTINGS, SPEC, run, stage_children(long_a, "train", 1, "emr")[0]))


# --------------------------------------------------------------------------- reading a child's state


@pytest.mark.parametrize("status,phase,words", [
    (None, "Missing", ""),
    ({}, "Pending", "created"),
    ({"jobDeploymentStatus": "Initializing"}, "Pending", "Initializing"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "PENDING"}, "Running", "PENDING"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "Running", "RUNNING"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, "Succeeded", "succeeded"),
    ({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
      "message": "Job entrypoint command failed with exit code 1"}, "Failed", "AppFailed: Job entrypoint"),
    ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, "Failed", "DeadlineExceeded"),
    ({"jobDeploymentStatus": "ValidationFailed", "message": "bad spec"}, "Failed", "bad spec"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, "Failed", "STOPPED"),
])
def test_rayjob_state(status: dict[str, Any] | None, phase: str, words: str) -> None:
    obj = None if status is None else {"metadata": {"name": "j"}, "status": status}
    state = rayjob_state(obj)
    assert state.phase == phase and words in state.message


@pytest.mark.parametrize("state,phase,words", [
    (None, "Pending", "created"),
    ("SUBMITTED", "Pending", "SUBMITTED"),
    ("RUNNING", "Running", "RUNNING"),
    ("SUCCEEDING", "Running", "SUCCEEDING"),
    ("COMPLETED", "Succeeded", "completed"),
    ("FAILED", "Failed", "driver OOMKilled"),
    ("SUBMISSION_FAILED", "Failed", "SUBMISSION_FAILED"),
])
def test_spark_application_state(state: str | None, phase: str, words: str) -> None:
    app_state = {"state": state, "errorMessage": "driver OOMKilled"}
    status = {} if state is None else {"applicationState": app_state}
    result = spark_application_state({"metadata": {"name": "s"}, "status": status})
    assert result.phase == phase and words in result.message
    assert spark_application_state(None).phase == "Missing"


@pytest.mark.parametrize("state,phase", [
    ("PENDING", "Pending"), ("SUBMITTED", "Pending"), ("RUNNING", "Running"), ("CANCEL_PENDING", "Running"),
    ("COMPLETED", "Succeeded"), ("FAILED", "Failed"), ("CANCELLED", "Failed")])
def test_emr_job_run_state(state: str, phase: str) -> None:
    job = {"id": "00000003abc", "name": "r-etl-clean-1", "state": state, "failureReason": "USER_ERROR",
           "stateDetails": "exit code 3"}
    result = emr_job_run_state(job)
    assert result.phase == phase and "00000003abc" in result.message
    if phase == "Failed":
        assert "USER_ERROR: exit code 3" in result.message
    assert emr_job_run_state(None).phase == "Missing"


def test_ray_pods_carry_the_secret_env_of_the_template() -> None:
    salt = {"name": "STREAMREC_INGEST__PII_SALT",
            "valueFrom": {"secretKeyRef": {"name": "streamrec-pii-salt", "key": "salt"}}}
    settings = make_settings(rayjob={"env": [salt]})
    job = rayjob(settings, SPEC, RUN, ray_child())
    for template in _templates(job)[:2]:  # head and workers; the submitter only talks to the head
        assert salt in template["spec"]["containers"][0]["env"]
    assert_valid_custom_resource(job)
