from __future__ import annotations

import pytest

from gateway.paths import BadPath, parse_target


@pytest.mark.parametrize(
    ("raw", "path", "forward", "query"),
    [
        ("/", "/", "/", ""),
        ("/api/", "/api/", "/api/", ""),
        ("/public/../admin", "/admin", "/admin", ""),
        ("/public/%2e%2e/admin", "/admin", "/admin", ""),
        ("//admin", "/admin", "/admin", ""),
        ("/a/./b//c?x=1&y=%2F", "/a/b/c", "/a/b/c", "x=1&y=%2F"),
        ("/a%20b/%C3%A9", "/a b/é", "/a%20b/%C3%A9", ""),
        ("/%61dmin", "/admin", "/admin", ""),
        ("/a/b/..", "/a/", "/a/", ""),
    ],
)
def test_normalization(raw: str, path: str, forward: str, query: str) -> None:
    t = parse_target(raw)
    assert (t.path, t.forward_path(), t.query) == (path, forward, query)


@pytest.mark.parametrize(
    "raw",
    [
        "/public%2fadmin",
        "/a%5cb",
        "/..",
        "/a/../..",
        "/%zz",
        "/a%00",
        "/%ff",
        "*",
        "http://x/",
        "example.com:443",
        "/a#frag",
    ],
)
def test_refused(raw: str) -> None:
    with pytest.raises(BadPath):
        parse_target(raw)


def test_strip_prefix() -> None:
    t = parse_target("/api/v1/items/")
    assert t.forward_path(2) == "/items/"
    assert t.forward_path(3) == "/"
