"""The admin listener: health, readiness, the ``/v1`` key-lifecycle API and its OpenAPI document.

The parts, each in its own module:

- ``api``: the route table, one entry per operation; everything below is derived from it.
- ``operations``: what each route does, plain async functions (no HTTP).
- ``schemas``: the wire types (msgspec Structs) and the views of store records.
- ``problems``: which error becomes which status and JSON error body.
- ``server``: the HTTP layer (``create_admin_app``: routing, admin tokens, decoding, answers).
- ``openapi``: the document, generated from the table and the Structs.
- ``client``: the CLI's two ways to the operations, over HTTP or straight on the store.

Must not: be reachable from the proxy listener, or import ``gateway.app`` (the app hands the
listener its ``server.AdminDeps``).
"""

from __future__ import annotations

from gateway.admin.server import AdminDeps, create_admin_app

__all__ = ["AdminDeps", "create_admin_app"]
