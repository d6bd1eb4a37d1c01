"""``streamrec demo``: the whole job end to end on the embedded local stack (what ``make demo`` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from streamrec.cli.common import UserError, console


def demo(
    events: Annotated[int, typer.Option(help="Records to generate per region (incl. bot, malformed, duplicate).")] = 25_000,
    users: Annotated[int, typer.Option(help="Users per region.")] = 1_000,
    items: Annotated[int, typer.Option(help="Items in the shared catalogue.")] = 1_000,
    days: Annotated[float, typer.Option(min=2, max=30, help="Days of history the generated clickstream spans "
                                        "(the ETL cleans each full day and builds features for the last).")] = 5.0,
    workers: Annotated[int, typer.Option(help="Consumer workers per region (they share the shards by lease).")] = 2,
    seed: Annotated[int, typer.Option(help="Generator seed (same seed, same records).")] = 7,
    state_dir: Annotated[Path, typer.Option(help="Where the demo's stack, lake and logs live (wiped at start).")] = Path(".streamrec/demo"),
    keep_stack: Annotated[bool, typer.Option("--keep-stack", help="Leave moto, redis and PostgreSQL running afterwards.")] = False,
    online: Annotated[bool, typer.Option("--online/--no-online", help="Start Ray Serve at the end and show "
                                         "a known, a cold and a just-clicked user's answers.")] = True,
) -> None:
    """Run the whole job end to end on local stand-ins: clickstream → Kinesis → consumers → a PipelineRun
    per region (Spark ETL, Ray Train, Ray Data scoring, sync to DynamoDB and PostgreSQL, promotion) →
    Ray Serve answering HTTP requests; account for every record."""
    from streamrec.demo import DemoError, run_demo
    from streamrec.devstack.process import DevStackError

    try:
        result = run_demo(state_dir.resolve(), events_per_region=events, users=users, items=items, days=days,
                          workers_per_region=workers, seed=seed, keep_stack=keep_stack, online=online,
                          say=lambda m: console.print(m, highlight=False, soft_wrap=True))
    except (DemoError, DevStackError) as exc:
        raise UserError(f"demo failed: {exc}") from None
    reports, etl_reports = result.ingest, result.etl
    table = Table(title="ingestion per region", box=box.SIMPLE_HEAD)
    for col in ("region", "produced", "lake\nrows", "dead\nletters", "duplicates", "Redis\nusers", "balanced"):
        table.add_column(col, justify="left" if col == "region" else "right", no_wrap=True)
    for r in reports:
        table.add_row(r.region, f"{r.produced:,}", f"{r.lake_rows:,}", f"{sum(r.dead_lettered.values()):,}",
                      f"{r.duplicates:,}", f"{r.users_online:,}",
                      "[green]yes[/]" if r.balanced else f"[red]no: {r.accounted:,}[/]")
    console.print(table)
    reasons = Table(title="dead letters by reason", box=box.SIMPLE_HEAD)
    reasons.add_column("reason")
    for r in reports:
        reasons.add_column(r.region, justify="right")
    for reason in sorted({k for r in reports for k in r.dead_lettered}):
        reasons.add_row(reason, *(f"{r.dead_lettered.get(reason, 0):,}" for r in reports))
    console.print(reasons)
    console.print(etl_table(etl_reports))
    for region in dict.fromkeys(a.region for a in result.answers):
        console.print(answers_table(region, [a for a in result.answers if a.region == region]), "")
    console.print(summary_table(result.pipelines, etl_reports))
    lake = state_dir.resolve() / "lake"
    console.print(f"lake: {lake}", highlight=False)
    failed = False
    if not all(r.balanced for r in reports):
        console.print("[red]accounting failed: lake + dead-letter + duplicates != produced[/]")
        failed = True
    if not all(r.balanced for r in etl_reports):
        console.print("[red]ETL accounting failed: clean rows + removed != raw rows of the days processed[/]")
        failed = True
    if failed:
        raise typer.Exit(1)
    console.print("every record accounted for: lake rows + dead letters + duplicates = produced")
    console.print("every raw row of the ETL's days accounted for: clean rows + removed = raw rows")


def answers_table(region: str, answers: list) -> Table:  # list[ServedAnswer]
    """One region's answers, one line each (a table per region keeps them within 80 columns)."""
    table = Table(title=f"Ray Serve {region}: GET /{region}/v1/users/{{user}}/recommendations?k=5",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in ("request", "user", "source", "ms", "top 3 items"):
        table.add_column(col, justify="right" if col == "ms" else "left", no_wrap=True)
    for a in answers:
        table.add_row(a.case, a.user_id, a.source, f"{a.milliseconds:.0f}", " ".join(a.item_ids[:3]))
    return table


def summary_table(pipelines: list, etl_reports: list) -> Table:  # list[PipelineReport], list[EtlReport]
    """One column per region: what the day's PipelineRun produced and where it went."""
    table = Table(title="per region", box=box.SIMPLE_HEAD)
    table.add_column("")
    for p in pipelines:
        table.add_column(p.region, justify="right")
    metric = pipelines[0].metric if pipelines else "recall@20"

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    rows = [
        ("clean events", [f"{e.clean_rows:,}" for e in etl_reports]),
        ("users", [f"{p.users:,}" for p in pipelines]),
        ("items", [f"{p.items:,}" for p in pipelines]),
        ("model version", [p.version or "none" for p in pipelines]),
        (f"{metric}: model", [fmt(p.model_metric) for p in pipelines]),
        (f"{metric}: popular", [fmt(p.popular_metric) for p in pipelines]),
        ("promoted", ["[green]yes[/]" if p.promoted else "[yellow]no[/]" for p in pipelines]),
        ("recs items in DynamoDB", [f"{p.recs_items:,}" for p in pipelines]),
        ("key items in DynamoDB", [f"{p.synced.get('dynamodb_keys', 0):,}" for p in pipelines]),
        ("rows in the warehouse", [f"{p.warehouse_rows:,}" for p in pipelines]),
        ("pipeline seconds", [f"{p.seconds:.0f}" for p in pipelines]),
    ]
    for label, cells in rows:
        table.add_row(label, *cells)
    return table


def etl_table(reports: list) -> Table:  # list[EtlReport]
    """Rows are measures, columns regions: the ETL's figures fit 80 columns for any number of removals."""
    table = Table(title=f"Spark ETL, {reports[0].days[0]} .. {reports[0].days[-1]}" if reports else "Spark ETL",
                  box=box.SIMPLE_HEAD)
    table.add_column("")
    for r in reports:
        table.add_column(r.region, justify="right")
    rows: list[tuple[str, list[str]]] = [("raw rows (event days)", [f"{r.raw_rows:,}" for r in reports])]
    for reason in sorted({k for r in reports for k in r.removed}):
        rows.append((f"removed: {reason}", [f"{r.removed.get(reason, 0):,}" for r in reports]))
    rows.append(("clean rows", [f"{r.clean_rows:,}" for r in reports]))
    for name in ("items", "users", "examples_train", "examples_eval"):
        rows.append((f"features: {name}", [f"{r.features.get(name, 0):,}" for r in reports]))
    for name in ("popular", "items", "users"):
        rows.append((f"keys: {name}", [f"{r.keys.get(name, 0):,}" for r in reports]))
    rows.append(("balanced", ["[green]yes[/]" if r.balanced else "[red]no[/]" for r in reports]))
    for label, cells in rows:
        table.add_row(label, *cells)
    return table
