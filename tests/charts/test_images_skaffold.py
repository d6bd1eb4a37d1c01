"""skaffold.yaml against the skaffold v4beta14 JSON schema (no skaffold binary here), wired to the
chart's values; the Dockerfiles pinned and non-root, with a .dockerignore."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chartlib import CHART, REGION_FILES, ROOT, SCHEMAS, VALUES_FILES, deep_merge, load_values, render
from jsonschema.exceptions import best_match

pytestmark = pytest.mark.charts

SKAFFOLD = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
DOCKERFILES = {
    "streamrec/app": ROOT / "docker" / "app.Dockerfile",
    "streamrec/ray": ROOT / "docker" / "ray.Dockerfile",
    "streamrec/spark": ROOT / "spark_etl" / "Dockerfile.emr",
}


def skaffold_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads((SCHEMAS / "skaffold-v4beta14.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = list(validator.iter_errors(doc))
    return [f"{'.'.join(map(str, e.absolute_path))}: {best_match([e]).message[:300]}" for e in errors]


def test_skaffold_yaml_matches_the_schema() -> None:
    assert SKAFFOLD["apiVersion"] == "skaffold/v4beta14"  # the schema does not pin it
    assert SKAFFOLD["kind"] == "Config"
    assert skaffold_errors(SKAFFOLD) == []


def test_skaffold_schema_check_is_not_vacuous() -> None:
    bad = json.loads(json.dumps(SKAFFOLD))
    bad["build"]["artifacts"][0]["docker"]["dockerfil"] = "x"
    assert skaffold_errors(bad)
    bad = json.loads(json.dumps(SKAFFOLD))
    bad["deploy"]["helm"]["releases"][0]["valuesFile"] = []
    assert skaffold_errors(bad)


def test_skaffold_builds_every_chart_image() -> None:
    artifacts = {a["image"]: a for a in SKAFFOLD["build"]["artifacts"]}
    assert set(artifacts) == set(DOCKERFILES)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["images"]
    assert {defaults[k]["repository"] for k in ("app", "ray", "spark")} == set(artifacts)
    for image, artifact in artifacts.items():
        assert (
            ROOT / artifact.get("context", ".") / artifact["docker"]["dockerfile"]
        ).resolve() == DOCKERFILES[image].resolve()
    assert "inputDigest" in SKAFFOLD["build"]["tagPolicy"], "content tags, never latest"


def test_skaffold_helm_deploy_injects_the_built_tags() -> None:
    (release,) = SKAFFOLD["deploy"]["helm"]["releases"]
    assert release["chartPath"] == "charts/streamrec" and release["name"] == "streamrec"
    assert release["namespace"] == "streamrec"
    templates = release["setValueTemplates"]
    for key, image in (("app", "streamrec/app"), ("ray", "streamrec/ray"), ("spark", "streamrec/spark")):
        var = re.sub(r"[^A-Za-z0-9]", "_", image)
        assert templates[f"images.{key}.repository"] == f"{{{{.IMAGE_REPO_{var}}}}}"
        assert templates[f"images.{key}.tag"] == f"{{{{.IMAGE_TAG_{var}}}}}"
    # What skaffold would set renders: a registry-qualified repository and a 64-hex inputDigest tag.
    overrides: dict[str, Any] = {}
    for key in templates:
        section, image, field = key.split(".")
        value = "123456789012.dkr.ecr.us-east-1.amazonaws.com/" + image if field == "repository" else "a" * 64
        overrides = deep_merge(overrides, {section: {image: {field: value}}})
    for values_file in release["valuesFiles"]:
        assert render(deep_merge(load_values(ROOT / values_file), overrides))


def test_skaffold_profiles_per_region_and_dev() -> None:
    profiles = {p["name"]: p for p in SKAFFOLD["profiles"]}
    assert set(profiles) == {p.stem for p in VALUES_FILES}
    (release,) = SKAFFOLD["deploy"]["helm"]["releases"]
    assert release["valuesFiles"] == ["charts/streamrec/values/dev.yaml"]
    assert SKAFFOLD["build"]["local"]["push"] is False
    assert {a["kubeContext"] for a in profiles["dev"]["activation"]} == {"kind-.*", "minikube"}
    for path in REGION_FILES:
        patches = {p["path"]: p["value"] for p in profiles[path.stem]["patches"]}
        assert patches["/deploy/helm/releases/0/valuesFiles/0"] == f"charts/streamrec/values/{path.name}"
        assert (ROOT / patches["/deploy/helm/releases/0/valuesFiles/0"]).exists()
        assert patches["/build/local/push"] is True
        assert patches["/deploy/helm/releases/0/createNamespace"] is False  # k8s/namespace.yaml makes it


def test_skaffold_forwards_the_api() -> None:
    (forward,) = SKAFFOLD["portForward"]
    assert forward == {
        "resourceType": "service",
        "resourceName": "streamrec-serve",
        "namespace": "streamrec",
        "port": 8000,
        "localPort": 8000,
    }


# ------------------------------------------------------------------------------------------ Dockerfiles


def _stages(path: Path) -> tuple[dict[str, str], list[list[str]]]:
    """(ARG defaults, the instructions of each stage)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and "=" in rest and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        if op == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(f"{op} {rest}")
    return args, stages


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfiles_pin_their_base_images(image: str) -> None:
    args, stages = _stages(DOCKERFILES[image])
    assert stages
    for stage in stages:
        base = stage[0].split()[1]
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        if base in {s[0].split()[-1] for s in stages}:  # FROM an earlier stage
            continue
        assert ":" in base.rsplit("/", 1)[-1], f"{image}: {base} has no tag"
        assert not base.endswith(":latest") and "-latest" not in base.rsplit(":", 1)[1], f"{image}: {base}"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfiles_run_as_non_root(image: str) -> None:
    _, stages = _stages(DOCKERFILES[image])
    users = [i.split()[1] for i in stages[-1] if i.startswith("USER ")]
    assert users, f"{image}: the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{image} runs as root"
    if image != "streamrec/spark":  # EMR's base image user is "hadoop"; EMR builds those pods itself
        assert user.isdigit(), "a numeric user, so runAsNonRoot can be verified"
        chart_uid = {"streamrec/app": 10001, "streamrec/ray": 1000}[image]
        assert int(user) == chart_uid


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfiles_install_pinned_python_packages(image: str) -> None:
    text = DOCKERFILES[image].read_text()
    assert "constraints.txt" in text
    if image == "streamrec/ray":
        assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    pins = [
        line
        for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[0-9][A-Za-z0-9.+!-]*", p) for p in pins), pins
    names = {p.split("==")[0] for p in pins}
    assert {"ray", "torch", "kopf", "pydantic", "pyarrow", "boto3"} <= names
    assert "ray==2.60.0" in pins  # the Ray image's version


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".streamrec", "tests"} <= ignored
    assert "dist" not in ignored, "spark_etl/Dockerfile.emr copies dist/streamrec-*.whl"


def test_emr_image_docs_stay_consistent() -> None:
    """`streamrec etl submit`'s docs point at spark_etl/Dockerfile.emr, which skaffold builds."""
    emr_py = (ROOT / "spark_etl" / "emr.py").read_text()
    assert "spark_etl/Dockerfile.emr" in emr_py
    spark = next(a for a in SKAFFOLD["build"]["artifacts"] if a["image"] == "streamrec/spark")
    assert spark["docker"]["dockerfile"] == "spark_etl/Dockerfile.emr"
    args, _ = _stages(DOCKERFILES["streamrec/spark"])
    assert spark["docker"]["buildArgs"] == {
        "EMR_RELEASE": args["EMR_RELEASE"],
        "EMR_IMAGE_TAG": args["EMR_IMAGE_TAG"],
    }
    release = yaml.safe_load((ROOT / "k8s" / "versions.yaml").read_text())["emr-on-eks"]["releaseLabel"]
    assert release == f"{args['EMR_RELEASE']}-{args['EMR_IMAGE_TAG']}"
