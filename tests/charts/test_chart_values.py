"""values.yaml, values.schema.json and the per-region values files: every value typed and documented,
unknown keys refused, region files holding only what differs between regions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import pytest
import settings_schema
import yaml
from chartlib import CHART, REGION_FILES, VALUES_FILES, chart, deep_merge, load_values

pytestmark = pytest.mark.charts

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())


def _validator() -> jsonschema.Draft7Validator:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    return jsonschema.Draft7Validator(SCHEMA)


def test_settings_schema_is_generated_from_the_code() -> None:
    """values.schema.json's settings part is what tests/charts/settings_schema.py makes of Settings now."""
    assert settings_schema.merged(SCHEMA) == SCHEMA, (
        "run: .venv/bin/python tests/charts/settings_schema.py --write"
    )


def _object_schemas(node: Any, path: str = "#") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            out.append((path, node))
        for key, value in node.items():
            out += _object_schemas(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _object_schemas(value, f"{path}/{i}")
    return out


# Objects whose keys are free by design: string maps (labels, annotations, node selectors) and the
# two free-form settings the code itself declares as dict[str, Any] / dict[str, str].
FREE_MAPS = {
    "#/definitions/labels",
    "#/definitions/settings.TrainSettings/properties/model",
    "#/definitions/settings.SparkSettings/properties/conf",
}


def test_every_object_in_the_schema_is_closed() -> None:
    problems = []
    for path, node in _object_schemas(SCHEMA):
        extra = node.get("additionalProperties")
        if "properties" in node and extra is not False:
            problems.append(f"{path}: additionalProperties is not false")
        if "properties" not in node and path not in FREE_MAPS and not isinstance(extra, dict):
            problems.append(f"{path}: an open object")
    assert problems == [], "\n".join(problems)


def _leaves(schema: dict[str, Any], node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    if "$ref" in node:
        node = {**_resolve(schema, node["$ref"]), **{k: v for k, v in node.items() if k != "$ref"}}
    if "properties" in node:
        out = []
        for key, sub in node["properties"].items():
            out += _leaves(schema, sub, f"{path}.{key}" if path else key)
        return out
    return [(path, node)]


def _resolve(schema: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = schema
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_value_is_typed() -> None:
    untyped = [
        path
        for path, node in _leaves(SCHEMA, SCHEMA)
        if not ({"type", "anyOf", "allOf", "oneOf", "enum", "const"} & set(node))
    ]
    assert untyped == []


def test_values_files_match_the_schema(values_file: Path) -> None:
    merged = deep_merge(DEFAULTS, load_values(values_file))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(merged)]
    assert errors == []
    chart().validate_schema(load_values(values_file))  # Helm's own validator agrees


@pytest.mark.parametrize(
    "bad",
    [
        {"regoin": "us-east-1"},  # unknown top-level key
        {"ingest": {"keda": {"shardPerReplica": 2}}},  # misspelt nested key
        {"settings": {"ingest": {"batch_max_recordz": 10}}},  # misspelt setting
        {"settings": {"ingest": {"pii_salt": "x" * 20}}},  # a secret in values: refused
        {"settings": {"serve": {"ingress": {"min_replicas": 1}}}},  # chart-owned: serving.autoscaling
        {"settings": {"aws": {}}},  # not a pass-through section
        {"images": {"app": {"tag": "latest"}}},
        {"environment": "local"},
        {"region": "Mars-1"},
        {"serving": {"workers": {"maxReplicas": "10"}}},  # wrong type
        {"identity": {"mode": "static-keys"}},
    ],
)
def test_unknown_or_bad_values_fail(bad: dict[str, Any]) -> None:
    values = deep_merge(load_values(REGION_FILES[0]), bad)
    with pytest.raises(helm_python.HelmValuesError):
        chart().validate_schema(values)
    report = helm_python.lint(str(CHART), values, strict=True)
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"])
    assert not _validator().is_valid(deep_merge(DEFAULTS, values))


def _commented_keys() -> tuple[list[str], list[str]]:
    """(values documented with a `# --` comment, values not documented by themselves or a parent)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    root = yaml.compose("\n".join(lines))
    documented, undocumented = [], []

    def comment_above(line: int) -> bool:
        i = line - 1
        while i >= 0 and lines[i].strip().startswith("#") and not lines[i].strip().startswith("# --"):
            i -= 1
        return i >= 0 and lines[i].strip().startswith("# --")

    def walk(node: yaml.Node, path: str, covered: bool) -> None:
        for key, value in node.value:
            p = f"{path}.{key.value}" if path else key.value
            has = comment_above(key.start_mark.line)
            if has:
                documented.append(p)
            if isinstance(value, yaml.MappingNode) and value.value and not has:
                walk(value, p, covered)
            elif not (has or covered):
                undocumented.append(p)

    walk(root, "", False)
    return documented, undocumented


def test_every_value_has_a_doc_comment() -> None:
    documented, undocumented = _commented_keys()
    assert undocumented == [], f"values without a `# --` comment: {undocumented}"
    assert len(documented) > 100


def test_every_schema_value_is_in_values_yaml() -> None:
    """values.yaml shows every chart value (settings.* are documented by streamrec/settings.py)."""

    def keys(d: dict[str, Any], path: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            p = f"{path}.{k}" if path else k
            out.add(p)
            if isinstance(v, dict) and v and not p.startswith(("settings.", "commonLabels")):
                out |= keys(v, p)
        return out

    schema_paths = {p for p, _ in _leaves(SCHEMA, SCHEMA) if not p.startswith("settings.")}
    present = keys(DEFAULTS)
    assert sorted(schema_paths - present) == []


# Keys a region file may set: what differs between regions (the issue: stream, bucket, tables, Redis,
# roles, replica counts), plus the endpoints and switches that are per cluster.
REGION_KEYS = {
    "region",
    "data.streamName",
    "data.shardCount",
    "data.lakeUri",
    "data.tables",
    "data.warehouse",
    "cache.url",
    "cache.cidrs",
    "secrets.piiSalt.existingSecret",
    "secrets.apiKeys.existingSecret",
    "identity",
    "images.registry",
    "ingest.keda.maxReplicas",
    "ingest.keda.minReplicas",
    "ingest.hpa",
    "serving.workers.replicas",
    "serving.workers.minReplicas",
    "serving.workers.maxReplicas",
    "serving.autoscaling",
    "serving.ingress.host",
    "serving.ingress.certificateArn",
    "networkPolicy.loadBalancerCidrs",
    "networkPolicy.warehouseCidrs",
    "networkPolicy.httpsCidrs",
    "monitoring.podMonitors.enabled",
    "monitoring.prometheusRule.enabled",
    "settings.emr",
}


def _set_paths(d: dict[str, Any], path: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        p = f"{path}.{k}" if path else k
        out += _set_paths(v, p) if isinstance(v, dict) and p not in REGION_KEYS else [p]
    return out


@pytest.mark.parametrize("path", REGION_FILES, ids=[p.stem for p in REGION_FILES])
def test_region_files_set_only_what_differs(path: Path) -> None:
    values = load_values(path)
    assert values["region"] == path.stem
    extra = [p for p in _set_paths(values) if not any(p == k or p.startswith(k + ".") for k in REGION_KEYS)]
    assert extra == [], f"{path.name} sets values that do not differ between regions: {extra}"
    # No value of one region names another region (a copy-paste slip).
    text = path.read_text()
    for other in REGION_FILES:
        if other != path:
            assert other.stem not in text, f"{path.name} mentions {other.stem}"


def test_region_files_differ_where_regions_differ() -> None:
    per_region = {p.stem: load_values(p) for p in REGION_FILES}
    for key in ("streamName", "lakeUri"):
        assert len({v["data"][key] for v in per_region.values()}) == len(per_region)
    assert len({v["cache"]["url"] for v in per_region.values()}) == len(per_region)
    assert {p.stem for p in VALUES_FILES} == {"us-east-1", "eu-west-1", "ap-southeast-1", "dev"}
