"""The admin API: its operations, its HTTP handlers, its own authentication and its error mapping.

Owns: what each ``/v1`` route does (``Operations``, shared with the CLI's store mode), the route
table ``ENDPOINTS`` (the router and the OpenAPI document are both built from it), admin bearer-token
checks, and turning core errors into the one JSON error shape. Must not: hold policy (it calls
``gateway.lifecycle``), decide about keys itself (``verify`` asks ``gateway.auth``), or log a token,
a key secret or a request body.

Authentication: every ``/v1`` route except ``/v1/openapi.json`` needs ``Authorization: Bearer
<admin token>`` (``KEYSTILE_ADMIN_TOKENS`` or ``admin.tokens_file``). The presented token is hashed
and compared with every configured token in constant time; with no tokens configured every ``/v1``
request is refused. The OpenAPI document is public: it describes the API and holds no data. Writes
are audited with the actor ``admin:<first 8 hex of sha256(token)>``, never the token itself.

Errors, always ``{"error", "message", "field"}``: 400 ``malformed_json``; 401 ``unauthenticated``;
404 ``not_found`` (also for an id that cannot exist, e.g. one holding a NUL); 405
``method_not_allowed`` with the path's own ``Allow``; 409 ``name_taken`` / ``key_limit_reached`` /
``principal_has_keys`` / ``conflict``; 422 ``invalid_request`` (wrong types, unknown fields, broken
policies, bad cursors, with ``field`` naming the input); 503 ``store_unavailable`` with
``Retry-After``; 500 ``store_error`` for any other store failure, whose detail goes to the log only
(it may name the database or echo input).

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
import re
import time
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, TypeVar

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler as WebHandler
from aiohttp.typedefs import Middleware
from multidict import MultiMapping

from gateway import auth
from gateway.admin import schemas as s
from gateway.lifecycle import Lifecycle, PolicyError, check_scopes
from gateway.store import AuditFilter, Conflict, KeyFilter, NotFound, StoreError, StoreUnavailable

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("keystile.admin")
T = TypeVar("T")

GATEWAY: Final[web.AppKey[Gateway]] = web.AppKey("gateway")
ACTOR: Final[web.RequestKey[str]] = web.RequestKey("actor", str)
PUBLIC_PATHS: Final = frozenset({"/v1/openapi.json"})

_enc = msgspec.json.Encoder()
_HEADERS: Final = {"Cache-Control": "no-store"}


class InvalidInput(Exception):
    """Input that decodes but cannot be used (HTTP 422), e.g. a cursor this API never handed out."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


class Unauthenticated(Exception):
    """No usable admin token (HTTP 401)."""


# -- operations ------------------------------------------------------------------------------


