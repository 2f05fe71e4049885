"""Keep-alive connection pools, one per upstream origin.

Owns: opening connections (TCP or TLS, bounded by ``connect_timeout``), reusing idle ones
(last-in first-out, so the freshest is used and the rest age out) once they have stayed quiet for
``reuse_delay``, the per-origin limit with a first-come first-served queue of waiters, closing
connections idle for ``keepalive_timeout``, the read-timeout ticker, and the open-connection
accounting. Must not: speak HTTP (``connection`` does), or decide whether a connection is reusable.

Quiet time: a released connection first waits in ``_settling`` (oldest first), still reading its
socket, and closes itself on any byte (``connection``). A ticker makes it reusable once it was
released at least ``reuse_delay`` before the time the tick was *due* (however late the loop runs
it), and only two turns of the loop after the tick ran: the loop polls every socket in between, so
bytes that reached this host within the quiet time have been read, and have closed their
connection, before it can be handed out. Bytes that arrive later are the residual risk
``connection`` describes. A connection becomes reusable ``reuse_delay`` after its release (up to
2 ms more under load, when ticks free connections in batches), so the pool holds about requests per
second × (``reuse_delay`` + 1 ms) more open connections. ``reuse_delay`` 0: reusable at once.

Accounting: ``_open`` counts every connection being opened, in use or idle, plus slots reserved
for woken waiters. A connection that becomes reusable goes straight to the longest waiter if there
is one; a freed slot is reserved for it, so a newcomer can never overtake the queue.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from urllib.parse import urlsplit

from gateway.upstream.connection import Connection
from gateway.upstream.errors import ConnectFailed, ConnectTimeout, TLSFailed


def parse_origin(origin: str) -> tuple[str, str, int]:
    """``scheme://host[:port]`` → (scheme, host, port)."""
    u = urlsplit(origin)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"not an http(s) origin: {origin!r}")
    return u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)


