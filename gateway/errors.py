"""The answers the proxy listener builds itself: every error response, and its JSON answers.

Owns: the error codes, their status, their JSON bodies and header blocks, and the one way such an
answer is built: ``ErrorSpec`` for a fixed error (serialized once, at import or first use),
``error_response`` for an error whose message is made per request, ``json_answer`` for any other
JSON the listener answers itself (whoami). Must not: import the store, the cache or the proxy. A
body never contains a key, a digest or request input that could carry one.

A rejection is the cheapest answer the gateway gives and the one an attacker can ask for at will,
so none of these builds an aiohttp ``Response``: the status line and headers are serialized here
and written by ``gateway.wire``, which adds ``Date`` and ``Connection``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import msgspec

from gateway.wire import ClosingResponse, RawResponse, status_tail

_enc = msgspec.json.Encoder()


def json_block(
    body: bytes, headers: Mapping[str, str] | None = None, content_type: str = "application/json"
) -> bytes:
    """The header block of a JSON answer: its type, ``Cache-Control: no-store`` (answers about a
    key are never cached), ``headers``, its length. Raises ValueError on CR, LF or NUL."""
    fields = {
        "Content-Type": content_type,
        "Cache-Control": "no-store",
        **(headers or {}),
        "Content-Length": str(len(body)),
    }
    block = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    if any(c in block.replace("\r\n", "") for c in "\r\n\x00"):
        raise ValueError("CR, LF or NUL in a header")
    return block.encode("latin-1")


# Status line tails of the JSON answers made per request (a handful of statuses).
_TAILS: dict[int, bytes] = {}


def json_answer(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> RawResponse:
    """A JSON answer made per request (``body`` already encoded)."""
    tail = _TAILS.get(status)
    if tail is None:
        tail = _TAILS[status] = status_tail(status)  # status codes are few: bounded
    return RawResponse(status, tail, json_block(body, headers), body)


def problem_answer(
    status: int, problem: Mapping[str, object], headers: Mapping[str, str] | None = None
) -> RawResponse:
    """An RFC 9457 problem (``application/problem+json``) made per request: the limiter's 429s,
    whose body names the policy. ``problem`` holds names and numbers, never request input."""
    tail = _TAILS.get(status)
    if tail is None:
        tail = _TAILS[status] = status_tail(status)
    body = _enc.encode(problem)
    return RawResponse(status, tail, json_block(body, headers, "application/problem+json"), body)


class ErrorSpec:
    """A fixed error answer: status, code, message and extra headers, serialized once."""

    __slots__ = ("_block", "_tail", "body", "code", "extra_headers", "status")

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.code = code
        self.body = _enc.encode({"error": code, "message": message})
        self.extra_headers = headers or {}
        try:
            self._block = json_block(self.body, self.extra_headers)
        except ValueError:
            raise ValueError(f"error {code}: CR, LF or NUL in a header") from None
        self._tail = status_tail(status)

    def response(self) -> RawResponse:
        return RawResponse(self.status, self._tail, self._block, self.body)

    def closing(self) -> ClosingResponse:
        """The same answer, after which the connection is closed (``wire.ClosingResponse``)."""
        return ClosingResponse(self.status, self._tail, self._block, self.body)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> RawResponse:
    """An error whose message is made per request (never from secrets): built like a fixed one."""
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


# Rate limits cannot be decided (Redis unreachable) and limits.on_redis_failure = "closed".
LIMITS_UNAVAILABLE: Final = ErrorSpec(
    503,
    "limits_unavailable",
    "Rate limits cannot be checked right now; retry shortly.",
    {"Retry-After": "1"},
)

# A request with two Host headers (RFC 9112 §3.2: a server must answer 400).
MULTIPLE_HOSTS: Final = ErrorSpec(400, "bad_request", "more than one Host header")
# Defence in depth: a header Keystile would send upstream carries CR, LF or NUL (the client's own
# headers were refused by the listener's parser, so the value came from Keystile's side).
UNSAFE_UPSTREAM_HEADER: Final = ErrorSpec(
    500, "unsafe_upstream_header", "A header for the upstream contains a forbidden character."
)
