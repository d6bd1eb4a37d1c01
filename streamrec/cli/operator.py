"""``streamrec operator run``: the PipelineRun controller (kopf), as the chart's Deployment runs it."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer

from streamrec.cli.common import ConfigOption, UserError, load

app = typer.Typer(help="The Kubernetes controller that drives PipelineRun custom resources.",
                  no_args_is_help=True)

RUN_HELP = "\n\n".join([
    "Run the PipelineRun controller until SIGTERM or Ctrl-C.",
    "It watches PipelineRuns (streamrec.io/v1alpha1) in one namespace and drives each through its stages: "
    "the ETL as EMR on EKS job runs or SparkApplications (pipeline.etl_backend), training and scoring as "
    "KubeRay RayJobs on the R5 nodes, sync and promotion in this process.",
    "Progress is in each run's status: kubectl get prun; kubectl describe prun NAME. See docs/operations.md.",
    "One replica: it runs standalone, without kopf peering. It uses the in-cluster service account, else the "
    "current kubeconfig context. Logs are JSON lines on stderr.",
])


class _KopfExtras(logging.Filter):
    """kopf attaches its settings object and an object reference to every record; keep a short
    ``object`` field (namespace/name) instead of printing the whole settings in each JSON line."""

    def filter(self, record: logging.LogRecord) -> bool:
        ref = getattr(record, "k8s_ref", None)
        for attr in ("settings", "k8s_ref", "k8s_skip"):
            if hasattr(record, attr):
                delattr(record, attr)
        if isinstance(ref, dict) and ref.get("name"):
            record.object = f"{ref.get('namespace') or ''}/{ref['name']}".lstrip("/")
        return True


@app.command("run", help=RUN_HELP)
def run(
    namespace: Annotated[Optional[str], typer.Option(
        "--namespace", "-n", help="Namespace whose PipelineRuns to drive; RayJobs and SparkApplications are "
        "created there too (default: settings pipeline.namespace).", show_default=False)] = None,
    config: ConfigOption = None,
    liveness_port: Annotated[int, typer.Option(
        "--liveness-port", min=1, max=65535,
        help="Port of the liveness endpoint, http://0.0.0.0:PORT/healthz (the Deployment's probe).")] = 8080,
    metrics_port: Annotated[int, typer.Option(
        "--metrics-port", min=0, max=65535,
        help="Port of the Prometheus metrics, http://0.0.0.0:PORT/metrics (streamrec_pipeline_*); 0: none.")] = 9100,
) -> None:
    """Run the PipelineRun controller (help text: RUN_HELP)."""
    settings = load(config)
    ns = namespace or settings.pipeline.namespace

    from streamrec.logs import configure_logging

    configure_logging("operator", level=settings.log_level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_KopfExtras())
    try:
        import kopf  # noqa: F401

        from operators.controller import run as run_controller
    except ImportError as exc:
        raise UserError(f"the controller needs the operators extra (pip install 'streamrec[operators]'): "
                        f"{exc}") from None
    logging.getLogger(__name__).info("controller starting", extra={"namespace": ns,
                                                                   "liveness_port": liveness_port,
                                                                   "metrics_port": metrics_port})
    run_controller(settings, namespace=ns, liveness_port=liveness_port, metrics_port=metrics_port or None)
