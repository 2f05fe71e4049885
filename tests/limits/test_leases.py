"""Leases (Redis): a busy key spends units Redis granted its process ahead, without a round trip
per request, and a client cannot tell: every response's RateLimit fields count exactly as a
decision per request would, an expired lease's units come back, and near the limit every request
is decided in Redis again. Real Redis, real upstream, a ManualClock for expiry."""

from __future__ import annotations

import re

import aiohttp

from gateway.clock import ManualClock
from tests.conftest import GatewayFactory
from tests.servers import RedisServer
from tests.upstream import RecordingUpstream


def _routes(upstream: RecordingUpstream, limit: int) -> list[dict[str, object]]:
    return [
        {
            "prefix": "/limited",
            "upstream": upstream.url,
            "limits": [{"name": "q", "limit": limit, "window": "1h"}],
        }
    ]


async def _remaining(s: aiohttp.ClientSession, url: str, key: str) -> tuple[int, int | None]:
    async with s.get(url + "/limited/x", headers={"X-API-Key": key}) as r:
        await r.read()
        m = re.fullmatch(r'"q";r=(\d+);t=(\d+)', r.headers.get("RateLimit", ""))
        return r.status, None if m is None else int(m[1])


async def test_a_busy_key_is_decided_on_leases_with_exact_fields(
    keystile: GatewayFactory, upstream: RecordingUpstream, private_redis: RedisServer
) -> None:
    clock = ManualClock()
    ks = await keystile(routes=_routes(upstream, 1000), redis={"url": private_redis.url}, clock=clock)
    key = await ks.key()
    gate = ks.gateway.limits
    assert gate.redis is not None
    async with aiohttp.ClientSession() as s:
        seen = [await _remaining(s, ks.url, key) for _ in range(300)]
        # Every response says what a decision per request would have said.
        assert seen == [(200, 999 - i) for i in range(300)]
        trips = gate.redis.round_trips
        assert gate.leased > 200 and trips < 100  # most requests never waited for Redis

        # A lease expires: what it did not use goes back with the next decision.
        left = max(p.lease_left for p in gate.plans())
        assert left > 0
        clock.advance(0.05)
        assert await _remaining(s, ks.url, key) == (200, 699)
        assert await _remaining(s, ks.url, key) == (200, 698)
    assert len(upstream.received) == 302


async def test_near_the_limit_every_request_is_decided_in_redis(
    keystile: GatewayFactory, upstream: RecordingUpstream, private_redis: RedisServer
) -> None:
    ks = await keystile(routes=_routes(upstream, 40), redis={"url": private_redis.url}, clock=ManualClock())
    key = await ks.key()
    async with aiohttp.ClientSession() as s:
        seen = [await _remaining(s, ks.url, key) for _ in range(60)]
    assert seen[:40] == [(200, 39 - i) for i in range(40)]
    assert [st for st, _ in seen[40:]] == [429] * 20
    # Leases were granted while more than half the quota was left, never after.
    plans = ks.gateway.limits.plans()
    assert ks.gateway.limits.leased > 0 and all(p.lease_left == 0 for p in plans)
    assert len(upstream.received) == 40


async def test_lease_zero_decides_every_request_in_redis(
    keystile: GatewayFactory, upstream: RecordingUpstream, private_redis: RedisServer
) -> None:
    ks = await keystile(
        routes=_routes(upstream, 1000),
        redis={"url": private_redis.url},
        limits={"lease": 0},
        clock=ManualClock(),
    )
    key = await ks.key()
    async with aiohttp.ClientSession() as s:
        seen = [await _remaining(s, ks.url, key) for _ in range(50)]
    assert seen == [(200, 999 - i) for i in range(50)]
    gate = ks.gateway.limits
    assert gate.leased == 0 and gate.redis is not None and gate.redis.round_trips >= 50


async def test_leases_over_two_policies_keep_both_counts_exact(
    keystile: GatewayFactory, upstream: RecordingUpstream, private_redis: RedisServer
) -> None:
    limits = [{"name": "q", "limit": 1000, "window": "1h"}, {"name": "d", "limit": 5000, "window": "1d"}]
    routes = [{"prefix": "/limited", "upstream": upstream.url, "limits": limits}]
    ks = await keystile(routes=routes, redis={"url": private_redis.url}, clock=ManualClock())
    key = await ks.key()
    async with aiohttp.ClientSession() as s:
        fields = []
        for _ in range(200):
            async with s.get(ks.url + "/limited/x", headers={"X-API-Key": key}) as r:
                await r.read()
                fields.append(r.headers["RateLimit"])
    assert ks.gateway.limits.leased > 100
    pattern = re.compile(r'"q";r=(\d+);t=\d+, "d";r=(\d+);t=\d+')
    got = [tuple(int(x) for x in pattern.fullmatch(f).groups()) for f in fields]  # type: ignore[union-attr]
    assert got == [(999 - i, 4999 - i) for i in range(200)]
