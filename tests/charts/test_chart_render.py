"""The chart lints strictly and every rendered object is valid: built-in kinds against the Kubernetes
1.31 schemas (kubernetes-validate, strict), custom resources against their CRD schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from chartlib import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    REGION_FILES,
    chart,
    crd_validator,
    is_custom,
    load_values,
    objects,
    of_kind,
    one,
    render_file,
    strip,
    validate_builtin,
    validate_custom_resource,
)

pytestmark = pytest.mark.charts


def test_lint_strict(values_file: Path) -> None:
    report = helm_python.lint(
        str(CHART),
        load_values(values_file),
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSION}",
    )
    assert report["errors"] == []
    # Severity 1 is "info" (Helm's "icon is recommended"); warnings (2) and errors (3) fail.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


def test_every_object_is_valid(scenario: str, scenario_objects: list[dict[str, Any]]) -> None:
    assert scenario_objects, "nothing rendered"
    problems = []
    for obj in scenario_objects:
        where = f"{obj['kind']}/{obj['metadata']['name']} ({obj['_template']})"
        if is_custom(obj):
            problems += [f"{where}: {p}" for p in validate_custom_resource(obj)]
            continue
        try:
            validate_builtin(obj)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(
                f"{where}: {obj['apiVersion']} {obj['kind']} is neither a Kubernetes "
                f"{KUBE_VERSION} kind nor a custom resource with a vendored CRD"
            )
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{where}: {path}: {exc.message}")
        if obj["metadata"].get("namespace") != NAMESPACE:
            problems.append(f"{where}: not in the release namespace")
    assert problems == [], "\n".join(problems)


def test_object_names_are_unique(scenario_objects: list[dict[str, Any]]) -> None:
    keys = [(o["apiVersion"].split("/")[0], o["kind"], o["metadata"]["name"]) for o in scenario_objects]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)


def test_region_release_renders_every_component(
    values_file: Path, values_objects: list[dict[str, Any]]
) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in values_objects}
    expected = {
        ("ConfigMap", "streamrec-config"),
        ("Deployment", "streamrec-ingest"),
        ("RayService", "streamrec-serve"),
        ("PodDisruptionBudget", "streamrec-serve"),
        ("Deployment", "streamrec-controller"),
        ("Role", "streamrec-controller"),
        ("RoleBinding", "streamrec-controller"),
        ("Role", "streamrec-cron"),
        ("CronJob", "streamrec-pipeline-create"),
        ("NetworkPolicy", "streamrec-default-deny"),
        ("ConfigMap", "streamrec-dashboard"),
        ("Pod", "streamrec-test-readyz"),
        *(("ServiceAccount", f"streamrec-{c}") for c in ("ingest", "serve", "controller", "cron", "ray")),
    }
    if values_file in REGION_FILES:
        expected |= {
            ("ScaledObject", "streamrec-ingest"),
            ("TriggerAuthentication", "streamrec-ingest-kinesis"),
            ("Ingress", "streamrec-serve"),
            ("PodMonitor", "streamrec-ingest"),
            ("PodMonitor", "streamrec-controller"),
            ("PodMonitor", "streamrec-serve"),
            ("PrometheusRule", "streamrec"),
        }
        assert not of_kind(values_objects, "Secret"), (
            "a region release must not create Secrets (existingSecret)"
        )
        assert not [o for o in values_objects if o["metadata"]["name"].endswith("-redis")], (
            "dev Redis in a region"
        )
    else:
        expected |= {
            ("Deployment", "streamrec-redis"),
            ("Service", "streamrec-redis"),
            ("Secret", "streamrec-dev-secrets"),
        }
    assert expected <= kinds, sorted(expected - kinds)


def test_keda_off_falls_back_to_hpa() -> None:
    objs = objects(render_file(REGION_FILES[0], {"ingest": {"keda": {"enabled": False}}}))
    hpa = one(objs, "HorizontalPodAutoscaler", "-ingest")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "streamrec-ingest"
    assert not of_kind(objs, "ScaledObject")
    assert "replicas" not in one(objs, "Deployment", "-ingest")["spec"], "the HPA owns the replica count"


def test_scaled_object_reads_the_region_stream(
    values_objects: list[dict[str, Any]], values: dict[str, Any]
) -> None:
    found = of_kind(values_objects, "ScaledObject")
    if not values.get("ingest", {}).get("keda", {}).get("enabled", True):
        assert not found
        return
    (so,) = found
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "aws-kinesis-stream"
    assert trigger["metadata"]["streamName"] == f"streamrec-clicks-{values['region']}"
    assert trigger["metadata"]["awsRegion"] == values["region"]
    assert int(trigger["metadata"]["shardCount"]) >= 1
    auth = one(values_objects, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["podIdentity"]["provider"] == "aws", (
        "KEDA reads the stream with an IAM identity, not keys"
    )


def test_pipelinerun_crd_is_valid_and_installed_by_helm() -> None:
    """The CRD file (not ours to edit) is a valid v1 CRD, its schema compiles, and Helm ships it."""
    doc = yaml.safe_load((CHART / "crds" / "pipelineruns.streamrec.io.yaml").read_text())
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    _, _, scope = crd_validator("streamrec.io/v1alpha1", "PipelineRun")
    assert scope == "Namespaced"
    shipped = [yaml.safe_load(c["data"])["metadata"]["name"] for c in chart().crds]
    assert shipped == ["pipelineruns.streamrec.io"]


@pytest.mark.parametrize(
    "spec, valid",
    [
        ({"region": "us-east-1", "date": "2026-11-25"}, True),
        (
            {
                "region": "eu-west-1",
                "date": "2026-11-01",
                "endDate": "2026-11-07",
                "stages": ["etl", "train"],
                "overrides": {"train": {"epochs": 5}},
            },
            True,
        ),
        ({"region": "us-east-1"}, False),  # no date
        ({"region": "US-EAST-1", "date": "2026-11-25"}, False),  # not a region name
        ({"region": "us-east-1", "date": "2026-11-25", "stages": ["deploy"]}, False),
        ({"region": "us-east-1", "date": "2026-11-25", "overrides": {"serve": {}}}, False),
        ({"region": "us-east-1", "date": "2026-11-25", "typo": 1}, False),
    ],
)
def test_pipelinerun_crd_schema(spec: dict[str, Any], valid: bool) -> None:
    obj = {
        "apiVersion": "streamrec.io/v1alpha1",
        "kind": "PipelineRun",
        "metadata": {"name": "us-east-1-2026-11-25", "namespace": NAMESPACE},
        "spec": spec,
    }
    assert (validate_custom_resource(obj) == []) is valid


def test_cli_pipelinerun_manifest_matches_the_crd() -> None:
    """What `streamrec pipeline create` (the CronJob) posts is accepted by the CRD."""
    from operators.kube import pipeline_run_manifest
    from operators.pipeline import RunSpec

    for manifest in (
        {"region": "us-east-1", "date": "2026-11-25"},
        {"region": "ap-southeast-1", "date": "2026-11-01", "endDate": "2026-11-03"},
    ):
        obj = pipeline_run_manifest(RunSpec.from_manifest(manifest), NAMESPACE)
        assert validate_custom_resource(obj) == [], obj
        assert obj["metadata"]["name"].startswith(manifest["region"])


def test_crd_validation_catches_typos() -> None:
    """The strict CRD check is not vacuous: a misspelt field in a rendered RayService fails."""
    objs = objects(render_file(REGION_FILES[0]))
    rs = strip(one(objs, "RayService"))
    assert validate_custom_resource(rs) == []
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParamz"] = {}
    assert any("rayStartParamz" in p for p in validate_custom_resource(rs))


def test_helm_test_hook_calls_readyz(values_objects: list[dict[str, Any]]) -> None:
    pod = one(values_objects, "Pod", "-test-readyz")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = " ".join(pod["spec"]["containers"][0]["args"])
    assert "http://streamrec-serve.streamrec.svc:8000/readyz" in script
    rs = one(values_objects, "RayService")
    assert rs["spec"]["serveService"]["metadata"]["name"] == "streamrec-serve"


def test_ingress_routes_to_the_serve_service(values_objects: list[dict[str, Any]]) -> None:
    ingresses = of_kind(values_objects, "Ingress")
    if not ingresses:
        return
    (ing,) = ingresses
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    rs = one(values_objects, "RayService")
    ports = rs["spec"]["serveService"]["spec"]["ports"]
    assert backend == {
        "name": rs["spec"]["serveService"]["metadata"]["name"],
        "port": {"number": ports[0]["port"]},
    }
    annotations = ing["metadata"]["annotations"]
    assert ing["spec"]["ingressClassName"] == "alb"
    assert annotations["alb.ingress.kubernetes.io/target-type"] == "ip"
    assert annotations["alb.ingress.kubernetes.io/healthcheck-path"] == "/healthz"
    assert "alb.ingress.kubernetes.io/certificate-arn" in annotations
    # The embedded Service spec is a valid core/v1 Service once KubeRay names and selects it.
    validate_builtin(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": rs["spec"]["serveService"]["metadata"],
            "spec": {**rs["spec"]["serveService"]["spec"], "selector": {"ray.io/serve": "true"}},
        }
    )
