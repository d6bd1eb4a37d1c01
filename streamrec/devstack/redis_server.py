"""redis-server (the Debian package) on a loopback port: the local stand-in for ElastiCache.

Persistence is off (``--save "" --appendonly no``): the online features are rebuilt by ingest, and a
dev stack that starts empty is easier to reason about.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from streamrec.devstack.process import DevStackError
from streamrec.devstack.service import ProcessLauncher, ServiceHandle

INSTALL_HINT = "redis-server is not installed: run `apt-get install -y redis-server` (`make setup` does this)"


class RedisLauncher(ProcessLauncher):
    name = "redis"
    not_ready = (OSError, redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError)

    def command(self, port: int, workdir: Path) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise DevStackError(INSTALL_HINT)
        data = self.data_dir_for(workdir)
        data.mkdir(parents=True, exist_ok=True)
        return [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(data),
            "--daemonize", "no",
            "--protected-mode", "no",
        ]  # fmt: skip

    def url_for(self, port: int) -> str:
        return f"redis://127.0.0.1:{port}"

    def data_dir_for(self, workdir: Path) -> Path:
        return workdir / "redis-data"

    def probe(self, handle: ServiceHandle) -> None:
        client = redis.Redis.from_url(handle.url, socket_timeout=2, socket_connect_timeout=2)
        try:
            if not client.ping():
                raise OSError("PING did not answer PONG")
        finally:
            client.close()
