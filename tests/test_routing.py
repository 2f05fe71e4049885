"""The route table picks the most specific route, whatever order the config lists them in."""

from __future__ import annotations

import pytest

from gateway.config import RouteConfig
from gateway.paths import parse_target
from gateway.routing import RouteTable

UP = "http://127.0.0.1:9"


def table(*routes: dict[str, object]) -> RouteTable:
    return RouteTable(tuple(RouteConfig(upstream=UP, **r) for r in routes))  # type: ignore[arg-type]


def picked(t: RouteTable, path: str, method: str = "GET", host: str = "gw.test") -> str | None:
    r = t.match(method, host, parse_target(path))
    return None if r is None else f"{r.name} {sorted(r.methods)} {r.host}".strip()


@pytest.mark.parametrize("order", [1, -1])
def test_longest_prefix_then_host_then_methods(order: int) -> None:
    routes = [
        {"prefix": "/"},
        {"prefix": "/api"},
        {"prefix": "/api/v2/items"},
        {"prefix": "/api/v2", "methods": ["POST"]},
        {"prefix": "/api/v2", "host": "*.example.com"},
        {"prefix": "/open"},
    ][::order]
    t = table(*routes)
    assert picked(t, "/api/v2/items/7") == "/api/v2/items []"
    assert picked(t, "/api/v2/other") == "/api []"  # a shared first segment is not a match
    assert picked(t, "/api/v2/other", "POST") == "/api/v2 ['POST']"
    assert picked(t, "/api/v2/x", host="eu.example.com:8443") == "/api/v2 [] *.example.com"
    assert picked(t, "/api/v3") == "/api []"
    assert picked(t, "/apix") == "/ []"  # whole segments only
    assert picked(t, "/") == "/ []"
    assert picked(t, "/open/x") == "/open []"


def test_no_catch_all_means_no_route() -> None:
    t = table({"prefix": "/api"}, {"prefix": "/api/admin", "methods": ["DELETE"]})
    assert picked(t, "/other") is None
    assert picked(t, "/") is None
    assert picked(t, "/api/admin/x") == "/api []"
    assert picked(t, "/api/admin/x", "DELETE") == "/api/admin ['DELETE']"


def test_prefixes_match_case_sensitively_by_default() -> None:
    t = table({"prefix": "/"}, {"prefix": "/admin"})
    assert picked(t, "/ADMIN/x") == "/ []"


def test_case_insensitive_routes_match_any_case() -> None:
    routes = ({"prefix": "/"}, {"prefix": "/Admin"}, {"prefix": "/admin/Keys", "methods": ["DELETE"]})
    t = RouteTable(tuple(RouteConfig(upstream=UP, **r) for r in routes), case_insensitive=True)  # type: ignore[arg-type]
    assert picked(t, "/ADMIN/x") == "/Admin []"
    assert picked(t, "/admin") == "/Admin []"
    assert picked(t, "/aDmIn/KEYS/1", "DELETE") == "/admin/Keys ['DELETE']"
    assert picked(t, "/adminx") == "/ []"
    # Matching only: the path goes upstream as sent.
    route = t.match("GET", "gw.test", parse_target("/ADMIN/X"))
    assert route is not None and route.upstream_path(parse_target("/ADMIN/X")) == "/ADMIN/X"
