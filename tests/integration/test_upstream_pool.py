"""The upstream transport on real sockets: keep-alive reuse, pool limits, framing, flow control, TLS.

Most tests script the upstream byte by byte (``RawUpstream``) so they can count connections and
send exactly the framing under test; the gateway runs in-process via the ``keystile`` fixture.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.models import IdentityRecord
from gateway.proxy import UnsafeHeader, identity_lines, serialize_head
from gateway.upstream import HIGH_WATER
from tests.upstream import RecordingUpstream, raw_request
from tests.waiting import until


@dataclass
class RawRequest:
    line: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_body: bytes

    @property
    def method(self) -> str:
        return self.line.split(" ", 1)[0]

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def read_request(reader: asyncio.StreamReader) -> RawRequest | None:
    """One request as a strict upstream would read it; None when the peer closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    req = RawRequest(lines[0], headers, b"", b"")
    if req.header("Content-Length"):
        req.body = req.raw_body = await reader.readexactly(int(req.header("Content-Length")[0]))
    elif req.header("Transfer-Encoding") == ["chunked"]:
        raw, body = bytearray(), bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.strip(), 16)
            data = await reader.readexactly(size + 2)
            assert data.endswith(b"\r\n"), data[-10:]
            raw += size_line + data
            body += data[:-2]
            if size == 0:
                break
        req.body, req.raw_body = bytes(body), bytes(raw)
    return req


Script = Callable[["RawUpstream", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@dataclass
class RawUpstream:
    """A scripted upstream on raw sockets: counts connections and records every request."""

    script: Script
    connections: int = 0
    open: int = 0
    requests: list[RawRequest] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def next_request(self, reader: asyncio.StreamReader) -> RawRequest | None:
        req = await read_request(reader)
        if req is not None:
            self.requests.append(req)
        return req

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.script(self, reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            self.open -= 1
            writer.close()

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in self._writers:
            w.close()
        await asyncio.sleep(0.01)  # kept: the closes reach the gateway before the test ends


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def serve_ok(up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while await up.next_request(reader) is not None:
        writer.write(OK)
        await writer.drain()


@pytest.fixture
async def raw_upstream():
    started: list[RawUpstream] = []

    async def start(script: Script = serve_ok) -> RawUpstream:
        up = await RawUpstream(script).start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


def open_route(url: str) -> list[dict[str, object]]:
    return [{"prefix": "/", "upstream": url, "auth": "none"}]


async def eventually(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    await until(cond, timeout)


async def quiet(gw, origin: str) -> None:
    """Wait until every pooled connection has served its quiet time (``upstream.reuse_delay``)."""
    await eventually(lambda: gw.gateway.forwarder.stats()[origin].get("settling", 0) == 0)


# -- keep-alive reuse ---------------------------------------------------------------------------


async def test_connections_are_reused(keystile, raw_upstream) -> None:
    up = await raw_upstream()
    gw = await keystile(routes=open_route(up.url))
    async with aiohttp.ClientSession() as s:
        for i in range(50):
            async with s.get(f"{gw.url}/r{i}") as r:
                assert r.status == 200 and await r.read() == b"ok"
            await quiet(gw, up.url)
    assert len(up.requests) == 50
    assert up.connections == 1
    assert gw.gateway.forwarder.stats()[up.url] == {
        "open": 1, "idle": 1, "settling": 0, "waiting": 0, "buffered_bytes": 0
    }


async def test_back_to_back_requests_reuse_at_once_without_a_quiet_time(keystile, raw_upstream) -> None:
    up = await raw_upstream()
    gw = await keystile(routes=open_route(up.url), upstream={"reuse_delay": 0})
    async with aiohttp.ClientSession() as s:
        for i in range(50):
            async with s.get(f"{gw.url}/r{i}") as r:
                assert r.status == 200 and await r.read() == b"ok"
    assert len(up.requests) == 50 and up.connections == 1


async def test_a_connection_stays_quiet_before_its_next_request(keystile, raw_upstream) -> None:
    delay = 0.05
    answered: dict[int, float] = {}  # connection -> when its last answer went out
    gaps: list[float] = []

    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        while await up.next_request(reader) is not None:
            if n in answered:
                gaps.append(time.monotonic() - answered[n])
            await asyncio.sleep(0.01)  # kept: the upstream answers a little after each request
            writer.write(OK)
            await writer.drain()
            answered[n] = time.monotonic()

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url), upstream={"reuse_delay": delay})
    async with aiohttp.ClientSession() as s:

        async def client(c: int) -> None:
            for i in range(15):
                async with s.get(f"{gw.url}/c{c}/{i}") as r:
                    assert r.status == 200 and await r.read() == b"ok"

        await asyncio.gather(*(client(c) for c in range(4)))
    # Back to back, requests do not wait for a quiet connection: they open new ones meanwhile
    # (more than the 4 in flight at a time), and reuse them once quiet.
    assert 4 < up.connections < 60
    assert gaps, "no connection was reused"
    assert min(gaps) >= delay * 0.9, min(gaps)  # a reused connection had been silent for the delay


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
    ],
)
async def test_connection_not_reused_unless_both_sides_keep_alive(keystile, raw_upstream, reply: bytes) -> None:
    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        # Answer, then keep the socket open: the gateway itself must not reuse it.
        while await up.next_request(reader) is not None:
            writer.write(reply)
            await writer.drain()

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url))
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.get(gw.url + "/x") as r:
                assert r.status == 200 and await r.read() == b"ok"
    assert up.connections == 5
    await eventually(lambda: up.open == 0)  # the gateway closed each one
    assert gw.gateway.forwarder.stats()[up.url]["open"] == 0


