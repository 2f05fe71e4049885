"""Error responses the proxy listener sends itself, prebuilt once.

Owns: the error codes, their status and their fixed JSON bodies. Must not: import the store,
the cache or the proxy. A body never contains a key, a digest or request input.
"""

from __future__ import annotations

from typing import Final

import msgspec
from aiohttp import web

_enc = msgspec.json.Encoder()


class ErrorSpec:
    __slots__ = ("body", "code", "extra_headers", "status")

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.code = code
        self.body = _enc.encode({"error": code, "message": message})
        self.extra_headers = headers or {}

    def response(self) -> web.Response:
        headers = {"Content-Type": "application/json", "Cache-Control": "no-store", **self.extra_headers}
        return web.Response(status=self.status, body=self.body, headers=headers)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """A one-off error whose message is built per request (never from secrets)."""
    return ErrorSpec(status, code, message, headers).response()


_CHALLENGE = 'Bearer realm="keystile"'

MISSING_KEY: Final = ErrorSpec(
    401,
    "missing_api_key",
    "An API key is required: send it in X-API-Key or Authorization: Bearer.",
    {"WWW-Authenticate": _CHALLENGE},
)
INVALID_KEY: Final = ErrorSpec(
    401,
    "invalid_api_key",
    "The API key is not valid.",
    {"WWW-Authenticate": _CHALLENGE + ', error="invalid_token"'},
)
EXPIRED_KEY: Final = ErrorSpec(
    401,
    "expired_api_key",
    "The API key has expired.",
    {"WWW-Authenticate": _CHALLENGE + ', error="invalid_token"'},
)
INSUFFICIENT_SCOPE: Final = ErrorSpec(
    403,
    "insufficient_scope",
    "The API key does not grant what this route requires.",
)
AUTH_UNAVAILABLE: Final = ErrorSpec(
    503,
    "auth_unavailable",
    "Keys cannot be verified right now; retry shortly.",
    {"Retry-After": "1"},
)
NO_ROUTE: Final = ErrorSpec(404, "no_route", "No route matches this request.")
UPSTREAM_TIMEOUT: Final = ErrorSpec(504, "upstream_timeout", "The upstream did not answer in time.")
UPSTREAM_UNREACHABLE: Final = ErrorSpec(
    502, "upstream_unreachable", "The upstream refused or reset the connection."
)
UPSTREAM_BAD_RESPONSE: Final = ErrorSpec(
    502, "upstream_bad_response", "The upstream sent a malformed response."
)
