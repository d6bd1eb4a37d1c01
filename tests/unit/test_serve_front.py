"""ray_apps/serve/front.py: the process environment of Serve's HTTP front end."""

from __future__ import annotations

import pytest

from ray_apps.serve.front import apply_serve_env, serve_env

pytestmark = pytest.mark.unit


def test_haproxy_is_serves_throughput_optimized_mode_and_proxy_is_rays_default() -> None:
    assert serve_env("haproxy") == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    assert serve_env("proxy") == {} == serve_env("proxy", local=True)


def test_a_local_cluster_drains_its_ingress_replicas_quickly() -> None:
    """No load balancer deregisters a local replica: its 30 s drain would only delay every shutdown."""
    local = serve_env("haproxy", local=True)
    assert local["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "1"
    assert serve_env("haproxy").items() <= local.items()


def test_apply_leaves_what_the_operator_set() -> None:
    environ = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "PATH": "/bin"}
    added = apply_serve_env("haproxy", environ)
    assert environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # theirs wins
    assert added == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    assert environ == {"PATH": "/bin", "RAY_SERVE_ENABLE_HA_PROXY": "0", **added}
