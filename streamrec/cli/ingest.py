"""``streamrec ingest``: the Kinesis consumer (what the ingest pods run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from streamrec.cli.common import ConfigOption, UserError, console, load, require_region

app = typer.Typer(help="Kinesis consumer: leases, raw lake, dead letters, Redis online features.",
                  no_args_is_help=True)


@app.command("run")
def run(
    region: Annotated[str, typer.Option("--region", "-r", help="AWS region whose stream to consume.")],
    config: ConfigOption = None,
    worker_id: Annotated[Optional[str], typer.Option(
        help="Lease owner id (default: hostname plus a random suffix, so a restarted pod is a new worker).")] = None,
    until_drained: Annotated[bool, typer.Option(
        "--until-drained", help="Exit once every shard is read to its tip and flushed (demo, backfills).")] = False,
    metrics_port: Annotated[Optional[int], typer.Option(
        help="Serve Prometheus metrics on this port (default: ingest.metrics_port; 0 = off).")] = None,
    batch_max_seconds: Annotated[Optional[float], typer.Option(
        min=0.01, help="Override ingest.batch_max_seconds (flush age of a shard buffer).")] = None,
    summary_out: Annotated[Optional[Path], typer.Option(
        help="Write the worker's final counts as JSON to this file.")] = None,
    crash_after: Annotated[Optional[str], typer.Option(
        hidden=True, help="Fault injection for crash tests: SIGKILL self at this point of the first flush.")] = None,
) -> None:
    """Consume REGION's clickstream until SIGTERM (or until drained): raw lake Parquet, dead letters with
    reasons, Redis last-N items and live popularity, checkpoints only after durable writes."""
    from ingest.worker import StartupError, build_worker
    from streamrec.logs import configure_logging

    settings = load(config)
    require_region(settings, region)
    overrides = {}
    if batch_max_seconds is not None:
        overrides["batch_max_seconds"] = batch_max_seconds
    if crash_after is not None:
        overrides["crash_point"] = crash_after
    worker = build_worker(settings, region, worker_id=worker_id, until_drained=until_drained, **overrides)
    configure_logging("ingest", region=region, run_id=worker.worker_id, level=settings.log_level)
    port = settings.ingest.metrics_port if metrics_port is None else metrics_port
    if port:
        from prometheus_client import start_http_server

        start_http_server(port)
    worker.install_signal_handlers()
    try:
        stats = worker.run()
    except StartupError as exc:
        raise UserError(str(exc)) from None
    summary = {"region": region, "worker_id": worker.worker_id, **stats.as_dict()}
    if summary_out:
        summary_out.write_text(json.dumps(summary, indent=2))
    console.print_json(data=summary)
