"""OS-level helpers shared by every launcher: free ports, spawning, polling with a deadline, stopping.

The servers are started in their own session (``start_new_session=True``) so they outlive the
``streamrec dev up`` command that started them; everything that later touches them goes by pid, and a
pid is only signalled after checking that its command line still names the service's port, because a
pid recorded in ``state.json`` may have been reused by an unrelated process since.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class DevStackError(RuntimeError):
    """The local stack could not do what was asked; the message says what to do about it."""


def free_port() -> int:
    """A loopback TCP port that is free right now (the kernel picks it when binding port 0).

    Another process may take it before the server binds it; launchers retry with a new port when the
    server exits early.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
    ignore: tuple[type[BaseException], ...] = (),
    interval_s: float = 0.05,
    max_interval_s: float = 0.5,
) -> None:
    """Poll ``condition`` until it returns True, backing off from ``interval_s`` to ``max_interval_s``.

    Exceptions of the ``ignore`` types count as "not yet" (a server that is still starting refuses
    connections); the last one is quoted if the deadline passes. Any other exception propagates at once,
    which is how a condition aborts the wait (e.g. the process exited).
    """
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            if condition():
                return
            last = None
        except ignore as exc:
            last = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f" (last error: {last})" if last is not None else ""
            raise DevStackError(f"{what}: not ready after {timeout_s:.0f}s{detail}")
        time.sleep(min(interval_s, remaining))
        interval_s = min(interval_s * 2, max_interval_s)


def spawn(
    argv: Sequence[str],
    log_path: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running server detached from our session, stdout and stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        try:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                close_fds=True,
            )
        except FileNotFoundError as exc:
            raise DevStackError(f"cannot run {argv[0]}: {exc.strerror}") from None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not: it has exited and only waits to be reaped)."""
    if pid <= 0:
        return False
    try:
        # Reap it if it is our own exited child (e.g. a server a test killed); otherwise a zombie lingers.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child: ask the kernel instead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists but belongs to another user
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): kill(0) said it exists
    # Field 3, after the parenthesised command name (which may itself contain spaces or parens).
    return stat.rpartition(")")[2].split()[0] != "Z"


def pid_serves(pid: int, port: int) -> bool:
    """Whether ``pid`` is alive and its command line names ``port``: our server, not a reused pid."""
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # cannot tell without /proc; trust the pid
    # redis-server rewrites its title to "redis-server 127.0.0.1:PORT"; the others keep "-p PORT".
    return any(tok == str(port) or tok.endswith(f":{port}") for tok in cmdline.split())


def terminate(pid: int, port: int, *, timeout_s: float = 15.0) -> None:
    """Stop the server ``pid`` (and its process group) gracefully, then forcibly after ``timeout_s``.

    Does nothing if the pid is gone or now belongs to some other program.
    """
    if not pid_serves(pid, port):
        return
    _signal_group(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not pid_alive(pid), timeout_s=timeout_s, what=f"stopping pid {pid}")
    except DevStackError:
        _signal_group(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), timeout_s=5.0, what=f"killing pid {pid}")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # Servers are session leaders (start_new_session), so their pgid is their pid; signalling the group
    # also reaches any workers they forked.
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a server's log, to quote in an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.strip().splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"
