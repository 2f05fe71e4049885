"""The admin listener: health, readiness, the ``/v1`` key-lifecycle API and its OpenAPI document.

Owns: the admin ``web.Application`` (its middlewares and routes; what each route does is in
``gateway.admin.api``, the wire types in ``schemas``, the document in ``openapi``). Must not: be
reachable from the proxy listener.

Routes (``ENDPOINTS`` in ``api`` is the list): ``/healthz``, ``/readyz`` and ``/v1/openapi.json``
are public; every other ``/v1`` route needs an admin bearer token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.admin.api import GATEWAY, auth_middleware, error_middleware, http_handler, log_middleware
from gateway.admin.openapi import ALL_ENDPOINTS

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["GATEWAY", "create_admin_app"]


def create_admin_app(gateway: Gateway) -> web.Application:
    app = web.Application(
        client_max_size=1 << 20,
        middlewares=[log_middleware, error_middleware, auth_middleware(gateway.secrets.admin_tokens)],
    )
    app[GATEWAY] = gateway
    for ep in ALL_ENDPOINTS:
        app.router.add_route(ep.method, ep.path, http_handler(ep))
    return app
