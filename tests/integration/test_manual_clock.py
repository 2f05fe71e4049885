"""A gateway started on a ManualClock reads every time from it: what it stores, what it reports and
what it decides. (A part still reading the machine's clock would show the real date here: the
manual clock starts in November 2023.)"""

from __future__ import annotations

import aiohttp

from gateway.clock import ManualClock
from gateway.models import IdentityRecord


async def metric(s: aiohttp.ClientSession, admin_url: str, name: str) -> float:
    async with s.get(admin_url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_times_stored_reported_and_decided_come_from_the_gateways_clock(keystile) -> None:
    clock = ManualClock()
    gw = await keystile(clock=clock, usage={"flush_interval": 3600})
    key = await gw.key(expires_in=60)
    created_at = clock.time()
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/x", headers={"X-API-Key": key}) as r:
            assert r.status == 200
        used_at = clock.time()
        ident = gw.gateway.authenticator.check(key)  # now the in-process entry
        assert isinstance(ident, IdentityRecord)
        assert gw.gateway.usage.last_seen(ident.key_id) == used_at  # the handler's use time
        clock.advance(7)
        assert await metric(s, gw.admin_url, "keystile_usage_flush_lag_seconds") == 7.0
        assert await gw.gateway.usage.flush()
        assert gw.gateway.usage.last_flush_at == clock.time()
        stored = await gw.store.get_key(ident.key_id)
        assert stored.created_at == created_at  # the lifecycle's creation time
        assert stored.expires_at == created_at + 60
        assert stored.last_used_at == used_at
        clock.advance(60)  # past its expiry on this clock, long before it on the machine's
        async with s.get(gw.url + "/x", headers={"X-API-Key": key}) as r:
            assert r.status == 401
            assert (await r.json())["error"] == "expired_api_key"
