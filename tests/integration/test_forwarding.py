"""Forwarding through real sockets: request-target safety, smuggling, header hygiene, failures."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.upstream import RecordingUpstream, exchange, malformed_upstream, raw_request


def req(target: str, *headers: str, method: str = "GET", body: str = "") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *headers, "Connection: close"]
    if not any(h.lower().startswith("host:") for h in headers):
        lines.insert(1, "Host: gw.test")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


# -- request target ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/public/../admin/x",
        "/public/%2e%2e/admin/x",
        "/public/%2E%2E/admin/x",
        "/public/./../admin/x",
        "//admin/x",
        "/public//../admin/x",
    ],
)
async def test_dot_segments_never_reach_a_protected_route_without_a_key(
    keystile, upstream: RecordingUpstream, target: str
) -> None:
    gw = await keystile()
    status, _, body = await raw_request(gw.port, req(target))
    # The decision is made on the normalized path /admin/x, which needs a key.
    assert status == 401, body
    assert upstream.received == []


async def test_normalized_path_is_what_is_forwarded(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    key = await gw.key(grant=("admin",))
    status, _, _ = await raw_request(
        gw.port, req("/public/%2e%2e/admin/a%20b//c?q=%2F&x", f"X-API-Key: {key}")
    )
    assert status == 200
    assert upstream.received[-1].raw_path == "/admin/a%20b/c?q=%2F&x"


@pytest.mark.parametrize(
    "target",
    [
        "/public%2fadmin",
        "/public%2Fadmin/x",
        "/public/..%2fadmin",
        "/public%5cadmin",
        "/..",
        "/public/../../x",
        "/%zz",
        "/a%00b",
    ],
)
async def test_ambiguous_paths_are_refused(keystile, upstream: RecordingUpstream, target: str) -> None:
    gw = await keystile()
    status, _, body = await raw_request(gw.port, req(target))
    assert status == 400
    assert json.loads(body)["error"] == "bad_request"
    assert upstream.received == []


async def test_absolute_form_target_is_never_followed(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    key = await gw.key()
    for target in ("http://169.254.169.254/latest/meta-data", "http://gw.test/public/x"):
        status, _, _ = await raw_request(gw.port, req(target, f"X-API-Key: {key}"))
        assert status == 400
    assert upstream.received == []


async def test_no_route_is_404_json(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile(routes=[{"prefix": "/api", "upstream": upstream.url}])
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/apix") as r:
        assert r.status == 404
        assert (await r.json())["error"] == "no_route"


async def test_most_specific_route_wins(keystile, upstream: RecordingUpstream) -> None:
    other = RecordingUpstream()
    await other.start()
    try:
        gw = await keystile(
            routes=[
                {"prefix": "/", "upstream": upstream.url, "auth": "none"},
                {"prefix": "/api/v2", "upstream": other.url + "/base", "auth": "none", "strip_prefix": True},
                {"prefix": "/api", "upstream": upstream.url, "auth": "none", "methods": ["POST"]},
                {"prefix": "/api", "upstream": other.url, "auth": "none", "host": "special.test"},
            ]
        )
        await raw_request(gw.port, req("/api/v2/items?x=1"))
        assert other.received[-1].raw_path == "/base/items?x=1"
        await raw_request(
            gw.port,
            req(
                "/api/thing",
                method="POST",
                body="",
            ),
        )
        assert upstream.received[-1].raw_path == "/api/thing"
        await raw_request(gw.port, req("/api/thing", "Host: special.test:8080"))
        assert other.received[-1].raw_path == "/api/thing"
        await raw_request(gw.port, req("/api/thing"))  # GET, other host: falls to "/"
        assert upstream.received[-1].method == "GET" and upstream.received[-1].raw_path == "/api/thing"
    finally:
        await other.stop()


# -- smuggling and malformed requests ---------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        # CL.TE
        "POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        # TE.TE obfuscations
        "POST /public/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
        "POST /public/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        "POST /public/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        "POST /public/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        # conflicting lengths
        "POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        # bare CR, bare LF inside a value, NUL
        "GET /public/x HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n",
        "GET /public/x HTTP/1.1\r\nHost: a\r\nX-A: b\nX-Keystile-Owner: mallory\r\n\r\n",
        "GET /public/x HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n",
        # duplicate Host
        "GET /public/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ],
)
async def test_malformed_requests_are_400_and_never_forwarded(
    keystile, upstream: RecordingUpstream, raw: str
) -> None:
    gw = await keystile()
    status, _, _ = await raw_request(gw.port, raw.encode("latin-1"))
    assert status == 400
    await asyncio.sleep(0.05)  # kept: time for a forward that must never come to arrive
    assert upstream.received == [], upstream.received


# -- headers ------------------------------------------------------------------------------------


async def test_hop_by_hop_headers_removed_both_ways(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    status, headers, _ = await raw_request(
        gw.port,
        req(
            "/public/hop",
            "Connection: keep-alive, X-Drop-Me",
            "X-Drop-Me: 1",
            "Keep-Alive: timeout=5",
            "TE: trailers",
            "Upgrade: websocket",
            "Proxy-Authorization: Basic abc",
            "X-Keep: 1",
        ),
    )
    assert status == 200
    sent = {k.lower() for k, _ in upstream.received[-1].headers}
    assert {"x-drop-me", "keep-alive", "te", "upgrade", "proxy-authorization"}.isdisjoint(sent)
    assert "x-keep" in sent
    assert "x-private" not in headers and "keep-alive" not in headers and "proxy-authenticate" not in headers
    assert headers["x-public"] == "ok"


async def test_header_order_and_query_pass_unchanged(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    await raw_request(
        gw.port, req("/public/x?b=2&a=1&a=3&e=%20", "X-Zeta: 1", "X-Alpha: 2", "X-Mid: 3", "X-Alpha: 4")
    )
    seen = upstream.received[-1]
    assert seen.raw_path == "/public/x?b=2&a=1&a=3&e=%20"
    names = [k for k, _ in seen.headers if k.startswith("X-") and not k.startswith("X-Forwarded")]
    assert names == ["X-Zeta", "X-Alpha", "X-Mid", "X-Alpha"]
    assert seen.header("X-Alpha") == ["2", "4"]


async def test_forwarded_headers_from_untrusted_peer_are_replaced(
    keystile, upstream: RecordingUpstream
) -> None:
    gw = await keystile()
    await raw_request(
        gw.port,
        req(
            "/public/x",
            "X-Forwarded-For: 6.6.6.6",
            "X-Forwarded-Host: evil",
            "X-Forwarded-Proto: https",
            "Forwarded: for=6.6.6.6",
        ),
    )
    seen = upstream.received[-1]
    assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.header("X-Forwarded-Host") == ["gw.test"]
    assert seen.header("X-Forwarded-Proto") == ["http"]
    assert seen.header("Forwarded") == []


async def test_forwarded_chain_extended_for_trusted_proxy(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile(proxy={"trusted_proxies": ["127.0.0.0/8"]})
    await raw_request(
        gw.port,
        req(
            "/public/x",
            "X-Forwarded-For: 203.0.113.9",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: api.example.com",
        ),
    )
    seen = upstream.received[-1]
    assert seen.header("X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == ["https"]
    assert seen.header("X-Forwarded-Host") == ["api.example.com"]


async def test_host_rewritten_unless_preserved(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile(
        routes=[
            {"prefix": "/keep", "upstream": upstream.url, "auth": "none", "preserve_host": True},
            {"prefix": "/", "upstream": upstream.url, "auth": "none"},
        ]
    )
    await raw_request(gw.port, req("/x"))
    assert upstream.received[-1].header("Host") == [f"127.0.0.1:{upstream.port}"]
    await raw_request(gw.port, req("/keep/x"))
    assert upstream.received[-1].header("Host") == ["gw.test"]


async def test_query_key_source_is_stripped(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile(proxy={"query_param": "api_key"})
    key = await gw.key()
    status, _, _ = await raw_request(gw.port, req(f"/x?a=1&api_key={key}&b=2"))
    assert status == 200
    assert upstream.received[-1].raw_path == "/x?a=1&b=2"


# -- upstream behaviour -------------------------------------------------------------------------


async def test_redirects_are_passed_back_not_followed(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    status, headers, _ = await raw_request(gw.port, req("/public/redirect"))
    assert status == 302
    assert headers["location"] == "http://169.254.169.254/latest"
    assert len(upstream.received) == 1


async def test_read_timeout_is_504_json(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile(upstream={"read_timeout": 0.3})
    status, _, body = await raw_request(gw.port, req("/public/hang"))
    assert status == 504 and json.loads(body)["error"] == "upstream_timeout"


async def test_connect_timeout_is_504(keystile) -> None:
    # A listening socket whose accept queue is full never completes new handshakes.
    import socket

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        gw = await keystile(
            routes=[{"prefix": "/", "upstream": f"http://127.0.0.1:{port}", "auth": "none"}],
            upstream={"connect_timeout": 0.3},
        )
        status, _, body = await raw_request(gw.port, req("/x"), timeout=5)
        assert status in (504, 502)
        assert json.loads(body)["error"] in ("upstream_timeout", "upstream_unreachable")
    finally:
        for s in fillers:
            s.close()
        lsock.close()


async def test_refused_is_502(keystile) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    gw = await keystile(routes=[{"prefix": "/", "upstream": f"http://127.0.0.1:{port}", "auth": "none"}])
    status, _, body = await raw_request(gw.port, req("/x"))
    assert status == 502 and json.loads(body)["error"] == "upstream_unreachable"


async def test_reset_is_502(keystile) -> None:
    gw = await keystile()
    status, _, body = await raw_request(gw.port, req("/public/reset"))
    assert status == 502 and json.loads(body)["error"] == "upstream_unreachable"


@pytest.mark.parametrize(
    "reply",
    [b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"],
)
async def test_malformed_upstream_response_is_502(keystile, reply: bytes) -> None:
    server, port = await malformed_upstream(reply)
    try:
        gw = await keystile(routes=[{"prefix": "/", "upstream": f"http://127.0.0.1:{port}", "auth": "none"}])
        status, _, body = await raw_request(gw.port, req("/x"))
        assert status == 502 and json.loads(body)["error"] == "upstream_bad_response"
    finally:
        server.close()


async def test_client_disconnect_cancels_upstream_request(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(req("/public/hang"))
    await writer.drain()
    for _ in range(50):
        if upstream.received:
            break
        await asyncio.sleep(0.02)
    assert upstream.received
    writer.close()
    for _ in range(100):
        if upstream.cancelled:
            break
        await asyncio.sleep(0.02)
    assert upstream.cancelled == 1


async def test_methods_and_bodies_pass(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    async with aiohttp.ClientSession() as s:
        for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            async with s.request(method, gw.url + "/public/echo", data=b"hello") as r:
                assert r.status == 200
                assert upstream.received[-1].method == method
                assert upstream.received[-1].body_bytes == 5
        async with s.head(gw.url + "/public/echo") as r:
            assert r.status == 200


# -- response framing: a complete upstream answer is relayed as bytes ------------------------


@pytest.mark.parametrize(
    ("reply", "method", "expect_head", "absent", "body"),
    [
        # 204 cannot carry a body: the upstream's Content-Length is dropped, others kept.
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-A: 1\r\n\r\n", "GET",
         [b"HTTP/1.1 204 No Content", b"X-A: 1"], [b"content-length"], b""),
        # Chunked upstream, complete: relayed with the body's length instead.
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "GET",
         [b"HTTP/1.1 200 OK", b"Content-Length: 3", b"X-A: 1"], [b"transfer-encoding"], b"abc"),
        # A header the Connection header names goes; the upstream's Date and reason phrase stay.
        (b"HTTP/1.1 299 Custom Thing\r\nConnection: X-Secret\r\nX-Secret: 1\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT"
         b"\r\nContent-Length: 2\r\n\r\nok", "GET",
         [b"HTTP/1.1 299 Custom Thing", b"Date: Mon, 01 Jan 2024 00:00:00 GMT", b"Content-Length: 2"],
         [b"x-secret"], b"ok"),
        # HEAD: the upstream's length is passed on, no body follows.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "HEAD", [b"Content-Length: 10"], [], b""),
    ],
)
async def test_relayed_responses_are_framed_for_the_client(
    keystile, reply: bytes, method: str, expect_head: list[bytes], absent: list[bytes], body: bytes
) -> None:
    server, port = await malformed_upstream(reply)
    try:
        gw = await keystile(routes=[{"prefix": "/", "upstream": f"http://127.0.0.1:{port}", "auth": "none"}])
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(req("/x", method=method))
            raw = await asyncio.wait_for(reader.read(-1), 5)
        finally:
            writer.close()
        head, _, got_body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        for line in expect_head:
            assert line in lines, (line, lines)
        names = [ln.split(b":")[0].lower() for ln in lines[1:]]
        for name in absent:
            assert name not in names, (name, lines)
        assert names.count(b"date") == 1 and names.count(b"content-length") <= 1
        assert got_body == body
    finally:
        server.close()


async def test_pipelined_requests_are_answered_in_order(keystile, upstream: RecordingUpstream) -> None:
    # Responses leave at the end of the loop's turn (gateway.turn): whatever writes them (a relayed
    # answer, a streamed one, the handler's error through aiohttp), they reach the client in
    # request order, and the last one before the close it asked for.
    gw = await keystile()
    data = (
        b"GET /public/a HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /public/bytes?n=100000 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /public%2fadmin HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /public/d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    replies, closed = await exchange(gw.port, data, 4)
    assert [r.split(b" ", 2)[1] for r in replies] == [b"200", b"200", b"400", b"200"]
    assert json.loads(replies[0].partition(b"\r\n\r\n")[2])["path"] == "/public/a"
    assert replies[1].partition(b"\r\n\r\n")[2] == b"x" * 100000
    assert json.loads(replies[2].partition(b"\r\n\r\n")[2])["error"] == "bad_request"
    assert json.loads(replies[3].partition(b"\r\n\r\n")[2])["path"] == "/public/d"
    assert closed
    assert [s.raw_path for s in upstream.received] == ["/public/a", "/public/bytes?n=100000", "/public/d"]


async def test_relayed_responses_follow_the_clients_keep_alive(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    one = b"GET /public/x HTTP/1.1\r\nHost: t\r\n\r\n"
    replies, closed = await exchange(gw.port, one * 2, 2)
    assert not closed and all(r.startswith(b"HTTP/1.1 200 ") and b"Connection:" not in r for r in replies)
    replies, closed = await exchange(gw.port, b"GET /public/x HTTP/1.0\r\n\r\n", 1)
    assert replies[0].startswith(b"HTTP/1.0 200 ") and closed
    replies, closed = await exchange(gw.port, b"GET /public/x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 1)
    assert b"\r\nConnection: keep-alive\r\n" in replies[0] and not closed
