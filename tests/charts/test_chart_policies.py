"""Policy checks over every rendered object: restricted Pod Security on every container, requests and
limits, probes, the standard labels, pinned images, one ServiceAccount per component, least-privilege
RBAC, default-deny NetworkPolicies with a flow for every component, and no static AWS keys."""

from __future__ import annotations

from typing import Any

import pytest
from chartlib import (
    config_document,
    containers,
    of_kind,
    one,
    pod_specs,
    pod_template_labels,
    run_to_completion,
)

pytestmark = pytest.mark.charts

STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/component",
    "helm.sh/chart",
)
POD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")


def restricted_problems(where: str, pod: dict[str, Any], container_sc: dict[str, Any]) -> list[str]:
    """The Pod Security "restricted" profile, plus read-only root filesystems."""
    pod_sc = pod.get("securityContext", {})
    problems = []

    def effective(key: str) -> Any:
        return container_sc.get(key, pod_sc.get(key))

    if effective("runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    if effective("runAsUser") == 0:
        problems.append("runAsUser is 0")
    if container_sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if container_sc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if container_sc.get("privileged"):
        problems.append("privileged")
    caps = container_sc.get("capabilities", {})
    if "ALL" not in caps.get("drop", []):
        problems.append("capabilities do not drop ALL")
    if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
        problems.append(f"adds capabilities {caps['add']}")
    if (effective("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("seccompProfile is not RuntimeDefault")
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(flag)
    if any("hostPath" in v for v in pod.get("volumes", [])):
        problems.append("hostPath volume")
    return [f"{where}: {p}" for p in problems]


def resource_problems(where: str, resources: dict[str, Any]) -> list[str]:
    problems = []
    for kind in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if res not in (resources or {}).get(kind, {}):
                problems.append(f"{where}: no {kind}.{res}")
    return problems


def test_every_container_is_restricted(scenario_objects: list[dict[str, Any]]) -> None:
    problems = []
    for obj in scenario_objects:
        for where, pod in pod_specs(obj):
            for c in containers(pod):
                problems += restricted_problems(f"{where} {c['name']}", pod, c.get("securityContext", {}))
        if obj["kind"] == "RayService":
            # KubeRay injects the autoscaler container into the head pod with these settings.
            options = obj["spec"]["rayClusterConfig"]["autoscalerOptions"]
            head = obj["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
            problems += restricted_problems("RayService autoscaler", head, options.get("securityContext", {}))
    assert problems == [], "\n".join(problems)


def test_every_container_has_requests_and_limits(scenario_objects: list[dict[str, Any]]) -> None:
    problems = []
    for obj in scenario_objects:
        for where, pod in pod_specs(obj):
            for c in containers(pod):
                problems += resource_problems(f"{where} {c['name']}", c.get("resources"))
        if obj["kind"] == "RayService":
            problems += resource_problems(
                "RayService autoscaler", obj["spec"]["rayClusterConfig"]["autoscalerOptions"].get("resources")
            )
    assert problems == [], "\n".join(problems)


def test_every_long_running_container_has_probes(scenario_objects: list[dict[str, Any]]) -> None:
    problems, checked = [], 0
    for obj in scenario_objects:
        for where, pod in pod_specs(obj):
            if run_to_completion(pod):
                continue  # the CronJob's job and the helm test pod exit when done
            for c in pod.get("containers", []):
                checked += 1
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in c:
                        problems.append(f"{where} {c['name']}: no {probe}")
    assert checked >= 4
    assert problems == [], "\n".join(problems)


def test_every_object_has_the_standard_labels(scenario_objects: list[dict[str, Any]]) -> None:
    problems = []
    for obj in scenario_objects:
        labels = obj["metadata"].get("labels", {})
        missing = [k for k in STANDARD_LABELS if k not in labels]
        if missing:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: missing {missing}")
        if labels.get("app.kubernetes.io/part-of") != "streamrec":
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: part-of is not streamrec")
        for where, pod_labels in pod_template_labels(obj):
            missing = [k for k in POD_LABELS if k not in pod_labels]
            if missing:
                problems.append(f"{where} pod template: missing {missing}")
    assert problems == [], "\n".join(problems)


def _images(objs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    found = []
    for obj in objs:
        for where, pod in pod_specs(obj):
            found += [(f"{where} {c['name']}", c["image"]) for c in containers(pod)]
    cfg = config_document(objs)
    found += [
        ("streamrec.yaml pipeline.rayjob.image", cfg["pipeline"]["rayjob"]["image"]),
        ("streamrec.yaml pipeline.spark_image", cfg["pipeline"]["spark_image"]),
        ("streamrec.yaml emr.image", cfg["emr"]["image"]),
    ]
    return found


def test_no_latest_or_untagged_images(scenario_objects: list[dict[str, Any]]) -> None:
    problems = []
    for where, image in _images(scenario_objects):
        name = image.split("@")[0]
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else None
        if tag is None or tag == "latest":
            problems.append(f"{where}: {image}")
    assert problems == [], problems


def test_images_follow_values(scenario_objects: list[dict[str, Any]]) -> None:
    """Consumer, controller and CronJob run the app image; the RayService and RayJobs the Ray image."""
    by_where = dict(_images(scenario_objects))
    app = by_where["Deployment/streamrec-controller controller"]
    assert by_where["CronJob/streamrec-pipeline-create create"] == app
    ray = by_where["RayService/streamrec-serve head ray-head"]
    assert by_where["streamrec.yaml pipeline.rayjob.image"] == ray
    assert by_where["streamrec.yaml emr.image"] == by_where["streamrec.yaml pipeline.spark_image"]
    assert len({app, ray, by_where["streamrec.yaml emr.image"]}) == 3


def test_one_service_account_per_component(scenario_objects: list[dict[str, Any]]) -> None:
    accounts = {sa["metadata"]["name"]: sa for sa in of_kind(scenario_objects, "ServiceAccount")}
    used: dict[str, str] = {}
    for obj in scenario_objects:
        for where, pod in pod_specs(obj):
            if obj["kind"] == "Pod" or obj["metadata"]["name"].endswith("-redis"):
                assert pod.get("automountServiceAccountToken") is False, (
                    f"{where} mounts a token it does not need"
                )
                continue
            sa = pod.get("serviceAccountName")
            assert sa in accounts, f"{where}: service account {sa!r} is not one of the chart's"
            component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
            assert accounts[sa]["metadata"]["labels"]["app.kubernetes.io/component"] in (
                component,
                "serve",
            ), where
            used.setdefault(sa, component)
            assert used[sa] == component, f"{sa} is shared by {used[sa]} and {component}"
            token = pod.get(
                "automountServiceAccountToken", accounts[sa].get("automountServiceAccountToken", True)
            )
            # Only the API callers: the controller, the CronJob and the Ray head (KubeRay autoscaler).
            needs_api = sa.endswith(("-controller", "-cron")) or where.endswith(" head")
            assert token is needs_api, f"{where}: automountServiceAccountToken should be {needs_api}"


def test_aws_identity_is_pod_identity_or_irsa_never_keys(
    scenario: str, scenario_objects: list[dict[str, Any]]
) -> None:
    cfg = config_document(scenario_objects)
    assert "access_key_id" not in cfg["aws"] and "secret_access_key" not in cfg["aws"]
    for obj in scenario_objects:
        for where, pod in pod_specs(obj):
            for c in containers(pod):
                names = {e["name"] for e in c.get("env", [])}
                if scenario != "dev":  # dev talks to a moto server with its dummy "testing" keys
                    assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}, (
                        where
                    )
    irsa = {
        sa["metadata"]["name"]: sa["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn")
        for sa in of_kind(scenario_objects, "ServiceAccount")
    }
    if scenario == "irsa":
        assert all(arn for name, arn in irsa.items() if not name.endswith("-cron")), irsa
    else:
        assert not any(irsa.values()), "pod-identity mode annotates no role"


def test_rbac_is_least_privilege(scenario: str, scenario_objects: list[dict[str, Any]]) -> None:
    assert not of_kind(scenario_objects, "ClusterRole") and not of_kind(
        scenario_objects, "ClusterRoleBinding"
    )
    for role in of_kind(scenario_objects, "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{role['metadata']['name']}: wildcard {field}"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
    controller = one(scenario_objects, "Role", "-controller")
    granted = {
        (g, r): set(rule["verbs"])
        for rule in controller["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    expected = {
        ("streamrec.io", "pipelineruns"): {"get", "list", "watch", "patch", "update"},
        ("streamrec.io", "pipelineruns/status"): {"get", "patch", "update"},
        ("ray.io", "rayjobs"): {"get", "list", "watch", "create", "delete"},
        ("ray.io", "rayjobs/status"): {"get"},
        ("", "events"): {"create", "patch"},
        ("events.k8s.io", "events"): {"create", "patch"},
        ("", "configmaps"): {"get", "list", "watch"},
    }
    if scenario == "spark-operator":
        expected |= {
            ("sparkoperator.k8s.io", "sparkapplications"): {"get", "list", "watch", "create", "delete"},
            ("sparkoperator.k8s.io", "sparkapplications/status"): {"get"},
        }
    assert granted == expected
    cron = one(scenario_objects, "Role", "-cron")
    assert cron["rules"] == [
        {"apiGroups": ["streamrec.io"], "resources": ["pipelineruns"], "verbs": ["create"]}
    ]
    for binding in of_kind(scenario_objects, "RoleBinding"):
        role = binding["roleRef"]["name"]
        assert binding["roleRef"]["kind"] == "Role" and one(scenario_objects, "Role", role)
        (subject,) = binding["subjects"]
        assert subject["kind"] == "ServiceAccount" and subject["name"] == role  # streamrec-<component>


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        if expr["operator"] == "Exists" and not present:
            return False
        if expr["operator"] == "DoesNotExist" and present:
            return False
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_network_policies_default_deny_and_a_flow_per_component(
    scenario_objects: list[dict[str, Any]],
) -> None:
    policies = of_kind(scenario_objects, "NetworkPolicy")
    deny = one(scenario_objects, "NetworkPolicy", "-default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    specific = [p for p in policies if p["spec"]["podSelector"]]
    for obj in scenario_objects:
        for where, labels in pod_template_labels(obj):
            if obj["kind"] == "RayService":
                labels = {**labels, "ray.io/is-ray-node": "yes"}  # set by KubeRay on every Ray pod
            if obj["kind"] == "CronJob":
                continue  # DNS and HTTPS to the API server only: the namespace-wide policy
            assert any(_selects(p["spec"]["podSelector"], labels) for p in specific), f"{where}: no flows"
    ray = one(scenario_objects, "NetworkPolicy", "-ray")
    kuberay = [r for r in ray["spec"]["ingress"] if any("namespaceSelector" in f for f in r.get("from", []))]
    assert any({"port": 8265, "protocol": "TCP"} in r.get("ports", []) for r in kuberay), (
        "the KubeRay operator must reach the Ray dashboard"
    )
    dns = one(scenario_objects, "NetworkPolicy", "-dns-https")
    assert {"port": 53, "protocol": "UDP"} in dns["spec"]["egress"][0]["ports"]
