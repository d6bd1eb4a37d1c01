"""Fixtures of the chart tests: every values file (and a few variants that switch the chart's
branches) rendered once per session, offline, with the Helm SDK."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from chartlib import REGION_FILES, VALUES_FILES, load_values, objects, render_file

# Variants on top of a region file, so every branch of the chart is rendered and validated too.
VARIANTS: dict[str, tuple[Path, dict[str, Any]]] = {
    "hpa-fallback": (REGION_FILES[0], {"ingest": {"keda": {"enabled": False}}}),
    "keda-role": (
        REGION_FILES[0],
        {"ingest": {"keda": {"roleArn": "arn:aws:iam::111122223333:role/streamrec-keda"}}},
    ),
    "spark-operator": (REGION_FILES[0], {"pipeline": {"etlBackend": "spark-operator"}}),
    "irsa": (
        REGION_FILES[0],
        {
            "identity": {
                "mode": "irsa",
                "roles": {
                    c: f"arn:aws:iam::111122223333:role/streamrec-{c}"
                    for c in ("ingest", "serve", "controller", "ray", "spark")
                },
            }
        },
    ),
    "http-internal": (
        REGION_FILES[0],
        {
            "serving": {
                "ingress": {"certificateArn": "", "groupName": "streamrec", "inboundCidrs": ["10.0.0.0/8"]}
            }
        },
    ),
}
SCENARIOS = [p.stem for p in VALUES_FILES] + list(VARIANTS)


def scenario_values(name: str) -> tuple[Path, dict[str, Any]]:
    if name in VARIANTS:
        return VARIANTS[name]
    return next(p for p in VALUES_FILES if p.stem == name), {}


@pytest.fixture(params=[p.stem for p in VALUES_FILES])
def values_file(request: pytest.FixtureRequest) -> Path:
    return next(p for p in VALUES_FILES if p.stem == request.param)


@pytest.fixture(params=SCENARIOS)
def scenario(request: pytest.FixtureRequest) -> str:
    return request.param


_parsed: dict[str, list[dict[str, Any]]] = {}


def scenario_objects_of(name: str) -> list[dict[str, Any]]:
    """The objects of a scenario, parsed once per session; each caller gets its own copy."""
    if name not in _parsed:
        path, overrides = scenario_values(name)
        _parsed[name] = objects(render_file(path, overrides))
    return copy.deepcopy(_parsed[name])


@pytest.fixture
def scenario_objects(scenario: str) -> list[dict[str, Any]]:
    return scenario_objects_of(scenario)


@pytest.fixture
def values_objects(values_file: Path) -> list[dict[str, Any]]:
    return scenario_objects_of(values_file.stem)


@pytest.fixture
def values(values_file: Path) -> dict[str, Any]:
    return load_values(values_file)
