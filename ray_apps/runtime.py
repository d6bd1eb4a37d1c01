"""Connecting to Ray: the cluster a RayJob runs in, or a small local one on a laptop or CI box."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ray_apps.serve.front import apply_serve_env
from streamrec.settings import Settings


def local_ray_options(settings: Settings) -> dict[str, Any]:
    """``ray.init`` options for an in-process local cluster sized for 2 cores and a few GB."""
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": True,
        "logging_level": "warning",
        # Ray's socket paths must stay short (107 bytes): a short temp dir, not pytest's deep tmp_path.
        "_temp_dir": str(Path(tempfile.gettempdir()) / "streamrec-ray"),
    }
    if settings.train.object_store_bytes:
        options["object_store_memory"] = settings.train.object_store_bytes
    return options


def ensure_ray(settings: Settings) -> Any:
    """Return the ``ray`` module connected to a cluster.

    Inside a RayJob (``RAY_ADDRESS`` set by KubeRay) this joins that cluster; otherwise it starts a local
    one. A session that is already connected (tests, notebooks) is reused as it is.
    """
    import ray

    if ray.is_initialized():
        return ray
    # Ray turns on token authentication by default; a local throwaway cluster has no token to share.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        # Serve reads its front-end switches when its processes start, which inherit this environment.
        apply_serve_env(settings.serve.http_front, os.environ)
        ray.init(**local_ray_options(settings))
        # A local run reports its own progress; Ray Data's per-dataset INFO lines would bury it. (In a
        # cluster they go to the job's logs, where they belong.)
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
        logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"])
    return ray