class Operations:
    """The admin operations without HTTP: the API handlers and the CLI's store mode call these.

    Every write goes through ``Lifecycle`` (policies, audit via the store, cache invalidation).
    """

    def __init__(self, lifecycle: Lifecycle, actor: str) -> None:
        self.lifecycle = lifecycle
        self.store = lifecycle.store
        self.actor = actor

    # principals

    async def create_principal(self, body: s.PrincipalCreate) -> s.PrincipalView:
        p = await self.lifecycle.create_principal(
            body.name,
            kind=body.kind,
            grants=dict(body.grants),
            metadata=dict(body.metadata),
            actor=self.actor,
        )
        return s.principal_view(p)

    async def list_principals(self, query: s.PrincipalQuery) -> s.PrincipalPage:
        items, nxt = await _paged(self.store.list_principals(query.limit, query.cursor))
        return s.PrincipalPage(items=[s.principal_view(p) for p in items], next_cursor=nxt)

    async def get_principal(self, ref: str) -> s.PrincipalView:
        return s.principal_view(await self.store.get_principal(ref))

    async def update_principal(self, ref: str, body: s.PrincipalUpdate) -> s.PrincipalView:
        if body.grants is msgspec.UNSET and body.metadata is msgspec.UNSET:
            return await self.get_principal(ref)  # nothing to change: no write, no audit row
        p = await self.lifecycle.update_principal(
            ref,
            grants=body.grants if isinstance(body.grants, msgspec.UnsetType) else dict(body.grants),
            metadata=body.metadata,
            actor=self.actor,
        )
        return s.principal_view(p)

    async def set_disabled(self, ref: str, disabled: bool) -> s.PrincipalView:
        p = await self.lifecycle.update_principal(ref, disabled=disabled, actor=self.actor)
        return s.principal_view(p)

    async def delete_principal(self, ref: str, query: s.PrincipalDeleteQuery) -> None:
        await self.lifecycle.delete_principal(ref, with_keys=query.with_keys, actor=self.actor)

    # keys

    async def create_key(self, body: s.KeyCreate) -> s.IssuedKey:
        try:
            created = await self.lifecycle.create_key(
                body.owner,
                body.project,
                name=body.name,
                scopes=body.scopes,
                expires_at=body.expires_at,
                expires_in=body.expires_in,
                env=body.env,
                metadata=dict(body.metadata),
                actor=self.actor,
            )
        except NotFound as e:  # the owner named in the body: bad input, not a missing resource
            raise InvalidInput("owner", str(e)) from None
        return s.issued_key(created.record, created.secret, time.time())

    async def list_keys(self, query: s.KeyQuery) -> s.KeyPage:
        flt = KeyFilter(
            principal_id=query.owner,
            project=query.project,
            status=query.status,
            q=query.q,
            limit=query.limit,
            cursor=query.cursor,
        )
        now = time.time()
        page = await _paged(self.store.list_keys(flt, now))
        return s.KeyPage(items=[s.key_view(k, now) for k in page.items], next_cursor=page.next_cursor)

    async def get_key(self, key_id: str) -> s.KeyView:
        return s.key_view(await self.store.get_key(key_id), time.time())

    async def update_key(self, key_id: str, body: s.KeyUpdate) -> s.KeyView:
        if all(getattr(body, f) is msgspec.UNSET for f in body.__struct_fields__):
            return await self.get_key(key_id)  # nothing to change: no write, no audit row
        rec = await self.lifecycle.update_key(
            key_id,
            name=body.name,
            expires_at=body.expires_at,
            scopes=body.scopes,
            metadata=body.metadata,
            actor=self.actor,
        )
        return s.key_view(rec, time.time())

    async def revoke_key(self, key_id: str) -> s.KeyView:
        return s.key_view(await self.lifecycle.revoke_key(key_id, actor=self.actor), time.time())

    async def delete_key(self, key_id: str) -> None:
        await self.lifecycle.delete_key(key_id, actor=self.actor)

    async def rotate_key(self, key_id: str, body: s.KeyRotate) -> s.IssuedKey:
        created = await self.lifecycle.rotate_key(key_id, grace=body.grace_seconds, actor=self.actor)
        return s.issued_key(created.record, created.secret, time.time())

    # audit

    async def list_audit(self, query: s.AuditQuery) -> s.AuditPage:
        principal_id = query.principal
        if principal_id is not None:
            try:
                principal_id = (await self.store.get_principal(principal_id)).id
            except NotFound:
                pass  # a deleted principal's rows still carry its id
        flt = AuditFilter(
            key_id=query.key_id,
            principal_id=principal_id,
            since=query.since,
            until=query.until,
            limit=query.limit,
            cursor=query.cursor,
        )
        page = await _paged(self.store.list_audit(flt))
        return s.AuditPage(items=[s.audit_view(e) for e in page.items], next_cursor=page.next_cursor)


async def _paged(call: Awaitable[T]) -> T:
    """Await a listing; the store raises ValueError for a cursor it did not hand out."""
    try:
        return await call
    except StoreError:
        raise
    except ValueError:
        raise InvalidInput("cursor", "is not a cursor this API handed out") from None


# -- errors ----------------------------------------------------------------------------------

_AT = re.compile(r" - at `(?:key` in `)?\$(?P<path>[^`]*)`$")
_NAMED = re.compile(r"(?:missing required|unknown) field `(?P<name>[^`]*)`")


def _validation_field(message: str) -> tuple[str | None, str]:
    """msgspec's ``... - at `$.a.b[0]``` -> (``a.b[0]``, message without the location)."""
    path = ""
    m = _AT.search(message)
    if m:
        message = message[: m.start()]
        path = m.group("path").lstrip(".").split("[...]")[0]
    named = _NAMED.search(message)
    if named:
        path = f"{path}.{named.group('name')}" if path else named.group("name")
    return path or None, message


