"""Failures of the upstream transport, classified by what the client should be told.

Owns: the exception types ``gateway.upstream`` raises and their ``kind`` ("timeout", "unreachable",
"tls", "bad_response"). Must not: build HTTP responses; ``gateway.proxy`` maps kinds to error responses.
"""

from __future__ import annotations

from typing import ClassVar


class UpstreamError(Exception):
    kind: ClassVar[str] = "unreachable"


class ConnectFailed(UpstreamError):
    """Refused, unresolvable, or the pool is closed."""


class TLSFailed(ConnectFailed):
    """The TLS handshake failed or the upstream's certificate could not be verified."""

    kind = "tls"


class ConnectTimeout(UpstreamError):
    """No connection (new or pooled) within ``connect_timeout``."""

    kind = "timeout"


class ReadTimeout(UpstreamError):
    """The upstream made no progress for ``read_timeout`` seconds."""

    kind = "timeout"


class BadResponse(UpstreamError):
    """The upstream's response is not valid HTTP/1.1 (status line, header, length, chunk)."""

    kind = "bad_response"


class Disconnected(UpstreamError):
    """The connection was reset or closed before the response was complete."""

    def __init__(self, detail: str, *, got_bytes: bool, unsent: bool = False) -> None:
        super().__init__(detail)
        # False: not one response byte arrived, so the upstream may never have seen the request.
        self.got_bytes = got_bytes
        # True: not one byte of the request was written, so the upstream certainly never saw it.
        self.unsent = unsent


class ClientBodyError(UpstreamError):
    """Reading the client's request body failed (client gone, body shorter than announced)."""
