"""Error responses the proxy listener sends itself, serialized once.

Owns: the error codes, their status, their fixed JSON bodies and the bytes that carry them. Must
not: import the store, the cache or the proxy. A body never contains a key, a digest or request
input.

A rejection is the cheapest answer the gateway gives and the one an attacker can ask for at will,
so ``ErrorSpec.response()`` does not build an aiohttp ``Response``: its status line and headers are
serialized at import, and a request only adds ``Date`` (formatted once a second) and, when the
connection will not be kept, ``Connection``, in one transport write.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

import msgspec
from aiohttp import web

_enc = msgspec.json.Encoder()


class ErrorSpec:
    __slots__ = ("_heads", "body", "code", "extra_headers", "status")

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
        tail = block.encode("latin-1")
        reason = HTTPStatus(status).phrase
        # By minor HTTP version: the status line and fixed headers, without Date and Connection.
        self._heads = tuple(f"HTTP/1.{minor} {status} {reason}\r\n".encode() + tail for minor in (0, 1))

    def response(self) -> Prebuilt:
        return Prebuilt(self)


class Prebuilt:
    """A fixed response written in one go, for aiohttp's low-level server.

    It offers what ``web.Server`` uses of a handler's ``StreamResponse`` (``prepare``,
    ``write_eof``, ``keep_alive``) and ``status``. Keep-alive follows the request exactly as aiohttp
    decides it (HTTP/1.1 unless ``Connection: close``; HTTP/1.0 only with ``Connection:
    keep-alive``); a HEAD request gets the headers without the body.
    """

    __slots__ = ("keep_alive", "spec")

    def __init__(self, spec: ErrorSpec) -> None:
        self.spec = spec
        self.keep_alive = False

    @property
    def status(self) -> int:
        return self.spec.status

    @property
    def body(self) -> bytes:
        return self.spec.body

    async def prepare(self, request: web.BaseRequest) -> None:
        spec = self.spec
        keep = self.keep_alive = request.keep_alive
        minor = request.version.minor
        if minor == 1:
            conn = b"\r\n" if keep else b"Connection: close\r\n\r\n"
        else:
            minor = 0
            conn = b"Connection: keep-alive\r\n\r\n" if keep else b"\r\n"
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        body = b"" if request.method == "HEAD" else spec.body
        transport.write(b"".join((spec._heads[minor], _date_line(), conn, body)))

    async def write_eof(self, data: bytes = b"") -> None:
        """Everything went out in ``prepare``."""


class _DateLine:
    """``Date: <IMF-fixdate>\\r\\n`` for the current second, formatted once per second."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._line


_date_line = _DateLine()

# What the proxy listener's handler returns.
Answer = web.StreamResponse | Prebuilt


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
