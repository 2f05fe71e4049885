"""No oracle after a rotation (issue 20, item 10): once its grace has ended, an old secret gets the
very answer an unknown key gets (``invalid_api_key``), through the proxy, whoami and
``POST /v1/keys/verify``, also while its identity is still cached from before the grace ended.

"expired_api_key" would tell whoever holds a leaked old secret that it was real. The grace is half
a second on the gateway's clock, which the test moves past its end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp

from gateway import auth
from gateway.clock import ManualClock
from gateway.keys import generate_key
from gateway.models import IdentityRecord
from tests.admin_client import AdminAPI
from tests.conftest import GatewayFactory, Running


async def answer(
    s: aiohttp.ClientSession, gw: Running, key: str, path: str
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (without Date) and body: everything a client can compare."""
    async with s.get(gw.url + path, headers={"X-API-Key": key}) as r:
        headers = {k: v for k, v in r.headers.items() if k.lower() != "date"}
        return r.status, headers, await r.read()


async def test_an_old_secret_past_its_grace_is_answered_like_an_unknown_key(
    keystile: GatewayFactory, admin: Callable[..., AdminAPI]
) -> None:
    clock = ManualClock()
    gw = await keystile(cache={"local_ttl": 60}, clock=clock)
    api = admin(gw)
    await api.principal()
    old = await api.key()
    rotated = await api.ok("POST", f"/v1/keys/{old['id']}/rotate", {"grace_seconds": 0.5})
    unknown = generate_key("ks", "live")
    paths = ("/x", "/_keystile/whoami")

    async def verify(key: str) -> Any:
        return await api.ok("POST", "/v1/keys/verify", {"key": key})

    async with aiohttp.ClientSession() as s:
        # Within the grace the old secret works, and its identity is now in the in-process tier.
        for path in paths:
            assert (await answer(s, gw, old["key"], path))[0] == 200
        assert (await verify(old["key"]))["valid"] is True

        clock.advance(0.6)
        assert clock.time() > rotated["previous_valid_until"]

        local = gw.gateway.cache.local
        hits = local.hits
        for path in paths:
            assert await answer(s, gw, old["key"], path) == await answer(s, gw, unknown, path), path
        assert (
            await verify(old["key"])
            == await verify(unknown)
            == {
                "valid": False,
                "code": "invalid_api_key",
                "identity": None,
            }
        )
        assert local.hits == hits + 3  # answered from the identity cached during the grace
        assert (await answer(s, gw, rotated["key"], "/x"))[0] == 200  # the new secret works


def test_the_decision_for_a_cached_old_secret_is_invalid_once_the_grace_ends() -> None:
    """Whichever tier holds it (in-process or Redis): the record carries the end of its grace."""
    now = time.time()
    base = dict(
        key_id="key_1", start="ks_live_x", principal_id="prn_1", principal="alice", project="p",
        scopes=("read",), env="live",
    )  # fmt: skip
    graced = IdentityRecord(digest=b"old", expires_at=now - 1, grace_until=now - 1, **base)
    assert auth.decide(graced, frozenset(), now) == (auth.INVALID, None)
    within = IdentityRecord(digest=b"old", expires_at=now + 60, grace_until=now + 60, **base)
    assert auth.decide(within, frozenset(), now) is within
    # The key itself expired during the grace: the old secret, still a real one, is told so.
    key_expired = IdentityRecord(digest=b"old", expires_at=now - 1, grace_until=now + 60, **base)
    assert auth.decide(key_expired, frozenset(), now) == (auth.EXPIRED, key_expired)
    plain = IdentityRecord(digest=b"cur", expires_at=now - 1, **base)
    assert auth.decide(plain, frozenset(), now) == (auth.EXPIRED, plain)
