"""moto server: Kinesis, S3 and DynamoDB on a loopback port, in a process of its own.

A separate process (rather than moto's in-process ``ThreadedMotoServer``) because the dev stack must
keep running after ``streamrec dev up`` returns. It runs with this interpreter, so it is the moto
installed next to streamrec.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

from streamrec.devstack.service import ProcessLauncher, ServiceHandle


class MotoLauncher(ProcessLauncher):
    name = "moto"

    def command(self, port: int, workdir: Path) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    def url_for(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def probe(self, handle: ServiceHandle) -> None:
        # The moto dashboard answers without touching any backend: cheapest proof the server is up.
        with urllib.request.urlopen(f"{handle.url}/moto-api/", timeout=2) as resp:
            if resp.status != 200:
                raise OSError(f"GET /moto-api/ answered {resp.status}")
