"""The ``streamrec`` command: the composition root.

Sub-commands live in their own modules and import the heavy packages (Spark, Ray, kopf) inside the
command functions, so ``streamrec --help`` stays fast and a missing optional dependency only affects
the command that needs it.
"""

from __future__ import annotations

import inspect
import sys

import typer

from streamrec.cli import demo, dev, etl, events, ingest, operator, pipeline, score, serve, train
from streamrec.cli.common import UserError, err_console

app = typer.Typer(
    name="streamrec",
    help="Clickstream to recommendations, per AWS region: local stack, events, ingest, pipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(dev.app, name="dev")
app.add_typer(events.app, name="events")
app.add_typer(ingest.app, name="ingest")
app.add_typer(etl.app, name="etl")
app.add_typer(train.app, name="train")
app.add_typer(score.app, name="score")
app.add_typer(serve.app, name="serve")
app.add_typer(pipeline.app, name="pipeline")
app.add_typer(operator.app, name="operator")
app.command("demo")(demo.demo)


def _unwrap(doc: str) -> str:
    """A docstring as help text: paragraphs kept, the line breaks inside each removed (typer keeps
    them after the first paragraph, which leaves ragged lines at any terminal width)."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _unwrap_help(typer_app: typer.Typer) -> None:
    for command in typer_app.registered_commands:
        if command.help is None and command.callback is not None and command.callback.__doc__:
            command.help = _unwrap(command.callback.__doc__)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _unwrap_help(group.typer_instance)


_unwrap_help(app)


def main() -> None:
    try:
        app()
    except UserError as exc:
        # A user mistake: one clear line, non-zero exit, no traceback.
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
