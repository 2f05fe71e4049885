"""One keep-alive HTTP/1.1 connection to an upstream: request writer, response parser, flow control.

Owns: the exchange on one socket — writing a serialised request and streaming its body (as given
or re-chunked, with write backpressure), parsing the response with httptools (llhttp, strict mode),
buffering the response body with read backpressure, the read timeout, and deciding whether the
connection may carry another request. Must not: choose or clean headers, know routes or keys,
touch the client's connection, or pool itself (``gateway.upstream.pool`` does that).

One exchange at a time (no pipelining): ``begin`` → ``send``/``send_streaming`` → ``read_head`` →
``read_body`` until b"" → ``finish``. The response is exposed raw: ``status``, ``reason`` and
``headers`` as (name, value) byte pairs in wire order, duplicates kept.

Never another request's answer. HTTP/1.1 pairs responses with requests by order alone, so a byte
the upstream sends that is not part of the answer to the request in flight (a body after a HEAD
response or after 204/304, a second response in the same write, an unsolicited one later) would
be read as the answer to the next request on this connection — on a pooled connection, another
client's. Three rules keep that from happening:

- A response is due only from the moment the request's first bytes are handed to the kernel (the
  end of the loop's turn, ``gateway.turn``) until its last byte. A byte that arrives at any other
  time — idle in the pool, after ``begin`` but before the request went out, after the response's
  last byte, within the same read too — is never parsed as an answer: the connection closes, and a
  request that had not gone out fails as unsent, so the caller may send it on a new connection.
- Responses to HEAD, and 204 and 304 responses, end the connection: servers are known to send
  the body those must not have, sometimes much later.
- The pool reuses a connection only after it has stayed silent for ``upstream.reuse_delay`` after
  its response, checked after the loop has polled it (``gateway.upstream.pool``).

Residual risk: an upstream that answers a request correctly, then sends more bytes (an unsolicited
response, a body longer than its Content-Length) after that quiet time, when the next request has
already gone out, makes those bytes indistinguishable from the answer to the next request: nothing
in HTTP/1.1 tells them apart. The connection is closed when the real answer follows (no response
due then), but one answer has been taken from the wrong bytes. A larger ``upstream.reuse_delay``
narrows the window for an upstream known to send late bytes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from gateway.turn import BatchedTransport, TurnWrites, turn_writes
from gateway.upstream.errors import BadResponse, ClientBodyError, Disconnected, ReadTimeout, UpstreamError

if TYPE_CHECKING:
    from gateway.upstream.pool import Pool

# Stop reading from the upstream socket once this much response body waits for the client; the
# consumer takes everything buffered at once, so reading resumes as soon as it has taken it.
HIGH_WATER = 256 * 1024
# Status line and headers (1xx included) larger than this are refused, like an oversized header
# in nginx; llhttp itself sets no limit.
MAX_HEAD = 64 * 1024

_CHUNK_END = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class BodySource(Protocol):
    """What a request body is read from: aiohttp's ``request.content``."""

    async def readany(self) -> bytes: ...


class _Upgrade(Exception):
    """Raised inside the parser on 101: we never ask for an upgrade."""


class _TooLarge(Exception):
    """Raised inside the parser when the response head exceeds MAX_HEAD."""


class _Extra(Exception):
    """Raised inside the parser when another message starts after the response was complete."""


def _close_delimited(headers: list[tuple[bytes, bytes]]) -> bool:
    """No Content-Length and no final chunked coding: the body ends when the connection does."""
    for name, value in headers:
        low = name.lower()
        if low == b"content-length":
            return False
        if low == b"transfer-encoding" and value.rsplit(b",", 1)[-1].strip().lower() == b"chunked":
            return False
    return True


class _RequestWrites(BatchedTransport):
    """The connection's transport: writes wait for the end of the loop's turn (``gateway.turn``),
    and the connection learns when its request actually goes out, which is when a response becomes
    due."""

    __slots__ = ("_conn",)

    def __init__(self, transport: asyncio.Transport, turn: TurnWrites, conn: Connection) -> None:
        super().__init__(transport, turn)
        self._conn = conn

    def flush(self) -> None:
        conn = self._conn
        if conn._queued:  # the request of the exchange in progress goes out now
            conn._queued = False
            conn._due = not conn.complete
        BatchedTransport.flush(self)

    def discard(self) -> None:
        """Forget what is queued: it must not reach the upstream (close and abort send it)."""
        self._pending = None


