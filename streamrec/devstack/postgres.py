"""PostgreSQL 15 on a loopback port: the local stand-in for Redshift (same MERGE / COPY FROM STDIN subset).

``initdb`` refuses to run as root, so when we are root every PostgreSQL program runs as the ``postgres``
OS account, and the cluster directory must be owned by it and reachable through directories it may
traverse. Where the cluster lives:

* ``<workdir>`` itself (normally ``<state dir>/postgres``) when that is reachable by the account and short
  enough for a Unix socket path (about 100 bytes);
* otherwise ``$TMPDIR/streamrec-pg-<hash of workdir>``, e.g. for pytest's ``/tmp/pytest-of-root`` (mode
  0700). We deliberately do not loosen the permissions of the user's directories to make room for it.

Either way the directory is recorded as the handle's ``data_dir`` (holding ``data/``, the socket directory
``run/`` and ``postgres.log``), so ``down`` knows what to delete.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from streamrec.devstack.process import DevStackError, free_port, log_tail, terminate, wait_until
from streamrec.devstack.service import START_TIMEOUT_S, Launcher, ServiceHandle

DB_USER = "streamrec"
DB_NAME = "streamrec"
OS_ACCOUNT = "postgres"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes; leave room for ".s.PGSQL.65535"
_PORT_ATTEMPTS = 3


def dsn(port: int, dbname: str = DB_NAME) -> str:
    return f"postgresql://{DB_USER}@127.0.0.1:{port}/{dbname}"


def create_database(handle: ServiceHandle, name: str) -> str:
    """Create database ``name`` on the server if it is missing; return its DSN."""
    with psycopg.connect(dsn(handle.port, "postgres"), autocommit=True, connect_timeout=5) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except psycopg.errors.DuplicateDatabase:
                pass  # created concurrently: fine
    return dsn(handle.port, name)


def pg_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres: from PATH, else the newest /usr/lib/postgresql."""
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        # /usr/local/bin/pg_ctl may be a symlink; pg_ctl finds `postgres` next to its real path.
        candidates.append(Path(on_path).resolve().parent)
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: _version_key(p.parent.name), reverse=True)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise DevStackError(
        "PostgreSQL server programs (initdb, pg_ctl, postgres) not found on PATH or under "
        "/usr/lib/postgresql/*/bin: run `apt-get install -y postgresql-15`"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name)) or (0,)


@dataclass(frozen=True)
class _Account:
    """The OS account PostgreSQL programs run as when we are root."""

    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...]


def _account() -> _Account | None:
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(OS_ACCOUNT)
    except KeyError:
        raise DevStackError(
            f"running as root, and there is no `{OS_ACCOUNT}` account to run PostgreSQL as "
            "(initdb refuses root): install the postgresql package or run as a normal user"
        ) from None
    groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    return _Account(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, groups)


def _traversable(path: Path, account: _Account) -> bool:
    """Whether ``account`` may search every directory from / down to ``path``."""
    for directory in [path, *path.parents]:
        try:
            st = directory.stat()
        except OSError:
            return False
        if st.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in account.groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