async def test_stale_pooled_connection_is_retried_for_get(keystile, raw_upstream) -> None:
    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        # Answer the first request; take the second and close without a byte, as an upstream
        # whose idle timeout fired while the request was in flight.
        await up.next_request(reader)
        writer.write(OK)
        await writer.drain()
        await up.next_request(reader)

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url))
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(gw.url + "/x") as r:
                assert r.status == 200 and await r.read() == b"ok"
            await quiet(gw, up.url)
        assert up.connections == 2 and len(up.requests) == 3  # one lost, retried on a fresh one
        # A POST with a body is not replayed: the upstream may have acted on it.
        async with s.post(gw.url + "/x", data=b"payload") as r:
            assert r.status == 502
            assert (await r.json())["error"] == "upstream_unreachable"
        assert len(up.requests) == 4


@pytest.mark.parametrize(
    ("method", "sent_again"),
    [("GET", True), ("HEAD", True), ("PUT", True), ("DELETE", True), ("OPTIONS", True), ("TRACE", True),
     ("POST", False), ("PATCH", False)],
)  # fmt: skip
async def test_only_idempotent_requests_are_sent_again(
    keystile, raw_upstream, method: str, sent_again: bool
) -> None:
    """A reused connection closed after taking the request: only an idempotent one is sent again
    (RFC 9110 §9.2.2), even without a body; the upstream may have acted on a POST or PATCH."""

    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        await up.next_request(reader)  # answer the first request on each connection
        writer.write(OK)
        await writer.drain()
        await up.next_request(reader)  # take the second, then close without a byte

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url))
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/warm") as r:
            assert r.status == 200
        await quiet(gw, up.url)
        async with s.request(method, gw.url + "/x") as r:
            if sent_again:
                assert r.status == 200
            else:
                assert r.status == 502 and (await r.json())["error"] == "upstream_unreachable"
    received = [req.method for req in up.requests if req.line.split(" ")[1] == "/x"]
    assert received == [method] * (2 if sent_again else 1)


@pytest.mark.parametrize("pool_size", [0, 2])
async def test_retry_uses_a_new_connection_not_another_pooled_one(keystile, raw_upstream, pool_size: int) -> None:
    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        await up.next_request(reader)
        await asyncio.sleep(0.1)  # so that two requests hold two connections at once
        writer.write(OK)
        await writer.drain()
        await up.next_request(reader)  # every pooled connection has gone stale

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url), upstream={"pool_size": pool_size})
    async with aiohttp.ClientSession() as s:

        async def get() -> int:
            async with s.get(gw.url + "/x") as r:
                await r.read()
                return r.status

        assert await asyncio.gather(get(), get()) == [200, 200]
        assert up.connections == 2
        await quiet(gw, up.url)
        assert await get() == 200  # stale pooled one, then a new connection, not the other stale one
        assert up.connections == 3 and len(up.requests) == 4


