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
    users: Annotated[int, typer.Option(help="Users per region.")] = 2_000,
    items: Annotated[int, typer.Option(help="Items in the shared catalogue.")] = 3_000,
    workers: Annotated[int, typer.Option(help="Consumer workers per region (they share the shards by lease).")] = 2,
    seed: Annotated[int, typer.Option(help="Generator seed (same seed, same records).")] = 7,
    state_dir: Annotated[Path, typer.Option(help="Where the demo's stack, lake and logs live (wiped at start).")] = Path(".streamrec/demo"),
    keep_stack: Annotated[bool, typer.Option("--keep-stack", help="Leave moto, redis and PostgreSQL running afterwards.")] = False,
) -> None:
    """Run the pipeline end to end on local stand-ins and account for every record."""
    from streamrec.demo import DemoError, run_demo
    from streamrec.devstack.process import DevStackError

    try:
        reports = run_demo(state_dir.resolve(), events_per_region=events, users=users, items=items,
                           workers_per_region=workers, seed=seed, keep_stack=keep_stack,
                           say=lambda m: console.print(m, highlight=False))
    except (DemoError, DevStackError) as exc:
        raise UserError(f"demo failed: {exc}") from None
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
    lake = state_dir.resolve() / "lake"
    console.print(f"lake: {lake} (raw/, dead_letter/: region=/dt=/hour=)", highlight=False)
    if not all(r.balanced for r in reports):
        console.print("[red]accounting failed: lake + dead-letter + duplicates != produced[/]")
        raise typer.Exit(1)
    console.print("every record accounted for: lake rows + dead letters + duplicates = produced")
