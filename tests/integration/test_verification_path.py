"""The verification path with real Redis and real stores: tiers, invalidation, races, failures.

Private servers (``tests.servers``) are started per test where a test kills or freezes them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest

from gateway.cache.redis_tier import FILL_DELAY
from gateway.clock import ManualClock
from gateway.keys import KeyDigest, generate_key
from gateway.models import IdentityRecord
from gateway.store import KeyFilter
from gateway.store.sqlite import SQLiteStore
from tests.servers import PgCluster, RedisServer, require_server
from tests.upstream import RecordingUpstream
from tests.waiting import until


@pytest.fixture
def redis_url() -> str:
    """The machine's Redis, in a database of its own, emptied first."""
    import redis

    try:
        r = redis.Redis.from_url("redis://127.0.0.1:6379/9", socket_connect_timeout=1)
        r.flushdb()
        r.close()
    except redis.RedisError as e:
        require_server("redis", f"127.0.0.1:6379: {e}")
    return "redis://127.0.0.1:6379/9"




async def status_of(session: aiohttp.ClientSession, url: str, key: str | None, timeout: float = 10) -> int:
    headers = {"X-API-Key": key} if key else {}
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        await r.read()
        return r.status


async def in_redis(gw, key: str) -> bool:  # type: ignore[no-untyped-def]
    """Whether the Redis tier holds ``key``'s identity (written back after a store lookup)."""
    known = gw.gateway.authenticator.check(key)  # the digest, or the in-process entry's record
    digest = known.digest if isinstance(known, IdentityRecord) else known
    assert isinstance(digest, bytes)
    return isinstance((await gw.gateway.redis.get_many([digest])).get(digest), IdentityRecord)


async def key_id(gw, name_owner: str = "alice") -> str:  # type: ignore[no-untyped-def]
    return (await gw.store.list_keys(KeyFilter(principal_id=name_owner), time.time())).items[0].id


# -- in-process tier --------------------------------------------------------------------------


async def test_in_process_hit_needs_no_store_or_redis(keystile, redis_url: str) -> None:
    gw = await keystile(redis={"url": redis_url}, cache={"local_ttl": 60})
    key = await gw.key()
    async with aiohttp.ClientSession() as s:
        assert await status_of(s, gw.url + "/x", key) == 200
        loads, mgets = gw.gateway.loader.store_loads, gw.gateway.redis.misses + gw.gateway.redis.hits
        for _ in range(20):
            assert await status_of(s, gw.url + "/x", key) == 200
    assert gw.gateway.loader.store_loads == loads
    assert gw.gateway.redis.misses + gw.gateway.redis.hits == mgets
    assert gw.gateway.cache.local.hits >= 20


async def test_unknown_keys_are_cached_as_negative(keystile) -> None:
    gw = await keystile(cache={"negative_ttl": 30}, throttle={"failures": 0})  # not blocked at 20
    unknown = generate_key("ks", "live")
    async with aiohttp.ClientSession() as s:
        for _ in range(30):
            assert await status_of(s, gw.url + "/x", unknown) == 401
    assert gw.gateway.loader.store_loads == 1
    assert gw.gateway.cache.local.negative_hits == 29


async def test_a_full_cache_keeps_the_keys_in_use(keystile) -> None:
    """More active keys than ``local_max_entries``: the least recently used entry goes, so a key
    used between newcomers is never looked up again (oldest-inserted-first would evict it)."""
    gw = await keystile(cache={"local_ttl": 60, "local_max_entries": 3})
    hot = await gw.key()
    others = [await gw.key(name=f"k{i}") for i in range(4)]
    async with aiohttp.ClientSession() as s:
        assert await status_of(s, gw.url + "/x", hot) == 200
        loads = gw.gateway.loader.store_loads
        for other in others:
            assert await status_of(s, gw.url + "/x", other) == 200
            assert await status_of(s, gw.url + "/x", hot) == 200
        assert gw.gateway.loader.store_loads == loads + len(others)  # one per newcomer, none for hot
        assert len(gw.gateway.cache.local) == 3
        # The evicted newcomers are looked up again, and still work.
        assert await status_of(s, gw.url + "/x", others[0]) == 200
        assert gw.gateway.loader.store_loads == loads + len(others) + 1


