"""``streamrec etl request`` and ``streamrec etl submit``: the Spark ETL as an EMR on EKS job run.

Command functions only; the ``etl`` sub-app registers them::

    app.command("request")(etl_submit.request)
    app.command("submit")(etl_submit.submit)

The request itself is built by spark_etl/emr.py (also where the job code's packaging is documented).
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import typer

from streamrec.cli.common import ConfigOption, UserError, console, err_console, load

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from streamrec.settings import Settings


T = TypeVar("T")


class EtlJob(StrEnum):
    clean = "clean"
    features = "features"
    keys = "keys"
    all = "all"


RegionOption = Annotated[str, typer.Option("--region", "-r", help="AWS region whose lake the job processes.")]
DateOption = Annotated[str, typer.Option("--date", "-d", help="Day to process (UTC), YYYY-MM-DD.")]
JobOption = Annotated[EtlJob, typer.Option(
    "--job", "-j", help="Which job: clean, features, keys, or all three in order.")]
EndDateOption = Annotated[Optional[str], typer.Option(
    "--end-date", help="Last day of a range (backfill), YYYY-MM-DD; default: --date alone.")]
AttemptOption = Annotated[int, typer.Option(
    "--attempt", min=1, help="Attempt number, part of the idempotency token: a repeated submit of the same "
    "region, job and dates reaches the run already started; use the next number to run a day again after "
    "a FAILED or CANCELLED run.")]


def _parse_day(text: str, option: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UserError(f"{option} {text!r} is not a date (YYYY-MM-DD)") from None


def _build(settings: Settings, region: str, job: EtlJob, day: str, end_day: str | None,
           attempt: int = 1) -> dict[str, Any]:
    """The validated StartJobRun request; a setting or argument problem becomes one UserError line."""
    from spark_etl.emr import client_token_for, start_job_run_request

    start = _parse_day(day, "--date")
    end = _parse_day(end_day, "--end-date") if end_day is not None else None
    try:
        token = client_token_for(region, job.value, start, end, attempt)
        return start_job_run_request(settings, region, job.value, start, end, client_token=token)
    except ValueError as exc:  # includes SettingsError (an unconfigured region)
        raise UserError(str(exc)) from None


def request(
    region: RegionOption,
    date: DateOption,
    job: JobOption = EtlJob.all,
    end_date: EndDateOption = None,
    attempt: AttemptOption = 1,
    config: ConfigOption = None,
) -> None:
    """Print the EMR on EKS StartJobRun request for the ETL as JSON, without sending it (review it, or
    send it with `aws emr-containers start-job-run --cli-input-json file://request.json`)."""
    req = _build(load(config), region, job, date, end_date, attempt)
    # Plain JSON on stdout (no rich markup or wrapping), so it can be redirected to a file as is.
    typer.echo(json.dumps(req, indent=2))


def submit(
    region: RegionOption,
    date: DateOption,
    job: JobOption = EtlJob.all,
    end_date: EndDateOption = None,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="Wait for the job run to finish, printing its state changes; exit 1 unless "
        "it COMPLETED.")] = True,
    poll_seconds: Annotated[float, typer.Option(
        min=0.01, help="Seconds between DescribeJobRun calls while waiting.")] = 30.0,
    timeout_seconds: Annotated[float, typer.Option(
        min=0, help="Give up waiting after this long (the job run keeps running on EMR).")] = 4 * 3600.0,
    attempt: AttemptOption = 1,
    config: ConfigOption = None,
) -> None:
    """Submit the ETL for REGION and DATE to the region's EMR on EKS virtual cluster (settings emr.*)."""
    from spark_etl import emr

    settings = load(config)
    req = _build(settings, region, job, date, end_date, attempt)
    from streamrec.aws import client as aws_client

    # The request names the pod template (the R5 tolerations, emr.tolerations) by its content hash.
    s3 = aws_client("s3", region, settings.aws)
    _call(lambda: emr.upload_pod_template(s3, settings, region), "PutObject (pod template)")
    client = _client(settings, region)
    job_run_id = _call(lambda: emr.submit(client, req), "StartJobRun")
    vc = req["virtualClusterId"]
    # soft_wrap: a line is never broken at the terminal width, so scripts can read it.
    console.print(f"submitted {req['name']}: job run {job_run_id} on virtual cluster {vc}",
                  highlight=False, soft_wrap=True)
    if not wait:
        return
    try:
        _call(lambda: emr.wait(client, vc, job_run_id, poll_seconds=poll_seconds,
                               timeout_seconds=timeout_seconds, on_state=_print_state), "DescribeJobRun")
    except (emr.JobRunFailed, emr.JobRunTimeout) as exc:
        # Not a user mistake but not a success either: one line, exit 1 (2 is for usage errors).
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _print_state(state: str, job_run: Mapping[str, Any]) -> None:
    details = job_run.get("stateDetails")
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    line = f"{stamp}  {job_run['id']}  {state}" + (f"  ({details})" if details else "")
    console.print(line, markup=False, highlight=False, soft_wrap=True)  # EMR's text may hold [brackets]


def _client(settings: Settings, region: str) -> Any:
    from streamrec.aws import client

    return client("emr-containers", region, settings.aws)


def _call(fn: Callable[[], T], operation: str) -> T:
    """Run an AWS call; a refusal or an unreachable endpoint becomes one UserError line."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn()
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code, message = err.get("Code", "error"), err.get("Message", str(exc))
        raise UserError(f"{operation} refused: {code}: {message}") from None
    except BotoCoreError as exc:
        raise UserError(f"{operation} failed: {exc}") from None
