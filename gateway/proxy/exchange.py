"""The exchange: one request sent upstream and its answer streamed back, per ``forward`` call.

Owns: the upstream pools (one per origin), how a request body travels, the stale-connection retry,
turning the upstream's response into the client's (a complete one in one write, a longer one
streamed through aiohttp's response writer) and mapping upstream failures to 502/504. Header
policy is ``gateway.proxy.headers``'s, the bytes on the wire ``gateway.proxy.serialize``'s; the
sockets and the HTTP/1.1 parser live in ``gateway.upstream``. Must not: decide whether a key is
valid (it is handed the identity to inject).

Redirects are returned to the client, never followed; bodies are never decompressed or buffered
whole.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Final

from aiohttp import web

from gateway import errors, wire
from gateway.config import Config
from gateway.models import IdentityRecord
from gateway.paths import Target
from gateway.proxy.headers import HeaderPolicy, UnsafeHeader
from gateway.proxy.serialize import RESPONSE_HEADS, ResponseHeads, chunked_body, serialize_head
from gateway.routing import Route
from gateway.upstream import BodySource, Connection, Disconnected, Pool, UpstreamError

log = logging.getLogger("keystile.proxy")

# A request these methods make may be sent twice (RFC 9110 §9.2.2).
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})

_SPECS: Final = {
    "timeout": errors.UPSTREAM_TIMEOUT,
    "unreachable": errors.UPSTREAM_UNREACHABLE,
    "bad_response": errors.UPSTREAM_BAD_RESPONSE,
    "tls": errors.UPSTREAM_TLS,
}

# How a request body travels (see _request_body): (bytes sent with the head, or the client's
# stream to pump; Content-Length; re-chunked).
_Body = tuple[bytes, BodySource | None, int | None, bool]
_NO_BODY: Final[_Body] = (b"", None, None, False)


class UpstreamFailure(Exception):
    """Raised before any response byte was sent; carries the prebuilt error to send."""

    def __init__(self, spec: errors.ErrorSpec, detail: str) -> None:
        super().__init__(detail)
        self.spec = spec


class Forwarder:
    """One config generation's forwarding: its header policy and its upstream pools."""

    def __init__(self, cfg: Config, heads: ResponseHeads = RESPONSE_HEADS) -> None:
        self.policy = HeaderPolicy(cfg)
        # The handler asks for the upstream's headers before it forwards; bound once, so that
        # costs one call.
        self.upstream_headers = self.policy.upstream_headers
        self._identity = self.policy.identity
        self._request_target = self.policy.request_target
        self._heads = heads
        up = cfg.upstream
        self._connect_timeout = up.connect_timeout
        self._read_timeout = up.read_timeout
        self._pool_size = up.pool_size
        self._keepalive = up.keepalive_timeout
        self._reuse_delay = up.reuse_delay
        self._pools: dict[str, Pool] = {}  # by Route.upstream_origin
        self._ssl: ssl.SSLContext | None = None
        self._started = False

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        self._started = False
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per upstream origin: open, idle, waiting connections and buffered response bytes."""
        return {origin: pool.stats() for origin, pool in self._pools.items()}

    def _new_pool(self, origin: str) -> Pool:
        assert self._started, "Forwarder.start() was not called"
        ctx = None
        if origin.startswith("https:"):
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
                self._ssl.set_alpn_protocols(["http/1.1"])
            ctx = self._ssl
        pool = Pool(
            asyncio.get_running_loop(),
            origin,
            ssl_context=ctx,
            limit=self._pool_size,
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            keepalive_timeout=self._keepalive,
            reuse_delay=self._reuse_delay,
        )
        self._pools[origin] = pool
        return pool

    async def forward(
        self,
        request: web.BaseRequest,
        route: Route,
        target: Target,
        headers: list[tuple[str, str]],
        ident: IdentityRecord | None,
        strip_query_key: bool,
        extra: bytes = b"",
    ) -> tuple[wire.Answer, int]:
        """Send the request upstream and stream the answer back; returns (response, upstream status).
        ``extra``: header lines Keystile adds to the client's answer (the RateLimit fields, each
        line ending CRLF), after the upstream's.

        Raises UpstreamFailure when nothing has been sent to the client yet.
        """
        pool = self._pools.get(route.upstream_origin) or self._new_pool(route.upstream_origin)
        method = request.method
        body, source, length, chunked = _request_body(request) if request.body_exists else _NO_BODY
        head = self._request_head(method, route, target, headers, ident, strip_query_key, chunked)
        if source is None:
            head += body

        # Send, and read the response head. Written out here rather than in a coroutine of its
        # own: every proxied request runs it, and a nested coroutine would add an await to each.
        retried = False
        while True:
            try:
                conn, reused = await pool.acquire(fresh=retried)
            except UpstreamError as e:
                raise UpstreamFailure(_SPECS[e.kind], str(e)) from None
            pump: asyncio.Task[None] | None = None
            try:
                conn.begin(method == "HEAD")
                if source is None:
                    conn.send(head)
                else:
                    pump = conn.send_streaming(head, source, length)
                await conn.read_head()
                break
            except UpstreamError as e:
                _release(pool, conn, pump, False)
                if reused and not retried and _may_resend(e, method, conn, pump):
                    retried = True
                    log.debug("stale upstream connection on route %s (%s); retrying", route.name, e)
                    continue
                raise UpstreamFailure(_SPECS[e.kind], str(e)) from None
            except BaseException:
                _release(pool, conn, pump, False)
                raise

        status = conn.status
        if conn.complete:
            answer = self._complete_answer(pool, conn, pump, method == "HEAD")
            if extra:
                answer.add_lines(extra)
            return answer, status
        return await self._streamed_answer(request, route, pool, conn, pump, extra), status

    def _request_head(
        self,
        method: str,
        route: Route,
        target: Target,
        headers: list[tuple[str, str]],
        ident: IdentityRecord | None,
        strip_query_key: bool,
        chunked: bool,
    ) -> bytes:
        """The request line and headers, the identity's last."""
        path = self._request_target(route, target, strip_query_key)
        try:
            lines = "" if ident is None else self._identity(ident)
            return serialize_head(method, path, headers, chunked, lines)
        except UnsafeHeader as e:
            raise UpstreamFailure(errors.UNSAFE_UPSTREAM_HEADER, str(e)) from None

    def _complete_answer(
        self, pool: Pool, conn: Connection, pump: asyncio.Task[None] | None, head_request: bool
    ) -> wire.RawResponse:
        """The whole response is here: free the connection first, then answer in one write
        (aiohttp's server writes it, ``prepare``, once the handler returns)."""
        try:
            data = conn.take_body()
        except BaseException:
            _release(pool, conn, pump, False)
            raise
        _release(pool, conn, pump, True)
        status, heads = conn.status, self._heads
        try:
            block, has_date = heads.client_head(conn.headers, status, data, head_request)
        except UnsafeHeader as e:
            raise UpstreamFailure(errors.UPSTREAM_BAD_RESPONSE, f"response header: {e}") from None
        return wire.RawResponse(status, heads.status_tail(status, conn.reason), block, data, not has_date)

    async def _streamed_answer(
        self,
        request: web.BaseRequest,
        route: Route,
        pool: Pool,
        conn: Connection,
        pump: asyncio.Task[None] | None,
        extra: bytes = b"",
    ) -> web.StreamResponse:
        """The head now, the body as it arrives. Once the head is sent a failure can only cut the
        connection, so the client sees a truncated body rather than a clean end."""
        released = False
        try:
            heads = self._heads
            reason = heads.reason(conn.reason)
            hdrs = heads.client_headers(conn.headers)
            if extra:
                hdrs.extend(wire.header_pairs(extra))
            try:
                out = web.StreamResponse(status=conn.status, reason=reason, headers=hdrs)
                await out.prepare(request)
            except ValueError as e:
                raise UpstreamFailure(errors.UPSTREAM_BAD_RESPONSE, f"response header: {e}") from None
            try:
                while chunk := await conn.read_body():
                    await out.write(chunk)
            except UpstreamError as e:
                log.warning("upstream failed mid-response on route %s: %s", route.name, e)
                _abort(request)
                return out
            except ConnectionError:  # the client went away
                _abort(request)
                return out
            _release(pool, conn, pump, True)
            released = True
            try:
                await out.write_eof()
            except ConnectionError:
                _abort(request)
            return out
        finally:
            if not released:
                _release(pool, conn, pump, False)