async def test_concurrent_misses_coalesce_into_one_lookup(keystile, tmp_path: Path) -> None:
    store = await SlowStore.open(f"sqlite:///{tmp_path}/slow.db")
    gw = await keystile(store_obj=store)
    key = await gw.key()
    others = [generate_key("ks", "live") for _ in range(20)]
    store.delay = 0.2
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(
            *(status_of(s, gw.url + "/x", key) for _ in range(30)),
            *(status_of(s, gw.url + "/x", k) for k in others),
        )
    assert results[:30] == [200] * 30 and results[30:] == [401] * 20
    # One key x 30 requests and 20 unknown keys: each digest looked up once, in a few batches
    # (at most 4 loads in flight; later misses wait and go out together).
    assert store.digests_seen == 21
    assert store.calls <= 6


# -- Redis tier and invalidation ---------------------------------------------------------------


async def test_redis_tier_serves_a_second_instance(keystile, redis_url: str, tmp_path: Path) -> None:
    a = await keystile(redis={"url": redis_url})
    key = await a.key()
    async with aiohttp.ClientSession() as s:
        assert await status_of(s, a.url + "/x", key) == 200
        await until(lambda: in_redis(a, key), what="the write-back")  # it is asynchronous
        b = await keystile(redis={"url": redis_url}, store={"url": a.cfg.store.url})
        assert await status_of(s, b.url + "/x", key) == 200
    assert b.gateway.redis.hits == 1 and b.gateway.loader.store_loads == 0


async def test_a_write_back_rides_with_the_next_lookup_or_goes_alone(keystile, redis_url: str) -> None:
    gw = await keystile(redis={"url": redis_url})
    tier, auth = gw.gateway.redis, gw.gateway.authenticator
    first, second = auth.check(await gw.key(name="a")), auth.check(await gw.key(name="b"))
    assert isinstance(first, bytes) and isinstance(second, bytes)
    stored = await gw.gateway.store.find_identities([first, second], time.time())
    calls = tier.lookups.calls
    tier.fill_later({first: stored[first]}, time.time())
    got = await tier.get_many([first, second])  # the fill goes out in the MGET's write, ahead of it
    assert got == {first: stored[first]} and tier.lookups.calls == calls + 1
    tier.fill_later({second: stored[second]}, time.time())
    # No lookup follows: it goes alone, FILL_DELAY later.
    await until(lambda: tier.lookups.calls == calls + 2, timeout=FILL_DELAY * 40, what="the lone fill")
    assert await tier.get_many([second]) == {second: stored[second]}


async def test_revocation_reaches_every_instance_within_a_second(keystile, redis_url: str) -> None:
    a = await keystile(redis={"url": redis_url}, cache={"local_ttl": 300})
    b = await keystile(redis={"url": redis_url}, cache={"local_ttl": 300}, store={"url": a.cfg.store.url})
    await b.gateway.subscriber.ready.wait()
    key = await a.key()
    async with aiohttp.ClientSession() as s:
        assert await status_of(s, a.url + "/x", key) == 200
        assert await status_of(s, b.url + "/x", key) == 200  # now cached in b's memory for 300 s
        await a.lifecycle.revoke_key(await key_id(a), actor="test")
        started = time.monotonic()
        while await status_of(s, b.url + "/x", key) == 200:
            assert time.monotonic() - started < 1.0, "b still accepts the revoked key after 1 s"
            await asyncio.sleep(0.02)
        assert await status_of(s, b.url + "/x", key) == 401
    assert b.gateway.subscriber.received >= 1


async def test_lookup_racing_a_revocation_cannot_resurrect_the_key(
    keystile, redis_url: str, tmp_path: Path
) -> None:
    store = await SlowStore.open(f"sqlite:///{tmp_path}/race.db")
    a = await keystile(store_obj=store, redis={"url": redis_url}, cache={"local_ttl": 300})
    key = await a.key()
    store.delay = 0.5  # the store answers, then the answer travels slowly
    async with aiohttp.ClientSession() as s:
        first = asyncio.create_task(status_of(s, a.url + "/x", key))
        while store.calls == 0:
            await asyncio.sleep(0.01)
        await a.lifecycle.revoke_key(await key_id(a), actor="test")  # commits while the lookup is in flight
        await first  # may go either way: it raced the revocation
        store.delay = 0
        await asyncio.sleep(0.1)  # kept: time for a late fill, which must not come
        assert await status_of(s, a.url + "/x", key) == 401  # not filled into the in-process tier
        b = await keystile(
            redis={"url": redis_url}, store={"url": f"sqlite:///{tmp_path}/race.db"}, cache={"local_ttl": 0}
        )
        assert await status_of(s, b.url + "/x", key) == 401  # nor into Redis


