"""``streamrec dev``: the local stack (moto, redis-server, PostgreSQL) that commands and tests run on.

The stack lives in a state directory (``$STREAMREC_HOME``, else ``.streamrec/dev``) and outlives these
commands; ``up`` writes the settings file there that other streamrec commands pick up by themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from streamrec.cli.common import UserError, console

app = typer.Typer(
    help="Local development stack: moto (Kinesis, S3, DynamoDB), redis-server, PostgreSQL.",
    no_args_is_help=True,
)

StateDirOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Where the stack keeps its state, logs and settings (default: $STREAMREC_HOME, "
        "else ./.streamrec/dev).",
        show_default=False,
        file_okay=False,
    ),
]


@app.command()
def up(
    region: Annotated[
        list[str] | None,
        typer.Option(
            "--region",
            "-r",
            help="AWS region to provision (repeat for several). Default: us-east-1 and eu-west-1.",
            show_default=False,
        ),
    ] = None,
    shards: Annotated[int, typer.Option("--shards", min=1, max=64, help="Kinesis shards per region.")] = 2,
    lake_root: Annotated[
        str | None,
        typer.Option(
            "--lake-root",
            help="Lake root URI (file:// or s3://). Default: file://<state dir>/lake.",
            show_default=False,
        ),
    ] = None,
    state_dir: StateDirOption = None,
) -> None:
    """Start the stack (reusing whatever already runs), write its settings, provision each region."""
    from streamrec.devstack import stack
    from streamrec.devstack.process import DevStackError

    regions = tuple(region) if region else stack.DEFAULT_REGIONS
    try:
        with console.status("Starting the local stack…") as progress:

            def show(step: str) -> None:
                console.print(f"  {step}", highlight=False)
                progress.update(f"{step}…")

            state = stack.up(
                state_dir, regions=regions, shard_count=shards, lake_root=lake_root, on_step=show
            )
    except DevStackError as exc:
        raise UserError(str(exc)) from None

    table = Table(title="streamrec dev stack", title_justify="left")
    table.add_column("service")
    table.add_column("pid", justify="right")
    table.add_column("endpoint", overflow="fold")
    for handle in state.services.values():
        table.add_row(handle.name, str(handle.pid), handle.url)
    console.print(table)
    console.print(f"logs: {', '.join(str(h.log_path) for h in state.services.values())}", highlight=False)
    console.print(
        f"regions: {', '.join(state.regions)} ({state.shard_count} shards each); lake {state.lake_root}"
    )
    console.print(f"settings: {state.config_path}")
    console.print(
        "streamrec commands find these settings by themselves; "
        f"`export STREAMREC_CONFIG={state.config_path}` is optional "
        "(needed only when running from another directory).",
        highlight=False,
    )


@app.command()
def status(state_dir: StateDirOption = None) -> None:
    """Show each service's health; exit code 1 if any is down (or the stack is not running)."""
    from streamrec.devstack import stack
    from streamrec.devstack.process import DevStackError

    try:
        services = stack.status(state_dir)
    except DevStackError as exc:
        raise UserError(str(exc)) from None
    if not services:
        console.print("The local stack is not running: start it with `streamrec dev up`.")
        raise typer.Exit(code=1)
    table = Table(title="streamrec dev stack", title_justify="left")
    table.add_column("service")
    table.add_column("pid", justify="right")
    table.add_column("endpoint", overflow="fold")
    table.add_column("health", overflow="fold")
    for svc in services:
        health = "[green]healthy[/]" if svc.healthy else f"[red]down[/]: {svc.detail}"
        table.add_row(svc.name, str(svc.pid or "-"), svc.url or "-", health)
    console.print(table)
    if not all(svc.healthy for svc in services):
        raise typer.Exit(code=1)


@app.command()
def down(state_dir: StateDirOption = None) -> None:
    """Stop the stack and delete its PostgreSQL cluster and settings (the lake and logs stay)."""
    from streamrec.devstack import stack
    from streamrec.devstack.process import DevStackError

    try:
        stopped = stack.down(state_dir)
    except DevStackError as exc:
        raise UserError(str(exc)) from None
    if stopped:
        console.print(f"stopped: {', '.join(stopped)}")
    else:
        console.print("The local stack was not running.")
