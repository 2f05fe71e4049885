"""The admin API's one error shape: which error becomes which status, code and field.

Owns: ``problem`` (an exception -> status, ``ErrorBody`` and headers; the HTTP layer answers with
it and the CLI's store mode refuses with it, so both refuse alike), the admin layer's own refusals
(``InvalidInput``, ``Unauthenticated``) and reading the input a msgspec validation message names.
Must not: speak HTTP (no aiohttp), log, or put a store failure's detail in a body.

Errors, always ``{"error", "message", "field"}``: 400 ``malformed_json``; 401 ``unauthenticated``;
403 ``forbidden`` (the admin token's role does not allow the operation); 404 ``not_found`` (also
for an id that cannot exist, e.g. one holding a NUL); 405 ``method_not_allowed`` with the path's
own ``Allow``; 409 ``name_taken`` / ``key_limit_reached`` / ``principal_has_keys`` /
``conflict``; 422 ``invalid_request`` (wrong types, unknown fields, broken policies, bad cursors,
with ``field`` naming the input); 503 ``store_unavailable`` with ``Retry-After``; 500
``store_error`` for any other store failure, whose detail goes to the log only (it may name the
database or echo input).
"""

from __future__ import annotations

import re

import msgspec

from gateway.admin import schemas as s
from gateway.lifecycle import PolicyError
from gateway.store import Conflict, NotFound, StoreError, StoreUnavailable


class InvalidInput(Exception):
    """Input that decodes but cannot be used (HTTP 422), e.g. a cursor this API never handed out."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


class Unauthenticated(Exception):
    """No usable admin token (HTTP 401)."""


class Forbidden(Exception):
    """A valid admin token whose role does not allow the operation (HTTP 403)."""


_AT = re.compile(r" - at `(?:key` in `)?\$(?P<path>[^`]*)`$")
_NAMED = re.compile(r"(?:missing required|unknown) field `(?P<name>[^`]*)`")


def validation_field(message: str) -> tuple[str | None, str]:
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
        fld, message = validation_field(str(exc))
        return 422, s.ErrorBody(error="invalid_request", message=message, field=fld), {}
    if isinstance(exc, msgspec.DecodeError):
        return 400, s.ErrorBody(error="malformed_json", message=f"malformed JSON: {exc}"), {}
    if isinstance(exc, PolicyError | InvalidInput):
        return 422, s.ErrorBody(error="invalid_request", message=str(exc), field=exc.field), {}
    if isinstance(exc, Unauthenticated):
        challenge = {"WWW-Authenticate": 'Bearer realm="keystile-admin"'}
        return 401, s.ErrorBody(error="unauthenticated", message=str(exc)), challenge
    if isinstance(exc, Forbidden):
        return 403, s.ErrorBody(error="forbidden", message=str(exc)), {}
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
