"""The admin listener: health, readiness, the ``/v1`` key-lifecycle API and its OpenAPI document.

Owns: the admin ``web.Application`` (its middlewares and routes; what each route does is in
``gateway.admin.api``, the wire types in ``schemas``, the document in ``openapi``). Must not: be
reachable from the proxy listener.

Routes (``ENDPOINTS`` in ``api`` is the list): ``/healthz``, ``/readyz`` and ``/v1/openapi.json``
are public; every other ``/v1`` route needs an admin bearer token.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.admin.api import (
    GATEWAY,
    Endpoint,
    auth_middleware,
    error_middleware,
    http_handler,
    log_middleware,
)
from gateway.admin.openapi import ALL_ENDPOINTS, document

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["GATEWAY", "create_admin_app"]


def create_admin_app(gateway: Gateway) -> web.Application:
    app = web.Application(
        client_max_size=1 << 20,
        middlewares=[log_middleware, error_middleware, auth_middleware(gateway.secrets.admin_tokens)],
    )
    app[GATEWAY] = gateway
    document()  # built now, at start-up, not on the loop's time when first asked for
    by_path: dict[str, list[Endpoint]] = {}
    for ep in ALL_ENDPOINTS:
        by_path.setdefault(ep.path, []).append(ep)
    # One resource per path, in ENDPOINTS order (a literal path such as /v1/keys/verify before
    # /v1/keys/{key_id}); a method a path does not have is answered 405 with that path's own
    # Allow, never handed to a template that happens to match too.
    for path, eps in by_path.items():
        resource = app.router.add_resource(path)
        for ep in eps:
            resource.add_route(ep.method, http_handler(ep))
        resource.add_route("*", _not_allowed(ep.method for ep in eps))
    return app


def _not_allowed(methods: Iterable[str]) -> Handler:
    allowed = sorted(set(methods))

    async def handle(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMethodNotAllowed(request.method, allowed)

    return handle
