"""``streamrec score``: batch scoring of every user of a region's day with Ray Data (ray_apps/score.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Optional

import typer

from streamrec.cli.common import ConfigOption, UserError, console, load, parse_day, require_region

app = typer.Typer(help="Batch scoring: every user of a day → top-K recommendations in the lake.",
                  no_args_is_help=True)


def _parse_moment(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise UserError(f"--generated-at {value!r}: expected an ISO timestamp with a time zone, "
                        "e.g. 2026-11-26T00:00:00Z")
    return moment


@app.command("run")
def run(
    region: Annotated[str, typer.Option("--region", "-r", help="AWS region whose users to score.")],
    day: Annotated[str, typer.Option("--date", "-d", help="Day whose features to score (UTC), YYYY-MM-DD.")],
    version: Annotated[Optional[str], typer.Option(
        "--version", "-v", help="Model version to score with (default: the region's promoted version).",
        show_default=False)] = None,
    generated_at: Annotated[Optional[str], typer.Option(
        help="Timestamp stamped on every row (default: the end of --date, D+1 00:00 UTC, so reruns "
        "write the same rows).", show_default=False)] = None,
    rows_per_block: Annotated[Optional[int], typer.Option(
        min=1, help="Re-cut the users table into blocks of this many rows (one actor task and one output "
        "file each); default: equal blocks of at most score.batch_size rows, a multiple of "
        "score.concurrency of them, so every actor gets work.", show_default=False)] = None,
    config: ConfigOption = None,
) -> None:
    """Score every user of the day's users table and replace recs/region=R/dt=D/model_version=V/.

    Users with too short a history get the regional popularity list; the others the model's top-K
    items from its ANN index, without what they already bought. The folder's _run_summary.json is
    written last: the sync step loads only outputs that have one.
    """
    settings = load(config)
    require_region(settings, region)
    when = parse_day(day)
    moment = _parse_moment(generated_at) if generated_at else None

    from ray_apps.registry import RegistryError
    from ray_apps.score import ScoreError, score

    try:
        with console.status(f"scoring {region} {when.isoformat()} with Ray Data"):
            summary = score(settings, region, when, version=version, generated_at=moment,
                            rows_per_block=rows_per_block)
    except (ScoreError, RegistryError) as exc:
        raise UserError(str(exc)) from None
    console.print(
        f"score {region} {summary.dt}  model {summary.model_version}  users {summary.users:,} "
        f"(model {summary.model_scored:,}, popular {summary.popular_fallback:,})  "
        f"{summary.seconds:.1f} s  {summary.users_per_second:,.0f} users/s", highlight=False, soft_wrap=True)
    console.print(f"output: {summary.output} ({len(summary.files)} files)", highlight=False, soft_wrap=True)