def problem(exc: BaseException) -> tuple[int, s.ErrorBody, dict[str, str]] | None:
    """The status, body and headers an error becomes; None for errors that are bugs."""
    if isinstance(exc, msgspec.ValidationError):
        fld, message = _validation_field(str(exc))
        return 422, s.ErrorBody(error="invalid_request", message=message, field=fld), {}
    if isinstance(exc, msgspec.DecodeError):
        return 400, s.ErrorBody(error="malformed_json", message=f"malformed JSON: {exc}"), {}
    if isinstance(exc, PolicyError | InvalidInput):
        return 422, s.ErrorBody(error="invalid_request", message=str(exc), field=exc.field), {}
    if isinstance(exc, Unauthenticated):
        challenge = {"WWW-Authenticate": 'Bearer realm="keystile-admin"'}
        return 401, s.ErrorBody(error="unauthenticated", message=str(exc)), challenge
    if isinstance(exc, NotFound):
        return 404, s.ErrorBody(error="not_found", message=str(exc)), {}
    if isinstance(exc, Conflict):
        return 409, s.ErrorBody(error=exc.code, message=str(exc)), {}
    if isinstance(exc, StoreUnavailable):
        body = s.ErrorBody(error="store_unavailable", message="the key store is unavailable; retry shortly")
        return 503, body, {"Retry-After": "1"}
    if isinstance(exc, StoreError):  # the detail is logged, never answered: it may name the database
        return 500, s.ErrorBody(error="store_error", message="the key store failed; see the server log"), {}
    return None


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
    """Admin bearer tokens for ``/v1``; the actor recorded for a request names the token by hash."""
    digests = tuple(_token_digest(t) for t in tokens)

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
        matched = False
        for d in digests:  # every token is compared: no early exit reveals which one matched
            matched |= hmac.compare_digest(presented, d)
        if not matched:
            raise Unauthenticated("the admin token is not valid")
        request[ACTOR] = "admin:" + presented.hex()[:8]
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


# -- HTTP handlers ---------------------------------------------------------------------------


