"""A lean Redis client for the lookup path: one pipelined connection, replies parsed by hiredis.

Owns: one connection per process (TCP, TLS or a Unix socket; AUTH and SELECT from the URL, parsed
by redis-py's own ``parse_url``), writing commands, matching replies to calls in order (Redis
answers one connection's commands in the order they were sent) and the deadline of every call.
Must not: know what keys mean (``gateway.cache.redis_tier`` does); pub/sub, scripts and scans stay
on redis-py.

Why: a redis-py call does much more per call (pool checkout, retry wrapper, stream reads, a
timeout context) than a lookup of a key or two that misses the in-process tier can afford. Here a
call is one write and one hiredis parse, and concurrent calls share the connection.

Failure: an error on the connection, a reply that cannot be parsed, or the oldest call outliving
its deadline closes the connection and fails every call still waiting on it (their replies could
no longer be matched); the next call reconnects. An error reply (``-ERR ...``) fails only its call.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Sequence
from typing import Any, Final, cast

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url

Reply = Any  # bytes | int | None | list[Reply] | hiredis.ReplyError


class RespError(Exception):
    """The call failed: connection, deadline or an error reply. The message says which."""


def encode(*args: bytes) -> bytes:
    """One command in RESP: an array of bulk strings (hiredis builds it in C)."""
    # hiredis's stub types the argument as a 1-tuple; any number of parts is accepted.
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


def set_nx(key: str, value: bytes, px: int) -> bytes:
    """``SET key value PX px NX``, encoded."""
    return encode(b"SET", key.encode(), value, b"PX", str(px).encode(), b"NX")


def set_px(key: str, value: bytes, px: int) -> bytes:
    """``SET key value PX px`` (replacing what is there), encoded."""
    return encode(b"SET", key.encode(), value, b"PX", str(px).encode())


class _Call:
    __slots__ = ("deadline", "expected", "future", "replies")

    def __init__(self, future: asyncio.Future[list[Reply]], expected: int, deadline: float) -> None:
        self.future = future
        self.expected = expected
        self.deadline = deadline
        self.replies: list[Reply] = []


class _Connection(asyncio.Protocol):
    """One socket and the calls waiting on it, oldest first."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._reader = hiredis.Reader()
        self._pending: collections.deque[_Call] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass it

    def call(self, payload: bytes, expected: int, deadline: float) -> asyncio.Future[list[Reply]]:
        """Send ``payload`` (``expected`` commands); the future gets their replies, in order."""
        fut: asyncio.Future[list[Reply]] = self._loop.create_future()
        if self.closed or self._transport is None or self._transport.is_closing():
            self.closed = True
            fut.set_exception(RespError("connection closed"))
            return fut
        self._pending.append(_Call(fut, expected, deadline))
        self._transport.write(payload)
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._check_deadline)
        return fut

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._pending:
            return
        head = self._pending[0]
        if head.deadline <= self._loop.time():
            self.abort(RespError("timed out waiting for Redis"))
        else:  # the call it was armed for has finished; watch the oldest one left
            self._timer = self._loop.call_at(head.deadline, self._check_deadline)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        pending = self._pending
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                if not pending:
                    raise RespError("reply without a call")
                head = pending[0]
                head.replies.append(reply)
                if len(head.replies) == head.expected:
                    pending.popleft()
                    if not head.future.done():  # a caller that gave up still had its reply read
                        head.future.set_result(head.replies)
        except (hiredis.ProtocolError, RespError) as e:
            self.abort(RespError(f"bad reply: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(RespError(f"connection lost: {exc}" if exc else "connection closed by Redis"))

    def abort(self, error: RespError) -> None:
        """Close and fail everything waiting: replies still to come could not be matched."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, collections.deque()
        for c in pending:
            if not c.future.done():
                c.future.set_exception(error)
                c.future.exception()  # retrieved: the caller may be gone
        if self._transport is not None:
            self._transport.abort()


def _retrieve(task: asyncio.Task[_Connection]) -> None:
    """Mark a failed connect as seen: every caller that awaited it may have given up."""
    if not task.cancelled():
        task.exception()


class LeanRedis:
    def __init__(self, url: str, *, timeout: float, connect_timeout: float) -> None:
        kw: dict[str, Any] = dict(parse_url(url))
        self._path: str | None = kw.get("path")
        self._host: str = kw.get("host", "localhost")
        self._port: int = int(kw.get("port", 6379))
        self._ssl: ssl.SSLContext | None = None
        if kw.get("connection_class") is SSLConnection:
            # The options gateway.config.REDIS_URL_OPTIONS admits, as redis-py applies them.
            ctx = ssl.create_default_context(cafile=kw.get("ssl_ca_certs"))
            if kw.get("ssl_certfile"):
                ctx.load_cert_chain(kw["ssl_certfile"], kw.get("ssl_keyfile"))
            reqs = str(kw.get("ssl_cert_reqs", "required")).lower()
            if reqs == "none" or kw.get("ssl_check_hostname") is False:
                ctx.check_hostname = False
            if reqs == "none":
                ctx.verify_mode = ssl.CERT_NONE
            elif reqs == "optional":
                ctx.verify_mode = ssl.CERT_OPTIONAL
            self._ssl = ctx
        handshake = []
        if kw.get("password"):
            auth = [b"AUTH"]
            if kw.get("username"):
                auth.append(str(kw["username"]).encode())
            auth.append(str(kw["password"]).encode())
            handshake.append(encode(*auth))
        if int(kw.get("db", 0)):
            handshake.append(encode(b"SELECT", str(int(kw["db"])).encode()))
        self._handshake: Final = handshake
        # A call, connecting included, ends within this many seconds.
        self._deadline: Final = max(timeout, connect_timeout)
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self.connects = 0
        self.calls = 0  # writes, each one round trip

    async def mget(self, keys: Sequence[str], ahead: Sequence[bytes] = ()) -> list[bytes | None]:
        """MGET. ``ahead``: encoded commands sent before it in the same write (their replies are
        read and dropped, an error among them fails nothing): one round trip for both."""
        payload = encode(b"MGET", *(k.encode() for k in keys))
        if ahead:
            payload = b"".join(ahead) + payload
        replies = await self._call(payload, len(ahead) + 1, check_from=len(ahead))
        reply = replies[-1]
        if not isinstance(reply, list):
            raise RespError(f"MGET: unexpected reply {type(reply).__name__}")
        return reply

    async def send(self, commands: Sequence[bytes]) -> None:
        """Encoded commands, pipelined; raises if any of them fails."""
        if commands:  # a call expecting no reply would never end, and would take the next one's
            await self._call(b"".join(commands), len(commands))

    async def replies(self, commands: Sequence[bytes]) -> list[Reply]:
        """Encoded commands, pipelined in one write; their replies in order, an error reply
        (``hiredis.ReplyError``) among them returned, not raised. Raises RespError only when the
        call as a whole fails (connection, deadline)."""
        if not commands:
            return []
        return await self._call(b"".join(commands), len(commands), check_from=len(commands))

    async def _call(self, payload: bytes, expected: int, check_from: int = 0) -> list[Reply]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._deadline
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect(deadline)
        self.calls += 1
        replies = await conn.call(payload, expected, deadline)
        for r in replies[check_from:] if check_from else replies:
            if isinstance(r, hiredis.ReplyError):
                raise RespError(f"Redis error: {r}")
        return replies

    async def _connect(self, deadline: float) -> _Connection:
        task = self._connecting
        if task is None or task.done():
            task = self._connecting = asyncio.get_running_loop().create_task(self._open(deadline))
            task.add_done_callback(_retrieve)
        # shield: one caller giving up must not cancel the connection others wait for.
        return await asyncio.shield(task)

    async def _open(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                if self._path is not None:
                    _, conn = await loop.create_unix_connection(lambda: _Connection(loop), self._path)
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop),
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._host if self._ssl else None,
                    )
                try:
                    for command in self._handshake:
                        (reply,) = await conn.call(command, 1, deadline)
                        if isinstance(reply, hiredis.ReplyError):
                            raise RespError(f"Redis refused the connection setup: {reply}")
                except BaseException:
                    conn.abort(RespError("connection setup failed"))
                    raise
        except TimeoutError:
            raise RespError("timed out connecting to Redis") from None
        except OSError as e:
            raise RespError(f"cannot connect to Redis: {e}") from None
        self.connects += 1
        self._conn = conn
        return conn

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._conn is not None:
            self._conn.abort(RespError("client closed"))
            self._conn = None
