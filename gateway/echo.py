"""A tiny echo upstream for ``keystile demo`` and local trials.

Owns: answering every request with what it received (method, path, query, headers, body size) as
JSON. Must not: be used in front of anything real.
"""

from __future__ import annotations

from aiohttp import web


async def _echo(request: web.BaseRequest) -> web.Response:
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path.partition("?")[0],
            "query": request.query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_bytes": size,
        }
    )


async def start_echo(host: str = "127.0.0.1", port: int = 0) -> tuple[web.ServerRunner, int]:
    runner = web.ServerRunner(web.Server(_echo), shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addr = runner.addresses[0]
    return runner, int(addr[1])
