"""A flood of random well-formed keys (issue 20, item 3), through real sockets and real SQLite.

The checksum is public, so anyone can mint keys that pass the format check. Such a flood must not
push valid keys out of the in-process tier (unknown keys have their own space), and one client
that keeps presenting bad keys is blocked (429 with Retry-After, before any lookup) after
``throttle.failures`` of them per window. Clients of a trusted proxy are judged by the forwarded
address; other addresses are unaffected. The throttle's clock is injected: no test sleeps through
a window or a block.

Figures for a 10,000-key flood: ``python -m benchmarks.key_flood`` (printed, not asserted here).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping

import aiohttp
import pytest

from gateway.clock import ManualClock
from gateway.keys import BASE62, with_checksum
from tests.adversarial.invariants import assert_no_key
from tests.conftest import GatewayFactory, Running

# The flooding client and a bystander: both loopback, two addresses.
FLOODER = "127.0.0.1"
BYSTANDER = "127.0.0.2"


def random_key() -> str:
    """A key anyone can mint: random body, valid checksum."""
    return with_checksum("ks_live_" + "".join(secrets.choice(BASE62) for _ in range(30)))


@pytest.fixture
async def sessions() -> AsyncIterator[dict[str, aiohttp.ClientSession]]:
    """One keep-alive client session per source address."""
    out = {
        addr: aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(addr, 0)))
        for addr in (FLOODER, BYSTANDER)
    }
    yield out
    for s in out.values():
        await s.close()


async def call(
    s: aiohttp.ClientSession, gw: Running, key: str | None, path: str = "/x", **headers: str
) -> tuple[int, Mapping[str, str], bytes]:
    if key is not None:
        headers["X-API-Key"] = key
    async with s.get(gw.url + path, headers=headers) as r:
        return r.status, r.headers, await r.read()


async def local_hit(s: aiohttp.ClientSession, gw: Running, key: str, **headers: str) -> bool:
    """The key passes (200), answered by the in-process tier without a store query."""
    cache, loader = gw.gateway.cache.local, gw.gateway.loader
    hits, loads = cache.hits, loader.store_loads
    status, _, _ = await call(s, gw, key, **headers)
    assert status == 200
    return cache.hits == hits + 1 and loader.store_loads == loads


async def metrics(gw: Running) -> str:
    async with aiohttp.ClientSession() as s, s.get(gw.admin_url + "/metrics") as r:
        return await r.text()


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


async def test_a_random_key_flood_from_one_address_neither_evicts_a_valid_key_nor_reaches_the_store(
    keystile: GatewayFactory, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    gw = await keystile(
        cache={"local_ttl": 60, "local_max_entries": 5, "negative_max_entries": 50},
        throttle={"failures": 20},
    )
    valid = await gw.key()
    flooder, bystander = sessions[FLOODER], sessions[BYSTANDER]
    assert (await call(bystander, gw, valid))[0] == 200  # cached from now on
    assert await local_hit(bystander, gw, valid)

    loads = gw.gateway.loader.store_loads
    answers: list[tuple[int, Mapping[str, str], bytes]] = []
    for _ in range(500):
        answers.append(await call(flooder, gw, random_key()))
    statuses = [a[0] for a in answers]
    assert statuses == [401] * 20 + [429] * 480
    assert gw.gateway.loader.store_loads - loads == 20  # one query per counted failure, no more
    status, headers, body = answers[-1]
    assert headers["Retry-After"] == "60" and headers["Content-Type"] == "application/json"
    assert body == (
        b'{"error":"too_many_failed_attempts",'
        b'"message":"Too many invalid API keys from this address; retry later."}'
    )
    assert_no_key("429 answers", [a[2] for a in answers] + [str(dict(a[1])) for a in answers])

    # The valid key is still answered by the in-process tier, from the bystander's address.
    assert await local_hit(bystander, gw, valid)
    # From the flooding address a key that would need a lookup waits, even a valid one: the
    # block comes before any lookup. A key the in-process tier holds as valid costs nothing and
    # passes (a failing client behind a shared address does not lock out working keys).
    fresh = await gw.key()
    loads = gw.gateway.loader.store_loads
    assert (await call(flooder, gw, fresh))[0] == 429
    assert (await call(flooder, gw, valid))[0] == 200
    assert gw.gateway.loader.store_loads == loads

    text = await metrics(gw)
    assert sample(text, "keystile_throttle_refused_total") == 481
    assert sample(text, "keystile_throttle_blocks_total") == 1
    assert sample(text, "keystile_throttle_blocked_clients") == 1
    assert 'keystile_auth_total{outcome="throttled"} 481.0' in text
    assert_no_key("/metrics", [text])


async def test_without_the_throttle_random_keys_still_cannot_evict_a_valid_key(
    keystile: GatewayFactory, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    """The issue's reproduction: 60 random keys against ``local_max_entries = 50`` evicted a valid
    key. Unknown keys now cycle a space of their own; each reaches the store once."""
    gw = await keystile(
        cache={"local_ttl": 60, "local_max_entries": 50, "negative_max_entries": 100},
        throttle={"failures": 0},
    )
    valid = await gw.key()
    s = sessions[FLOODER]
    assert (await call(s, gw, valid))[0] == 200
    flood = [random_key() for _ in range(60)]
    loads = gw.gateway.loader.store_loads
    assert [(await call(s, gw, k))[0] for k in flood] == [401] * 60
    assert gw.gateway.loader.store_loads - loads == 60
    assert await local_hit(s, gw, valid)
    assert [(await call(s, gw, k))[0] for k in flood] == [401] * 60  # again: negative hits
    assert gw.gateway.loader.store_loads - loads == 60
    assert len(gw.gateway.cache.local) == 1 and gw.gateway.cache.local.negatives == 60


async def test_the_block_starts_at_the_configured_count_and_ends_after_the_block_time(
    keystile: GatewayFactory, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    gw = await keystile(throttle={"failures": 3, "window": 60, "block": 30})
    clock = gw.gateway.throttle.clock = ManualClock()
    valid, other = await gw.key(), await gw.key()
    flooder, bystander = sessions[FLOODER], sessions[BYSTANDER]
    bad = random_key()
    assert [(await call(flooder, gw, bad))[0] for _ in range(3)] == [401] * 3
    status, headers, _ = await call(flooder, gw, bad)
    assert (status, headers["Retry-After"]) == (429, "30")
    assert (await call(flooder, gw, valid))[0] == 429
    assert (await call(flooder, gw, valid, path="/_keystile/whoami"))[0] == 429
    # Without a key, or on a route that checks none, nothing is looked up: not refused.
    assert (await call(flooder, gw, None))[0] == 401
    assert (await call(flooder, gw, None, path="/public/x"))[0] == 200
    assert (await call(bystander, gw, valid))[0] == 200  # another address is unaffected

    # Now held in-process as valid (the bystander's request): it passes even from the flooder.
    assert (await call(flooder, gw, valid))[0] == 200
    clock.advance(29.5)
    status, headers, _ = await call(flooder, gw, other)  # needs a lookup: still refused
    assert (status, headers["Retry-After"]) == (429, "1")
    clock.advance(0.5)
    assert (await call(flooder, gw, other))[0] == 200
    # The count starts over: two failures, a window later two more, and no block.
    assert [(await call(flooder, gw, random_key()))[0] for _ in range(2)] == [401] * 2
    clock.advance(60)
    assert [(await call(flooder, gw, random_key()))[0] for _ in range(2)] == [401] * 2
    assert (await call(flooder, gw, valid))[0] == 200


async def test_whoami_failures_count_and_malformed_keys_count_too(
    keystile: GatewayFactory, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    gw = await keystile(throttle={"failures": 3})
    s = sessions[FLOODER]
    assert (await call(s, gw, random_key(), path="/_keystile/whoami"))[0] == 401
    assert (await call(s, gw, "ks_live_not-a-key"))[0] == 401
    assert (await call(s, gw, random_key()))[0] == 401
    assert (await call(s, gw, random_key(), path="/_keystile/whoami"))[0] == 429


async def test_a_trusted_proxys_clients_are_judged_by_the_forwarded_address(
    keystile: GatewayFactory, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    gw = await keystile(proxy={"trusted_proxies": [f"{FLOODER}/32"]}, throttle={"failures": 3})
    valid = await gw.key()
    proxy, untrusted = sessions[FLOODER], sessions[BYSTANDER]

    async def status(s: aiohttp.ClientSession, key: str, xff: str) -> int:
        return (await call(s, gw, key, **{"X-Forwarded-For": xff}))[0]

    for _ in range(3):
        assert await status(proxy, random_key(), "203.0.113.7") == 401
    # (A key each time that no request has shown valid yet: a cached valid key passes a block.)
    assert await status(proxy, await gw.key(), "203.0.113.7") == 429
    assert await status(proxy, valid, "203.0.113.8") == 200  # the proxy's other clients
    assert (await call(proxy, gw, valid))[0] == 200  # the proxy itself
    # What a client writes left of the last untrusted hop changes nothing.
    assert await status(proxy, await gw.key(), "203.0.113.8, 203.0.113.7") == 429
    assert await status(proxy, valid, "203.0.113.7, 203.0.113.8") == 200

    # An untrusted peer's X-Forwarded-For is not believed: it is judged as itself.
    for _ in range(3):
        assert await status(untrusted, random_key(), "203.0.113.9") == 401
    assert await status(untrusted, await gw.key(), "203.0.113.10") == 429
    assert await status(proxy, valid, "203.0.113.9") == 200

    # IPv6 clients by their /64: a host cannot step around a block within its network.
    for _ in range(3):
        assert await status(proxy, random_key(), "2001:db8:1:2::1") == 401
    assert await status(proxy, await gw.key(), "2001:db8:1:2:ffff::99") == 429
    assert await status(proxy, valid, "2001:db8:1:3::1") == 200


async def test_when_keys_cannot_be_checked_nothing_counts(
    keystile: GatewayFactory, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    """503s are the gateway's failure, not the client's: they never lead to a block."""
    gw = await keystile(throttle={"failures": 2})
    await gw.store.close()  # every lookup past the in-process tier now fails
    s = sessions[FLOODER]
    answers = [(await call(s, gw, random_key()))[0] for _ in range(5)]
    assert answers == [503] * 5
    assert not gw.gateway.throttle.blocked and gw.gateway.throttle.counting == 0


async def test_a_reload_lifts_no_block(
    keystile: GatewayFactory, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    gw = await keystile(throttle={"failures": 2})
    for _ in range(2):
        await call(sessions[FLOODER], gw, random_key())
    await gw.gateway.reload(gw.cfg)
    assert (await call(sessions[FLOODER], gw, random_key()))[0] == 429
