"""What the listener logs of a request its parser refused: the parser's reason, never the line."""

from __future__ import annotations

import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, InvalidHeader, InvalidURLError, LineTooLong

from gateway.keys import generate_key
from gateway.listener import parse_reason

KEY = generate_key("ks", "live")


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (BadHttpMessage(f"Invalid header value char:\n\n  b'X-API-Key: {KEY}\\x01'\n   ^"), "Invalid header value char"),
        (
            BadHttpMessage("Transfer-Encoding can't be present with Content-Length:\n\n  b'Transfer-Encoding: x'"),
            "Transfer-Encoding can't be present with Content-Length",
        ),
        (BadStatusLine(error=f"Bad status line:\n  Invalid HTTP version:\n\n  b'GET /?k={KEY} HTTP/9'"), "Invalid HTTP version"),
        (BadStatusLine(f"GET /?k={KEY} HTTP/1.1 x"), "Bad status line"),
        (LineTooLong(f"X-API-Key: {KEY}", 8190), "Got more than 8190 bytes when reading"),
        (InvalidHeader(f"X-API-Key: {KEY}".encode()), "Invalid HTTP header"),
        (InvalidURLError(f"{KEY}:443"), None),
        (BadHttpMessage(KEY), None),
        (BadHttpMessage(f"{KEY} x"), None),
        (BadHttpMessage("Duplicate 'Host' header found."), None),
    ],
)
def test_parse_reason_keeps_the_words_and_never_the_line(exc: BadHttpMessage, reason: str | None) -> None:
    assert parse_reason(exc) == reason


async def test_a_handler_that_raises_gets_a_fixed_500_and_a_log_line_without_the_message(caplog) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import json
    import logging

    from aiohttp import web

    from gateway.listener import ProxyServer
    from gateway.observability import JSONFormatter

    caplog.set_level(logging.DEBUG)

    async def raising(request: web.BaseRequest) -> web.StreamResponse:
        raise ValueError(f"cannot use {request.headers['X-API-Key']}")

    server = ProxyServer(raising, header_timeout=5, max_connections=10, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET / HTTP/1.1\r\nHost: a\r\nX-API-Key: {KEY}\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
    finally:
        await runner.cleanup()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ") and b"Connection: close" in head
    assert json.loads(body) == {"error": "internal_error", "message": "The gateway failed to handle the request."}
    lines = [JSONFormatter().format(r) for r in caplog.records]
    assert any('"error":"ValueError"' in line and "raising" in line for line in lines)  # where, not what
    assert KEY not in "\n".join(lines) + caplog.text
