"""The admin API over HTTP: routing, admin-token authentication, decoding, encoding, error answers.

Owns: ``create_admin_app`` (the aiohttp application, its middlewares and one route per entry of the
table in ``api``), the admin bearer-token check, reading a request's body and query string as the
table types them, and turning results and errors into responses (``problems`` says which error is
which). It is handed a gateway's ``AdminDeps``, not the gateway. Must not: do what an operation
does (``operations``), be reachable from the proxy listener, or log a token, a key secret or a
request body.

Authentication: every ``/v1`` route except ``/v1/openapi.json`` needs ``Authorization: Bearer
<admin token>`` (``KEYSTILE_ADMIN_TOKENS`` or ``admin.tokens_file``). The presented token is hashed
and compared with every configured token in constant time; with no tokens configured every ``/v1``
request is refused. The OpenAPI document is public: it describes the API and holds no data. A
token's role (``label:role:token`` entries; a bare token is ``admin``) must reach the operation's
(``api.required_role``), else 403. Writes are audited with the token's label as the actor, or
``admin:<first 8 hex of sha256(token)>`` for an unlabelled one, never the token itself.

Routing: one resource per path, in table order (a literal path such as ``/v1/keys/verify`` before
``/v1/keys/{key_id}``); a method a path does not have is answered 405 with that path's own
``Allow``, never handed to a template that happens to match too.

Conformance: input valid by the OpenAPI document is accepted unless a rule the document cannot
state refuses it (an expiry in the past, an owner that does not exist); query strings are read as
the document types them (no ``null``; numbers and booleans as JSON scalars); cursors are positions
of the documented shape. ``tests/adversarial/test_admin_schemathesis.py`` holds the API to this.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import time
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Final, Literal, Protocol

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler as WebHandler
from aiohttp.typedefs import Middleware
from multidict import MultiMapping

from gateway.admin import schemas as s
from gateway.admin.api import Endpoint, invoke, required_role
from gateway.admin.openapi import ALL_ENDPOINTS, document
from gateway.admin.operations import Context, Services
from gateway.admin.problems import Forbidden, InvalidInput, Unauthenticated, problem, validation_field
from gateway.config import ADMIN_ROLES, Secrets, admin_token
from gateway.models import Actor, AuditSource

log = logging.getLogger("keystile.admin")


class AdminDeps(Services, Protocol):
    """What the admin listener is handed: the operations' ``Services`` and the admin tokens."""

    @property
    def secrets(self) -> Secrets: ...


DEPS: Final[web.AppKey[AdminDeps]] = web.AppKey("admin_deps")
ACTOR: Final[web.RequestKey[str]] = web.RequestKey("actor", str)
ROLE: Final[web.RequestKey[str]] = web.RequestKey("role", str)
_RANK: Final = {role: rank for rank, role in enumerate(ADMIN_ROLES)}
PUBLIC_PATHS: Final = frozenset({"/v1/openapi.json"})
SOURCE_HEADER: Final = "X-Keystile-Source"

_enc = msgspec.json.Encoder()
_HEADERS: Final = {"Cache-Control": "no-store"}


def create_admin_app(deps: AdminDeps) -> web.Application:
    app = web.Application(
        client_max_size=1 << 20,
        middlewares=[log_middleware, error_middleware, auth_middleware(deps.secrets.admin_tokens)],
    )
    app[DEPS] = deps
    document()  # built now, at start-up, not on the loop's time when first asked for
    by_path: dict[str, list[Endpoint[Any]]] = {}
    for ep in ALL_ENDPOINTS:
        by_path.setdefault(ep.path, []).append(ep)
    for path, eps in by_path.items():
        resource = app.router.add_resource(path)
        for ep in eps:
            resource.add_route(ep.method, _handler(ep))
        resource.add_route("*", _not_allowed(ep.method for ep in eps))
    return app


def _handler(ep: Endpoint[Any]) -> WebHandler:
    needed = required_role(ep)

    async def handle(request: web.Request) -> web.StreamResponse:
        if not ep.public:
            role = request.get(ROLE, "")  # set by auth_middleware for every /v1 route
            if _RANK.get(role, -1) < _RANK[needed]:
                raise Forbidden(f"this admin token's role is {role}; {ep.operation_id} needs {needed}")
        body = await _read_body(request, ep.body) if request.method != "GET" else None
        query = _read_query(request.query, ep.query)
        deps = request.app[DEPS]
        actor = Actor(request.get(ACTOR, ""), _source(request))
        ctx = Context(deps.lifecycle, actor, deps)  # this generation's lifecycle
        return _respond(ep, await invoke(ep, ctx, request.match_info, body, query))

    handle.__name__ = ep.operation_id
    return handle


def _source(request: web.Request) -> AuditSource:
    """Where the change comes from, as the audit log records it: ``cli`` when the CLI says so
    (``SOURCE_HEADER``), else ``api``. Only the console, in-process, records ``console``."""
    return "cli" if request.headers.get(SOURCE_HEADER) == "cli" else "api"


def _respond(ep: Endpoint[Any], result: Any) -> web.Response:
    status, headers = ep.status, {"Cache-Control": ep.cache_control}
    other = None if ep.status_of is None else ep.status_of(result)
    if other is not None:
        status, extra = other
        headers.update(extra)
    if result is None:
        return web.Response(status=status, headers=headers)
    return web.Response(
        status=status, body=_enc.encode(result), content_type="application/json", headers=headers
    )


