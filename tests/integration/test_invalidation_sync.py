"""Long-lived in-process entries are safe only while an instance can confirm it missed no
invalidation: changes recorded in the store's outbox arrive without Redis, trust lapses when the
store cannot be read, lost messages are noticed, older publishers still count.

A "lost message" is staged the way it looks from outside: the key is revoked in the store behind
the outbox's back (as a Keystile from before the outbox would), then the test leaves in Redis what
a publisher whose message vanished would have left (tombstones and a moved generation counter).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import redis.asyncio as aioredis

from gateway.clock import ManualClock
from tests.integration.test_verification_path import key_id, redis_url, status_of
from tests.servers import PgCluster, RedisServer
from tests.store.conftest import execute_sql
from tests.waiting import until

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


async def older_and_read_again(gw, clock: ManualClock, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """Age the in-process entries by ``seconds``, then wait for a read of the outbox that began
    after that (it vouches for them again, as one would after that much real time)."""
    clock.advance(seconds)
    polls = gw.gateway.poller.polls
    await until(lambda: gw.gateway.poller.polls >= polls + 2, what="a read of the outbox after the move")


async def tombstone_all(r: aioredis.Redis) -> list[bytes]:
    names: list[bytes] = await r.keys("keystile:id:*")
    for name in names:
        await r.set(name, b"x", px=10_000)
    return names


async def revoke_without_outbox(gw, owner: str = "alice") -> None:  # type: ignore[no-untyped-def]
    """Revoke as a writer from before the outbox would: the store changes, no outbox row."""
    kid = await key_id(gw, owner)
    await execute_sql(gw.cfg.store.url, f"UPDATE keys SET revoked_at = {time.time()} WHERE id = '{kid}'")


async def metric(s: aiohttp.ClientSession, gw, name: str) -> float:  # type: ignore[no-untyped-def]
    async with s.get(gw.admin_url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_a_lost_invalidation_message_is_noticed_within_two_checks(keystile, redis_url: str) -> None:
    gw = await keystile(redis={"url": redis_url}, cache=SYNCED)
    await gw.gateway.subscriber.ready.wait()
    key = await gw.key()
    r = aioredis.Redis.from_url(redis_url)
    try:
        async with aiohttp.ClientSession() as s:
            assert await status_of(s, gw.url + "/x", key) == 200
            await until(lambda: r.keys("keystile:id:*"), what="the Redis write-back")
            await revoke_without_outbox(gw)
            polls = gw.gateway.poller.polls
            await until(lambda: gw.gateway.poller.polls >= polls + 2, what="two reads of the outbox")
            assert await status_of(s, gw.url + "/x", key) == 200  # cached, and nothing told it
            assert await tombstone_all(r)
            await r.incr("keystile:gen")  # the message for this generation never arrives
            await until_rejected(s, gw.url + "/x", key, within=1.0)
            assert await metric(s, gw, "keystile_invalidations_lost_total") == 1
    finally:
        await r.aclose()
    assert gw.gateway.subscriber.lost == 1


async def test_entries_outlive_local_ttl_only_while_the_store_can_be_read(
    keystile, private_redis: RedisServer, pg_cluster: PgCluster
) -> None:
    """What vouches for long-lived entries is reading the store's outbox, not Redis: with Redis
    dead they are kept and a change still arrives; with the store unreadable they lapse."""
    clock = ManualClock()  # the entries' age; the outbox is still read every sync_interval
    gw = await keystile(
        clock=clock,
        store={"url": pg_cluster.url, "timeout": 1.0},
        redis={"url": private_redis.url, "socket_timeout": 0.2, "connect_timeout": 0.2},
        cache={"local_ttl": 0.5, "local_ttl_synced": 300, "sync_interval": 0.2},
    )
    await gw.gateway.subscriber.ready.wait()
    writer = await keystile(store={"url": pg_cluster.url})  # no Redis: publishes nothing
    key = await gw.key()
    other = await gw.key(owner="bob")
    async with aiohttp.ClientSession() as s:
        assert await status_of(s, gw.url + "/x", key) == 200
        assert await status_of(s, gw.url + "/x", other) == 200
        loads = gw.gateway.cache.loads
        await older_and_read_again(gw, clock, 1.0)  # twice local_ttl
        assert await status_of(s, gw.url + "/x", key) == 200
        assert gw.gateway.cache.loads == loads, "in sync, the entry should have been kept"
        assert await metric(s, gw, "keystile_cache_in_sync") == 1
        private_redis.kill()  # the store's outbox still vouches for the in-process entries
        await until(lambda: not gw.gateway.subscriber.connected, what="the subscriber sees Redis gone")
        await older_and_read_again(gw, clock, 1.0)
        assert await status_of(s, gw.url + "/x", key) == 200
        assert gw.gateway.cache.loads == loads
        assert await metric(s, gw, "keystile_cache_in_sync") == 1
        await writer.lifecycle.revoke_key(await key_id(writer), actor="test")  # only the outbox knows
        await until_rejected(s, gw.url + "/x", key, within=1.0)
        assert await status_of(s, gw.url + "/x", other) == 200
        pg_cluster.stop()  # nothing can vouch for the in-process entries any more
        deadline = time.monotonic() + 3.0
        while await metric(s, gw, "keystile_cache_in_sync") != 0:
            assert time.monotonic() < deadline, "trust outlived the store"
            await asyncio.sleep(0.05)
        # Older than local_ttl, no tier can answer for it: 503, never 200.
        assert await status_of(s, gw.url + "/x", other) == 503
    assert gw.gateway.subscriber.connected is False


async def test_messages_from_publishers_without_generations_still_apply(keystile, redis_url: str) -> None:
    gw = await keystile(redis={"url": redis_url}, cache=SYNCED)
    await gw.gateway.subscriber.ready.wait()
    key = await gw.key()
    r = aioredis.Redis.from_url(redis_url)
    try:
        async with aiohttp.ClientSession() as s:
            assert await status_of(s, gw.url + "/x", key) == 200
            await until(lambda: r.keys("keystile:id:*"), what="the Redis write-back")
            await revoke_without_outbox(gw)
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
            await until(lambda: gw.gateway.subscriber.lost == 1, what="the loss noticed")
            assert await status_of(s, gw.url + "/x", gw2_key) == 200
            assert gw.gateway.cache.loads == loads + 1, "the cache should have been cleared"
    finally:
        await r.aclose()
