"""Slow and numerous clients: the request-head deadline and the per-process connection cap.

A client that trickles its request head is cut off ``proxy.header_timeout`` after it opened the
connection (or, on a keep-alive connection, after the first byte of its next head); an idle
keep-alive connection is governed by ``proxy.keepalive_timeout`` instead, and a slow body by the
upstream's timeouts. Past ``proxy.max_connections`` open connections, a new one is closed at once
while the open ones keep working. Short deadlines keep these tests to about a second each.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

from tests.upstream import RecordingUpstream
from tests.waiting import until

HEAD = b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\n"
# The loop's clock ticks in milliseconds (uvloop): a cut may land a tick before the deadline as
# measured here.
TICK = 0.01


def metric(gw: object, name: str) -> float:
    text = gw.gateway.metrics.render().decode()  # type: ignore[attr-defined]
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def answer(reader: asyncio.StreamReader) -> bytes:
    """One whole response framed by Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


async def trickle(port: int, data: bytes, interval: float, limit: float = 10.0) -> tuple[float, bytes]:
    """Send ``data`` a byte every ``interval`` until the server closes the connection; the seconds
    from connecting until then, and what the server sent."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = bytearray()

    async def read() -> None:
        try:
            while chunk := await reader.read(4096):
                got.extend(chunk)
        except ConnectionError:
            pass

    reading = asyncio.ensure_future(read())
    try:
        async with asyncio.timeout(limit):
            for byte in data:
                if reading.done():
                    break
                try:
                    writer.write(bytes([byte]))
                    await writer.drain()
                except ConnectionError:
                    break
                await asyncio.wait([reading], timeout=interval)
            await reading
        return time.monotonic() - started, bytes(got)
    finally:
        reading.cancel()
        writer.close()


async def test_a_trickled_head_is_cut_off_at_the_deadline(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile(proxy={"header_timeout": 0.5})
    took, got = await trickle(gw.port, HEAD + b"X-Pad: " + b"a" * 1000, 0.02)
    # Without the deadline it would take 20 s to send (and keepalive_timeout is 75 s).
    assert 0.5 - TICK <= took < 5, took
    assert got == b""  # cut, not answered
    assert upstream.received == []
    assert metric(gw, "keystile_header_timeouts_total") == 1


async def test_a_silent_connection_is_cut_off_at_the_deadline(keystile) -> None:
    gw = await keystile(proxy={"header_timeout": 0.5})
    took, got = await trickle(gw.port, b"", 0.02)
    assert 0.5 - TICK <= took < 5 and got == b""


async def test_an_idle_keep_alive_connection_waits_for_keepalive_timeout_not_the_head_deadline(
    keystile, upstream: RecordingUpstream
) -> None:
    gw = await keystile(proxy={"header_timeout": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(HEAD + b"\r\n")
        assert (await answer(reader)).startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(0.7)  # idle for more than two head deadlines
        writer.write(HEAD + b"\r\n")
        assert (await answer(reader)).startswith(b"HTTP/1.1 200 ")
        # The next head, trickled: cut off a deadline after its first byte.
        started = time.monotonic()
        for byte in HEAD:
            writer.write(bytes([byte]))
            try:
                if await asyncio.wait_for(reader.read(1), 0.02) == b"":
                    break
            except TimeoutError:
                continue
        else:
            raise AssertionError("the trickled head was not cut off")
        assert 0.3 - TICK <= time.monotonic() - started < 5  # not from the last answer
    finally:
        writer.close()
    assert len(upstream.received) == 2


async def test_a_slow_body_is_not_cut_by_the_head_deadline(keystile) -> None:
    gw = await keystile(proxy={"header_timeout": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"POST /public/sink HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
        for _ in range(8):
            await asyncio.sleep(0.1)  # kept: the body trickles for longer than the head deadline
            writer.write(b"x")
        raw = await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert json.loads(raw.partition(b"\r\n\r\n")[2]) == {"body_bytes": 8}


async def test_a_normal_client_is_served_after_slow_clients_are_cut(keystile) -> None:
    gw = await keystile(proxy={"header_timeout": 0.5})
    slow = [asyncio.ensure_future(trickle(gw.port, HEAD + b"X-Pad: " + b"a" * 1000, 0.05)) for _ in range(30)]
    results = await asyncio.gather(*slow)
    assert all(0.5 - TICK <= took < 8 and got == b"" for took, got in results), results
    assert metric(gw, "keystile_header_timeouts_total") == 30
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(HEAD + b"Connection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(-1), 5)).startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()


async def test_connections_over_the_cap_are_closed_at_once_and_open_ones_keep_working(keystile) -> None:
    gw = await keystile(proxy={"max_connections": 3})
    open_ = []
    try:
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            open_.append((reader, writer))
            writer.write(HEAD + b"\r\n")
            assert (await answer(reader)).startswith(b"HTTP/1.1 200 ")
        assert metric(gw, "keystile_client_connections") == 3
        # The fourth is accepted by the kernel and closed by Keystile without an answer.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(HEAD + b"Connection: close\r\n\r\n")
            try:
                assert await asyncio.wait_for(reader.read(-1), 5) == b""
            except ConnectionResetError:
                pass
        finally:
            writer.close()
        assert metric(gw, "keystile_client_connections_refused_total") == 1
        # The open ones are served as before.
        for reader, writer in open_:
            writer.write(HEAD + b"\r\n")
            assert (await answer(reader)).startswith(b"HTTP/1.1 200 ")
        # One closes: a new client gets its place.
        open_.pop()[1].close()
        await until(lambda: metric(gw, "keystile_client_connections") == 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(HEAD + b"Connection: close\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(-1), 5)).startswith(b"HTTP/1.1 200 ")
        finally:
            writer.close()
    finally:
        for _, writer in open_:
            writer.close()