async def test_disconnecting_clients_never_get_another_keys_identity(
    keystile, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    store = await SlowStore.open(f"sqlite:///{tmp_path}/dc.db")
    gw = await keystile(store_obj=store)
    keys = {}
    for i in range(12):
        keys[f"user{i}"] = await gw.key(owner=f"user{i}", grant=("read",))
    store.delay = 0.2
    async with aiohttp.ClientSession() as s:

        async def call(owner: str, key: str, abandon: bool) -> tuple[str, str | None]:
            if abandon:
                try:
                    async with s.get(
                        gw.url + "/x", headers={"X-API-Key": key}, timeout=aiohttp.ClientTimeout(total=0.05)
                    ) as r:
                        await r.read()
                except TimeoutError:
                    pass
                return owner, None
            async with s.get(gw.url + "/x", headers={"X-API-Key": key}) as r:
                data = await r.json()
            got = [v for k, v in data["headers"] if k == "X-Keystile-Owner"]
            return owner, got[0]

        results = await asyncio.gather(*(call(o, k, i % 2 == 0) for i, (o, k) in enumerate(keys.items())))
    for owner, seen in results:
        assert seen is None or seen == owner


# -- failures ---------------------------------------------------------------------------------


async def load(
    url: str, keys: Sequence[str], seconds: float, per_request_limit: float
) -> list[tuple[str, int, float]]:
    """Concurrent requests for ``seconds``; each must finish within ``per_request_limit``."""
    out: list[tuple[str, int, float]] = []
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as s:

        async def worker(i: int) -> None:
            while time.monotonic() < deadline:
                k = keys[i % len(keys)]
                t0 = time.monotonic()
                code = await status_of(s, url, k, timeout=per_request_limit)
                out.append((k, code, time.monotonic() - t0))

        await asyncio.gather(*(worker(i) for i in range(8)))
    return out


@pytest.mark.parametrize("failure", ["kill", "freeze"])
async def test_redis_dying_or_freezing_mid_load(keystile, private_redis: RedisServer, failure: str) -> None:
    gw = await keystile(
        redis={"url": private_redis.url, "socket_timeout": 0.2, "connect_timeout": 0.2},
        cache={"local_ttl": 0},
        throttle={"failures": 0},  # the revoked key is sent from the valid keys' address
    )
    valid = [await gw.key(owner=f"u{i}") for i in range(3)]
    revoked = await gw.key(owner="gone")
    await gw.lifecycle.revoke_key(await key_id(gw, "gone"), actor="test")
    async with aiohttp.ClientSession() as s:
        for k in valid:
            assert await status_of(s, gw.url + "/x", k) == 200

    async def break_it() -> None:
        await asyncio.sleep(0.3)  # kept: Redis breaks while the 1.5 s load is under way
        private_redis.kill() if failure == "kill" else private_redis.freeze()

    results, _ = await asyncio.gather(
        load(gw.url + "/x", [*valid, revoked], 1.5, per_request_limit=2.0), break_it()
    )
    assert results, "no requests completed"
    assert all(code == 200 for k, code, _ in results if k != revoked)
    assert all(code == 401 for k, code, _ in results if k == revoked)
    # No request waited much longer than the Redis timeout (0.2 s) plus a store lookup.
    assert max(elapsed for _, _, elapsed in results) < 1.0
    assert gw.gateway.redis.breaker.opens >= 1

    # Recovery without a restart.
    if failure == "kill":
        private_redis.start()
    else:
        private_redis.thaw()
    deadline = time.monotonic() + 10
    hits_before = gw.gateway.redis.hits
    async with aiohttp.ClientSession() as s:
        while gw.gateway.redis.hits == hits_before:
            assert time.monotonic() < deadline, "the Redis tier never came back"
            assert await status_of(s, gw.url + "/x", valid[0]) == 200
            await asyncio.sleep(0.2)
    assert gw.gateway.redis.breaker.state == "closed"


async def test_store_down_cached_keys_work_until_their_ttl_uncached_get_503(
    keystile, pg_cluster: PgCluster
) -> None:
    clock = ManualClock()  # the entries' age
    gw = await keystile(store={"url": pg_cluster.url, "timeout": 1.0}, cache={"local_ttl": 1.5}, clock=clock)
    cached = await gw.key(owner="cached")
    cold = await gw.key(owner="cold")
    async with aiohttp.ClientSession() as s:
        assert await status_of(s, gw.url + "/x", cached) == 200
        pg_cluster.stop()
        assert await status_of(s, gw.url + "/x", cached) == 200  # in-process hit
        async with s.get(gw.url + "/x", headers={"X-API-Key": cold}) as r:
            assert r.status == 503
            assert (await r.json())["error"] == "auth_unavailable"
            assert r.headers["Retry-After"] == "1"
        # Never cached as "unknown": still 503 on the next try, not 401.
        assert await status_of(s, gw.url + "/x", cold) == 503
        clock.advance(1.6)
        assert await status_of(s, gw.url + "/x", cached) == 503  # TTL ended: not extended
        pg_cluster.start()
        deadline = time.monotonic() + 15
        while await status_of(s, gw.url + "/x", cold) != 200:
            assert time.monotonic() < deadline, "no recovery after the store came back"
            await asyncio.sleep(0.2)
        assert await status_of(s, gw.url + "/x", cached) == 200


async def test_store_and_redis_down_only_in_process_hits(
    keystile, pg_cluster: PgCluster, private_redis: RedisServer
) -> None:
    gw = await keystile(
        store={"url": pg_cluster.url, "timeout": 1.0},
        redis={"url": private_redis.url, "socket_timeout": 0.2, "connect_timeout": 0.2},
        cache={"local_ttl": 30},
    )
    cached = await gw.key(owner="cached")
    cold = await gw.key(owner="cold")
    async with aiohttp.ClientSession() as s:
        assert await status_of(s, gw.url + "/x", cached) == 200
        await until(lambda: in_redis(gw, cached), what="the write-back")
        private_redis.kill()
        pg_cluster.stop()
        assert await status_of(s, gw.url + "/x", cached) == 200
        assert await status_of(s, gw.url + "/x", cold) == 503
        pg_cluster.start()


class SlowStore(SQLiteStore):
    """A real SQLite store whose identity lookups answer late: the one fault-injection seam."""

    delay = 0.0
    calls = 0
    digests_seen = 0

    async def find_identities(
        self, digests: Sequence[KeyDigest], now: float
    ) -> dict[KeyDigest, IdentityRecord]:
        result = await super().find_identities(digests, now)
        self.calls += 1
        self.digests_seen += len(digests)
        if self.delay:
            await asyncio.sleep(self.delay)
        return result


async def test_closing_the_cache_answers_the_misses_waiting_for_a_lookup(keystile, tmp_path: Path) -> None:
    store = await SlowStore.open(f"sqlite:///{tmp_path}/close.db")
    gw = await keystile(store_obj=store)
    first, second = await gw.key(name="a"), await gw.key(name="b")
    store.delay = 0.5
    auth = gw.gateway.authenticator
    in_flight = asyncio.create_task(auth.identify(first))
    # SQLite allows one lookup at a time: once the first is in the store, the second miss must wait.
    await until(lambda: store.calls == 1, what="the first lookup in the store")
    waiting = asyncio.create_task(auth.identify(second))
    await asyncio.sleep(0.1)  # kept: the second miss reaches its wait for a lookup slot
    await gw.gateway.cache.aclose()
    assert await asyncio.wait_for(waiting, 1) == ("unavailable", None)
    assert in_flight.done()
    assert store.calls == 1  # nothing was looked up after the close


async def test_clients_giving_up_on_a_shared_lookup_leave_it_to_the_others(
    keystile, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    store = await SlowStore.open(f"sqlite:///{tmp_path}/giveup.db")
    gw = await keystile(store_obj=store)
    key = await gw.key()
    store.delay = 0.3
    async with aiohttp.ClientSession() as s:

        async def call(abandon: bool) -> int | None:
            try:
                return await status_of(s, gw.url + "/x", key, timeout=0.05 if abandon else 5)
            except TimeoutError:
                return None

        results = await asyncio.gather(*(call(i % 2 == 0) for i in range(8)))
    # The four that waited got their answer from the one lookup the four that left also joined.
    assert results == [None, 200] * 4
    assert store.digests_seen == 1
    assert len(upstream.received) == 4
