"""Credits: a route's cost spent exactly (concurrent requests, Redis), refused at zero with 429,
refilled at a UTC calendar boundary (a ManualClock moves, no sleep) and audited, written to the
store in batches so a Redis restart loses none of what was written."""

from __future__ import annotations

import asyncio
import datetime
import json
from pathlib import Path

import aiohttp

from gateway.clock import ManualClock
from gateway.limits.credits import Credits
from gateway.models import Refill
from gateway.store import AuditFilter, KeyFilter
from gateway.store.sql_limits import next_refill
from tests.conftest import ADMIN_TOKEN, GatewayFactory
from tests.servers import RedisServer
from tests.upstream import RecordingUpstream

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _utc(*args: int) -> float:
    return datetime.datetime(*args, tzinfo=datetime.UTC).timestamp()  # type: ignore[misc]


def test_refill_boundaries_are_utc_midnights() -> None:
    daily = Refill(amount=5, every="daily")
    assert next_refill(daily, _utc(2030, 1, 31, 23, 59, 59)) == _utc(2030, 2, 1)
    assert next_refill(daily, _utc(2030, 2, 1)) == _utc(2030, 2, 2)
    monthly = Refill(amount=5, every="monthly", day=15)
    assert next_refill(monthly, _utc(2030, 1, 15, 0, 0, 1)) == _utc(2030, 2, 15)
    assert next_refill(monthly, _utc(2030, 12, 20)) == _utc(2031, 1, 15)


async def _status(s: aiohttp.ClientSession, url: str, key: str) -> tuple[int, bytes]:
    async with s.get(url, headers={"X-API-Key": key}) as r:
        return r.status, await r.read()


async def test_credits_are_spent_exactly_and_refused_at_zero(
    keystile: GatewayFactory, upstream: RecordingUpstream, private_redis: RedisServer
) -> None:
    routes = [
        {"prefix": "/dear", "upstream": upstream.url, "cost": 3},
        {"prefix": "/free", "upstream": upstream.url, "cost": 0},
        {"prefix": "/", "upstream": upstream.url},
    ]
    ks = await keystile(routes=routes, redis={"url": private_redis.url})
    key = await ks.key()
    kid = (await ks.store.list_keys(KeyFilter(), 0)).items[0].id
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        r = await s.post(f"{ks.admin_url}/v1/keys/{kid}/credits", json={"remaining": 30}, headers=AUTH)
        assert r.status == 200, await r.text()
        results = await asyncio.gather(*(_status(s, ks.url + "/dear/x", key) for _ in range(25)))
        statuses = [st for st, _ in results]
        assert statuses.count(200) == 10  # 30 credits at 3 each, however concurrent
        refused = next(body for st, body in results if st == 429)
        assert json.loads(refused)["violated-policies"] == ["credits"]
        assert (await _status(s, ks.url + "/free/x", key))[0] == 200  # cost 0 passes at zero
        shown = await (await s.get(f"{ks.admin_url}/v1/keys/{kid}/limits", headers=AUTH)).json()
        assert shown["credits"]["remaining"] == 0
        r = await s.post(f"{ks.admin_url}/v1/keys/{kid}/credits", json={"add": 6}, headers=AUTH)
        assert r.status == 200
        assert [(await _status(s, ks.url + "/dear/x", key))[0] for _ in range(3)] == [200, 200, 429]
    credits = ks.gateway.limits.credits
    assert credits is not None
    await credits.flush()
    stored = await ks.store.get_credits(kid)
    assert stored is not None and stored.remaining == 0


async def test_credits_survive_a_redis_restart(
    keystile: GatewayFactory, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        ks = await keystile(redis={"url": redis.url, "breaker_reset": 0.05})
        key = await ks.key()
        kid = (await ks.store.list_keys(KeyFilter(), 0)).items[0].id
        async with aiohttp.ClientSession() as s:
            await s.post(f"{ks.admin_url}/v1/keys/{kid}/credits", json={"remaining": 8}, headers=AUTH)
            assert [(await _status(s, ks.url + "/x", key))[0] for _ in range(5)] == [200] * 5
            credits = ks.gateway.limits.credits
            assert credits is not None
            await credits.flush()  # what the background task does every credits_flush_interval
            redis.kill()
            redis.start()  # empty: every counter is gone
        # The counter is seeded again from the store's balance: 3 left.
        assert (await ks.store.get_credits(kid)).remaining == 3  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as s:
            after = [(await _status(s, ks.url + "/x", key))[0] for _ in range(5)]
        assert after.count(200) <= 3
        assert after[-1] == 429
    finally:
        redis.stop()


async def test_refill_at_the_boundary_is_applied_once_and_audited(keystile: GatewayFactory) -> None:
    ks = await keystile()
    await ks.key()
    kid = (await ks.store.list_keys(KeyFilter(), 0)).items[0].id
    clock = ManualClock(wall=_utc(2030, 3, 1, 23, 59, 58))
    p = await ks.store.get_principal("alice")
    await ks.store.change_credits(
        kid, p.id, remaining=2, refill=Refill(amount=100, every="daily"), actor="test", now=clock.time()
    )
    a = Credits(ks.store, interval=1.0, clock=clock)
    b = Credits(ks.store, interval=1.0, clock=clock)  # a second instance
    await a.tick()
    assert (await ks.store.get_credits(kid)).remaining == 2  # type: ignore[union-attr]
    clock.advance(2.0)  # past midnight UTC
    await asyncio.gather(a.tick(), b.tick())
    state = await ks.store.get_credits(kid)
    assert state is not None and state.remaining == 100
    assert state.next_refill_at == _utc(2030, 3, 3)
    assert a.refills + b.refills == 1
    events = (await ks.store.list_audit(AuditFilter(key_id=kid))).items
    assert [e.action for e in events if e.action.startswith("credits")] == ["credits.refill", "credits.set"]
