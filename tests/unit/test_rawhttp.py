"""benchmarks/rawhttp.py, the serve benchmark's lean load-generator client, against a real loopback
HTTP/1.1 server (the standard library's)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks.rawhttp import RawHttpClient, RawHttpError

pytestmark = pytest.mark.unit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    connections: set[int] = set()

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        Handler.connections.add(id(self.connection))
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"0\r\n\r\n")
            return
        body = self.path.encode() if self.path != "/missing" else b"no"
        self.send_response(404 if self.path == "/missing" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_gets_reuse_their_connections_and_read_whole_bodies(server: str) -> None:
    Handler.connections.clear()

    async def go() -> list[tuple[int, bytes]]:
        async with RawHttpClient(server, connections=2) as client:
            answers = await asyncio.gather(*(client.get(f"/v1/users/u{i}/recs", params={"k": 20})
                                             for i in range(6)))
            answers.append(await client.get("/missing"))
        return [(a.status_code, a.content) for a in answers]

    answers = asyncio.run(go())
    assert answers[:6] == [(200, f"/v1/users/u{i}/recs?k=20".encode()) for i in range(6)]
    assert answers[6] == (404, b"no")
    assert len(Handler.connections) <= 2  # six requests over at most two keep-alive connections


def test_an_unsupported_or_failed_answer_is_an_error_and_frees_its_slot(server: str) -> None:
    async def go() -> int:
        async with RawHttpClient(server, connections=1) as client:
            with pytest.raises(RawHttpError, match="chunked"):
                await client.get("/chunked")
            return (await client.get("/after")).status_code  # the slot reconnects

    assert asyncio.run(go()) == 200
    with pytest.raises(RawHttpError):
        asyncio.run(_get_refused())


async def _get_refused() -> None:
    async with RawHttpClient("http://127.0.0.1:9", connections=1, timeout_s=2) as client:
        await client.get("/")
