"""The proxy a user writes instead of Keystile: the naive few lines, as a benchmark peer.

aiohttp.web + uvloop, keys in a dict, one shared ClientSession, 401 for an unknown key, the owner
forwarded in ``X-Keystile-Owner``, the upstream body read whole (``await resp.read()``) and
returned. No streaming, no hop-by-hop hygiene beyond dropping Host: this is the baseline Keystile
must beat on cost per request while doing more.

    python benchmarks/peers/plain_aiohttp.py --port 9001 --upstream http://127.0.0.1:9000 \
        --keys keys.txt
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import uvloop
from aiohttp import web

KEYS = web.AppKey("keys", dict[str, str])
UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def proxy(request: web.Request) -> web.Response:
    owner = request.app[KEYS].get(request.headers.get("X-API-Key", ""))
    if owner is None:
        return web.Response(status=401, text="unauthorized\n")
    headers = request.headers.copy()
    headers.popall("X-API-Key", None)
    headers.popall("Host", None)
    headers["X-Keystile-Owner"] = owner
    async with request.app[SESSION].request(
        request.method,
        request.app[UPSTREAM] + request.path_qs,
        headers=headers,
        data=await request.read(),
    ) as resp:
        body = await resp.read()
        return web.Response(
            status=resp.status, body=body, content_type=resp.content_type or "text/plain"
        )


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession()
    yield
    await app[SESSION].close()


async def serve(port: int, upstream: str, keys: dict[str, str]) -> None:
    app = web.Application()
    app[KEYS] = keys
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--keys", type=Path, required=True)
    a = p.parse_args()
    keys = {line.strip(): "bench" for line in a.keys.read_text().splitlines() if line.strip()}
    uvloop.run(serve(a.port, a.upstream, keys))


if __name__ == "__main__":
    main()
