"""Shared CLI plumbing: consoles, the --config option, turning known errors into one-line messages."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console()
# soft_wrap: a long error (a lake path) stays one line when stderr is not a terminal.
err_console = Console(stderr=True, soft_wrap=True)


class UserError(Exception):
    """An error caused by the user's input or environment: printed as one line, exit code 2."""


ConfigOption = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        "-c",
        help="Settings YAML (default: $STREAMREC_CONFIG, else the local dev stack's generated config "
        "if `streamrec dev up` is running).",
        show_default=False,
    ),
]


def load(config: Path | None):  # -> Settings (imported lazily to keep --help fast)
    """Load settings for a command; a bad key or value becomes a one-line UserError."""
    from streamrec.devstack.state import default_config_path
    from streamrec.settings import SettingsError, load_settings
    import os

    if config is None and not os.environ.get("STREAMREC_CONFIG"):
        dev_config = default_config_path()
        if dev_config.exists():
            config = dev_config
    try:
        return load_settings(config)
    except SettingsError as exc:
        raise UserError(str(exc)) from None


def parse_day(value: str, option: str = "--date") -> date:
    """A YYYY-MM-DD option value; anything else is a one-line UserError naming the option."""
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise UserError(f"{option} {value!r}: expected a date as YYYY-MM-DD") from None


def require_region(settings, region: str) -> None:  # settings: Settings (imported lazily)
    """Refuse a --region the settings do not configure, listing those they do."""
    if region not in settings.regions:
        configured = ", ".join(sorted(settings.regions)) or "none"
        raise UserError(f"--region {region}: not configured (configured: {configured})")