async def test_idle_connection_closed_by_upstream_is_dropped(keystile, raw_upstream) -> None:
    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        await up.next_request(reader)
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.05)  # then close while idle in the gateway's pool

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url))
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(gw.url + "/x") as r:
                assert r.status == 200
            await eventually(lambda: up.open == 0)
            await eventually(lambda: gw.gateway.forwarder.stats()[up.url]["open"] == 0)
    assert up.connections == 3 and len(up.requests) == 3  # no request was lost on a dead socket


async def test_idle_connections_closed_after_keepalive_timeout(keystile, raw_upstream) -> None:
    up = await raw_upstream()
    gw = await keystile(routes=open_route(up.url), upstream={"keepalive_timeout": 0.3})
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/x") as r:
            assert r.status == 200
        assert up.open == 1
        await asyncio.sleep(0.1)  # kept: idle for a while, still within keepalive_timeout
        assert up.open == 1  # still within keepalive_timeout
        await eventually(lambda: up.open == 0, timeout=2)
        assert gw.gateway.forwarder.stats()[up.url]["open"] == 0
        async with s.get(gw.url + "/x") as r:
            assert r.status == 200
    assert up.connections == 2


# -- pool limits ----------------------------------------------------------------------------------


async def test_pool_size_is_respected_under_concurrency(keystile, raw_upstream) -> None:
    active = peak = 0

    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        nonlocal active, peak
        while await up.next_request(reader) is not None:
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.1)  # kept: a slow upstream, so requests overlap
            active -= 1
            writer.write(OK)
            await writer.drain()

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url), upstream={"pool_size": 2, "connect_timeout": 5})
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> int:
            async with s.get(f"{gw.url}/c{i}") as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(10)))
    assert statuses == [200] * 10
    assert peak == 2
    assert up.connections == 2
    await quiet(gw, up.url)
    assert gw.gateway.forwarder.stats()[up.url] == {
        "open": 2, "idle": 2, "settling": 0, "waiting": 0, "buffered_bytes": 0
    }


async def test_waiters_are_served_in_order(keystile, raw_upstream) -> None:
    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        while await up.next_request(reader) is not None:
            await asyncio.sleep(0.15)  # kept: a slow upstream, so later requests queue for a connection
            writer.write(OK)
            await writer.drain()

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url), upstream={"pool_size": 1, "connect_timeout": 5})
    async with aiohttp.ClientSession() as s:

        async def get(path: str, delay: float) -> int:
            await asyncio.sleep(delay)  # kept: the requests arrive in a known order
            async with s.get(gw.url + path) as r:
                await r.read()
                return r.status

        got = await asyncio.gather(*(get(f"/{i}", i * 0.03) for i in range(5)))
    assert got == [200] * 5
    assert [r.line.split(" ")[1] for r in up.requests] == ["/0", "/1", "/2", "/3", "/4"]
    assert up.connections == 1  # each handed straight to the next waiter


async def test_waiting_for_a_pooled_connection_is_bounded_by_connect_timeout(
    keystile, upstream: RecordingUpstream
) -> None:
    gw = await keystile(
        routes=open_route(upstream.url), upstream={"pool_size": 1, "connect_timeout": 0.3, "read_timeout": 30}
    )
    async with aiohttp.ClientSession() as s:
        hang = asyncio.create_task(s.get(gw.url + "/hang"))
        await eventually(lambda: len(upstream.received) == 1)
        started = time.monotonic()
        async with s.get(gw.url + "/x") as r:
            assert r.status == 504
            assert (await r.json())["error"] == "upstream_timeout"
        assert 0.25 < time.monotonic() - started < 2
        assert len(upstream.received) == 1
        hang.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hang
    # The cancelled request's connection is closed, not pooled; the slot is free again.
    await eventually(lambda: upstream.cancelled == 1)
    await eventually(lambda: gw.gateway.forwarder.stats()[upstream.url]["open"] == 0)
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/x") as r:
        assert r.status == 200


