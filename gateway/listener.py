"""Client connections of both listeners: fixed error answers, the request-head deadline, the
connection cap, and the proxy connections' remembered key.

Owns: ``FixedErrors``, aiohttp's protocol with its error answers and error logging replaced (both
listeners); ``KeyedConnection``, the proxy listener's protocol, which adds the head deadline, the
connection count and one ``auth.KeyMemory`` per connection (``key_memory(request)`` hands it to
the handler); ``ProxyServer`` and ``AdminRunner``, which make those protocols; ``ListenerStats``,
their counters. Must not: decide anything about a key or a route, or read the key memory: ``auth``
reads and writes it (comparing keys in constant time) and still looks the digest up in the cache on
every request, so a revocation applies to an open connection at once.

**Errors.** aiohttp answers a request its parser refuses with the parser's message, which quotes
the offending header line (a key, an admin token), and logs it with a traceback. Here every such
request gets ``errors.MALFORMED_REQUEST`` (fixed JSON, ``Connection: close``) and one log line
naming the client, the error class and the parser's reason (kept only when it is plain words: never
a quoted line). A handler that raises gets a fixed 500 and a log line with the exception's type and
frames but not its message, for the same reason.

**Head deadline** (``proxy.header_timeout``). A connection must deliver a complete request head
within the deadline, counted from its opening, and on a keep-alive connection from the first byte
of the next head: the idle wait between requests is ``proxy.keepalive_timeout``'s (aiohttp's own
timer), so a keep-alive client is not cut off for pausing. A missed deadline closes the connection
without an answer (an answer would need the head it never sent). One timer per connection, armed
when a head starts and left running while heads keep completing before it fires, so a busy
connection re-arms it about once per deadline, not per request. The deadline ends where aiohttp
hands the request to the handler: a slow body is the upstream timeouts' business.

**Connection cap** (``proxy.max_connections``, per process). A connection accepted past the cap is
reset at once, without reading it: answering (a 503) would mean reading a head, which is what a
slow-client flood wants Keystile to spend sockets and time on, and a reset is what a load balancer
retries on another instance. Open connections are unaffected.

The key stays in memory only while its connection is open (or until it presents another one): the
same lifetime as the buffers the request arrived in. Nothing process-wide keeps raw keys.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import traceback
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from prometheus_client.core import Metric

from gateway import errors
from gateway.auth import KeyMemory
from gateway.observability import counter, gauge
from gateway.turn import BatchedTransport, turn_writes

log = logging.getLogger("keystile.listener")

# A parser's reason worth logging: plain words ("Invalid header value char", "Transfer-Encoding
# can't be present with Content-Length"), cut before the quoted line that follows them.
_PLAIN_REASON = re.compile(r"[A-Za-z][A-Za-z0-9 ,./`'-]{0,79}")
_REASON_END = re.compile(r"[:\n\"(]|'(?!t\b)")


class ListenerStats:
    """Counters of the proxy listener, read by ``/metrics``."""

    __slots__ = ("header_timeouts", "malformed", "open", "refused")

    def __init__(self) -> None:
        self.open = 0  # client connections open now
        self.refused = 0  # connections reset at max_connections
        self.header_timeouts = 0  # connections cut at header_timeout
        self.malformed = 0  # requests the HTTP parser refused

    def metrics(self) -> list[Metric]:
        return [
            gauge("keystile_client_connections", "Client connections open on the proxy listener.", self.open),
            counter(
                "keystile_client_connections_refused",
                "Client connections reset at once because proxy.max_connections were open.",
                [({}, self.refused)],
            ),
            counter(
                "keystile_header_timeouts",
                "Client connections closed for not sending a request head within proxy.header_timeout.",
                [({}, self.header_timeouts)],
            ),
            counter(
                "keystile_malformed_requests",
                "Requests the HTTP parser refused (answered 400 and closed).",
                [({}, self.malformed)],
            ),
        ]


def parse_reason(exc: HttpProcessingError) -> str | None:
    """The parser's reason for refusing a request, when it is plain words; None otherwise.

    llhttp's messages start with a fixed description ("Invalid header value char") and go on to
    quote the offending bytes; aiohttp's own quote the line or header. Only text before the first
    quote, colon or line break is kept, and only when it looks like a sentence fragment.
    """
    text = exc.message if isinstance(exc.message, str) else ""
    if text.startswith("Bad status line:"):
        text = text[len("Bad status line:") :]
    reason = _REASON_END.split(text.strip(), maxsplit=1)[0].strip()
    return reason if " " in reason and _PLAIN_REASON.fullmatch(reason) else None


def _frames(exc: BaseException | None) -> str:
    """Where ``exc`` was raised, without its message (which may quote request input)."""
    if exc is None:
        return ""
    return "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))


class FixedErrors(RequestHandler):
    """aiohttp's protocol, answering errors with Keystile's fixed JSON and logging them safely."""

    __slots__ = ()

    def _stats(self) -> ListenerStats | None:
        return None

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            stats = self._stats()
            if stats is not None:
                stats.malformed += 1
            fields = {"client": request.remote, "error": type(exc).__name__, "reason": parse_reason(exc)}
            log.info("malformed request", extra={"fields": fields})
            spec = errors.MALFORMED_REQUEST
        else:
            # The handler raised (500) or timed out (504): a bug, logged where it happened.
            log.error(
                "error handling a request",
                extra={
                    "fields": {
                        "client": request.remote,
                        "error": None if exc is None else type(exc).__name__,
                        "traceback": _frames(exc),
                    }
                },
            )
            spec = errors.HANDLER_TIMEOUT if status == 504 else errors.INTERNAL_ERROR
        if request.writer.output_size > 0:
            # Part of an answer went out already: only closing the connection is left (aiohttp's
            # start() does that on ConnectionError).
            raise ConnectionError("an answer was partly sent; closing")
        # aiohttp only calls prepare/write_eof and reads keep_alive on it (see gateway.wire).
        return cast(web.StreamResponse, spec.closing())

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's own error logs ("Unhandled exception"), without the exception's message."""
        exc_info = kw.get("exc_info")
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        what = str(args[0]) if args else "error"
        log.error(
            "aiohttp: " + what.split("%", 1)[0].strip(),
            extra={
                "fields": {
                    "error": None if exc is None else type(exc).__name__,
                    "traceback": _frames(exc),
                }
            },
        )


