"""aiohttp's own ceiling: a low-level ``web.Server`` answering "ok" with no key check, no upstream.

    python benchmarks/peers/hello_aiohttp.py --port 9002
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from aiohttp import web, web_request


async def hello(request: web_request.BaseRequest) -> web.Response:
    return web.Response(text="ok\n")


async def serve(port: int) -> None:
    runner = web.ServerRunner(web.Server(hello), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    uvloop.run(serve(p.parse_args().port))


if __name__ == "__main__":
    main()
