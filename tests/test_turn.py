"""Writes held to the end of the event-loop turn (gateway.turn), over real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from gateway.turn import BatchedTransport, turn_writes


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport


@pytest.fixture
async def pair() -> AsyncIterator[tuple[BatchedTransport, socket.socket]]:
    """A batched transport writing to ``peer``, a plain non-blocking socket we read directly."""
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(_Sink, sock=ours)
    batched = BatchedTransport(transport, turn_writes(loop))
    yield batched, peer
    transport.abort()
    peer.close()


def _received(peer: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = peer.recv(65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_writes_go_out_together_when_the_turn_ends(pair: tuple[BatchedTransport, socket.socket]) -> None:
    batched, peer = pair
    batched.write(b"HTTP/1.1 200 OK\r\n")
    batched.writelines([b"Content-Length: 2\r\n\r\n", b"ok"])
    assert _received(peer) == b""  # nothing sent while the turn is still running
    assert batched.get_write_buffer_size() == 17 + 21 + 2
    await _turns()
    assert _received(peer) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert batched.get_write_buffer_size() == 0


@pytest.mark.parametrize("end", ["close", "abort"])
async def test_closing_sends_what_is_queued_first(pair: tuple[BatchedTransport, socket.socket], end: str) -> None:
    batched, peer = pair
    batched.write(b"last words")
    getattr(batched, end)()  # abort: a client cut off mid-response still gets what came before
    await _turns()
    assert _received(peer) == b"last words"
    if end == "close":
        assert peer.recv(1) == b""  # then the end of the stream


async def test_writes_to_many_transports_keep_each_ones_order() -> None:
    loop = asyncio.get_running_loop()
    pairs = []
    for _ in range(3):
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        transport, _ = await loop.create_connection(_Sink, sock=ours)
        pairs.append((BatchedTransport(transport, turn_writes(loop)), transport, peer))
    try:
        for round_ in range(3):
            for i, (batched, _, _) in enumerate(pairs):
                batched.write(b"%d.%d;" % (i, round_))
        await _turns()
        for i, (_, _, peer) in enumerate(pairs):
            assert _received(peer) == b"%d.0;%d.1;%d.2;" % (i, i, i)
    finally:
        for _, transport, peer in pairs:
            transport.abort()
            peer.close()


async def test_a_closed_transport_is_skipped_without_holding_back_the_others() -> None:
    loop = asyncio.get_running_loop()
    a_ours, a_peer = socket.socketpair()
    b_ours, b_peer = socket.socketpair()
    b_peer.setblocking(False)
    a_t, _ = await loop.create_connection(_Sink, sock=a_ours)
    b_t, _ = await loop.create_connection(_Sink, sock=b_ours)
    try:
        a, b = BatchedTransport(a_t, turn_writes(loop)), BatchedTransport(b_t, turn_writes(loop))
        a.write(b"lost")
        b.write(b"kept")
        a_t.abort()  # the real transport goes away behind the wrapper's back
        await _turns()
        assert _received(b_peer) == b"kept"
    finally:
        b_t.abort()
        a_peer.close()
        b_peer.close()
