"""``streamrec train``: the daily two-tower training step (ray_apps/train.py) for one region and day."""

from __future__ import annotations

from datetime import date
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated

import typer

from streamrec.cli.common import ConfigOption, UserError, console, load, parse_day, require_region

if TYPE_CHECKING:
    from ray_apps.train import TrainOutcome

app = typer.Typer(help="Two-tower training with Ray Train → evaluation gate → model registry.",
                  no_args_is_help=True)

# Metrics shown next to the gate's own (each at the gate metric's K).
SHOWN = ("recall", "ndcg", "mrr", "coverage")


@app.command("run")
def run(
    region: Annotated[str, typer.Option("--region", "-r", help="AWS region whose features to train on.")],
    day: Annotated[str, typer.Option(
        "--date", "-d", help="Cutoff day (UTC), YYYY-MM-DD: train on the days before it, evaluate on it.")],
    config: ConfigOption = None,
) -> None:
    """Train on features/region=R/dt=D, evaluate against popularity and the promoted model, publish a
    model version, and promote it when the gate passes.

    A rerun of the same day resumes the day's Ray Train run from its last checkpoint (a completed run
    trains nothing more) and republishes the same version. Exit status 2: the ETL features are missing
    or the settings are wrong; 1: training or publication failed.
    """
    settings = load(config)
    require_region(settings, region)
    when = parse_day(day)

    from ray_apps.registry import RegistryError
    from ray_apps.train import FeaturePaths, FeaturesMissingError, TrainError
    from ray_apps.train import run as run_training
    from streamrec.logs import configure_logging

    # Missing ETL output is the common mistake: say so in one line before Ray starts.
    paths = FeaturePaths.for_day(settings, region, when)
    try:
        for folder in (paths.train, paths.eval, paths.items):
            paths.data_files(folder)
    except FeaturesMissingError as exc:
        raise UserError(str(exc)) from None

    configure_logging("train", region=region, run_id=f"train-{region}-{when.isoformat()}",
                      level=settings.log_level)
    try:
        with console.status(f"training {region} {when.isoformat()} with Ray Train"):
            outcome = run_training(settings, region, when)
    except FeaturesMissingError as exc:
        raise UserError(str(exc)) from None
    except (TrainError, RegistryError) as exc:
        console.print(f"[red]train {region} {when.isoformat()} failed:[/] {exc}", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        _shutdown_ray()
    _print_summary(outcome, region, when, settings.gate.metric)


def _shutdown_ray() -> None:
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _print_summary(outcome: TrainOutcome, region: str, when: date, gate_metric: str) -> None:
    def say(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)  # long lines stay whole (copy, grep)

    result = outcome.train
    losses = " → ".join(f"{loss:.4f}" for loss in result.losses)
    resumed = ("" if result.resumed_from_epoch is None
               else f", resumed after epoch {result.resumed_from_epoch}")
    say(f"train {region} {when.isoformat()}  run {result.run_name}  {result.stats.rows:,} examples "
        f"{result.stats.first_day}..{result.stats.last_day}  {result.workers} workers "
        f"({'GPU' if result.use_gpu else 'CPU'})  {result.samples_per_second:,.0f} samples/s")
    say(f"loss by epoch: {losses}  (trained {result.epochs_trained} epoch(s) now{resumed}; "
        f"warm start: {result.warm_start_from or 'none'})")
    k = gate_metric.split("@")[1]
    say(f"evaluation on {when.isoformat()}: {outcome.report.users:,} users, {outcome.report.items:,} items")
    say(f"{'':<10}" + "".join(f"{name + '@' + k:>14}" for name in SHOWN))
    rows: list[tuple[str, Mapping[str, float]]] = [("model", outcome.report.model),
                                                   ("popular", outcome.report.popular)]
    if outcome.promoted_report is not None:
        rows.append(("promoted", outcome.promoted_report.model))
    for label, metrics in rows:
        say(f"{label:<10}" + "".join(f"{metrics.get(f'{name}@{k}', float('nan')):>14.4f}" for name in SHOWN))
    if outcome.previous_version:
        say(f"(promoted = {outcome.previous_version}, the version serving before this run)")
    say(f"gate: {outcome.decision.reason}")
    state = "[green]promoted[/]" if outcome.promoted else "[yellow]published, not promoted[/]"
    say(f"version {outcome.version}: {state}")
