from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.paths import BadPath, parse_general, parse_target
from tests.adversarial import budget


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


@pytest.mark.parametrize(
    "raw",
    ["/public/..;/admin", "/public/secret;jsessionid=1/x", "/public/secret%3bx/y", "/a%3B", "/a;", "/;x/a"],
)
def test_path_parameters_are_refused_by_default(raw: str) -> None:
    with pytest.raises(BadPath, match="path parameters"):
        parse_target(raw)


def test_a_semicolon_in_the_query_is_not_a_path_parameter() -> None:
    assert parse_target("/a?b=1;c=2").query == "b=1;c=2"


@pytest.mark.parametrize(
    ("raw", "path", "forward"),
    [
        # Matched on the part before ";", as Tomcat, Jetty and Spring read it; forwarded with it.
        ("/public/..;/admin/x", "/admin/x", "/admin/x"),
        ("/public/..;jsessionid=1/admin", "/admin", "/admin"),
        ("/public/.;x/secret", "/public/secret", "/public/secret"),
        ("/public/secret;jsessionid=1/x", "/public/secret/x", "/public/secret;jsessionid=1/x"),
        ("/public/secret%3bx/y", "/public/secret/y", "/public/secret;x/y"),
        ("/public;a=1;b=2/secret/", "/public/secret/", "/public;a=1;b=2/secret/"),
        ("/;x/admin", "/admin", "/admin"),
        ("/a;p=%2520", "/a", "/a;p=%2520"),
    ],
)
def test_allowed_path_parameters(raw: str, path: str, forward: str) -> None:
    t = parse_target(raw, allow_params=True)
    assert (t.path, t.forward_path()) == (path, forward)


def test_allowed_path_parameters_keep_their_segment_when_a_prefix_is_stripped() -> None:
    t = parse_target("/api;v=1/items;page=2/7", allow_params=True)
    assert t.forward_path(1) == "/items;page=2/7"


def test_allowed_path_parameters_still_refuse_climbing_above_the_root() -> None:
    with pytest.raises(BadPath):
        parse_target("/..;x/admin", allow_params=True)


# -- the plain-path shortcut gives exactly what the general parse gives --------------------------

_SEGMENT = st.text(alphabet="aZ09-._~!$&'()*+,=:@;%2e/", min_size=0, max_size=6)


@settings(max_examples=budget.examples(600), derandomize=budget.seeded(), database=None)
@given(st.lists(_SEGMENT, min_size=0, max_size=5), st.booleans(), st.booleans())
def test_plain_paths_parse_as_the_general_parser_does(parts: list[str], trailing: bool, allow: bool) -> None:
    path = "/" + "/".join(parts) + ("/" if trailing and parts else "")
    try:
        want = parse_general(path, "q=1", allow)
    except BadPath:
        want = None
    try:
        got = parse_target(path + "?q=1", allow)
    except BadPath:
        got = None
    if want is None or got is None:
        assert want is None and got is None, path
        return
    assert (got.segments, got.path, got.query) == (want.segments, want.path, want.query), path
    for skip in range(len(want.segments) + 1):
        assert got.forward_path(skip) == want.forward_path(skip), (path, skip)
