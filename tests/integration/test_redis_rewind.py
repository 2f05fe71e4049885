"""Redis values older than an invalidation are refused, however they came back: what a restore
from a snapshot, a promoted stale replica or a lost tombstone leaves behind is staged by writing
the old value back by hand."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import redis.asyncio as aioredis

from tests.integration.test_verification_path import key_id, redis_url, status_of

__all__ = ["redis_url"]  # the fixture: the machine's Redis, database 9, emptied


async def cached_values(r: aioredis.Redis) -> dict[bytes, bytes]:
    names = await r.keys("keystile:id:*")
    return {n: v for n in names if (v := await r.get(n)) is not None}


async def test_a_value_from_before_a_revocation_is_refused_and_replaced(keystile, redis_url: str) -> None:
    a = await keystile(redis={"url": redis_url}, cache={"local_ttl": 300})
    key, kept = await a.key(), await a.key(owner="bob")
    r = aioredis.Redis.from_url(redis_url)
    try:
        async with aiohttp.ClientSession() as s:
            assert await status_of(s, a.url + "/x", key) == 200
            assert await status_of(s, a.url + "/x", kept) == 200
            deadline = time.monotonic() + 5
            while len(before := await cached_values(r)) < 2:  # the write-back is asynchronous
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await a.lifecycle.revoke_key(await key_id(a), actor="test")
            for name, value in before.items():  # Redis rewinds: the tombstone is gone
                await r.set(name, value, px=300_000)
            assert await status_of(s, a.url + "/x", key) == 401  # the writer knows
            # A new instance learns the recent invalidations from the store as it starts.
            b = await keystile(
                redis={"url": redis_url}, store={"url": a.cfg.store.url}, cache={"local_ttl": 300}
            )
            assert await status_of(s, b.url + "/x", key) == 401
            assert b.gateway.redis.stale == 1
            assert await status_of(s, b.url + "/x", kept) == 200  # an untouched key is still served
            assert b.gateway.redis.hits == 1 and b.gateway.loader.store_loads == 1
            # The refused value is replaced by the store's answer ("unknown"), not left in place.
            deadline = time.monotonic() + 5
            while b"-" not in (await cached_values(r)).values():
                assert time.monotonic() < deadline, "the stale value was left in Redis"
                await asyncio.sleep(0.02)
    finally:
        await r.aclose()


async def test_an_instance_that_only_read_the_outbox_refuses_the_old_value(keystile, redis_url: str) -> None:
    """The writer could not tell Redis (no Redis configured on it): the other instance learns of
    the revocation from the store, and from then on refuses what Redis still holds."""
    b = await keystile(redis={"url": redis_url}, cache={"local_ttl": 300, "sync_interval": 0.1})
    writer = await keystile(store={"url": b.cfg.store.url})  # no Redis: no tombstone, no message
    key = await b.key()
    r = aioredis.Redis.from_url(redis_url)
    try:
        async with aiohttp.ClientSession() as s:
            assert await status_of(s, b.url + "/x", key) == 200
            deadline = time.monotonic() + 5
            while not await cached_values(r):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            before = await cached_values(r)
            await writer.lifecycle.revoke_key(await key_id(writer), actor="test")
            deadline = time.monotonic() + 2
            while await status_of(s, b.url + "/x", key) == 200:
                assert time.monotonic() < deadline, "the outbox never delivered the revocation"
                await asyncio.sleep(0.02)
            for name, value in before.items():  # whatever B's tombstone did, the old value is back
                await r.set(name, value, px=300_000)
            b.gateway.cache.clear()  # as on a resubscription
            assert await status_of(s, b.url + "/x", key) == 401
            assert b.gateway.poller.delivered >= 1
    finally:
        await r.aclose()
