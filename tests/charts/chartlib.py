"""Helpers of the chart tests: render the chart offline, walk its objects, validate custom resources
against their CRD schemas (vendored in tests/charts/schemas, see its README for the rules applied).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "streamrec"
VALUES_DIR = CHART / "values"
VALUES_FILES = sorted(VALUES_DIR.glob("*.yaml"))
REGION_FILES = [p for p in VALUES_FILES if p.stem != "dev"]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S = ROOT / "k8s"
KUBE_VERSION = "1.31.0"
RELEASE = "streamrec"
NAMESPACE = "streamrec"

# apiVersion/kind -> (CRD file, patch file or None). The PipelineRun CRD is the chart's own.
CRD_FILES: dict[tuple[str, str], tuple[Path, Path | None]] = {
    ("ray.io/v1", "RayService"): (SCHEMAS / "ray.io_rayservices.yaml", None),
    ("keda.sh/v1alpha1", "ScaledObject"): (
        SCHEMAS / "keda.sh_scaledobjects.yaml",
        SCHEMAS / "keda.sh_scaledobjects.patch.yaml",
    ),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): (SCHEMAS / "keda.sh_triggerauthentications.yaml", None),
    ("monitoring.coreos.com/v1", "PodMonitor"): (SCHEMAS / "monitoring.coreos.com_podmonitors.yaml", None),
    ("monitoring.coreos.com/v1", "PrometheusRule"): (
        SCHEMAS / "monitoring.coreos.com_prometheusrules.yaml",
        None,
    ),
    ("karpenter.sh/v1", "NodePool"): (SCHEMAS / "karpenter.sh_nodepools.yaml", None),
    ("karpenter.k8s.aws/v1", "EC2NodeClass"): (SCHEMAS / "karpenter.k8s.aws_ec2nodeclasses.yaml", None),
    ("streamrec.io/v1alpha1", "PipelineRun"): (CHART / "crds" / "pipelineruns.streamrec.io.yaml", None),
}
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


# ------------------------------------------------------------------------------------------ rendering


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@functools.lru_cache(maxsize=1)
def chart() -> Any:
    import helm_python

    return helm_python.Chart.load(str(CHART))


@functools.lru_cache(maxsize=64)
def _render(values_json: str, namespace: str) -> tuple[tuple[str, str], ...]:
    out = chart().render(json.loads(values_json), name=RELEASE, namespace=namespace, is_install=True)
    return tuple(sorted(out.items()))


def render(values: dict[str, Any], namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text, as `helm install` would (cached per values)."""
    return dict(_render(json.dumps(values, sort_keys=True), namespace))


def render_file(path: Path, overrides: dict[str, Any] | None = None) -> dict[str, str]:
    return render(deep_merge(load_values(path), overrides or {}))


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of a render (NOTES.txt left out), each with ``_template`` added."""
    out = []
    for template, text in rendered.items():
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.load_all(text, Loader=_LOADER):
            if doc:
                doc = dict(doc)
                doc["_template"] = template
                out.append(doc)
    return out


def strip(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, (
        f"expected one {kind} *{name_suffix}, found {[o['metadata']['name'] for o in found]}"
    )
    return found[0]


def config_document(objs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = one(objs, "ConfigMap", "-config")
    return yaml.safe_load(cm["data"]["streamrec.yaml"])


# ------------------------------------------------------------------------------------------ pods


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod template an object carries."""
    kind, spec = obj["kind"], obj.get("spec", {})
    name = f"{kind}/{obj['metadata']['name']}"
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield name, spec["template"]["spec"]
    elif kind == "CronJob":
        yield name, spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "Pod":
        yield name, spec
    elif kind == "RayService":
        cluster = spec["rayClusterConfig"]
        yield f"{name} head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{name} worker {group['groupName']}", group["template"]["spec"]


