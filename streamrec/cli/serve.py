"""``streamrec serve``: the online recommendation API on Ray Serve (ray_apps/serve/)."""

from __future__ import annotations

import signal
import threading
from typing import Annotated, Optional

import typer

from streamrec.cli.common import ConfigOption, UserError, console, load, require_region

app = typer.Typer(help="Online inference: the Ray Serve recommendation API.", no_args_is_help=True)


@app.command("run")
def run(
    region: Annotated[str, typer.Option("--region", "-r", help="AWS region to serve (its tables, Redis, models).")],
    host: Annotated[Optional[str], typer.Option(help="Listen address (default: serve.host, 127.0.0.1).",
                                                show_default=False)] = None,
    port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Listen port (default: serve.port, 8000).",
                                                show_default=False)] = None,
    config: ConfigOption = None,
) -> None:
    """Serve GET /v1/users/{user_id}/recommendations, POST /v1/recommendations:batch,
    GET /v1/items/{item_id}/similar, /healthz, /readyz, /metrics and /docs until Ctrl-C.

    Runs on the Ray cluster of RAY_ADDRESS, or a local one. In Kubernetes the RayService runs the
    same application (import path ray_apps.serve.app:build).
    """
    settings = load(config)
    require_region(settings, region)
    host = host or settings.serve.host
    port = port or settings.serve.port

    from ray_apps.runtime import ensure_ray

    ensure_ray(settings)
    from ray import serve

    from ray_apps.serve.app import build_app

    try:
        with console.status(f"starting Ray Serve for {region} on {host}:{port}"):
            serve.start(http_options={"host": host, "port": port})
            serve.run(build_app(settings, region), name=f"streamrec-{region}", route_prefix="/")
    except Exception as exc:  # Serve reports deployment failures as one long exception
        raise UserError(f"the application did not start: {str(exc).strip().splitlines()[0][:300]}") from None
    console.print(f"serving {region} on http://{host}:{port}  (API docs: http://{host}:{port}/docs; "
                  "Ctrl-C stops)", highlight=False, soft_wrap=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