class Pool:
    __slots__ = (
        "_closed",
        "_connect_timeout",
        "_conns",
        "_host",
        "_idle",
        "_keepalive",
        "_limit",
        "_loop",
        "_open",
        "_port",
        "_read_timeout",
        "_reuse_delay",
        "_server_hostname",
        "_settle_at",
        "_settle_cutoff",
        "_settler",
        "_settling",
        "_ssl",
        "_sweeper",
        "_tick",
        "_ticker",
        "_waiters",
        "origin",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        origin: str,
        *,
        ssl_context: ssl.SSLContext | None,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float,
        reuse_delay: float = 0.0,
    ) -> None:
        scheme, host, port = parse_origin(origin)
        self._loop = loop
        self.origin = origin
        self._host = host
        self._port = port
        if scheme == "https":
            self._ssl: ssl.SSLContext | None = ssl_context or ssl.create_default_context()
            self._server_hostname: str | None = host  # SNI and certificate name
        else:
            self._ssl = None
            self._server_hostname = None
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive = keepalive_timeout
        self._idle: list[Connection] = []  # oldest first; reuse pops the newest
        # Released, still in their quiet time (oldest first), and the ticker that ends it.
        self._reuse_delay = reuse_delay
        self._settling: deque[Connection] = deque()
        self._settler: asyncio.TimerHandle | None = None
        self._settle_at = 0.0  # when the armed tick is due
        self._settle_cutoff = 0.0  # released at or before this: quiet long enough
        self._conns: set[Connection] = set()  # every open connection, for stats
        self._open = 0
        # Pending waiters only; each gets a handed-over connection or None (a slot reserved in
        # ``_open`` for it to open one).
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        # One ticker per pool enforces read_timeout on every connection (no timer per request).
        self._tick = max(0.01, min(1.0, read_timeout / 4))
        self._ticker: asyncio.TimerHandle | None = None
        self._closed = False

    async def acquire(self, fresh: bool = False) -> tuple[Connection, bool]:
        """A connection for one exchange and whether it is a reused one; ``fresh`` opens a new one.

        Raises ConnectTimeout (no connection within ``connect_timeout``, waiting included) or
        ConnectFailed. Waiters are served first come, first served.
        """
        if self._closed:
            raise ConnectFailed("the upstream pool is closed")
        if not self._waiters:
            if not fresh:
                conn = self._pop_idle()
                if conn is not None:
                    return conn, True
            else:
                self._make_room()
            if not self._limit or self._open < self._limit:
                self._open += 1
                return await self._connect(self._loop.time() + self._connect_timeout), False
        return await self._acquire_queued(fresh)

    def release(self, conn: Connection, reuse: bool) -> None:
        """Give a connection back after ``conn.finish()``; ``reuse`` False closes it."""
        if not reuse or self._closed or self._keepalive <= 0 or not conn.usable():
            self._drop(conn)
            return
        conn.idle_since = now = self._loop.time()
        if not self._reuse_delay:
            self._reusable(conn)
            return
        conn.in_pool = True
        self._settling.append(conn)
        if self._settler is None:
            self._settle_at = at = now + self._reuse_delay
            self._settler = self._loop.call_at(at, self._settle)

    def discard(self, conn: Connection) -> None:
        """A pooled connection was closed (by the upstream, or by itself on stray bytes)."""
        if not conn.in_pool:
            return
        conn.in_pool = False
        try:
            self._idle.remove(conn)
        except ValueError:
            try:
                self._settling.remove(conn)
            except ValueError:
                pass
        self._drop(conn)

    def close(self) -> None:
        """Close every idle connection; in-use ones are closed when released."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._settler is not None:
            self._settler.cancel()
            self._settler = None
        idle, self._idle = [*self._settling, *self._idle], []
        self._settling.clear()
        for conn in idle:
            conn.in_pool = False
            self._drop(conn)
        if self._ticker is not None and not self._conns:  # else it still guards in-flight ones
            self._ticker.cancel()
            self._ticker = None
        while self._waiters:  # each wakes, sees the pool closed and gives its slot back
            w = self._waiters.popleft()
            if not w.done():
                self._open += 1
                w.set_result(None)

    def stats(self) -> dict[str, int]:
        """Open connections; idle ones (those in their quiet time included, also counted alone as
        settling); requests waiting for one; response bytes buffered."""
        return {
            "open": self._open,
            "idle": len(self._idle) + len(self._settling),
            "settling": len(self._settling),
            "waiting": sum(1 for w in self._waiters if not w.done()),
            "buffered_bytes": sum(c.buffered() for c in self._conns),
        }

    # -- internals --------------------------------------------------------------------------

    def _reusable(self, conn: Connection) -> None:
        """``conn`` may carry a request now: to the longest waiter, else onto the idle stack."""
        waiters = self._waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                conn.in_pool = False
                w.set_result(conn)
                return
        conn.in_pool = True
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._loop.call_at(conn.idle_since + self._keepalive, self._sweep)

    def _settle(self) -> None:
        """Ticker: connections released ``reuse_delay`` before this tick was due become reusable,
        two turns of the loop later (``_settled``)."""
        # The due time, not now: a tick that runs late must not shorten anyone's quiet time.
        self._settle_cutoff = self._settle_at - self._reuse_delay
        # Between the two turns the loop polls every socket, so bytes already on this host by now
        # are read (and close their connection) before any of these can be handed out.
        self._loop.call_soon(self._loop.call_soon, self._settled)

    def _settled(self) -> None:
        self._settler = None
        cutoff = self._settle_cutoff
        settling = self._settling
        idle = self._idle
        while settling and settling[0].idle_since <= cutoff:
            # A connection that closed meanwhile has left already (discard); one still closing
            # is caught where it is handed out (usable()).
            conn = settling.popleft()
            if self._waiters:
                self._reusable(conn)
            else:
                idle.append(conn)
        if idle and self._sweeper is None:
            self._sweeper = self._loop.call_at(idle[0].idle_since + self._keepalive, self._sweep)
        if settling and not self._closed:
            # When the next one's quiet time ends, but no sooner than 2 ms on: under load each
            # tick frees a batch (a tick costs a timer and two callbacks).
            now = self._loop.time()
            self._settle_at = at = max(settling[0].idle_since + self._reuse_delay, now + 0.002)
            self._settler = self._loop.call_at(at, self._settle)

    def _pop_idle(self) -> Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            conn.in_pool = False
            if conn.usable():
                return conn
            self._drop(conn)  # closing, but connection_lost has not run yet
        return None

    def _make_room(self) -> None:
        """At the limit, close the oldest idle connection so a fresh one can be opened: after a
        pooled connection turned out stale, the other idle ones likely are too."""
        if self._limit and self._open >= self._limit and (self._idle or self._settling):
            oldest = self._idle.pop(0) if self._idle else self._settling.popleft()
            oldest.in_pool = False
            self._drop(oldest, wake=False)  # the slot is for the caller

    def _drop(self, conn: Connection, wake: bool = True) -> None:
        conn.close()
        self._conns.discard(conn)
        self._open -= 1
        if wake and self._waiters:
            self._wake_one()

    def _wake_one(self) -> None:
        """A slot came free: reserve it for the longest waiter, which will open a connection."""
        waiters = self._waiters
        while waiters and (not self._limit or self._open < self._limit):
            w = waiters.popleft()
            if not w.done():
                self._open += 1
                w.set_result(None)
                return

    async def _connect(self, deadline: float) -> Connection:
        """Open a connection in a slot the caller has already counted in ``_open``."""
        conn = Connection(self, self._loop, self._read_timeout)
        try:
            async with asyncio.timeout_at(deadline):
                await self._loop.create_connection(
                    lambda: conn, self._host, self._port, ssl=self._ssl, server_hostname=self._server_hostname
                )
        except BaseException as e:
            self._open -= 1
            if self._waiters:
                self._wake_one()
            if isinstance(e, TimeoutError):
                raise ConnectTimeout(f"connecting to {self.origin} timed out") from None
            if isinstance(e, ssl.SSLError):  # verification failed or the handshake broke
                raise TLSFailed(f"TLS with {self.origin} failed: {e}") from None
            if isinstance(e, OSError):
                raise ConnectFailed(f"connecting to {self.origin} failed: {e!r}") from None
            raise
        self._conns.add(conn)
        if self._ticker is None and not self._closed:
            self._ticker = self._loop.call_later(self._tick, self._on_tick)
        return conn

    async def _acquire_queued(self, fresh: bool) -> tuple[Connection, bool]:
        """Wait (FIFO) for a handed-over connection or a reserved slot, up to connect_timeout."""
        deadline = self._loop.time() + self._connect_timeout
        fut: asyncio.Future[Connection | None] = self._loop.create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout_at(deadline):
                got = await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                self._give_back(fut.result())  # woken, but can no longer use it
            else:
                fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            if isinstance(e, TimeoutError):
                raise ConnectTimeout(
                    f"no free connection to {self.origin} within {self._connect_timeout:g}s"
                ) from None
            raise
        if self._closed:
            self._give_back(got)
            raise ConnectFailed("the upstream pool is closed")
        if got is not None:
            if not fresh and got.usable():
                return got, True
            self._drop(got, wake=False)  # keep its slot for a new connection
            self._open += 1
        return await self._connect(deadline), False

    def _give_back(self, got: Connection | None) -> None:
        if got is None:
            self._open -= 1  # the slot reserved for us
            if self._waiters:
                self._wake_one()
        else:
            self.release(got, True)

    def _on_tick(self) -> None:
        self._ticker = None
        if not self._conns:
            return  # restarted by the next connect
        now = self._loop.time()
        for conn in list(self._conns):
            conn.check_timeout(now)
        self._ticker = self._loop.call_later(self._tick, self._on_tick)

    def _sweep(self) -> None:
        self._sweeper = None
        idle = self._idle
        cutoff = self._loop.time() - self._keepalive + 0.001
        n = 0
        while n < len(idle) and idle[n].idle_since <= cutoff:
            n += 1
        if n:
            expired = idle[:n]
            del idle[:n]
            for conn in expired:
                conn.in_pool = False
                self._drop(conn)
        if idle:
            self._sweeper = self._loop.call_at(idle[0].idle_since + self._keepalive, self._sweep)
