"""Limits as a client of the proxy sees them: 429 with Retry-After and a problem body naming the
policy, the RateLimit fields on every response of a limited route, limits set through the admin
API reaching the proxy, a principal's pool shared by its keys, and the failure policy when Redis
dies (auth unaffected). Real Redis, real upstream, real sockets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from gateway.config import LimitConfig
from tests.conftest import ADMIN_TOKEN, GatewayFactory
from tests.servers import RedisServer
from tests.upstream import RecordingUpstream

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _routes(upstream: RecordingUpstream, limits: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return [
        {
            "prefix": "/limited",
            "upstream": upstream.url,
            "limits": limits or [{"name": "burst", "limit": 3, "window": "1m"}],
        },
        {"prefix": "/", "upstream": upstream.url},
    ]


async def _get(s: aiohttp.ClientSession, url: str, key: str) -> tuple[int, dict[str, str], bytes]:
    async with s.get(url, headers={"X-API-Key": key}) as r:
        return r.status, dict(r.headers), await r.read()


@pytest.mark.parametrize("with_redis", [False, True])
async def test_route_limit_answers_429_with_fields_and_a_problem(
    keystile: GatewayFactory, upstream: RecordingUpstream, private_redis: RedisServer, with_redis: bool
) -> None:
    extra = {"redis": {"url": private_redis.url}} if with_redis else {}
    ks = await keystile(routes=_routes(upstream), **extra)
    key = await ks.key()
    async with aiohttp.ClientSession() as s:
        answers = [await _get(s, ks.url + "/limited/x", key) for _ in range(4)]
        status, headers, _ = await _get(s, ks.url + "/free", key)
    assert [a[0] for a in answers] == [200, 200, 200, 429]
    assert answers[0][1]["RateLimit-Policy"] == '"burst";q=3;w=60'
    assert answers[0][1]["RateLimit"] == '"burst";r=2;t=20'
    assert answers[2][1]["RateLimit"] == '"burst";r=0;t=60'
    refused = answers[3]
    assert refused[1]["Content-Type"] == "application/problem+json"
    assert refused[1]["Retry-After"] == "20"
    problem = json.loads(refused[2])
    assert problem["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
    assert problem["violated-policies"] == ["burst"]
    assert problem["status"] == 429
    assert len([r for r in upstream.received if r.raw_path.startswith("/limited")]) == 3
    # A route without limits carries no fields.
    assert status == 200 and "RateLimit" not in headers


async def test_fields_can_be_turned_off(keystile: GatewayFactory, upstream: RecordingUpstream) -> None:
    ks = await keystile(routes=_routes(upstream), limits={"headers": False})
    key = await ks.key()
    async with aiohttp.ClientSession() as s:
        answers = [await _get(s, ks.url + "/limited/x", key) for _ in range(4)]
    assert [a[0] for a in answers] == [200, 200, 200, 429]
    assert all("RateLimit" not in a[1] and "RateLimit-Policy" not in a[1] for a in answers)
    assert answers[3][1]["Retry-After"] == "20"


async def test_limits_set_through_the_admin_api_apply_and_a_principal_pool_is_shared(
    keystile: GatewayFactory, upstream: RecordingUpstream, private_redis: RedisServer
) -> None:
    ks = await keystile(redis={"url": private_redis.url})
    key_a = await ks.key("pool")
    key_b = await ks.key("pool", name="second")
    async with aiohttp.ClientSession() as s:
        page = await (await s.get(ks.admin_url + "/v1/keys", headers=AUTH, params={"owner": "pool"})).json()
        kid = page["items"][-1]["id"]
        r = await s.patch(
            f"{ks.admin_url}/v1/keys/{kid}/limits",
            json={"limits": [{"name": "own", "limit": 2, "window": "1h"}]},
            headers=AUTH,
        )
        assert r.status == 200, await r.text()
        view = await r.json()
        assert view["limits"][0] == {
            "name": "own",
            "limit": 2,
            "window": 3600.0,
            "remaining": 2,
            "reset": 0.0,
        }
        statuses = [(await _get(s, ks.url + "/x", key_a))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        r = await s.patch(
            f"{ks.admin_url}/v1/principals/pool/limits",
            json={"limits": [{"name": "pool", "limit": 3, "window": "1d"}]},
            headers=AUTH,
        )
        assert r.status == 200, await r.text()
        pooled = [(await _get(s, ks.url + "/x", k))[0] for k in (key_b, key_b, key_b, key_b)]
        assert pooled == [200, 200, 200, 429]
        _, headers, body = await _get(s, ks.url + "/x", key_b)
        assert b'"violated-policies":["pool"]' in body
        assert headers["RateLimit-Policy"] == '"pool";q=3;w=86400'
        shown = await (await s.get(f"{ks.admin_url}/v1/keys/{kid}/limits", headers=AUTH)).json()
        assert shown["pool_limits"][0]["remaining"] == 0
        bad = await s.patch(
            f"{ks.admin_url}/v1/keys/{kid}/limits",
            json={"limits": [{"name": "x", "limit": 1, "window": "400d"}]},
            headers=AUTH,
        )
        assert bad.status == 422
        assert (await bad.json())["field"] == "limits[0]"


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_redis_killed_mid_load(
    keystile: GatewayFactory, upstream: RecordingUpstream, tmp_path: Path, policy: str
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        ks = await keystile(
            routes=_routes(upstream, [{"name": "big", "limit": 1_000_000, "window": "1d"}]),
            redis={"url": redis.url, "socket_timeout": 0.2, "connect_timeout": 0.2},
            limits={"on_redis_failure": policy},
        )
        key = await ks.key()
        async with aiohttp.ClientSession() as s:
            assert (await _get(s, ks.url + "/limited/x", key))[0] == 200
            redis.kill()
            seen = [(await _get(s, ks.url + "/limited/x", key))[0] for _ in range(5)]
            invalid = await _get(s, ks.url + "/limited/x", "ks_live_" + "A" * 36)
        assert set(seen) == ({200} if policy == "open" else {503})
        assert invalid[0] == 401  # authentication never fails open
        metrics = ks.gateway.metrics.render().decode() if hasattr(ks.gateway.metrics, "render") else ""
        assert "keystile_limit_redis_outages" in metrics
    finally:
        redis.stop()


async def test_two_instances_share_one_limit_exactly(
    keystile: GatewayFactory, upstream: RecordingUpstream, private_redis: RedisServer, tmp_path: Path
) -> None:
    routes = _routes(upstream, [{"name": "shared", "limit": 50, "window": "1h"}])
    a = await keystile(routes=routes, redis={"url": private_redis.url})
    b = await keystile(routes=routes, redis={"url": private_redis.url}, store={"url": a.cfg.store.url})
    key = await a.key()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def client(url: str) -> list[int]:
            return [(await _get(s, url + "/limited/x", key))[0] for _ in range(20)]

        results = await asyncio.gather(*(client(gw.url) for gw in (a, b) for _ in range(5)))
    statuses = [st for r in results for st in r]
    # 200 requests in well under the 72 s one unit takes to refill: exactly the limit passes.
    assert statuses.count(200) == 50
    assert statuses.count(429) == 150
    assert len([r for r in upstream.received if r.raw_path.startswith("/limited")]) == 50
    # ...with leases in play (each instance spent units Redis granted it ahead): still exact.
    assert a.gateway.limits.leased + b.gateway.limits.leased > 0


async def test_a_reload_that_changes_a_routes_limit_applies_it_to_keys_already_seen(
    keystile: GatewayFactory, upstream: RecordingUpstream
) -> None:
    ks = await keystile(routes=_routes(upstream))
    key = await ks.key()
    async with aiohttp.ClientSession() as s:
        first = [(await _get(s, ks.url + "/limited/x", key))[1]["RateLimit"] for _ in range(2)]
        assert first == ['"burst";r=2;t=20', '"burst";r=1;t=40']
        bigger = msgspec.convert([{"name": "burst", "limit": 10, "window": 60}], tuple[LimitConfig, ...])
        routes = tuple(msgspec.structs.replace(r, limits=bigger) if r.limits else r for r in ks.cfg.routes)
        assert await ks.gateway.reload(msgspec.structs.replace(ks.cfg, routes=routes)) is not None
        status, fields, _ = await _get(s, ks.url + "/limited/x", key)
    assert status == 200
    assert fields["RateLimit-Policy"] == '"burst";q=10;w=60'
    assert fields["RateLimit"].startswith('"burst";r=9;')