class Reply:
    """A handler result with a status or headers other than the endpoint's default."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, body: msgspec.Struct, status: int, headers: Mapping[str, str] | None = None) -> None:
        self.body = body
        self.status = status
        self.headers = headers or {}


Result = msgspec.Struct | Reply | web.StreamResponse | None


class Call:
    """One decoded request as a handler sees it."""

    __slots__ = ("body", "query", "request")

    def __init__(self, request: web.Request, body: Any, query: Any) -> None:
        self.request = request
        self.body = body
        self.query = query

    @property
    def gateway(self) -> Gateway:
        return self.request.app[GATEWAY]

    @property
    def ops(self) -> Operations:
        return Operations(self.gateway.lifecycle, self.request[ACTOR])

    def param(self, name: str) -> str:
        value = self.request.match_info[name]
        if "\x00" in value:  # no id or name holds a NUL (and PostgreSQL cannot even compare one)
            raise NotFound(f"{name} {value!r} not found")
        return value


Handler = Callable[[Call], Awaitable[Result]]


@dataclass(frozen=True)
class Endpoint:
    """One route: the router, the decoder and the OpenAPI document all read it."""

    method: str
    path: str
    operation_id: str
    tag: str
    summary: str
    handler: Handler
    status: int = 200
    response: type[msgspec.Struct] | dict[str, Any] | None = None
    body: type[msgspec.Struct] | None = None
    query: type[msgspec.Struct] | None = None
    errors: tuple[int, ...] = ()
    # Other documented non-error answers: status -> body type.
    extra: dict[int, type[msgspec.Struct]] = field(default_factory=dict)
    description: str = ""
    public: bool = False


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
                raise InvalidInput(name, _validation_field(str(e))[1]) from None
            raise InvalidInput(name, f"expected {_SCALAR_NAMES[scalar]}") from None
    return None if typ is None else msgspec.convert(values, typ)


_SCALAR_NAMES: Final[dict[type, str]] = {bool: "true or false", int: "an integer", float: "a number"}


def _respond(endpoint: Endpoint, result: Result) -> web.StreamResponse:
    if isinstance(result, web.StreamResponse):
        return result
    if isinstance(result, Reply):
        return web.Response(
            status=result.status,
            body=_enc.encode(result.body),
            content_type="application/json",
            headers={**_HEADERS, **result.headers},
        )
    if result is None:
        return web.Response(status=endpoint.status, headers=_HEADERS)
    return web.Response(
        status=endpoint.status, body=_enc.encode(result), content_type="application/json", headers=_HEADERS
    )


def http_handler(endpoint: Endpoint) -> WebHandler:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await _read_body(request, endpoint.body) if request.method != "GET" else None
        query = _read_query(request.query, endpoint.query)
        return _respond(endpoint, await endpoint.handler(Call(request, body, query)))

    handle.__name__ = endpoint.operation_id
    return handle


async def _healthz(call: Call) -> s.Health:
    return s.Health(status="ok")


async def _readyz(call: Call) -> Result:
    ready, checks = await call.gateway.readiness()
    body = s.Readiness(ready=ready, checks=checks)
    return body if ready else Reply(body, 503)


async def _create_principal(call: Call) -> s.PrincipalView:
    return await call.ops.create_principal(call.body)


async def _list_principals(call: Call) -> s.PrincipalPage:
    return await call.ops.list_principals(call.query)


async def _get_principal(call: Call) -> s.PrincipalView:
    return await call.ops.get_principal(call.param("principal"))


async def _update_principal(call: Call) -> s.PrincipalView:
    return await call.ops.update_principal(call.param("principal"), call.body)


async def _disable_principal(call: Call) -> s.PrincipalView:
    return await call.ops.set_disabled(call.param("principal"), True)


async def _enable_principal(call: Call) -> s.PrincipalView:
    return await call.ops.set_disabled(call.param("principal"), False)


async def _delete_principal(call: Call) -> None:
    await call.ops.delete_principal(call.param("principal"), call.query)


async def _create_key(call: Call) -> s.IssuedKey:
    return await call.ops.create_key(call.body)


async def _list_keys(call: Call) -> s.KeyPage:
    return await call.ops.list_keys(call.query)


async def _get_key(call: Call) -> s.KeyView:
    return await call.ops.get_key(call.param("key_id"))


async def _update_key(call: Call) -> s.KeyView:
    return await call.ops.update_key(call.param("key_id"), call.body)


async def _revoke_key(call: Call) -> s.KeyView:
    return await call.ops.revoke_key(call.param("key_id"))


async def _delete_key(call: Call) -> None:
    await call.ops.delete_key(call.param("key_id"))


async def _rotate_key(call: Call) -> s.IssuedKey:
    return await call.ops.rotate_key(call.param("key_id"), call.body)


async def _list_audit(call: Call) -> s.AuditPage:
    return await call.ops.list_audit(call.query)


# auth outcome -> the code the proxy answers with (the ``error`` of gateway.errors' bodies; a test
# holds the two together)
VERIFY_CODES: Final[dict[str, s.VerifyCode]] = {
    auth.OK: "ok",
    auth.MISSING: "missing_api_key",
    auth.INVALID: "invalid_api_key",
    auth.EXPIRED: "expired_api_key",
    auth.INSUFFICIENT_SCOPE: "insufficient_scope",
    auth.UNAVAILABLE: "auth_unavailable",
}


async def _verify_key(call: Call) -> Result:
    body: s.VerifyRequest = call.body
    check_scopes(body.scopes, "scopes")  # the document's rule for scopes, as everywhere
    gw = call.gateway
    # The proxy's decision for a route needing ``body.scopes``.
    outcome, ident = await gw.authenticator.verify(body.key, body.scopes)
    identity = None
    if outcome == auth.OK and ident is not None:
        # Like whoami: the last use before this one.
        identity = s.Identity.of(ident, await gw.last_used(ident.key_id))
        gw.usage.bump(ident.key_id, time.time())
    result = s.VerifyResponse(valid=identity is not None, code=VERIFY_CODES[outcome], identity=identity)
    if outcome == auth.UNAVAILABLE:
        return Reply(result, 503, {"Retry-After": "1"})
    return result


_P = "/v1/principals/{principal}"
_K = "/v1/keys/{key_id}"
_W = (401, 422, 503)  # every write can meet these; 400 too where there is a body to parse
_R = (401, 503)

ENDPOINTS: Final[tuple[Endpoint, ...]] = (
    Endpoint("GET", "/healthz", "getHealth", "health", "Liveness", _healthz, response=s.Health, public=True),
    Endpoint(
        "GET",
        "/readyz",
        "getReadiness",
        "health",
        "Readiness: the store answers and its schema is current",
        _readyz,
        response=s.Readiness,
        extra={503: s.Readiness},
        public=True,
    ),
    Endpoint(
        "POST",
        "/v1/principals",
        "createPrincipal",
        "principals",
        "Create a principal (a user or a service account) with its grants",
        _create_principal,
        status=201,
        response=s.PrincipalView,
        body=s.PrincipalCreate,
        errors=(400, *_W, 409),
    ),
    Endpoint(
        "GET",
        "/v1/principals",
        "listPrincipals",
        "principals",
        "List principals by name",
        _list_principals,
        response=s.PrincipalPage,
        query=s.PrincipalQuery,
        errors=(*_R, 422),
    ),
    Endpoint(
        "GET",
        _P,
        "getPrincipal",
        "principals",
        "Get a principal by id or name",
        _get_principal,
        response=s.PrincipalView,
        errors=(*_R, 404),
    ),
    Endpoint(
        "PATCH",
        _P,
        "updatePrincipal",
        "principals",
        "Replace a principal's grants or metadata",
        _update_principal,
        response=s.PrincipalView,
        body=s.PrincipalUpdate,
        errors=(400, *_W, 404),
        description="New grants take effect for every key of the principal at once, without re-issuing them.",
    ),
    Endpoint(
        "POST",
        _P + "/disable",
        "disablePrincipal",
        "principals",
        "Disable a principal: all of its keys stop working",
        _disable_principal,
        response=s.PrincipalView,
        errors=(*_W, 404),
    ),
    Endpoint(
        "POST",
        _P + "/enable",
        "enablePrincipal",
        "principals",
        "Enable a principal again: its keys work again",
        _enable_principal,
        response=s.PrincipalView,
        errors=(*_W, 404),
    ),
    Endpoint(
        "DELETE",
        _P,
        "deletePrincipal",
        "principals",
        "Delete a principal",
        _delete_principal,
        status=204,
        query=s.PrincipalDeleteQuery,
        errors=(*_W, 404, 409),
        description="A principal that still has keys (of any status) is refused with 409 "
        "`principal_has_keys`, unless `with_keys=true`, which deletes its keys with it.",
    ),
    Endpoint(
        "POST",
        "/v1/keys",
        "createKey",
        "keys",
        "Create a key; the secret is in this response only",
        _create_key,
        status=201,
        response=s.IssuedKey,
        body=s.KeyCreate,
        errors=(400, *_W, 409),
        description="Policies: at most `policy.max_active_keys` active keys per principal and "
        "project (409 `key_limit_reached`); names unique per principal and project (409 "
        "`name_taken`), at most 200 characters, `API Key name YYYYMMDDHHMMSS` when omitted; "
        "`policy.default_lifetime` applies without an expiry and `policy.max_lifetime` caps it (422).",
    ),
    Endpoint(
        "GET",
        "/v1/keys",
        "listKeys",
        "keys",
        "List keys, newest first",
        _list_keys,
        response=s.KeyPage,
        query=s.KeyQuery,
        errors=(*_R, 422),
        description="Expired and revoked keys stay listed with their status.",
    ),
    Endpoint(
        "POST",
        "/v1/keys/verify",
        "verifyKey",
        "keys",
        "Check a key as the proxy would, for services not behind it",
        _verify_key,
        response=s.VerifyResponse,
        body=s.VerifyRequest,
        errors=(400, 401, 422),
        extra={503: s.VerifyResponse},
        description="A bad key is a 200 answer with `valid: false` and the code the proxy would "
        "send; 503 (`auth_unavailable`) only when keys cannot be checked right now. A valid key's "
        "use counts as use (last used, request count).",
    ),
    Endpoint(
        "GET",
        _K,
        "getKey",
        "keys",
        "Get a key",
        _get_key,
        response=s.KeyView,
        errors=(*_R, 404),
    ),
    Endpoint(
        "PATCH",
        _K,
        "updateKey",
        "keys",
        "Change a key's name, expiry, scopes or metadata",
        _update_key,
        response=s.KeyView,
        body=s.KeyUpdate,
        errors=(400, *_W, 404, 409),
    ),
    Endpoint(
        "POST",
        _K + "/revoke",
        "revokeKey",
        "keys",
        "Revoke a key: it stops at once and stays listed as revoked",
        _revoke_key,
        response=s.KeyView,
        errors=(*_W, 404),
    ),
    Endpoint(
        "POST",
        _K + "/rotate",
        "rotateKey",
        "keys",
        "Give a key a new secret with the same settings",
        _rotate_key,
        response=s.IssuedKey,
        body=s.KeyRotate,
        errors=(400, *_W, 404, 409),
        description="The old secret stops at once, or works until `previous_valid_until` when "
        "`grace_seconds` is given (at most `policy.max_rotation_grace`, 24 h). Only an active key "
        "can be rotated (409 `conflict`).",
    ),
    Endpoint(
        "DELETE",
        _K,
        "deleteKey",
        "keys",
        "Delete a key: it is gone (revoke to keep a record)",
        _delete_key,
        status=204,
        errors=(*_W, 404),
    ),
    Endpoint(
        "GET",
        "/v1/audit",
        "listAudit",
        "audit",
        "List audit events, newest first",
        _list_audit,
        response=s.AuditPage,
        query=s.AuditQuery,
        errors=(*_R, 422),
        description="Every lifecycle change, with its actor and the record before and after.",
    ),
)
