"""Complete responses written to the client as bytes, in one transport write.

Owns: framing a response whose status, headers and whole body are known (the status line for the
request's HTTP version, ``Date``, ``Connection``, no body for HEAD) and handing it to aiohttp's
low-level server. Must not: decide what the headers say; callers pass a header block they built
and checked (``errors`` at import, ``proxy`` from an upstream's parsed response).

Why not ``aiohttp.web.Response``: building one, its header multidict and its serialization is a
fifth of a proxied request's CPU and most of a rejection's. ``RawResponse`` offers what
``web.Server`` uses of the object a handler returns — ``prepare(request)``, ``write_eof()`` and,
afterwards, ``keep_alive`` — plus ``status``. Keep-alive follows the request as aiohttp decides it
(HTTP/1.1 unless ``Connection: close``; HTTP/1.0 only with ``Connection: keep-alive``).
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

from aiohttp import web

_HTTP11: tuple[bytes, bytes] = (b"\r\n", b"Connection: close\r\n\r\n")  # by keep-alive: no, yes
_HTTP10: tuple[bytes, bytes] = (b"\r\n", b"Connection: keep-alive\r\n\r\n")


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


date_line = _DateLine()


def status_tail(status: int, reason: str | None = None) -> bytes:
    """``"<status> <reason>\\r\\n"``: the status line after the version. ``reason`` must already be
    free of control characters; None means the standard phrase (empty for an unknown code)."""
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
    return b"%d %b\r\n" % (status, reason.encode("utf-8", "surrogateescape"))


def header_pairs(lines: bytes) -> list[tuple[str, str]]:
    """Header lines (each ending CRLF) as (name, value) pairs, for aiohttp's own responses."""
    out = []
    for line in lines.decode("latin-1").split("\r\n"):
        if line:
            name, _, value = line.partition(": ")
            out.append((name, value))
    return out


class RawResponse:
    """A finished response: status line tail, header block (each line ending CRLF, without
    ``Connection``), body. ``add_date``: prepend ``Date`` (the block has none)."""

    __slots__ = ("_add_date", "_headers", "_status_tail", "body", "keep_alive", "status")

    def __init__(self, status: int, tail: bytes, headers: bytes, body: bytes, add_date: bool = True) -> None:
        self.status = status
        self._status_tail = tail
        self._headers = headers
        self.body = body
        self._add_date = add_date
        self.keep_alive = False

    def add_lines(self, lines: bytes) -> None:
        """Append header lines Keystile built itself (each ending CRLF, free of other CR, LF, NUL)."""
        self._headers += lines

    async def prepare(self, request: web.BaseRequest) -> None:
        keep = self.keep_alive = request.keep_alive
        if request.version.minor == 1:
            version, end = b"HTTP/1.1 ", _HTTP11[not keep]
        else:
            version, end = b"HTTP/1.0 ", _HTTP10[keep]
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        body = b"" if request.method == "HEAD" else self.body
        date = date_line() if self._add_date else b""
        transport.write(b"".join((version, self._status_tail, date, self._headers, end, body)))

    async def write_eof(self, data: bytes = b"") -> None:
        """Everything went out in ``prepare``."""


# What the proxy listener's handler returns.
Answer = web.StreamResponse | RawResponse


class ClosingResponse(RawResponse):
    """A finished response after which the connection is closed: always ``HTTP/1.1`` with
    ``Connection: close``, whatever the request said. For requests whose framing or version cannot
    be trusted to delimit a next request (parser errors, a version other than 1.0 or 1.1)."""

    __slots__ = ()

    async def prepare(self, request: web.BaseRequest) -> None:
        self.keep_alive = False  # aiohttp reads it once the answer is written, and closes
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        body = b"" if request.method == "HEAD" else self.body
        date = date_line() if self._add_date else b""
        transport.write(b"".join((b"HTTP/1.1 ", self._status_tail, date, self._headers, _HTTP11[1], body)))
