"""``streamrec etl``: the Spark ETL, locally in Spark ``local[2]`` or submitted to EMR on EKS."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from streamrec.cli import etl_submit
from streamrec.cli.common import ConfigOption, UserError, console, load, parse_day, require_region

app = typer.Typer(help="Spark ETL: raw clickstream → clean events → features and key data points.",
                  no_args_is_help=True)

app.command("request")(etl_submit.request)
app.command("submit")(etl_submit.submit)

JOB_HELP = "clean (raw → clean events), features (items, users, training examples), keys (online store), or all."


@app.command("run")
def run(
    region: Annotated[str, typer.Option("--region", "-r", help="AWS region whose lake partitions to process.")],
    day: Annotated[str, typer.Option("--date", "-d", help="Day to process (UTC), YYYY-MM-DD.")],
    job: Annotated[str, typer.Option("--job", "-j", help=JOB_HELP)] = "all",
    end_date: Annotated[Optional[str], typer.Option(
        help="Last day of a backfill (inclusive): every day from --date is cleaned, then featurized.")] = None,
    config: ConfigOption = None,
    summary_out: Annotated[Optional[Path], typer.Option(
        help="Also write the run summaries as a JSON list to this file.")] = None,
) -> None:
    """Run ETL jobs in Spark local mode (the same job code EMR on EKS runs) and print their summaries.

    Each job replaces only its own output for the day and writes _run_summary.json beside it; a failed
    data-quality check writes no output and exits 3 with the check's message.
    """
    import json

    from spark_etl import runner
    from spark_etl.jobs.common import MissingInputError
    from spark_etl.summary import DataQualityError

    settings = load(config)
    require_region(settings, region)
    if job not in runner.JOB_CHOICES:
        raise UserError(f"--job {job!r}: choose one of {', '.join(runner.JOB_CHOICES)}")
    start = parse_day(day, "--date")
    end = parse_day(end_date, "--end-date") if end_date else None
    try:
        steps = runner.plan(job, start, end)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    lake_uri = settings.region(region).lake_uri
    if not lake_uri.startswith("file://"):
        raise UserError(f"regions.{region}.lake_uri: local Spark reads file:// lakes only (s3a is not bundled); "
                        "run the job on EMR on EKS with `streamrec etl submit`")
    summaries = []
    with console.status(f"starting Spark ({settings.spark.master})"):
        from spark_etl.session import local_session

        spark = local_session(settings.spark)
    try:
        with console.status("") as status:
            results = runner.run(spark, lake_uri, region, job, start, end, settings.etl)
            for i, (name, when) in enumerate(steps, 1):
                status.update(f"[{i}/{len(steps)}] {name} {region} {when}")
                try:
                    summary = next(results)
                except (DataQualityError, MissingInputError) as exc:
                    console.print(f"[red]{name} {region} {when} failed:[/] {exc}", highlight=False, soft_wrap=True)
                    raise typer.Exit(3) from None
                summaries.append(summary)
                removed = ", ".join(f"{k} {v:,}" for k, v in summary.removed.items()) or "none"
                outputs = ", ".join(f"{k} {v:,}" for k, v in summary.outputs.items())
                console.print(f"{summary.job:<8} {region} {summary.dt}  {summary.seconds:6.1f} s  "
                              f"out: {outputs}  removed: {removed}", highlight=False)
    finally:
        spark.stop()
        if summary_out:
            summary_out.write_text(json.dumps([json.loads(s.to_json()) for s in summaries], indent=2))
