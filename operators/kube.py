"""Creating PipelineRun objects in a cluster (``streamrec pipeline create``, the chart's CronJob)."""

from __future__ import annotations

from typing import Any

from operators.pipeline import API_GROUP, API_VERSION, KIND, PLURAL, RunSpec


def pipeline_run_name(spec: RunSpec) -> str:
    """``<region>-<date>`` for a daily run (what `kubectl get prun` lists), the run id for a backfill."""
    return spec.run_id


def pipeline_run_manifest(spec: RunSpec, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {
            "name": pipeline_run_name(spec),
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "streamrec", "app.kubernetes.io/component": "pipeline",
                       "app.kubernetes.io/managed-by": "streamrec-cli", "streamrec.io/region": spec.region},
        },
        "spec": spec.to_manifest(),
    }


def _api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def create_pipeline_run(spec: RunSpec, namespace: str, api: Any | None = None) -> tuple[str, bool]:
    """Create the run's PipelineRun; (name, False) when one with that name already exists."""
    from kubernetes.client.exceptions import ApiException

    api = api or _api()
    body = pipeline_run_manifest(spec, namespace)
    try:
        api.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, body)
    except ApiException as exc:
        if exc.status == 409:
            return body["metadata"]["name"], False
        raise
    return body["metadata"]["name"], True


__all__ = ["create_pipeline_run", "pipeline_run_manifest", "pipeline_run_name"]