def _request_body(request: web.BaseRequest) -> _Body:
    """How a request's body travels: all of it already received (sent with the head, so the
    request can be replayed), or streamed from the client as it arrives; either with exactly its
    Content-Length, or re-chunked."""
    content = request.content
    length = request.content_length
    chunked = length is None
    if not content.is_eof():
        return b"", content, length, chunked
    try:
        body = content.read_nowait(-1)
    except Exception as e:
        raise UpstreamFailure(errors.UPSTREAM_UNREACHABLE, f"client body: {e!r}") from None
    if length is not None and len(body) != length:
        raise UpstreamFailure(errors.UPSTREAM_UNREACHABLE, "client body incomplete")
    return (chunked_body(body) if chunked else body), None, length, chunked


def _may_resend(e: UpstreamError, method: str, conn: Connection, pump: asyncio.Task[None] | None) -> bool:
    """Stale keep-alive race: a reused connection died before answering. The request is sent
    again, once and on a new connection, when it can be replayed in full and sending it twice is
    harmless: its method is idempotent (RFC 9110 §9.2.2), or not one byte of it went out."""
    return (
        isinstance(e, Disconnected)
        and not e.got_bytes
        and (e.unsent or method in _IDEMPOTENT)
        and (pump is None or not conn.body_started)
    )


def _release(pool: Pool, conn: Connection, pump: asyncio.Task[None] | None, ok: bool) -> None:
    reuse = conn.finish() and ok
    if pump is not None and not pump.done() and not conn.body_sent:
        pump.cancel()
    pool.release(conn, reuse)


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
