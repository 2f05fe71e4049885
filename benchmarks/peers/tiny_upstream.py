"""A minimal keep-alive HTTP/1.1 upstream answering 200 "ok", for machines without nginx (smoke).

Handles GET/HEAD and bodies with Content-Length; ``/_bench/echo`` answers with the identity
headers it received, like the nginx upstream. Not a general HTTP server.

    python benchmarks/peers/tiny_upstream.py --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import uvloop

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            total = end + 4 + int(headers.get("content-length", "0") or 0)
            if len(self.buf) < total:
                return
            del self.buf[:total]
            assert self.transport is not None
            target = head[0].split(" ")[1] if " " in head[0] else "/"
            if target.startswith("/_bench/echo"):
                body = (
                    f"owner={headers.get('x-keystile-owner', '')} "
                    f"principal={headers.get('x-keystile-principal', '')} "
                    f"key={headers.get('x-api-key', '')}\n"
                ).encode()
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
            else:
                self.transport.write(OK)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    uvloop.run(serve(p.parse_args().port))


if __name__ == "__main__":
    main()
