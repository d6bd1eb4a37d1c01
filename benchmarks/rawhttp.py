"""A minimal HTTP/1.1 keep-alive GET client on asyncio streams, for load generation on small machines.

``httpx`` spends 2-3 ms of CPU per request on the 2-core benchmark machine, which the closed-loop load
generator takes from the server it measures. This client does only what a GET of a small JSON answer
needs (a request line, ``Content-Length`` bodies, keep-alive), at a fraction of that cost, so a run can
show how much of a latency figure is the generator's. It has the small part of httpx's interface the
serve benchmark uses (``get(path, params=)`` → ``.status_code``, ``.content``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit


class RawHttpError(Exception):
    """A request that got no complete answer (connection closed, malformed or chunked response)."""


@dataclass(frozen=True)
class RawResponse:
    status_code: int
    content: bytes


class RawHttpClient:
    """Up to ``connections`` keep-alive connections to one ``http://host:port``, shared by the callers."""

    def __init__(self, base_url: str, connections: int, timeout_s: float = 10.0) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"an http://host:port base URL is needed, got {base_url!r}")
        self.host, self.port = url.hostname, url.port or 80
        self.timeout_s = timeout_s
        self._idle: asyncio.LifoQueue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = asyncio.LifoQueue()
        for _ in range(connections):
            self._idle.put_nowait(None)  # a slot; connected on first use
        self._open: set[asyncio.StreamWriter] = set()

    async def get(self, path: str, params: dict[str, Any] | None = None) -> RawResponse:
        target = f"{path}?{urlencode(params)}" if params else path
        request = f"GET {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode()
        conn = await self._idle.get()
        try:
            if conn is None:
                conn = await asyncio.open_connection(self.host, self.port)
                self._open.add(conn[1])
            response = await asyncio.wait_for(self._exchange(*conn, request), self.timeout_s)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, RawHttpError, ValueError) as exc:
            if conn is not None:
                conn[1].close()
                self._open.discard(conn[1])
            self._idle.put_nowait(None)
            raise RawHttpError(f"{type(exc).__name__}: {exc}") from exc
        self._idle.put_nowait(conn)
        return response

    @staticmethod
    async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> RawResponse:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise RawHttpError("chunked responses are not supported")
        return RawResponse(status, await reader.readexactly(length or 0))

    async def aclose(self) -> None:
        for writer in list(self._open):
            writer.close()
        self._open.clear()

    async def __aenter__(self) -> RawHttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
