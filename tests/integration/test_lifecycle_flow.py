"""A key's life seen from a client of the proxy, while an operator drives the admin API.

Every admin change must show through the proxy at once (the gateway drops what it cached for the
changed keys), not when a cache entry happens to expire.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.clock import ManualClock
from tests.upstream import RecordingUpstream


async def status_of(proxy_url: str, key: str, path: str = "/reports") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(proxy_url + path, headers={"X-API-Key": key}) as r:
        return r.status, await r.json()


@pytest.fixture
async def scoped(keystile, upstream: RecordingUpstream) -> Any:
    """A gateway whose every route needs the ``read`` scope, with a long cache TTL, so only
    invalidation can make a change visible within the test."""
    return await keystile(
        routes=[{"prefix": "/", "upstream": upstream.url, "scopes": ["read"]}],
        cache={"local_ttl": 300, "negative_ttl": 300},
        clock=ManualClock(),  # grace periods end when the test moves it
    )


async def test_create_narrow_rotate_with_grace_revoke(scoped, admin) -> None:
    gw, api = scoped, admin(scoped)
    await api.principal("alice", {"p1": ["read", "write"]})
    key = await api.key(name="reporting")
    assert (await status_of(gw.url, key["key"]))[0] == 200

    # Narrow the principal's grant: the same key, not re-issued, is refused at once.
    await api.ok("PATCH", "/v1/principals/alice", {"grants": {"p1": ["write"]}})
    status, body = await status_of(gw.url, key["key"])
    assert (status, body["error"]) == (403, "insufficient_scope")
    await api.ok("PATCH", "/v1/principals/alice", {"grants": {"p1": ["read", "write"]}})
    assert (await status_of(gw.url, key["key"]))[0] == 200

    # Rotate with a grace period: both secrets work until it ends, then only the new one.
    rotated = await api.ok("POST", f"/v1/keys/{key['id']}/rotate", {"grace_seconds": 1})
    assert rotated["previous_valid_until"] is not None
    assert (await status_of(gw.url, key["key"]))[0] == 200
    assert (await status_of(gw.url, rotated["key"]))[0] == 200
    clock = gw.gateway.clock
    assert isinstance(clock, ManualClock)
    clock.advance(1.2)
    status, body = await status_of(gw.url, key["key"])
    assert status == 401 and body["error"] in ("expired_api_key", "invalid_api_key")
    assert (await status_of(gw.url, rotated["key"]))[0] == 200

    # Revoke: refused at once, identical to an unknown key.
    await api.ok("POST", f"/v1/keys/{key['id']}/revoke")
    status, body = await status_of(gw.url, rotated["key"])
    assert (status, body["error"]) == (401, "invalid_api_key")
    listed = (await api.ok("GET", "/v1/keys", params={"status": "revoked"}))["items"]
    assert [k["id"] for k in listed] == [key["id"]]


async def test_rotation_without_grace_retires_the_old_secret_at_once(scoped, admin) -> None:
    gw, api = scoped, admin(scoped)
    await api.principal("alice", {"p1": ["read"]})
    key = await api.key()
    assert (await status_of(gw.url, key["key"]))[0] == 200
    rotated = await api.ok("POST", f"/v1/keys/{key['id']}/rotate")
    assert rotated["previous_valid_until"] is None
    assert (await status_of(gw.url, key["key"]))[0] == 401
    assert (await status_of(gw.url, rotated["key"]))[0] == 200


async def test_disabling_a_principal_stops_all_its_keys_until_enabled(scoped, admin) -> None:
    gw, api = scoped, admin(scoped)
    await api.principal("alice", {"p1": ["read"], "p2": ["read"]})
    await api.principal("bob", {"p1": ["read"]})
    keys = [(await api.key(project=p))["key"] for p in ("p1", "p2")]
    bobs = (await api.key("bob"))["key"]
    for k in (*keys, bobs):
        assert (await status_of(gw.url, k))[0] == 200

    await api.ok("POST", "/v1/principals/alice/disable")
    for k in keys:
        status, body = await status_of(gw.url, k)
        assert (status, body["error"]) == (401, "invalid_api_key")
    assert (await status_of(gw.url, bobs))[0] == 200  # only alice's keys

    await api.ok("POST", "/v1/principals/alice/enable")
    for k in keys:
        assert (await status_of(gw.url, k))[0] == 200


async def test_deleting_a_principal_with_its_keys_stops_them(scoped, admin) -> None:
    gw, api = scoped, admin(scoped)
    await api.principal("alice", {"p1": ["read"]})
    key = await api.key()
    assert (await status_of(gw.url, key["key"]))[0] == 200
    await api.ok("DELETE", "/v1/principals/alice", params={"with_keys": "true"}, status=204)
    assert (await status_of(gw.url, key["key"]))[0] == 401


async def test_narrowing_a_key_and_expiring_it_show_at_once(scoped, admin) -> None:
    gw, api = scoped, admin(scoped)
    await api.principal("alice", {"p1": ["read", "write"]})
    key = await api.key()
    assert (await status_of(gw.url, key["key"]))[0] == 200
    await api.ok("PATCH", f"/v1/keys/{key['id']}", {"scopes": ["write"]})
    assert (await status_of(gw.url, key["key"]))[0] == 403
    await api.ok("PATCH", f"/v1/keys/{key['id']}", {"scopes": None})
    assert (await status_of(gw.url, key["key"]))[0] == 200
    await api.ok("DELETE", f"/v1/keys/{key['id']}", status=204)
    assert (await status_of(gw.url, key["key"]))[0] == 401