async def test_pool_accounting_survives_cancellations_and_resets(keystile, raw_upstream) -> None:
    import random

    rng = random.Random(7)

    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        while (req := await up.next_request(reader)) is not None:
            await asyncio.sleep(rng.random() * 0.05)  # kept: an upstream that answers late by a random amount
            if req.line.startswith("GET /reset"):
                writer.transport.abort()
                return
            writer.write(OK)
            await writer.drain()

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url), upstream={"pool_size": 3, "connect_timeout": 5})
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as s:

        async def one(i: int) -> int:
            async with s.get(gw.url + ("/reset" if i % 7 == 0 else "/ok")) as r:
                await r.read()
                return r.status

        tasks = [asyncio.create_task(one(i)) for i in range(60)]
        await asyncio.sleep(0.05)  # kept: requests in flight before some are cancelled
        for t in tasks[1::5]:
            t.cancel()  # clients that give up, some while queued for a connection
        results = await asyncio.gather(*tasks, return_exceptions=True)
        statuses = [r for r in results if isinstance(r, int)]
        assert set(statuses) <= {200, 502} and statuses.count(200) >= 30

        def settled() -> bool:
            st = gw.gateway.forwarder.stats()[up.url]
            return st["open"] == st["idle"] and st["waiting"] == 0  # nothing in use, nothing leaked

        await eventually(settled)
        assert gw.gateway.forwarder.stats()[up.url]["open"] <= 3
        assert await one(1) == 200
    assert up.open <= 3


# -- request bodies -------------------------------------------------------------------------------


async def test_chunked_request_body_is_rechunked(keystile, raw_upstream) -> None:
    up = await raw_upstream()
    gw = await keystile(routes=open_route(up.url))
    # Streamed: the body arrives over time, so it is forwarded as it comes.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"POST /up HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n"
    )
    await writer.drain()
    await eventually(lambda: len(up.requests) == 0 and up.connections == 1)
    for part in (b"6\r\n, big \r\n", b"5\r\nworld\r\n", b"0\r\n\r\n"):
        await asyncio.sleep(0.05)  # kept: a client sending its chunked body slowly
        writer.write(part)
        await writer.drain()
    raw = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200")
    seen = up.requests[-1]
    assert seen.body == b"hello, big world"
    assert seen.header("Transfer-Encoding") == ["chunked"] and seen.header("Content-Length") == []
    assert seen.raw_body.endswith(b"0\r\n\r\n")
    # All at once: sent with the head, still chunked.
    await quiet(gw, up.url)
    status, _, _ = await raw_request(
        gw.port,
        b"POST /up HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
    )
    assert status == 200
    assert up.requests[-1].body == b"abc" and up.requests[-1].header("Transfer-Encoding") == ["chunked"]
    # Empty chunked body.
    await quiet(gw, up.url)
    status, _, _ = await raw_request(
        gw.port, b"POST /up HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n"
    )
    assert status == 200 and up.requests[-1].body == b"" and up.requests[-1].raw_body == b"0\r\n\r\n"
    assert up.connections == 1  # every exchange completed cleanly, so the connection was reused


async def test_content_length_body_streams_exactly(keystile, raw_upstream) -> None:
    up = await raw_upstream()
    gw = await keystile(routes=open_route(up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"PUT /up HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 10\r\nConnection: close\r\n\r\n01234")
    await writer.drain()
    await asyncio.sleep(0.1)  # kept: a client sending its body slowly
    writer.write(b"56789")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200")
    seen = up.requests[-1]
    assert seen.body == b"0123456789" and seen.header("Content-Length") == ["10"]
    assert seen.header("Transfer-Encoding") == []


async def test_early_upstream_answer_during_upload_is_passed_on(keystile, raw_upstream) -> None:
    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only; refuse the body unread
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
        await writer.drain()
        await asyncio.sleep(0.5)  # kept: the upstream holds the connection open after its early answer

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url))

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(32):
            await asyncio.sleep(0.002)  # kept: an upload that trickles
            yield b"u" * 65536

    async with aiohttp.ClientSession() as s, s.post(gw.url + "/up", data=upload()) as r:
        assert r.status == 413 and await r.read() == b"too big!"
    # The body was never sent in full: that connection must not carry another request.
    await eventually(lambda: gw.gateway.forwarder.stats()[up.url]["open"] == 0)


