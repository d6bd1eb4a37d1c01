"""``up`` / ``status`` / ``down`` for the whole local stack, recorded in ``<state dir>/state.json``.

``up`` is idempotent: servers that are still running and healthy are reused (same pid, same port);
those that died are started again (on their old port when it is free, so URLs stay stable), and the
settings file and the per-region resources are rewritten or re-created every time, which also repairs a
restarted moto server (it keeps everything in memory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from streamrec.devstack.moto_server import MotoLauncher
from streamrec.devstack.postgres import PostgresLauncher, create_database, dsn
from streamrec.devstack.process import DevStackError
from streamrec.devstack.provision import provision_region
from streamrec.devstack.redis_server import RedisLauncher
from streamrec.devstack.service import Launcher, ServiceHandle
from streamrec.devstack.state import StackState, default_state_dir, read_state, write_state
from streamrec.settings import RegionSettings, Settings, SettingsError, load_settings

DEFAULT_REGIONS: tuple[str, ...] = ("us-east-1", "eu-west-1")
DEFAULT_SHARDS = 2
# Start order; ``down`` stops in reverse.
LAUNCHERS: dict[str, Launcher] = {
    "moto": MotoLauncher(),
    "redis": RedisLauncher(),
    "postgres": PostgresLauncher(),
}
_LOCAL_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}

Step = Callable[[str], None]


@dataclass(frozen=True)
class ServiceStatus:
    """One line of ``streamrec dev status``."""

    name: str
    pid: int | None
    url: str
    healthy: bool
    detail: str


def up(
    state_dir: Path | None = None,
    regions: Iterable[str] = DEFAULT_REGIONS,
    shard_count: int = DEFAULT_SHARDS,
    lake_root: str | None = None,
    *,
    on_step: Step | None = None,
) -> StackState:
    """Start (or reuse) moto, redis and PostgreSQL, write ``streamrec.yaml``, provision every region.

    ``lake_root`` defaults to ``file://<state dir>/lake``. ``on_step`` receives a line per step, for
    progress display.
    """
    step = on_step or (lambda _msg: None)
    state_dir = (state_dir or default_state_dir()).resolve()
    region_names = tuple(dict.fromkeys(regions))  # de-duplicated, order kept
    if not region_names:
        raise DevStackError("give at least one region")
    root = lake_root or f"file://{state_dir / 'lake'}"
    # Check names and values before starting anything, with placeholder endpoints.
    _validate(_settings_document(region_names, shard_count, root, _placeholder_services(state_dir)))

    previous = read_state(state_dir)
    state = StackState(
        state_dir=state_dir,
        services=dict(previous.services) if previous else {},
        regions=region_names,
        shard_count=shard_count,
        lake_root=root,
    )
    for name, launcher in LAUNCHERS.items():
        old = state.services.get(name)
        if old is not None and launcher.healthy(old):
            step(f"{name}: running, pid {old.pid}")
            continue
        if old is not None:
            launcher.stop(old)  # gone, or alive but not answering: make sure it is gone
        step(f"{name}: starting")
        handle = launcher.start(state_dir / name, port=old.port if old else None)
        state = state.with_service(handle)
        write_state(state)  # record each server at once, so `down` can stop it if a later one fails
        step(f"{name}: started, pid {handle.pid}, {handle.url}")

    for region in region_names:  # each region's warehouse is its own database, as in AWS
        create_database(state.services["postgres"], warehouse_database(region))
    document = _settings_document(region_names, shard_count, root, state.services)
    state.config_path.write_text(
        "# Written by `streamrec dev up`; rewritten on every run. Streamrec commands load it when\n"
        "# neither --config nor STREAMREC_CONFIG is given.\n" + yaml.safe_dump(document, sort_keys=False)
    )
    try:
        settings = load_settings(state.config_path)
    except SettingsError as exc:
        raise DevStackError(str(exc)) from None
    for region in region_names:
        result = provision_region(settings, region)
        step(f"{region}: {len(result.created)} resources created, {len(result.existing)} already there")
    write_state(state)
    return state


def status(state_dir: Path | None = None) -> list[ServiceStatus]:
    """Health of every service of the stack; empty if no stack is recorded in ``state_dir``."""
    state = read_state((state_dir or default_state_dir()).resolve())
    if state is None:
        return []
    out = []
    for name, launcher in LAUNCHERS.items():
        handle = state.services.get(name)
        if handle is None:
            out.append(ServiceStatus(name, None, "", False, "not started"))
            continue
        healthy, detail = launcher.check(handle)
        out.append(ServiceStatus(name, handle.pid, handle.url, healthy, detail))
    return out


def down(state_dir: Path | None = None) -> list[str]:
    """Stop every recorded server, delete the PostgreSQL cluster, ``state.json`` and ``streamrec.yaml``.

    The lake and the logs stay. Returns the names of the services stopped, in stopping order (the
    reverse of starting); no error (and an empty list) when nothing is recorded.
    """
    state = read_state((state_dir or default_state_dir()).resolve())
    if state is None:
        return []
    stopped, failures = [], []
    for name in reversed(list(state.services)):
        launcher = LAUNCHERS.get(name)
        if launcher is None:
            continue
        try:
            launcher.stop(state.services[name])
            launcher.purge(state.services[name])
            stopped.append(name)
        except (DevStackError, OSError) as exc:
            failures.append(f"{name}: {exc}")
    if failures:
        raise DevStackError("could not stop everything (state.json kept): " + "; ".join(failures))
    state.state_path.unlink(missing_ok=True)
    # The settings would point at dead ports; without them commands fall back to their defaults.
    state.config_path.unlink(missing_ok=True)
    return stopped


def _placeholder_services(state_dir: Path) -> dict[str, ServiceHandle]:
    log = state_dir / "placeholder.log"
    return {
        "moto": ServiceHandle("moto", 0, 1, "http://127.0.0.1:1", log),
        "redis": ServiceHandle("redis", 0, 1, "redis://127.0.0.1:1", log),
        "postgres": ServiceHandle("postgres", 0, 1, dsn(1), log),
    }


def warehouse_database(region: str) -> str:
    """The local stand-in for a region's Redshift database: ``streamrec_us_east_1``."""
    return "streamrec_" + region.replace("-", "_")


def _settings_document(
    regions: tuple[str, ...], shard_count: int, lake_root: str, services: dict[str, ServiceHandle]
) -> dict[str, Any]:
    """The ``streamrec.yaml`` content: moto as the AWS endpoint, one section per region."""
    region_docs = {}
    for name in regions:
        region = RegionSettings.default_for(name, lake_root).model_copy(
            update={
                "shard_count": shard_count,
                # Every region shares db 0: online-feature keys carry the region.
                "redis_url": f"{services['redis'].url}/0",
                "warehouse_dsn": dsn(services["postgres"].port, warehouse_database(name)),
            }
        )
        region_docs[name] = region.model_dump(mode="json")
    return {
        "environment": "local",
        "aws": {"endpoint_url": services["moto"].url, **_LOCAL_CREDENTIALS},
        "regions": region_docs,
    }


def _validate(document: dict[str, Any]) -> None:
    # model_validate checks the document alone (no environment, no YAML), which is what we want here.
    try:
        Settings.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise DevStackError(f"invalid dev stack settings: {problems}") from None
