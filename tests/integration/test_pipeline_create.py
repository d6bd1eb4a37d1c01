"""``streamrec pipeline create`` (what the chart's CronJob runs) against the kmock Kubernetes emulator:
it creates the day's PipelineRun with a deterministic name, and a second create changes nothing."""

from __future__ import annotations

import asyncio
from datetime import date
from pathlib import Path
from typing import Any

import jsonschema
import kmock as kmock_lib
import pytest
import yaml

from operators.kube import create_pipeline_run
from operators.pipeline import RunSpec

pytestmark = pytest.mark.asyncio

NS = "streamrec"
PRUNS = "streamrec.io/v1alpha1/pipelineruns"
CRD = Path(__file__).resolve().parents[2] / "charts/streamrec/crds/pipelineruns.streamrec.io.yaml"


@pytest.fixture
def emulator(kmock: kmock_lib.KubernetesEmulator) -> kmock_lib.KubernetesEmulator:
    kmock.resources.load_bundled()
    kmock.resources[PRUNS] = kmock.ResourceInfo(kind="PipelineRun", namespaced=True,
                                                verbs={"get", "list", "create", "patch", "delete"},
                                                subresources={"status"})
    return kmock


def _api(emulator: Any) -> Any:
    from kubernetes import client

    config = client.Configuration()
    config.host = str(emulator.url).rstrip("/")
    return client.CustomObjectsApi(client.ApiClient(config))


async def test_create_is_idempotent_and_valid_for_the_crd(emulator: Any) -> None:
    api = _api(emulator)
    spec = RunSpec("eu-west-1", date(2026, 11, 25))
    # The kubernetes client is blocking and the emulator serves on this event loop: call it in a thread.
    first = await asyncio.to_thread(create_pipeline_run, spec, NS, api)
    second = await asyncio.to_thread(create_pipeline_run, spec, NS, api)
    assert first == ("eu-west-1-2026-11-25", True)
    assert second == ("eu-west-1-2026-11-25", False)

    stored = emulator.objects[PRUNS, NS, "eu-west-1-2026-11-25"]
    manifest = dict(stored["spec"])
    assert manifest == {"region": "eu-west-1", "date": "2026-11-25"}
    assert RunSpec.from_manifest(manifest) == spec
    schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.validate({"apiVersion": "streamrec.io/v1alpha1", "kind": "PipelineRun",
                         "metadata": {"name": "x"}, "spec": manifest}, schema)


async def test_a_backfill_is_named_after_its_range(emulator: Any) -> None:
    spec = RunSpec("us-east-1", date(2026, 11, 25), date(2026, 11, 1))
    name, created = await asyncio.to_thread(create_pipeline_run, spec, NS, _api(emulator))
    assert (name, created) == ("us-east-1-2026-11-25-from-2026-11-01", True)
    assert dict(emulator.objects[PRUNS, NS, name]["spec"]) == {"region": "us-east-1", "date": "2026-11-01",
                                                          "endDate": "2026-11-25"}