async def test_client_body_cut_short_is_never_completed_upstream(keystile, raw_upstream) -> None:
    up = await raw_upstream()
    gw = await keystile(routes=open_route(up.url))
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    await eventually(lambda: up.connections == 1)
    writer.close()  # mid-body
    await eventually(lambda: up.open == 0)
    assert up.requests == []  # the upstream never saw a complete request
    assert gw.gateway.forwarder.stats()[up.url]["open"] == 0


# -- response framing -----------------------------------------------------------------------------


async def test_close_delimited_response_body(keystile, raw_upstream) -> None:
    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        await up.next_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for i in range(5):
            writer.write(b"part%d;" % i)
            await writer.drain()
            await asyncio.sleep(0.02)  # kept: a body that trickles

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url))
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(gw.url + "/x") as r:
                assert r.status == 200
                assert await r.read() == b"part0;part1;part2;part3;part4;"
    assert up.connections == 2


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this",  # EOF before Content-Length
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n",  # EOF mid-chunked
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\nzz\r\n",  # bad chunk size
    ],
)
async def test_broken_body_after_headers_aborts_the_client(keystile, raw_upstream, reply: bytes) -> None:
    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        await up.next_request(reader)
        writer.write(reply)
        await writer.drain()
        await asyncio.sleep(0.2)  # let the first body bytes go out to the client before the cut

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url))
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/x") as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_read_timeout_after_headers_aborts_the_client(keystile, raw_upstream) -> None:
    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        await up.next_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
        await writer.drain()
        await reader.read(1)  # silent until the gateway gives up and closes

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url), upstream={"read_timeout": 0.3})
    started = time.monotonic()
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/x") as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    assert time.monotonic() - started < 3
    await eventually(lambda: up.open == 0)


async def test_interim_responses_are_skipped(keystile, raw_upstream) -> None:
    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        while await up.next_request(reader) is not None:
            writer.write(
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                b"HTTP/1.1 201 Created\r\nX-Final: yes\r\nContent-Length: 4\r\n\r\ndone"
            )
            await writer.drain()

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url))
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(gw.url + "/x", data=b"body") as r:
                assert r.status == 201
                assert r.headers["X-Final"] == "yes" and "Link" not in r.headers
                assert await r.read() == b"done"
            await quiet(gw, up.url)
    assert up.connections == 1


async def test_bodiless_responses_end_the_connection(keystile, raw_upstream) -> None:
    """HEAD, 204 and 304 answers are relayed whole, and their connection carries nothing more:
    servers are known to send the body these must not have (see tests/adversarial)."""

    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        while (req := await up.next_request(reader)) is not None:
            path = req.line.split(" ")[1]
            if req.method == "HEAD":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nX-Head: 1\r\n\r\n")
            elif path == "/204":
                writer.write(b"HTTP/1.1 204 No Content\r\nX-Empty: 1\r\n\r\n")
            elif path == "/304":
                writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n')
            else:
                writer.write(OK)
            await writer.drain()

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url))
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(gw.url + "/x") as r:
                assert r.status == 200 and await r.read() == b"ok"
            await quiet(gw, up.url)
            assert up.open == 1  # a body-carrying answer keeps the connection
            async with s.head(gw.url + "/x") as r:
                assert r.status == 200 and r.headers["Content-Length"] == "1000" and r.headers["X-Head"] == "1"
            await eventually(lambda: up.open == 0)
            async with s.get(gw.url + "/204") as r:
                assert r.status == 204 and await r.read() == b""
            await eventually(lambda: up.open == 0)
            async with s.get(gw.url + "/304") as r:
                assert r.status == 304 and r.headers["ETag"] == '"v1"'
            await eventually(lambda: up.open == 0)
    assert len(up.requests) == 8
    assert up.connections == 6  # the GET's connection served the HEAD, then each one closed
    assert gw.gateway.forwarder.stats()[up.url]["open"] == 0


async def test_two_responses_in_one_write_relay_only_the_first(keystile, raw_upstream) -> None:
    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        while await up.next_request(reader) is not None:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
                b"HTTP/1.1 200 OK\r\nX-Second: 1\r\nContent-Length: 6\r\n\r\nsecond"
            )
            await writer.drain()

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url))
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"  # not "200 OKOK"
        assert b"X-Second" not in head and body == b"first"
        # The second response was never an answer, and the connection carries nothing more.
        await eventually(lambda: up.open == 0)
    assert up.connections == 2
    assert gw.gateway.forwarder.stats()[up.url]["open"] == 0


