"""The admin listener: health, readiness and metrics now; the key-lifecycle API joins it.

Owns: the admin ``web.Application``. Must not: be reachable from the proxy listener.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.app import Gateway

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ready, checks = await gw.readiness()
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


def create_admin_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app[GATEWAY] = gateway
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