class KeyedConnection(FixedErrors):
    """One client connection to the proxy listener (aiohttp's protocol) plus the remembered key."""

    __slots__ = ("_counted", "_head_since", "_head_timer", "_server", "key_memory")

    def __init__(self, manager: ProxyServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.key_memory = KeyMemory()  # the last well-formed key presented here (auth's)
        self._server = manager  # aiohttp forgets its manager when the connection is lost
        self._counted = False
        # When the head being read started (loop time); below the current wait's start when no
        # byte of a head has arrived since the last answer.
        self._head_since = 0.0
        self._head_timer: asyncio.TimerHandle | None = None

    def _stats(self) -> ListenerStats:
        return self._server.stats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        stats = server.stats
        if stats.open >= server.max_connections:
            stats.refused += 1
            cast(asyncio.Transport, transport).abort()  # connection_lost follows; aiohttp never saw it
            return
        stats.open += 1
        self._counted = True
        # aiohttp then writes (responses, 100-continue, errors) and closes through this wrapper:
        # everything sent on the connection waits for the end of the loop's turn, in order.
        batched = BatchedTransport(cast(asyncio.Transport, transport), turn_writes(self._loop))
        super().connection_made(batched)
        # The first head's deadline runs from the connection's opening.
        self._head_since = self._wait_started()
        self._head_timer = self._loop.call_at(self._head_since + server.header_timeout, self._head_deadline)

    def _wait_started(self) -> float:
        # aiohttp sets the keep-alive close time at the opening and at the end of every answer:
        # this is when the connection began waiting for the head now due.
        return self._next_keepalive_close_time - self._keepalive_timeout

    def data_received(self, data: bytes) -> None:
        # The first byte of a head after an answer starts that head's deadline (_wait_started,
        # inlined: this runs for every read).
        if (
            self._head_since < self._next_keepalive_close_time - self._keepalive_timeout
            and not self._request_in_progress
            and not self._messages
        ):
            self._head_since = now = self._loop.time()
            if self._head_timer is None:
                self._head_timer = self._loop.call_at(now + self._server.header_timeout, self._head_deadline)
        RequestHandler.data_received(self, data)
        if self._messages:  # a complete head: its deadline is met
            self._head_since = -1.0

    def _head_deadline(self) -> None:
        self._head_timer = None
        if self.transport is None or self._force_close or self._request_in_progress or self._messages:
            return  # closed, or the head arrived: the next head's first byte re-arms
        since = self._head_since
        if since < self._wait_started():
            return  # an idle keep-alive wait, governed by keepalive_timeout
        due = since + self._server.header_timeout
        if self._loop.time() < due:  # a later head than the one this timer was armed for
            self._head_timer = self._loop.call_at(due, self._head_deadline)
            return
        self._server.stats.header_timeouts += 1
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._server.stats.open -= 1
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


def key_memory(request: web.BaseRequest) -> KeyMemory | None:
    """The key memory of the proxy connection ``request`` arrived on (None on any other)."""
    conn = request.protocol
    return conn.key_memory if type(conn) is KeyedConnection else None


class ProxyServer(web.Server):
    """``web.Server`` making ``KeyedConnection`` protocols (aiohttp calls the server per connection)."""

    def __init__(self, handler: Any, *, header_timeout: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.stats = ListenerStats()

    def __call__(self) -> RequestHandler:
        return KeyedConnection(self, loop=self._loop, **self._kwargs)


class _FixedErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return FixedErrors(self, loop=self._loop, **self._kwargs)


class AdminRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer and log errors like the proxy listener's."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return _FixedErrorServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
