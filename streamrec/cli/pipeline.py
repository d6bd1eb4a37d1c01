"""``streamrec pipeline``: the daily PipelineRun, in this process or as a Kubernetes custom resource.

``run`` executes the stages here (local mode, ``make demo``); ``create`` asks the controller in a
cluster to do it (what the chart's CronJob runs); ``stage`` runs one stage (what the controller's
RayJobs run). All three use the same stage functions (operators/stages.py) and result files.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.table import Table

from streamrec.cli.common import ConfigOption, UserError, console, load, parse_day, require_region

app = typer.Typer(help="The daily pipeline (ETL → train → score → sync → promote) for one region and day.",
                  no_args_is_help=True)

RegionOption = Annotated[str, typer.Option("--region", "-r", help="AWS region whose pipeline to run.")]
DateOption = Annotated[str, typer.Option(
    "--date", "-d", help="The day (UTC), YYYY-MM-DD: the ETL's day and training's evaluation cutoff.")]
EndDateOption = Annotated[Optional[str], typer.Option(
    "--end-date", help="Backfill: the ETL cleans --date .. --end-date; the other stages run for --end-date.",
    show_default=False)]
OverridesOption = Annotated[Optional[str], typer.Option(
    "--overrides", help='Settings overrides for this run, as JSON by section, e.g. \'{"train": {"epochs": 5}}\' '
    "(sections: train, gate, score, sync).", show_default=False)]


def _spec(region: str, day: str, end_day: str | None, stages: str | None, overrides: str | None) -> Any:
    from operators.pipeline import RunSpec, SpecError

    manifest: dict[str, Any] = {"region": region, "date": parse_day(day).isoformat()}
    if end_day:
        manifest["endDate"] = parse_day(end_day, "--end-date").isoformat()
    if stages:
        manifest["stages"] = [s.strip() for s in stages.split(",") if s.strip()]
    if overrides:
        try:
            manifest["overrides"] = json.loads(overrides)
        except json.JSONDecodeError as exc:
            raise UserError(f"--overrides: not valid JSON ({exc.msg})") from None
    try:
        return RunSpec.from_manifest(manifest)
    except SpecError as exc:
        raise UserError(str(exc).replace("spec.endDate", "--end-date").replace("spec.", "--")) from None


@app.command("run")
def run(
    region: RegionOption,
    day: DateOption,
    end_day: EndDateOption = None,
    stages: Annotated[Optional[str], typer.Option(
        "--stages", help="Comma-separated stages to run (default: etl,train,score,sync,promote).",
        show_default=False)] = None,
    overrides: OverridesOption = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Rerun stages that already finished for this run (each is idempotent).")] = False,
    config: ConfigOption = None,
) -> None:
    """Run the pipeline's stages here, in order: Spark local for the ETL, a local Ray for training and
    scoring, then sync to DynamoDB and the warehouse, then promotion.

    A stage that already finished for this region and day (its result file is in the lake) is not run
    again, so a rerun after a crash resumes, and a rerun of a finished day changes nothing. Exit
    status 1 when a stage fails (after its retries), 2 for a wrong option or setting.
    """
    settings = load(config)
    require_region(settings, region)
    spec = _spec(region, day, end_day, stages, overrides)

    from operators.local import PipelineFailed, run_pipeline
    from operators.pipeline import SpecError
    from streamrec.logs import configure_logging

    configure_logging("pipeline", region=region, run_id=spec.run_id, level=settings.log_level)
    console.print(f"pipeline {spec.run_id}: {', '.join(spec.stages)}", highlight=False)
    try:
        result = run_pipeline(settings, spec, force=force,
                              say=lambda m: console.print(m, highlight=False, soft_wrap=True))
    except SpecError as exc:
        raise UserError(str(exc)) from None
    except PipelineFailed as exc:
        console.print(f"[red]pipeline {spec.run_id} failed:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    table = Table(box=box.SIMPLE_HEAD, title=f"pipeline {spec.run_id}")
    for col in ("stage", "state", "seconds", "result"):
        table.add_column(col, overflow="fold")
    for s in result.stages:
        table.add_row(s.stage, s.state, f"{s.seconds:.0f}", s.result.message)
    console.print(table)


@app.command("stage")
def stage(
    name: Annotated[str, typer.Argument(help="The stage: etl, train, score, sync or promote.")],
    region: RegionOption,
    day: DateOption,
    end_day: EndDateOption = None,
    overrides: OverridesOption = None,
    refusal_key: Annotated[Optional[str], typer.Option(
        "--refusal-key", help="Record a refusal of the stage's input under this key in the run's folder "
                              "(the controller passes one per RayJob attempt and fails the run at once "
                              "instead of retrying).", show_default=False)] = None,
    config: ConfigOption = None,
) -> None:
    """Run ONE stage of a run (the entrypoint of the controller's RayJobs) and write its result file.

    Earlier stages' results are read from the lake; a stage that already finished is not run again.
    """
    settings = load(config)
    require_region(settings, region)
    spec = _spec(region, day, end_day, name, overrides)

    from operators.local import PipelineFailed, run_pipeline
    from operators.pipeline import SpecError
    from streamrec.logs import configure_logging

    configure_logging(f"pipeline-{name}", region=region, run_id=spec.run_id, level=settings.log_level)
    try:
        # The controller retries a failed RayJob itself: one attempt here.
        capped = settings.model_copy(update={"pipeline": settings.pipeline.model_copy(update={"max_attempts": 1})})
        result = run_pipeline(capped, spec, say=lambda m: console.print(m, highlight=False, soft_wrap=True))
    except SpecError as exc:
        raise UserError(str(exc)) from None
    except PipelineFailed as exc:
        if exc.refused and refusal_key:
            from operators.stages import write_refusal

            write_refusal(settings, spec, refusal_key, exc.reason)
        console.print(f"[red]{exc}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(result.stages[-1].result.message, highlight=False, soft_wrap=True)


def yesterday() -> date:
    return datetime.now(UTC).date() - timedelta(days=1)


@app.command("create")
def create(
    region: RegionOption,
    day: Annotated[Optional[str], typer.Option(
        "--date", "-d", help="The day to process (default: yesterday, UTC).", show_default=False)] = None,
    end_day: EndDateOption = None,
    namespace: Annotated[Optional[str], typer.Option(
        "--namespace", "-n", help="Namespace of the PipelineRun (default: settings pipeline.namespace).",
        show_default=False)] = None,
    config: ConfigOption = None,
) -> None:
    """Create the day's PipelineRun custom resource for the controller (what the chart's CronJob runs).

    Its name is deterministic (<region>-<date>), so a second create for the same day changes nothing.
    Uses the in-cluster service account, else the current kubeconfig context.
    """
    settings = load(config)
    require_region(settings, region)
    when = parse_day(day) if day else yesterday()
    spec = _spec(region, when.isoformat(), end_day, None, None)

    from operators.kube import create_pipeline_run

    ns = namespace or settings.pipeline.namespace
    try:
        name, created = create_pipeline_run(spec, ns)
    except Exception as exc:  # the Kubernetes client's errors: unreachable API, RBAC
        raise UserError(f"could not create the PipelineRun in namespace {ns}: {_one_line(exc)}") from None
    console.print(f"pipelinerun {ns}/{name} {'created' if created else 'already exists'}", highlight=False)


def _one_line(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    status = getattr(exc, "status", None)
    if reason and status:
        return f"{status} {reason}"
    return " ".join(str(exc).split())[:300]
