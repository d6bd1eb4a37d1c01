"""``streamrec events``: make clickstream (synthetic or replayed) and send it to Kinesis or a JSONL file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from streamrec.cli.common import ConfigOption, UserError, console, load

if TYPE_CHECKING:
    from streamrec.clickstream.publish import PublishSummary

app = typer.Typer(help="Generate or replay clickstream into Kinesis or JSONL.", no_args_is_help=True)


class Target(StrEnum):
    kinesis = "kinesis"
    jsonl = "jsonl"


class Format(StrEnum):
    movielens = "movielens"
    diginetica = "diginetica"
    jsonl = "jsonl"


ToOption = Annotated[
    Target, typer.Option("--to", help="Where records go: the region's Kinesis stream, or a JSONL file.")
]
OutOption = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", help="JSONL path (with --to jsonl); '{region}' in it is replaced by the region name."
    ),
]
RateOption = Annotated[
    float | None,
    typer.Option(
        "--rate",
        min=0.001,
        help="Target records per second per region (Kinesis only; default: as fast as possible).",
    ),
]


def _parse_end(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"--end {text!r} is not an ISO 8601 time (e.g. 2024-05-01T00:00:00Z)") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)  # a time without zone is read as UTC


@contextmanager
def _progress(total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar of records; ``total`` None shows an open-ended one."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]records"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as bar:
        task = bar.add_task("records", total=total)
        yield lambda n: bar.advance(task, n)


def _print_summary(summaries: dict[str, PublishSummary]) -> None:
    from rich.table import Table

    table = Table(title="records per region")
    columns = ("region", "target", "valid", "bot", "malformed", "duplicate", "put", "calls", "retried")
    for column in columns:
        table.add_column(column, justify="left" if column in ("region", "target") else "right")
    for region, s in summaries.items():
        kinds = s.tally.by_kind
        table.add_row(
            region,
            s.target,
            *(str(kinds.get(k, 0)) for k in ("valid", "bot", "malformed", "duplicate")),
            str(s.stats.records_put),
            str(s.stats.put_calls),
            str(s.stats.retried_records),
        )
    console.print(table)
    # Open-ended lists go below the table, one line each, so the table stays readable in a narrow terminal.
    for region, s in summaries.items():
        if s.tally.malformed_reasons:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(s.tally.malformed_reasons.items()))
            console.print(f"{region} malformed reasons: {reasons}", highlight=False)
        if s.stats.per_shard:
            shards = ", ".join(f"{shard} {n}" for shard, n in sorted(s.stats.per_shard.items()))
            console.print(f"{region} records per shard: {shards}", highlight=False)


@contextmanager
def _delivery_errors(target: str) -> Iterator[None]:
    """Turn what a wrong setup causes (no stream, no endpoint, records refused) into one clear line."""
    from botocore.exceptions import BotoCoreError, ClientError

    from streamrec.clickstream.publish import PublishError
    from streamrec.settings import SettingsError

    try:
        yield
    except SettingsError as exc:
        raise UserError(str(exc)) from None
    except (ClientError, BotoCoreError) as exc:
        raise UserError(f"cannot put records to {target}: {exc} (is `streamrec dev up` running?)") from None
    except PublishError as exc:
        raise UserError(str(exc)) from None


@app.command()
def generate(
    region: Annotated[
        list[str] | None,
        typer.Option(
            "--region", "-r", help="Region to generate (repeatable; default: us-east-1 and eu-west-1)."
        ),
    ] = None,
    events: Annotated[
        int,
        typer.Option("--events", "-n", min=1, help="Records per region, incl. bot, malformed and duplicate."),
    ] = 10_000,
    users: Annotated[int, typer.Option("--users", min=1, help="Human users per region.")] = 1_000,
    items: Annotated[int, typer.Option("--items", min=2, help="Items in the shared catalogue.")] = 2_000,
    days: Annotated[
        float, typer.Option("--days", min=0.001, help="Length of the simulated window, ending at --end.")
    ] = 7.0,
    seed: Annotated[
        int, typer.Option("--seed", help="Random seed: the same seed and options give the same bytes.")
    ] = 42,
    bot_share: Annotated[
        float, typer.Option("--bot-share", min=0, max=0.99, help="Share of records from bots.")
    ] = 0.02,
    malformed_share: Annotated[
        float, typer.Option("--malformed-share", min=0, max=0.99, help="Share of malformed records.")
    ] = 0.01,
    duplicate_share: Annotated[
        float, typer.Option("--duplicate-share", min=0, max=0.99, help="Share of records sent twice.")
    ] = 0.005,
    end: Annotated[
        str | None,
        typer.Option("--end", help="End of the window, ISO 8601 (default: now, rounded down to the hour)."),
    ] = None,
    to: ToOption = Target.kinesis,
    out: OutOption = None,
    rate: RateOption = None,
    truth_out: Annotated[
        Path | None,
        typer.Option(
            "--truth-out", help="Write the planted truth (topics, preferences, items) as JSON here."
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Generate a synthetic clickstream with planted preferences, bots, malformed records and duplicates."""
    from pydantic import ValidationError

    from streamrec.clickstream.config import DEFAULT_REGIONS, GeneratorConfig
    from streamrec.clickstream.publish import publish_generated, write_generated_jsonl
    from streamrec.clickstream.truth import write_truth

    try:
        gen = GeneratorConfig(
            seed=seed,
            regions=tuple(region or DEFAULT_REGIONS),
            users_per_region=users,
            items=items,
            events_per_region=events,
            days=days,
            end=_parse_end(end),
            bot_share=bot_share,
            malformed_share=malformed_share,
            duplicate_share=duplicate_share,
        ).resolved()
    except ValidationError as exc:
        raise UserError(
            "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        ) from None
    if truth_out is not None:
        console.print(f"truth written to {write_truth(truth_out, gen)}")
    if to is Target.jsonl and out is None:
        raise UserError("--to jsonl needs --out PATH")
    total = events * len(gen.regions)
    try:
        if to is Target.jsonl:
            with _progress(total) as progress:
                summaries = write_generated_jsonl(gen, out, progress=progress)
        else:
            settings = load(config)
            with _delivery_errors("Kinesis"), _progress(total) as progress:
                summaries = publish_generated(settings, gen, rate_per_s=rate, progress=progress)
    except ValueError as exc:  # e.g. too many events for the users and days, or --out without {region}
        raise UserError(str(exc)) from None
    _print_summary(summaries)


@app.command()
def replay(
    file: Annotated[
        Path, typer.Argument(help="Dataset file: MovieLens u.data, a DIGINETICA CSV, or JSONL records.")
    ],
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Format of FILE.")] = Format.jsonl,
    region: Annotated[
        str, typer.Option("--region", "-r", help="Region whose stream receives the records.")
    ] = "us-east-1",
    shift_to_now: Annotated[
        bool, typer.Option("--shift-to-now", help="Move all timestamps so the latest is now (gaps kept).")
    ] = False,
    to: ToOption = Target.kinesis,
    out: OutOption = None,
    rate: RateOption = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Replay only the first N records (in time order).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Replay a real interaction log (or a JSONL capture, byte for byte) as clickstream."""
    from streamrec.clickstream.publish import KinesisPublisher, deliver, jsonl_path, write_jsonl
    from streamrec.clickstream.records import report_progress
    from streamrec.clickstream.replay import replay as replay_records

    if to is Target.jsonl and out is None:
        raise UserError("--to jsonl needs --out PATH")
    try:
        records = replay_records(file, fmt.value, region, shift_to_now=shift_to_now, limit=limit)
        if to is Target.jsonl:
            path = jsonl_path(out, region, 1)
            with _progress(limit) as progress:
                summary = deliver(
                    region, str(path), report_progress(records, progress), lambda rs: write_jsonl(path, rs)
                )
        else:
            from streamrec.aws import client

            settings = load(config)
            with _delivery_errors("Kinesis"), _progress(limit) as progress:
                stream = settings.region(region).stream_name
                publisher = KinesisPublisher(
                    client("kinesis", region, settings.aws), stream, rate_per_s=rate, progress=progress
                )
                summary = deliver(region, stream, records, publisher.put)
    except (FileNotFoundError, ValueError) as exc:  # ValueError includes ReplayError: the line that is wrong
        raise UserError(str(exc)) from None
    _print_summary({region: summary})
