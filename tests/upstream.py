"""A real upstream for tests: records what it received and misbehaves on request.

Paths: ``/slow?s=N`` answers after N seconds; ``/hang`` never answers; ``/bytes?n=N`` streams N bytes;
``/sink`` counts the request body; ``/redirect`` answers 302; ``/reset`` drops the connection;
``/hop`` answers with hop-by-hop and Connection-listed headers; anything else echoes as JSON.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_bytes: int = 0

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class RecordingUpstream:
    received: list[Seen] = field(default_factory=list)
    cancelled: int = 0
    port: int = 0
    _runner: web.ServerRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        seen = Seen(request.method, request.raw_path, list(request.headers.items()))
        self.received.append(seen)
        path = request.path
        try:
            if path == "/sink" or path.endswith("/sink"):
                async for chunk in request.content.iter_any():
                    seen.body_bytes += len(chunk)
                return web.json_response({"body_bytes": seen.body_bytes})
            body = await request.read() if request.body_exists else b""
            seen.body_bytes = len(body)
            if path.endswith("/slow"):
                await asyncio.sleep(float(request.query.get("s", "1")))
            elif path.endswith("/hang"):
                await asyncio.sleep(3600)
            elif path.endswith("/bytes"):
                n = int(request.query["n"])
                resp = web.StreamResponse(
                    headers={"Content-Length": str(n), "Content-Type": "application/octet-stream"}
                )
                await resp.prepare(request)
                chunk = b"x" * 65536
                while n > 0:
                    part = chunk[: min(n, len(chunk))]
                    await resp.write(part)
                    n -= len(part)
                await resp.write_eof()
                return resp
            elif path.endswith("/redirect"):
                return web.Response(status=302, headers={"Location": "http://169.254.169.254/latest"})
            elif path.endswith("/reset"):
                assert request.transport is not None
                request.transport.abort()
                await asyncio.sleep(0.1)
            elif path.endswith("/hop"):
                return web.Response(
                    text="hop",
                    headers={
                        "Connection": "X-Private, keep-alive",
                        "X-Private": "secret",
                        "Keep-Alive": "timeout=5",
                        "Proxy-Authenticate": "Basic",
                        "X-Public": "ok",
                    },
                )
            return web.json_response(
                {
                    "method": request.method,
                    "path": request.raw_path,
                    "headers": seen.headers,
                    "body_bytes": seen.body_bytes,
                }
            )
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def start(self) -> None:
        self._runner = web.ServerRunner(
            web.Server(self._handle, handler_cancellation=True), shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def malformed_upstream(reply: bytes) -> tuple[asyncio.Server, int]:
    """A raw TCP server that answers every connection with ``reply`` and closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def raw_request(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the request should carry Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


async def exchange(port: int, data: bytes, replies: int) -> tuple[list[bytes], bool]:
    """Send ``data``; read ``replies`` responses framed by Content-Length; say whether the server
    then closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        out = []
        for _ in range(replies):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            body = b"" if data.startswith(b"HEAD") else await asyncio.wait_for(reader.readexactly(length), 5)
            out.append(head + body)
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.3) == b""
        except TimeoutError:
            closed = False
        return out, closed
    finally:
        writer.close()