async def test_duplicate_response_headers_keep_order(keystile, raw_upstream) -> None:
    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        await up.next_request(reader)
        writer.write(
            b"HTTP/1.1 200 Fine\r\nSet-Cookie: a=1\r\nX-Mid: m\r\nSet-Cookie: b=2\r\n"
            b"Connection: X-Secret\r\nX-Secret: s\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    head = raw.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 200 Fine"
    names = [line.split(b":")[0] for line in head[1:]]
    assert [n for n in names if n in (b"Set-Cookie", b"X-Mid")] == [b"Set-Cookie", b"X-Mid", b"Set-Cookie"]
    assert b"Set-Cookie: a=1" in head and b"Set-Cookie: b=2" in head
    assert b"X-Secret" not in names


@pytest.mark.parametrize(
    ("status_line", "expected"),
    [
        (b"HTTP/1.1 200 Fine", b"HTTP/1.1 200 Fine"),
        (b"HTTP/1.1 200 ", b"HTTP/1.1 200 OK"),
        (b"HTTP/1.1 404 Gone\x1b[31m\x00", b"HTTP/1.1 404 Not Found"),
    ],
)
async def test_reason_phrase_is_relayed_only_when_clean(
    keystile, raw_upstream, status_line: bytes, expected: bytes
) -> None:
    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        await up.next_request(reader)
        writer.write(status_line + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert raw.split(b"\r\n")[0] == expected


# -- flow control ---------------------------------------------------------------------------------


async def test_slow_client_does_not_make_the_gateway_buffer_the_body(keystile, raw_upstream) -> None:
    sent = 0
    total = 1 << 30  # far more than any buffer on the way

    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        nonlocal sent
        await up.next_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"z" * 65536
        while sent < total:
            writer.write(block)
            sent += len(block)
            await writer.drain()

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET /big HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        await writer.drain()
        got = len(await reader.read(65536))
        # Stop reading; the upstream must stall soon after (every buffer on the way is full).
        stalled_at, deadline = -1, time.monotonic() + 10
        while sent != stalled_at:
            assert time.monotonic() < deadline, "the upstream kept sending to a client that does not read"
            stalled_at = sent
            await asyncio.sleep(0.3)
        assert sent < 64 << 20, f"{sent >> 20} MB left the upstream for a client that read {got} bytes"
        buffered = gw.gateway.forwarder.stats()[up.url]["buffered_bytes"]
        assert buffered <= HIGH_WATER + 512 * 1024  # the mark plus at most one socket read
        # Reading again resumes the flow.
        for _ in range(50):
            got += len(await asyncio.wait_for(reader.read(1 << 20), 5))
        assert sent > stalled_at
    finally:
        writer.close()
    # The client left mid-body: the upstream connection is closed, not pooled.
    await eventually(lambda: up.open == 0)
    await eventually(lambda: gw.gateway.forwarder.stats()[up.url]["open"] == 0)


# -- TLS ------------------------------------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path] | None:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            return None
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-addext", "basicConstraints=critical,CA:TRUE"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        return cert, key
    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    crt = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pkey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(pkey, hashes.SHA256())
    )
    cert.write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        pkey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


@pytest.fixture
async def tls_upstream(tmp_path: Path):
    pair = _self_signed(tmp_path)
    if pair is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available")
    cert, key = pair
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server_names: list[str | None] = []
    ctx.sni_callback = lambda _sock, name, _ctx: server_names.append(name)  # type: ignore[assignment,func-returns-value]

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        if request.path == "/big":
            resp = web.StreamResponse()
            await resp.prepare(request)
            for _ in range(64):
                await resp.write(b"t" * 65536)
            await resp.write_eof()
            return resp
        return web.json_response({"path": request.raw_path, "body_bytes": len(body), "tls": request.secure})

    runner = web.ServerRunner(web.Server(handle), shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = int(runner.addresses[0][1])
    yield f"https://localhost:{port}", cert, server_names
    await runner.cleanup()


async def test_https_upstream(keystile, tls_upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    origin, cert, server_names = tls_upstream
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test CA through the default context
    gw = await keystile(routes=open_route(origin))
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            async with s.post(f"{gw.url}/tls/{i}", data=b"x" * 1000) as r:
                assert r.status == 200
                assert await r.json() == {"path": f"/tls/{i}", "body_bytes": 1000, "tls": True}
            await quiet(gw, origin)

        async def upload() -> AsyncIterator[bytes]:
            for _ in range(12):  # under the upstream's 1 MiB client_max_size
                await asyncio.sleep(0.005)  # kept: an upload that trickles
                yield b"u" * 65536

        async with s.post(gw.url + "/tls/up", data=upload()) as r:  # streamed, re-chunked over TLS
            assert (await r.json())["body_bytes"] == 12 * 65536
        await quiet(gw, origin)
        async with s.get(gw.url + "/big") as r:  # chunked, several MB: flow control over TLS
            got = 0
            async for chunk in r.content.iter_chunked(65536):
                got += len(chunk)
                await asyncio.sleep(0.001)  # kept: a client that reads slowly
            assert got == 64 * 65536
    assert server_names == ["localhost"]  # SNI sent; one handshake for all requests


async def test_https_upstream_with_untrusted_certificate_is_502_upstream_tls(
    keystile, tls_upstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    origin, _, _ = tls_upstream
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    gw = await keystile(routes=open_route(origin))
    with caplog.at_level(logging.WARNING, logger="keystile.proxy"):
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.get(gw.url + "/x") as r:
                    assert r.status == 502
                    body = await r.json()
                    assert body == {
                        "error": "upstream_tls",
                        "message": "The upstream's TLS certificate could not be verified or the TLS handshake failed.",
                    }
            async with s.get(gw.admin_url + "/metrics") as r:
                metrics = await r.text()
    # The reason is in the log, not in the body.
    reasons = [rec.getMessage() for rec in caplog.records if "certificate verify failed" in rec.getMessage()]
    assert len(reasons) == 2 and "self-signed" in reasons[0]
    assert 'keystile_upstream_errors_total{kind="upstream_tls"} 2.0' in metrics
    assert 'kind="upstream_unreachable"' not in metrics


# -- request serialisation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [("X-A", "b\r\nX-Evil: 1"), ("X-A", "b\rc"), ("X-A", "b\nc"), ("X-A", "b\x00c"), ("X-\r\nA", "b")],
)
def test_head_refuses_cr_lf_nul(name: str, value: str) -> None:
    with pytest.raises(UnsafeHeader):
        serialize_head("GET", "/", [("Host", "h"), (name, value)], False)
    with pytest.raises(UnsafeHeader):
        serialize_head("GET", "/a\r\nX: y", [("Host", "h")], False)
    with pytest.raises(UnsafeHeader):
        serialize_head("GET", "/a HTTP/1.1", [("Host", "h")], False)
    ok = serialize_head("GET", "/p?q=1", [("Host", "h"), ("X-B", "1"), ("X-B", "2")], True, "X-Id: 1\r\n")
    assert ok == b"GET /p?q=1 HTTP/1.1\r\nHost: h\r\nX-B: 1\r\nX-B: 2\r\nX-Id: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    ident = IdentityRecord("key_1", b"d", "ks_live_Ab12", "prn_1", "alice\r\nX-Evil: 1", "p1", ("read",), None, "live")
    with pytest.raises(UnsafeHeader):
        identity_lines(("A", "B", "C", "D", "E"), ident)


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Bad: a\nX-Injected: 1\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"b" * 70000 + b"\r\nContent-Length: 2\r\n\r\nok",
    ],
)
async def test_malformed_or_unexpected_responses_are_502(keystile, raw_upstream, reply: bytes) -> None:
    async def script(up: RawUpstream, reader, writer, n: int) -> None:
        await up.next_request(reader)
        writer.write(reply)
        await writer.drain()
        await reader.read(1)

    up = await raw_upstream(script)
    gw = await keystile(routes=open_route(up.url))
    status, _, body = await raw_request(gw.port, b"GET /x HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
    assert status == 502 and json.loads(body)["error"] == "upstream_bad_response"