class Connection(asyncio.Protocol):
    __slots__ = (
        "_active",
        "_buffered",
        "_chunks",
        "_client_wait",
        "_drain_waiter",
        "_due",
        "_exc",
        "_got_bytes",
        "_head_bytes",
        "_head_request",
        "_head_size",
        "_interim",
        "_keep_alive",
        "_last_io",
        "_loop",
        "_parser",
        "_pool",
        "_queued",
        "_read_paused",
        "_read_timeout",
        "_reusable",
        "_transport",
        "_waiter",
        "_write_paused",
        "body_sent",
        "body_started",
        "closed",
        "complete",
        "headers",
        "headers_done",
        "idle_since",
        "in_pool",
        "reason",
        "status",
    )

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._pool = pool
        self._loop = loop
        self._read_timeout = read_timeout
        self._transport: _RequestWrites | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.in_pool = False
        self.idle_since = 0.0
        self._active = False  # an exchange is in progress (begin .. finish)
        self._queued = False  # its request is queued for the end of the turn, not yet written
        self._due = False  # its request went out and the response is not complete yet
        self._head_request = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self._interim = False
        self._keep_alive = False
        self._reusable = True  # False once the byte stream is out of step with our requests
        self._got_bytes = False
        self._head_bytes = 0  # raw bytes received while the head was incomplete
        self._head_size = 0  # parsed header bytes
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._read_paused = False
        self._exc: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.body_sent = False
        self.body_started = False
        self._client_wait = False
        self._last_io = 0.0  # last progress with the upstream, for the pool's read-timeout ticker

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Writes wait for the end of the loop's turn (gateway.turn). uvloop's is not a subclass.
        self._transport = _RequestWrites(cast(asyncio.Transport, transport), turn_writes(self._loop), self)

    def data_received(self, data: bytes) -> None:
        if not self._due:
            self._stray()
            return
        self._got_bytes = True
        self._last_io = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._protocol_error("unexpected protocol upgrade")
        except httptools.HttpParserError as e:
            if isinstance(e.__context__, _Extra):
                self._protocol_error("bytes after the complete response")
            elif isinstance(e.__context__, _TooLarge):
                self._protocol_error(f"response head larger than {MAX_HEAD} bytes")
            else:
                self._protocol_error(f"malformed response: {e}")
        else:
            if not self.headers_done:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD:
                    self._protocol_error(f"response head larger than {MAX_HEAD} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._active and not self.complete:
            if exc is None and self.headers_done and _close_delimited(self.headers):
                self.complete = True  # a close-delimited body ends here
                self._keep_alive = False
            else:
                what = "reset" if exc is not None else "closed"
                self._fail(
                    Disconnected(
                        f"upstream {what} the connection", got_bytes=self._got_bytes, unsent=self._queued
                    )
                )
        self._wake()
        self._wake_drain()
        if self.in_pool:
            self._pool.discard(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # A second response to one request, in the same read: stop parsing, the answer is
            # what came before; the connection is closed (data_received).
            self._reusable = False
            raise _Extra

    def on_status(self, status: bytes) -> None:
        self.reason += status  # may arrive in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_HEAD:
            raise _TooLarge
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise _Upgrade
            self._interim = True  # 100 Continue, 103 Early Hints: skipped
            return
        self.status = status
        self.headers_done = True
        if self._head_request:
            # llhttp does not know the request was HEAD: the response ends with its headers. Many
            # servers send the body anyway (even much later): this connection carries no more.
            self.complete = True
            self._due = False
            self._keep_alive = False
        elif status == 204 or status == 304:
            self._keep_alive = False  # no body, yet servers send one: likewise
        else:
            self._keep_alive = parser.should_keep_alive() and parser.get_http_version() == "1.1"
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self._reusable = False  # body bytes after a HEAD response, never relayed
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self.headers = []
            self.reason = b""
            return
        if self.complete:
            return  # HEAD: already complete at its headers
        self.complete = True
        self._due = False
        self._wake()

    # -- the exchange -----------------------------------------------------------------------

    def usable(self) -> bool:
        t = self._transport
        return not self.closed and self._reusable and t is not None and not t.is_closing()

    def begin(self, head_request: bool) -> None:
        self._active = True
        self._queued = True
        self._due = False
        self._head_request = head_request
        self.status = 0
        self.reason = b""
        self.headers = []
        self.headers_done = self.complete = self._interim = False
        self._got_bytes = self.body_sent = self.body_started = False
        self._head_bytes = self._head_size = 0
        self._last_io = self._loop.time()
        if self.closed:  # lost between the pool and here: fail at once (retryable)
            self._exc = Disconnected("upstream closed the connection", got_bytes=False)

    def send(self, request: bytes) -> None:
        """Write a whole request (head and any body)."""
        assert self._transport is not None
        if not self.closed:
            self._transport.write(request)
        self.body_sent = True

    def send_streaming(self, head: bytes, source: BodySource, length: int | None) -> asyncio.Task[None]:
        """Write the head, then stream the body from ``source`` concurrently with the response.

        ``length`` None: re-chunk whatever the client sends. The task never raises: failures are
        recorded on the connection, where ``read_head``/``read_body`` report them.
        """
        assert self._transport is not None
        if not self.closed:
            self._transport.write(head)
        return self._loop.create_task(self._pump(source, length))

    async def read_head(self) -> None:
        """Wait for the final (non-1xx) status line and headers."""
        while not self.headers_done:
            if self._exc is not None:
                raise self._exc
            await self._wait()

    def take_body(self) -> bytes:
        """Everything buffered now (the whole body once ``complete``)."""
        chunks = self._chunks
        if not chunks:
            return b""
        if len(chunks) == 1:
            data = chunks.popleft()
        else:
            data = b"".join(chunks)
            chunks.clear()
        self._buffered = 0
        if self._read_paused:
            self._read_paused = False
            if self._transport is not None and not self.closed:
                self._transport.resume_reading()
        return data

    async def read_body(self) -> bytes:
        """The next piece of the body; b"" once it is complete. Raises on a broken body."""
        while True:
            if self._chunks:
                return self.take_body()
            if self.complete:
                return b""
            if self._exc is not None:
                raise self._exc
            await self._wait()

    def finish(self) -> bool:
        """End the exchange; True when the connection may carry another request."""
        self._active = self._queued = self._due = False
        return (
            self.complete
            and self._keep_alive
            and self._reusable
            and self.body_sent
            and self._exc is None
            and not self.closed
            and not self._chunks
        )

    def close(self) -> None:
        """Graceful close after a clean exchange, otherwise a reset."""
        t = self._transport
        if t is None or self.closed:
            return
        if self.complete and self.body_sent and self._exc is None:
            t.close()
        else:
            t.abort()

    def abort(self) -> None:
        t = self._transport
        if t is not None and not self.closed:
            t.abort()

    def buffered(self) -> int:
        return self._buffered

    # -- internals --------------------------------------------------------------------------

    def _stray(self) -> None:
        """Bytes while no response is due: never an answer, and the stream is out of step."""
        self._reusable = False
        t = self._transport
        if self._active and not self.complete and t is not None:
            # Our request is still queued: it must not go out on this connection now.
            t.discard()
            self._fail(Disconnected("upstream sent bytes before the request", got_bytes=False, unsent=True))
        self.abort()

    async def _pump(self, source: BodySource, length: int | None) -> None:
        transport = self._transport
        assert transport is not None
        remaining = length or 0
        try:
            while True:
                if self._exc is not None or self.closed:
                    return
                self._client_wait = self.body_started = True
                try:
                    chunk = await source.readany()
                finally:
                    self._client_wait = False
                if self._exc is not None or self.closed:
                    return
                if not chunk:
                    break
                n = len(chunk)
                if length is None:
                    transport.writelines((b"%x\r\n" % n, chunk, _CHUNK_END))
                else:
                    if n > remaining:
                        self._body_failed("client body longer than its Content-Length")
                        return
                    remaining -= n
                    transport.write(chunk)
                self._last_io = self._loop.time()
                if self._write_paused:
                    await self._drain()
            if length is None:
                transport.write(_LAST_CHUNK)
            elif remaining:
                self._body_failed("client body shorter than its Content-Length")
                return
            self.body_sent = True
        except UpstreamError:
            pass  # the connection failed; already recorded
        except Exception as e:  # the client's body could not be read
            self._body_failed(f"reading the client body failed: {e!r}")

    def _body_failed(self, detail: str) -> None:
        # The upstream must never take a partial body for a whole one: reset the connection.
        self._fail(ClientBodyError(detail))
        self.abort()

    async def _drain(self) -> None:
        while self._write_paused:
            if self._exc is not None:
                raise self._exc
            if self.closed:
                raise Disconnected("upstream closed the connection", got_bytes=self._got_bytes)
            fut = self._loop.create_future()
            self._drain_waiter = fut
            try:
                await fut
            finally:
                self._drain_waiter = None

    async def _wait(self) -> None:
        fut = self._loop.create_future()
        self._waiter = fut
        try:
            await fut
        finally:
            self._waiter = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_drain(self) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: UpstreamError) -> None:
        if self._exc is None:
            self._exc = exc
        self._wake()
        self._wake_drain()

    def _protocol_error(self, detail: str) -> None:
        self._reusable = False
        if not self.complete:
            self._fail(BadResponse(detail))
        self.abort()

    def check_timeout(self, now: float) -> None:
        """Called by the pool's ticker: fail the exchange if the upstream stalled."""
        if not self._active or self.complete or self._exc is not None:
            return
        if self._read_paused or (self._client_wait and not self.headers_done):
            self._last_io = now  # waiting on our client, not on the upstream
        elif now - self._last_io >= self._read_timeout:
            self._fail(ReadTimeout(f"no progress from the upstream for {self._read_timeout:g}s"))
            self.abort()
