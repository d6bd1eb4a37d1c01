"""The common shape of a local server: a serialisable handle and a launcher that starts, probes, stops.

A :class:`ServiceHandle` is plain data (it is written to ``state.json`` and read back by a later
command), so behaviour lives on the :class:`Launcher`, keyed by the handle's ``name``. Servers that run
in the foreground (moto, redis) share :class:`ProcessLauncher`; PostgreSQL, which ``pg_ctl`` manages,
implements the same interface itself.
"""

from __future__ import annotations

import abc
import functools
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from streamrec.devstack.process import (
    DevStackError,
    free_port,
    log_tail,
    pid_serves,
    spawn,
    terminate,
    wait_until,
)

START_TIMEOUT_S = 60.0
# A just-freed port can be taken by someone else before the server binds it; that many tries.
_PORT_ATTEMPTS = 3


@dataclass(frozen=True)
class ServiceHandle:
    """One running server. ``url`` is what clients use (an endpoint URL, redis URL or PostgreSQL DSN)."""

    name: str
    pid: int
    port: int
    url: str
    log_path: Path
    # -- The directory the server keeps its state in; None when it keeps everything in memory.
    data_dir: Path | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["log_path"] = str(self.log_path)
        out["data_dir"] = str(self.data_dir) if self.data_dir else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceHandle:
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            port=int(data["port"]),
            url=str(data["url"]),
            log_path=Path(data["log_path"]),
            data_dir=Path(data["data_dir"]) if data.get("data_dir") else None,
        )


class Launcher(abc.ABC):
    """Starts one kind of server in a working directory and manages it afterwards by its handle."""

    name: ClassVar[str]

    @abc.abstractmethod
    def start(self, workdir: Path, *, port: int | None = None) -> ServiceHandle:
        """Start the server (on ``port`` if given and free) and return once it answers its health probe."""

    @abc.abstractmethod
    def probe(self, handle: ServiceHandle) -> None:
        """Talk to the server once; raise if it does not answer correctly."""

    @abc.abstractmethod
    def stop(self, handle: ServiceHandle) -> None:
        """Stop the server; no error if it is already gone."""

    def purge(self, handle: ServiceHandle) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Delete what the (stopped) server kept on disk. Default: nothing worth deleting."""

    def check(self, handle: ServiceHandle) -> tuple[bool, str]:
        """(healthy, one-line detail): is the recorded process ours, alive, and answering?"""
        if not pid_serves(handle.pid, handle.port):
            return False, f"process {handle.pid} is not running"
        try:
            self.probe(handle)
        except Exception as exc:  # any failure to answer is "unhealthy", described, not raised
            return False, f"process {handle.pid} runs but does not answer: {_one_line(exc)}"
        return True, "ok"

    def healthy(self, handle: ServiceHandle) -> bool:
        return self.check(handle)[0]


class ProcessLauncher(Launcher):
    """A server that runs in the foreground as our (detached) child: spawn it, poll its probe."""

    # Exceptions the probe raises while the server is still starting.
    not_ready: ClassVar[tuple[type[BaseException], ...]] = (OSError,)

    @abc.abstractmethod
    def command(self, port: int, workdir: Path) -> list[str]:
        """The argv that runs the server in the foreground on ``port``."""

    @abc.abstractmethod
    def url_for(self, port: int) -> str:
        """The client URL of a server on ``port``."""

    def data_dir_for(self, workdir: Path) -> Path | None:
        return None

    def start(self, workdir: Path, *, port: int | None = None) -> ServiceHandle:
        workdir.mkdir(parents=True, exist_ok=True)
        log_path = workdir / f"{self.name}.log"
        errors: list[str] = []
        for attempt in range(_PORT_ATTEMPTS):
            use_port = port if (port and attempt == 0) else free_port()
            proc = spawn(self.command(use_port, workdir), log_path)
            handle = ServiceHandle(
                name=self.name,
                pid=proc.pid,
                port=use_port,
                url=self.url_for(use_port),
                log_path=log_path,
                data_dir=self.data_dir_for(workdir),
            )
            try:
                wait_until(
                    functools.partial(self._ready, proc, handle),
                    timeout_s=START_TIMEOUT_S,
                    what=f"{self.name} on port {use_port}",
                    ignore=self.not_ready,
                )
                return handle
            except _ExitedEarly as exc:
                errors.append(str(exc))  # most likely the port was taken meanwhile: try another
            except DevStackError as exc:
                terminate(proc.pid, use_port)
                raise DevStackError(f"{exc}; log {log_path}:\n{log_tail(log_path)}") from None
        raise DevStackError(
            f"{self.name} exited during start-up {_PORT_ATTEMPTS} times ({errors[-1]}); "
            f"log {log_path}:\n{log_tail(log_path)}"
        )

    def _ready(self, proc: subprocess.Popen[bytes], handle: ServiceHandle) -> bool:
        if proc.poll() is not None:
            raise _ExitedEarly(f"{self.name} exited with code {proc.returncode}")
        self.probe(handle)
        return True

    def stop(self, handle: ServiceHandle) -> None:
        terminate(handle.pid, handle.port)


class _ExitedEarly(Exception):
    pass


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
