"""The client's head from an upstream's response (``gateway.proxy.serialize.ResponseHeads``):
hop-by-hop and Connection-listed headers dropped, framing as aiohttp would, and its caches of what
upstreams send bounded whatever an upstream sends. Through real sockets:
``tests/integration/test_forwarding.py`` and ``test_upstream_pool.py``."""

from __future__ import annotations

import pytest

from gateway.proxy import ResponseHeads, UnsafeHeader
from gateway.proxy.serialize import _CACHE_MAX


def test_the_clients_head_drops_hop_by_hop_and_listed_headers_and_frames_the_body() -> None:
    heads = ResponseHeads()
    raw = [
        (b"X-A", b"1"),
        (b"Connection", b"x-b, close"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-B", b"2"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
    ]
    block, has_date = heads.client_head(raw, 200, b"hello", head=False)
    assert block == b"X-A: 1\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nContent-Length: 5\r\n" and has_date
    assert heads.client_head([(b"Content-Length", b"0")], 204, b"", head=False) == (b"", False)
    assert heads.client_headers(raw) == [("X-A", "1"), ("Date", "Mon, 01 Jan 2024 00:00:00 GMT")]
    with pytest.raises(UnsafeHeader):
        heads.client_head([(b"X-A", b"1\r\nX-Injected: 1")], 200, b"", head=False)


def test_reason_phrases_are_relayed_only_without_control_characters() -> None:
    heads = ResponseHeads()
    assert heads.status_tail(299, b"Fine Thanks") == b"299 Fine Thanks\r\n"
    assert heads.status_tail(404, b"Not\x01Found") == b"404 Not Found\r\n"
    assert heads.status_tail(599, b"\x7f") == b"599 \r\n"  # unknown code, no phrase to fall back on


def test_an_upstream_sending_endless_new_names_and_phrases_cannot_grow_the_caches() -> None:
    heads = ResponseHeads()
    for i in range(_CACHE_MAX + 500):
        raw = [(b"X-H%d" % i, b"v"), (b"Connection", b"x-h%d" % i), (b"X-Keep", b"k")]
        assert heads.client_head(raw, 200, b"ok", head=False) == (
            b"X-Keep: k\r\nContent-Length: 2\r\n",
            False,
        )
        assert heads.status_tail(200, b"R%d" % i) == b"200 R%d\r\n" % i
    sizes = [len(c) for c in (heads._names, heads._listed, heads._reasons, heads._tails)]
    assert max(sizes) == _CACHE_MAX
