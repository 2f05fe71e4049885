"""Long-lived in-process entries are safe only while an instance can confirm it missed no
invalidation: lost messages are noticed, trust lapses without Redis, older publishers still count.

A "lost message" is staged the way it looks from outside: a writer without Redis changes the store
(so nothing is published), then the test leaves in Redis what a publisher whose message vanished
would have left (tombstones and a moved generation counter).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import redis.asyncio as aioredis

from tests.integration.test_verification_path import key_id, redis_url, status_of
from tests.servers import RedisServer

__all__ = ["redis_url"]  # the fixture, shared with the verification-path tests

SYNCED = {"local_ttl": 60, "local_ttl_synced": 300, "sync_interval": 0.2}


async def until_rejected(s: aiohttp.ClientSession, url: str, key: str, within: float) -> float:
    started = time.monotonic()
    while (status := await status_of(s, url, key)) == 200:
        elapsed = time.monotonic() - started
        assert elapsed < within, f"the revoked key still works after {elapsed:.1f}s"
        await asyncio.sleep(0.02)
    assert status == 401
    return time.monotonic() - started


async def tombstone_all(r: aioredis.Redis) -> list[bytes]:
    names: list[bytes] = await r.keys("keystile:id:*")
    for name in names:
        await r.set(name, b"x", px=10_000)
    return names


async def metric(s: aiohttp.ClientSession, gw, name: str) -> float:  # type: ignore[no-untyped-def]
    async with s.get(gw.admin_url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_a_lost_invalidation_message_is_noticed_within_two_checks(keystile, redis_url: str) -> None:
    gw = await keystile(redis={"url": redis_url}, cache=SYNCED)
    await gw.gateway.subscriber.ready.wait()
    writer = await keystile(store={"url": gw.cfg.store.url})  # no Redis: publishes nothing
    key = await gw.key()
    r = aioredis.Redis.from_url(redis_url)
    try:
        async with aiohttp.ClientSession() as s:
            assert await status_of(s, gw.url + "/x", key) == 200
            await asyncio.sleep(0.1)  # the Redis write-back is asynchronous
            await writer.lifecycle.revoke_key(await key_id(writer), actor="test")
            await asyncio.sleep(0.5)
            assert await status_of(s, gw.url + "/x", key) == 200  # cached, and nothing told it
            assert await tombstone_all(r)
            await r.incr("keystile:gen")  # the message for this generation never arrives
            await until_rejected(s, gw.url + "/x", key, within=1.0)
            assert await metric(s, gw, "keystile_invalidations_lost_total") == 1
    finally:
        await r.aclose()
    assert gw.gateway.subscriber.lost == 1


async def test_entries_outlive_local_ttl_only_while_in_sync(keystile, private_redis: RedisServer) -> None:
    gw = await keystile(
        redis={"url": private_redis.url, "socket_timeout": 0.2, "connect_timeout": 0.2},
        cache={"local_ttl": 0.5, "local_ttl_synced": 300, "sync_interval": 0.2},
    )
    await gw.gateway.subscriber.ready.wait()
    writer = await keystile(store={"url": gw.cfg.store.url})
    key = await gw.key()
    async with aiohttp.ClientSession() as s:
        assert await status_of(s, gw.url + "/x", key) == 200
        loads = gw.gateway.cache.loads
        await asyncio.sleep(1.0)  # twice local_ttl
        assert await status_of(s, gw.url + "/x", key) == 200
        assert gw.gateway.cache.loads == loads, "in sync, the entry should have been kept"
        assert await metric(s, gw, "keystile_cache_in_sync") == 1
        await writer.lifecycle.revoke_key(await key_id(writer), actor="test")
        private_redis.kill()  # nothing can vouch for the in-process entries any more
        await until_rejected(s, gw.url + "/x", key, within=2.0)
        assert await metric(s, gw, "keystile_cache_in_sync") == 0
    assert gw.gateway.subscriber.connected is False


async def test_messages_from_publishers_without_generations_still_apply(keystile, redis_url: str) -> None:
    gw = await keystile(redis={"url": redis_url}, cache=SYNCED)
    await gw.gateway.subscriber.ready.wait()
    writer = await keystile(store={"url": gw.cfg.store.url})
    key = await gw.key()
    r = aioredis.Redis.from_url(redis_url)
    try:
        async with aiohttp.ClientSession() as s:
            assert await status_of(s, gw.url + "/x", key) == 200
            await asyncio.sleep(0.1)
            await writer.lifecycle.revoke_key(await key_id(writer), actor="test")
            (name,) = await tombstone_all(r)
            # What an instance from before generations publishes: bare digests, no counter.
            await r.publish("keystile:invalidate", name.rsplit(b":", 1)[1])
            await until_rejected(s, gw.url + "/x", key, within=1.0)
            assert gw.gateway.subscriber.lost == 0
            # A generation that skips one means a message in between was lost.
            gw2_key = await gw.key(owner="bob")
            assert await status_of(s, gw.url + "/x", gw2_key) == 200
            loads = gw.gateway.cache.loads
            await r.publish("keystile:invalidate", b"g2")
            await asyncio.sleep(0.1)
            assert gw.gateway.subscriber.lost == 1
            assert await status_of(s, gw.url + "/x", gw2_key) == 200
            assert gw.gateway.cache.loads == loads + 1, "the cache should have been cleared"
    finally:
        await r.aclose()
