"""Where the dev stack keeps its files, and the ``state.json`` that lets later commands find the servers.

Layout of a state directory::

    state.json        services (pid, port, url, log, data dir) and the provisioned regions
    streamrec.yaml    settings for `streamrec` commands (found automatically; see streamrec.cli.common)
    moto/ redis/      each server's log (and redis' working dir)
    postgres/         the PostgreSQL cluster, unless it had to live under $TMPDIR (see devstack.postgres)
    lake/<region>/    the local raw lake (file://)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from streamrec.devstack.process import DevStackError
from streamrec.devstack.service import ServiceHandle

HOME_ENV = "STREAMREC_HOME"
STATE_FILE = "state.json"
CONFIG_FILE = "streamrec.yaml"
_FORMAT = 1


def default_state_dir() -> Path:
    """``$STREAMREC_HOME``, else ``.streamrec/dev`` under the current directory (git-ignored)."""
    home = os.environ.get(HOME_ENV)
    return Path(home) if home else Path.cwd() / ".streamrec" / "dev"


def default_config_path() -> Path:
    """The settings file ``streamrec dev up`` writes, which streamrec commands load when given no other."""
    return default_state_dir() / CONFIG_FILE


@dataclass(frozen=True)
class StackState:
    """What ``state.json`` records about a running (or partly running) stack."""

    state_dir: Path
    services: dict[str, ServiceHandle] = field(default_factory=dict)
    regions: tuple[str, ...] = ()
    shard_count: int = 0
    lake_root: str = ""

    @property
    def config_path(self) -> Path:
        return self.state_dir / CONFIG_FILE

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def with_service(self, handle: ServiceHandle) -> StackState:
        return replace(self, services={**self.services, handle.name: handle})

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "services": {name: h.to_json() for name, h in self.services.items()},
            "regions": list(self.regions),
            "shard_count": self.shard_count,
            "lake_root": self.lake_root,
        }


def read_state(state_dir: Path) -> StackState | None:
    """The recorded stack, or None if there is none (never started, or ``down`` ran)."""
    path = state_dir / STATE_FILE
    try:
        data = json.loads(path.read_text())
        return StackState(
            state_dir=state_dir,
            services={name: ServiceHandle.from_json(h) for name, h in data.get("services", {}).items()},
            regions=tuple(data.get("regions", ())),
            shard_count=int(data.get("shard_count", 0)),
            lake_root=str(data.get("lake_root", "")),
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DevStackError(f"{path} is unreadable ({exc}); stop the servers it names, delete it") from None


def write_state(state: StackState) -> None:
    """Write ``state.json`` atomically, so a command killed mid-write never leaves half a file."""
    state.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state.state_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    tmp.replace(state.state_path)
