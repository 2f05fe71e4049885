"""Error responses the proxy listener sends itself, serialized once.

Owns: the error codes, their status, their fixed JSON bodies and header blocks. Must not: import
the store, the cache or the proxy. A body never contains a key, a digest or request input.

A rejection is the cheapest answer the gateway gives and the one an attacker can ask for at will,
so ``ErrorSpec.response()`` builds no aiohttp ``Response``: its status line and headers are
serialized at import and written by ``gateway.wire``, which adds ``Date`` and ``Connection``.
"""

from __future__ import annotations

from typing import Final

import msgspec
from aiohttp import web

from gateway.wire import ClosingResponse, RawResponse, status_tail

_enc = msgspec.json.Encoder()


class ErrorSpec:
    __slots__ = ("_block", "_tail", "body", "code", "extra_headers", "status")

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.code = code
        self.body = _enc.encode({"error": code, "message": message})
        self.extra_headers = headers or {}
        fields = {
            "Content-Type": "application/json",
            "Cache-Control": "no-store",
            **self.extra_headers,
            "Content-Length": str(len(self.body)),
        }
        block = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        if any(c in block.replace("\r\n", "") for c in "\r\n\x00"):
            raise ValueError(f"error {code}: CR, LF or NUL in a header")
        self._block = block.encode("latin-1")
        self._tail = status_tail(status)

    def response(self) -> RawResponse:
        return RawResponse(self.status, self._tail, self._block, self.body)

    def closing(self) -> ClosingResponse:
        """The same answer, after which the connection is closed (``wire.ClosingResponse``)."""
        return ClosingResponse(self.status, self._tail, self._block, self.body)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """A one-off error whose message is built per request (never from secrets)."""
    spec = ErrorSpec(status, code, message, headers)
    all_headers = {"Content-Type": "application/json", "Cache-Control": "no-store", **spec.extra_headers}
    return web.Response(status=status, body=spec.body, headers=all_headers)


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
UPSTREAM_TLS: Final = ErrorSpec(
    502,
    "upstream_tls",
    "The upstream's TLS certificate could not be verified or the TLS handshake failed.",
)

# The front door's own refusals (gateway.listener, the top of ProxyHandler._handle). Nothing from
# the request is ever part of them: a parser error message quotes the offending line, which may
# carry a key.
MALFORMED_REQUEST: Final = ErrorSpec(400, "bad_request", "The request is not valid HTTP/1.1.")
VERSION_NOT_SUPPORTED: Final = ErrorSpec(
    505, "http_version_not_supported", "Only HTTP/1.0 and HTTP/1.1 are served."
)
AMBIGUOUS_CREDENTIALS: Final = ErrorSpec(
    400,
    "bad_request",
    "More than one Authorization header, or more than one key header or parameter: send one.",
)
INTERNAL_ERROR: Final = ErrorSpec(500, "internal_error", "The gateway failed to handle the request.")
HANDLER_TIMEOUT: Final = ErrorSpec(504, "timeout", "The gateway timed out handling the request.")

# 429 for a client blocked by gateway.throttle: one spec per Retry-After value, built when first
# needed; past the bound (blocks longer than this many seconds) built per answer.
_THROTTLED: dict[int, ErrorSpec] = {}
_THROTTLED_MAX: Final = 3600


def throttled(retry_after: int) -> ErrorSpec:
    """The 429 a blocked client gets, with ``Retry-After: <retry_after>``; the body is fixed."""
    spec = _THROTTLED.get(retry_after)
    if spec is None:
        spec = ErrorSpec(
            429,
            "too_many_failed_attempts",
            "Too many invalid API keys from this address; retry later.",
            {"Retry-After": str(retry_after)},
        )
        if len(_THROTTLED) < _THROTTLED_MAX:
            _THROTTLED[retry_after] = spec
    return spec