def pod_template_labels(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, str]]]:
    kind, spec = obj["kind"], obj.get("spec", {})
    name = f"{kind}/{obj['metadata']['name']}"
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield name, spec["template"]["metadata"].get("labels", {})
    elif kind == "CronJob":
        yield name, spec["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    elif kind == "RayService":
        cluster = spec["rayClusterConfig"]
        yield f"{name} head", cluster["headGroupSpec"]["template"]["metadata"].get("labels", {})
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{name} worker", group["template"]["metadata"].get("labels", {})


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers", [])) + list(pod.get("containers", []))


def run_to_completion(pod: dict[str, Any]) -> bool:
    """Job and test pods: they exit when done, so liveness/readiness probes do not apply."""
    return pod.get("restartPolicy") in ("Never", "OnFailure")


# ------------------------------------------------------------------------------------------ CRD schemas


def _strictify(node: Any) -> Any:
    """What the API server does that jsonschema does not (see schemas/README.md)."""
    if isinstance(node, dict):
        node = {k: _strictify(v) for k, v in node.items()}
        if node.pop("nullable", False) and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        if (
            node.get("type") in ("object", ["object", "null"])
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        if node.get("pattern") == "^(?i)(abort|warn)?$":
            node["pattern"] = "(?i)^(abort|warn)?$"
        return node
    if isinstance(node, list):
        return [_strictify(v) for v in node]
    return node


def _apply_patch(crd: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 ``add`` operations (all KEDA's patch uses)."""
    crd = copy.deepcopy(crd)
    for op in ops:
        assert op["op"] == "add", op
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node: Any = crd
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[parts[-1]] = op["value"]
    return crd


@functools.cache
def crd(api_version: str, kind: str) -> dict[str, Any]:
    path, patch = CRD_FILES[(api_version, kind)]
    doc = yaml.safe_load(path.read_text())
    if patch is not None:
        doc = _apply_patch(doc, yaml.safe_load(patch.read_text()))
    return doc


@functools.cache
def crd_validator(api_version: str, kind: str) -> tuple[jsonschema.Draft4Validator, dict[str, Any], str]:
    """(validator, the version's schema, scope) for a custom resource's apiVersion and kind."""
    doc = crd(api_version, kind)
    group, version = api_version.split("/")
    assert doc["spec"]["group"] == group and doc["spec"]["names"]["kind"] == kind
    for v in doc["spec"]["versions"]:
        if v["name"] == version:
            assert v.get("served", True), f"{api_version} {kind} is not served"
            schema = _strictify(v["schema"]["openAPIV3Schema"])
            jsonschema.Draft4Validator.check_schema(schema)
            return jsonschema.Draft4Validator(schema), schema, doc["spec"]["scope"]
    raise KeyError(f"{kind} has no version {version}")


def with_defaults(instance: Any, schema: dict[str, Any]) -> Any:
    """The API server's order: drop nulls of non-nullable fields, fill defaults, then validate."""
    if isinstance(instance, dict) and isinstance(schema, dict):
        props = schema.get("properties", {})
        out = {}
        for key, value in instance.items():
            sub = props.get(key) or (
                schema.get("additionalProperties")
                if isinstance(schema.get("additionalProperties"), dict)
                else {}
            )
            if value is None and "null" not in (sub.get("type") or []):
                continue
            out[key] = with_defaults(value, sub)
        for key, sub in props.items():
            if key not in out and isinstance(sub, dict) and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        return out
    if isinstance(instance, list) and isinstance(schema, dict) and isinstance(schema.get("items"), dict):
        return [with_defaults(v, schema["items"]) for v in instance]
    return instance


def validate_custom_resource(obj: dict[str, Any]) -> list[str]:
    """Problems of one custom resource against its CRD (empty list: valid)."""
    obj = strip(obj)
    validator, schema, scope = crd_validator(obj["apiVersion"], obj["kind"])
    problems = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(with_defaults(obj, schema))
    ]
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    if not (name and len(name) <= 253 and DNS1123_SUBDOMAIN.match(name)):
        problems.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")
    if (scope == "Namespaced") != ("namespace" in meta):
        needs = "needs" if scope == "Namespaced" else "takes no"
        problems.append(f"metadata.namespace: {scope} resource {needs} namespace")
    return problems


def validate_builtin(obj: dict[str, Any], version: str = KUBE_VERSION) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(strip(obj), version, strict=True)


def is_custom(obj: dict[str, Any]) -> bool:
    return (obj["apiVersion"], obj["kind"]) in CRD_FILES