def _not_allowed(methods: Iterable[str]) -> WebHandler:
    allowed = sorted(set(methods))

    async def handle(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMethodNotAllowed(request.method, allowed)

    return handle


# -- decoding --------------------------------------------------------------------------------


async def _read_body(request: web.Request, typ: type[msgspec.Struct] | None) -> Any:
    raw = await request.read()
    if typ is None:
        if raw.strip() not in (b"", b"{}"):
            raise InvalidInput(None, "this route takes no request body")
        return None
    return msgspec.json.decode(raw if raw.strip() else b"{}", type=typ)


@functools.cache
def _query_fields(typ: type[msgspec.Struct]) -> dict[str, tuple[Any, type]]:
    """Each query field's type without ``None`` (a query parameter is absent or a value, never
    null), and ``str`` when its values are strings, else the JSON scalar it takes (``int``,
    ``float``, ``bool``)."""
    fields = {}
    for name, hint in typing.get_type_hints(typ, include_extras=True).items():
        options = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
        assert len(options) == 1, f"{typ.__name__}.{name}: one type besides None"
        (value_type,) = options
        plain = typing.get_args(value_type)[0] if typing.get_origin(value_type) is Annotated else value_type
        stringy = plain is str or (
            typing.get_origin(plain) is Literal and all(isinstance(a, str) for a in typing.get_args(plain))
        )
        fields[name] = (value_type, plain if not stringy else str)
    return fields


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _read_query(query: MultiMapping[str], typ: type[msgspec.Struct] | None) -> Any:
    """The query string as ``typ``, read as the OpenAPI document describes it: strings as they
    are, numbers and booleans as JSON scalars (``1e1`` is not an integer, ``nan`` not a number),
    and no ``null`` anywhere."""
    fields = {} if typ is None else _query_fields(typ)
    values: dict[str, Any] = {}
    for name in query.keys():  # a multidict: keys() names each key once, getall() has them all
        if len(query.getall(name)) > 1:
            raise InvalidInput(name, "given more than once")
        if name not in fields:
            raise InvalidInput(name, "unknown query parameter")
        value_type, scalar = fields[name]
        raw = query[name]
        try:
            if scalar is str:
                values[name] = msgspec.convert(raw, value_type)
            elif raw != raw.strip():  # JSON would skip the spaces; a query value is exact
                raise msgspec.DecodeError
            else:
                values[name] = msgspec.json.decode(raw.encode(), type=value_type)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            if name == "cursor":
                raise InvalidInput(name, "is not a cursor this API handed out") from None
            if isinstance(e, msgspec.ValidationError):
                raise InvalidInput(name, validation_field(str(e))[1]) from None
            raise InvalidInput(name, f"expected {_SCALAR_NAMES[scalar]}") from None
    return None if typ is None else msgspec.convert(values, typ)


_SCALAR_NAMES: Final[dict[type, str]] = {bool: "true or false", int: "an integer", float: "a number"}


# -- errors, authentication, logging --------------------------------------------------------


_HTTP_CODES: Final = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(status: int, body: s.ErrorBody, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=_enc.encode(body),
        content_type="application/json",
        headers={**_HEADERS, **(headers or {})},
    )


@web.middleware
async def error_middleware(request: web.Request, handler: WebHandler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:  # the router's 404/405, oversized bodies
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "bad_request" if e.status < 500 else "internal_error")
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else {}  # 405 (RFC 9110 15.5.6)
        return error_response(e.status, s.ErrorBody(error=code, message=e.reason), allow)
    except Exception as e:
        mapped = problem(e)
        if mapped is None:
            log.exception("admin request failed", extra={"fields": {"path": request.path}})
            mapped = 500, s.ErrorBody(error="internal_error", message="internal error"), {}
        elif mapped[0] >= 500:
            log.warning("admin request failed: %s: %s", type(e).__name__, e)
        return error_response(*mapped)


def _token_digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def auth_middleware(tokens: tuple[bytes, ...]) -> Middleware:
    """Admin bearer tokens for ``/v1``: sets the request's role and its actor (the token's label,
    else ``admin:`` and a hash prefix of the token). Entries were validated by ``load_secrets``."""
    known = []
    for entry in tokens:
        parsed = admin_token(entry)
        digest = _token_digest(parsed.token)
        known.append((digest, parsed.role, parsed.label or "admin:" + digest.hex()[:8]))
    digests = tuple(known)

    @web.middleware
    async def middleware(request: web.Request, handler: WebHandler) -> web.StreamResponse:
        path = request.path
        if not (path == "/v1" or path.startswith("/v1/")) or path in PUBLIC_PATHS:
            return await handler(request)
        if not digests:
            raise Unauthenticated(
                "no admin tokens are configured (set KEYSTILE_ADMIN_TOKENS or admin.tokens_file)"
            )
        values = request.headers.getall("Authorization", ())
        scheme, _, token = values[0].partition(" ") if len(values) == 1 else ("", "", "")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("an admin token is required: Authorization: Bearer <token>")
        presented = _token_digest(token.encode("utf-8", "surrogateescape"))
        found = None
        for entry in digests:  # every token is compared: no early exit reveals which one matched
            if hmac.compare_digest(presented, entry[0]):
                found = entry
        if found is None:
            raise Unauthenticated("the admin token is not valid")
        request[ROLE], request[ACTOR] = found[1], found[2]
        return await handler(request)

    return middleware


@web.middleware
async def log_middleware(request: web.Request, handler: WebHandler) -> web.StreamResponse:
    """One line per admin request: method, path (never the query or body), status, actor."""
    started = time.perf_counter()
    resp = await handler(request)
    fields = {
        "method": request.method,
        "path": request.path,
        "status": resp.status,
        "actor": request.get(ACTOR),
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
    }
    log.info("admin request", extra={"fields": fields})
    return resp