class PostgresLauncher(Launcher):
    name = "postgres"

    def start(self, workdir: Path, *, port: int | None = None) -> ServiceHandle:
        bindir = pg_bindir()
        account = _account()
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        root = self._cluster_root(workdir, account)
        data, sockets, log_path = root / "data", root / "run", root / "postgres.log"
        if not (data / "PG_VERSION").exists():
            shutil.rmtree(data, ignore_errors=True)  # a half-made cluster from an interrupted start
            self._run(account, root, bindir / "initdb", "-D", data, "-A", "trust", "-U", DB_USER,
                      "--encoding", "UTF8", "--locale", "C", "--no-instructions", "--no-sync")  # fmt: skip
        self._mkdir_owned(sockets, account)
        # A server left running on this cluster by an earlier stack (its state.json lost): stop it first.
        if (data / "postmaster.pid").exists():
            self._pg_ctl_stop(bindir, account, root, data)

        failures: list[str] = []
        for attempt in range(_PORT_ATTEMPTS):
            use_port = port if (port and attempt == 0) else free_port()
            options = (
                f"-p {use_port} -c listen_addresses=127.0.0.1 -k {shlex.quote(str(sockets))} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            result = self._run(
                account, root, bindir / "pg_ctl", "-D", data, "-l", log_path, "-o", options,
                "-w", "-t", str(int(START_TIMEOUT_S)), "start", check=False,
            )  # fmt: skip
            if result.returncode == 0:
                break
            failures.append(result.stdout.strip() or result.stderr.strip())  # e.g. the port was taken
        else:
            raise DevStackError(
                f"postgres did not start ({failures[-1]}); log {log_path}:\n{log_tail(log_path)}"
            )

        handle = ServiceHandle(
            name=self.name,
            pid=_postmaster_pid(data),
            port=use_port,
            url=dsn(use_port),
            log_path=log_path,
            data_dir=root,
        )
        wait_until(
            lambda: _select_one(dsn(use_port, "postgres")),
            timeout_s=START_TIMEOUT_S,
            what=f"postgres on port {use_port}",
            ignore=(psycopg.OperationalError,),
        )
        create_database(handle, DB_NAME)
        return handle

    def probe(self, handle: ServiceHandle) -> None:
        if not _select_one(handle.url):
            raise OSError("SELECT 1 did not return 1")

    def stop(self, handle: ServiceHandle) -> None:
        root = handle.data_dir
        if root is not None and (root / "data" / "postmaster.pid").exists():
            try:
                self._pg_ctl_stop(pg_bindir(), _account(), root, root / "data")
            except DevStackError:
                pass  # fall through to signalling the pid ourselves
        terminate(handle.pid, handle.port)

    def purge(self, handle: ServiceHandle) -> None:
        if handle.data_dir is not None and handle.data_dir.is_dir():
            shutil.rmtree(handle.data_dir)

    def _pg_ctl_stop(self, bindir: Path, account: _Account | None, cwd: Path, data: Path) -> None:
        status = self._run(account, cwd, bindir / "pg_ctl", "-D", data, "status", check=False)
        if status.returncode == 0:  # 3 = not running (stale postmaster.pid), 4 = no cluster
            self._run(account, cwd, bindir / "pg_ctl", "-D", data, "stop", "-m", "fast", "-w", "-t", "30")

    def _cluster_root(self, workdir: Path, account: _Account | None) -> Path:
        socket_path_len = len(str(workdir / "run" / ".s.PGSQL.65535"))
        reachable = account is None or _traversable(workdir.parent, account)
        if reachable and socket_path_len <= _MAX_SOCKET_PATH:
            root = workdir
        else:
            digest = hashlib.sha256(str(workdir).encode()).hexdigest()[:12]
            root = Path(tempfile.gettempdir()) / f"streamrec-pg-{digest}"
            if root.is_symlink() or (root.exists() and not root.is_dir()):
                raise DevStackError(f"{root} exists and is not a directory: remove it")
        self._mkdir_owned(root, account)
        return root

    @staticmethod
    def _mkdir_owned(path: Path, account: _Account | None) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if account is not None:
            os.chown(path, account.uid, account.gid)
            path.chmod(0o700)

    @staticmethod
    def _run(
        account: _Account | None, cwd: Path, *argv: str | Path, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program (as the postgres account when we are root) and capture its output."""
        env = dict(os.environ)
        if account is not None:
            env.update(HOME=account.home, USER=account.name, LOGNAME=account.name)
        result = subprocess.run(
            [str(a) for a in argv],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S + 30,
            start_new_session=True,  # the postmaster pg_ctl leaves behind must outlive us
            user=account.uid if account else None,
            group=account.gid if account else None,
            extra_groups=list(account.groups) if account else None,
        )
        if check and result.returncode != 0:
            output = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise DevStackError(f"{Path(str(argv[0])).name} failed: {' '.join(output[-3:])}")
        return result


def _postmaster_pid(data: Path) -> int:
    # First line of postmaster.pid is the postmaster's pid (root may read it; so may its owner).
    return int((data / "postmaster.pid").read_text().splitlines()[0])


def _select_one(conninfo: str) -> bool:
    with psycopg.connect(conninfo, connect_timeout=2, autocommit=True) as conn:
        row = conn.execute("SELECT 1").fetchone()
    return row == (1,)
