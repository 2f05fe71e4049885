"""The Redis tier: identities shared by every instance, tombstones, invalidation messages, a breaker.

Owns: the Redis clients (the lean pipelined one of ``gateway.cache.resp`` for lookups and fills,
a redis-py pool for the rest), the encoding of cached identities, the circuit
breaker, publishing invalidations and the subscriber that applies them. Must not: touch HTTP or the
store; the tiered loader in ``gateway.cache.tiers`` decides when to fall through.

Keys are ``{namespace}id:{hex digest}``; values are msgpack ``IdentityRecord``s, ``-`` for a cached
"unknown digest" (short TTL), or ``x`` for a tombstone. An admin write sets tombstones (not DEL) for
the digests it changed; fills use ``SET ... NX``, so a load that read the store before the write
committed cannot put the old identity back while the tombstone lives (it outlives any load). A
fill waits for the next lookup and goes out ahead of its MGET in the same write, or alone after
``FILL_DELAY``: a first-seen key then costs one round trip, not two.

Invalidation messages are ``hex,hex,...,g<n>`` (or ``*``, "forget everything", followed by
``g<n>``), where ``n`` comes from ``INCR {namespace}gen`` in the same script that publishes, so
generations arrive in order. A subscriber that sees the counter ahead of the messages it received,
or a generation skipped, has lost a message and clears its in-process cache; while neither happens
it confirms itself in sync, which lets in-process entries live ``cache.local_ttl_synced``. A parser
that predates generations skips the ``g<n>`` part (it is not hex) and applies the rest.

Failure: every command runs under ``socket_timeout`` with no retries, so a frozen Redis costs a
request at most that long; after ``breaker_failures`` consecutive failures the breaker opens and
lookups skip Redis for ``breaker_reset`` seconds, then one probe is let through (half-open).
Invalidations that cannot be published are kept (bounded) and retried; if they overflow, the next
successful connection purges every cached identity instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Literal

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.cache.resp import LeanRedis, RespError, set_nx
from gateway.config import CacheConfig, RedisConfig
from gateway.keys import KeyDigest
from gateway.models import IdentityRecord

log = logging.getLogger("keystile.redis")

NEGATIVE: Final = b"-"
TOMBSTONE: Final = b"x"
CLEAR_ALL: Final = b"*"
# Bump the generation and publish with it in one step, so generation order is message order.
_PUBLISH: Final = """
local g = redis.call('INCR', KEYS[1])
if ARGV[2] == '*' then
  redis.call('PUBLISH', ARGV[1], '*')
  redis.call('PUBLISH', ARGV[1], 'g' .. g)
else
  redis.call('PUBLISH', ARGV[1], ARGV[2] .. ',g' .. g)
end
return g
"""
MAX_PENDING_INVALIDATIONS: Final = 10_000
# Longest a fill waits for a lookup to ride with. A tombstone outlives any load (tombstone_ttl):
# this delay plus the call's deadline stays far inside it.
FILL_DELAY: Final = 0.05

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(IdentityRecord)


class RedisUnavailable(Exception):
    pass


class Breaker:
    """Consecutive-failure circuit breaker: closed → open (skip) → half-open (one probe)."""

    def __init__(self, failures: int, reset: float) -> None:
        self._limit = failures
        self._reset = reset
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.opens = 0

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        if self._failures < self._limit:
            return "closed"
        if time.monotonic() - self._opened_at >= self._reset:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._probing = False

    def failure(self) -> None:
        self._probing = False
        self._failures += 1
        if self._failures >= self._limit:
            if self._failures == self._limit:
                self.opens += 1
                log.warning("redis breaker open: skipping redis for %.1fs", self._reset)
            self._opened_at = time.monotonic()


Lookup = dict[KeyDigest, IdentityRecord | bytes | None]


class RedisTier:
    def __init__(self, cfg: RedisConfig, cache: CacheConfig, tombstone_ttl: float) -> None:
        self._cfg = cfg
        self._ttl = cache.redis_ttl
        self._negative_ttl = max(cache.negative_ttl, 0.001)
        self._tombstone_ttl = tombstone_ttl
        namespace = cfg.channel.rsplit(":", 1)[0]
        self._prefix = namespace + ":id:"
        self.generation_key = namespace + ":gen"
        self.channel = cfg.channel
        self.client = aioredis.Redis.from_url(
            cfg.url,
            socket_timeout=cfg.socket_timeout,
            socket_connect_timeout=cfg.connect_timeout,
            retry=Retry(NoBackoff(), 0),
            max_connections=64,
            decode_responses=False,
        )
        # The lookup path (MGET, write-back fills) takes the lean client; the rest redis-py.
        self.lookups = LeanRedis(cfg.url, timeout=cfg.socket_timeout, connect_timeout=cfg.connect_timeout)
        self.breaker = Breaker(cfg.breaker_failures, cfg.breaker_reset)
        self._deadline = max(cfg.socket_timeout, cfg.connect_timeout)
        self._pending: set[KeyDigest] = set()
        self._purge_needed = False
        self._fills: set[asyncio.Task[None]] = set()
        self._fill_queue: list[bytes] = []  # encoded SET ... NX commands, oldest first
        self._fill_timer: asyncio.TimerHandle | None = None
        self.hits = 0
        self.negative_hits = 0
        self.misses = 0
        self.errors = 0
        self.published = 0

    def _key(self, digest: KeyDigest) -> str:
        return self._prefix + digest.hex()

    async def _guard(self, what: str, coro: object) -> object:
        """Run one Redis call under the hard deadline, feeding the breaker."""
        try:
            async with asyncio.timeout(self._deadline):
                result = await coro  # type: ignore[misc]
        except (RedisError, OSError, TimeoutError) as e:
            self.errors += 1
            self.breaker.failure()
            raise RedisUnavailable(f"{what}: {type(e).__name__}: {e}") from None
        self.breaker.success()
        return result

    async def get_many(self, digests: Sequence[KeyDigest]) -> Lookup:
        """One MGET. Values: an identity, ``None`` (known unknown) or TOMBSTONE; absent = not cached.
        Fills waiting to be written go out ahead of it, in the same write."""
        try:
            raw = await self.lookups.mget([self._key(d) for d in digests], self._take_fills())
        except RespError as e:
            self.errors += 1
            self.breaker.failure()
            raise RedisUnavailable(f"mget: {e}") from None
        self.breaker.success()
        out: Lookup = {}
        for d, value in zip(digests, raw, strict=True):
            if value is None:
                self.misses += 1
            elif value == NEGATIVE:
                self.negative_hits += 1
                out[d] = None
            elif value == TOMBSTONE:
                self.misses += 1
                out[d] = TOMBSTONE
            else:
                try:
                    out[d] = _dec.decode(value)
                    self.hits += 1
                except msgspec.DecodeError:
                    self.misses += 1  # written by another version: treat as not cached
        return out

    def fill_later(self, values: dict[KeyDigest, IdentityRecord | None], now: float) -> None:
        """Write store answers back (NX) without making the request wait: with the next lookup's
        MGET (one round trip for both), or alone after ``FILL_DELAY`` if no lookup comes."""
        if not values or not self.breaker.allow():
            return
        for d, ident in values.items():
            if ident is None:
                self._fill_queue.append(set_nx(self._key(d), NEGATIVE, int(self._negative_ttl * 1000)))
                continue
            ttl = self._ttl
            if ident.expires_at is not None:
                ttl = min(ttl, max(ident.expires_at - now, 1.0))
            self._fill_queue.append(set_nx(self._key(d), _enc.encode(ident), int(ttl * 1000)))
        if self._fill_timer is None:
            self._fill_timer = asyncio.get_running_loop().call_later(FILL_DELAY, self._fill_alone)

    def _take_fills(self) -> list[bytes]:
        queue, self._fill_queue = self._fill_queue, []
        if self._fill_timer is not None:
            self._fill_timer.cancel()
            self._fill_timer = None
        return queue

    def _fill_alone(self) -> None:
        self._fill_timer = None
        commands = self._take_fills()
        if not commands:
            return
        task = asyncio.get_running_loop().create_task(self._fill(commands))
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def _fill(self, commands: list[bytes]) -> None:
        try:
            await self.lookups.send(commands)
        except RespError as e:
            self.errors += 1
            self.breaker.failure()
            log.debug("redis fill skipped: %s", e)
            return
        self.breaker.success()

    async def invalidate(self, digests: Iterable[KeyDigest]) -> bool:
        """Tombstone and publish; on failure keep them for ``retry_pending``. True when delivered."""
        self._pending.update(digests)
        if len(self._pending) > MAX_PENDING_INVALIDATIONS:
            self._pending.clear()
            self._purge_needed = True
        return await self.retry_pending()

    async def retry_pending(self) -> bool:
        if self._purge_needed:
            try:
                await self._purge()
            except RedisUnavailable as e:
                log.warning("redis purge pending: %s", e)
                return False
            self._purge_needed = False
        if not self._pending:
            return True
        batch = list(self._pending)
        pipe = self.client.pipeline(transaction=False)
        for d in batch:
            pipe.set(self._key(d), TOMBSTONE, px=int(self._tombstone_ttl * 1000))
        payload = ",".join(d.hex() for d in batch)
        pipe.eval(_PUBLISH, 1, self.generation_key, self.channel, payload)
        try:
            await self._guard("invalidate", pipe.execute())
        except RedisUnavailable as e:
            log.warning("invalidation of %d digests not yet published, will retry: %s", len(batch), e)
            return False
        self._pending.difference_update(batch)
        self.published += 1
        return True

    async def _purge(self) -> None:
        async def purge() -> None:
            async for key in self.client.scan_iter(match=self._prefix + "*", count=1000):
                await self.client.unlink(key)
            await self.client.eval(_PUBLISH, 1, self.generation_key, self.channel, "*")

        try:
            await asyncio.wait_for(purge(), 30)
        except (RedisError, OSError, TimeoutError) as e:
            raise RedisUnavailable(f"purge: {e}") from None

    async def generation(self) -> int:
        """The invalidation counter; 0 before the first invalidation (or after Redis lost it).
        Not counted by the breaker: it guards lookups, this is a background check."""
        try:
            async with asyncio.timeout(self._deadline):
                raw = await self.client.get(self.generation_key)
        except (RedisError, OSError, TimeoutError) as e:
            raise RedisUnavailable(f"generation: {type(e).__name__}: {e}") from None
        return int(raw) if raw else 0

    @property
    def pending_invalidations(self) -> int:
        return len(self._pending) + (1 if self._purge_needed else 0)

    async def aclose(self) -> None:
        self._take_fills()  # best effort, like every fill
        for t in list(self._fills):
            t.cancel()
        await self.lookups.aclose()
        await self.client.aclose()


def parse_message(data: bytes) -> tuple[list[KeyDigest] | None, int | None]:
    """An invalidation message: digests (None for "clear everything") and its generation, if any."""
    if data == CLEAR_ALL:
        return None, None
    out = []
    generation = None
    for part in data.split(b","):
        if part[:1] == b"g" and part[1:].isdigit():
            generation = int(part[1:])
            continue
        try:
            out.append(bytes.fromhex(part.decode()))
        except ValueError:
            continue
    return out, generation


class _Lost(Exception):
    """This subscription missed an invalidation message."""


class Subscriber:
    """Applies invalidation messages to this instance's in-process cache and confirms it is in sync.

    On every subscription the in-process cache is cleared first: messages sent while the
    subscription was down are lost, and clearing is the only safe answer. Every ``interval`` the
    subscriber reads the generation counter. Behind it for two checks in a row, a generation
    skipped, or the counter gone backwards (Redis restarted or was flushed) means a message was
    lost: clear, and resubscribe when the connection itself may be stuck. Otherwise it calls
    ``confirm(until)``: in-process entries may live ``cache.local_ttl_synced`` until then. A failed
    check or a lost connection confirms nothing, so that trust lapses by itself within two
    intervals. Pending invalidations of this instance are retried on the same schedule.
    """

    def __init__(
        self,
        tier: RedisTier,
        apply: Callable[[Sequence[KeyDigest] | None], None],
        confirm: Callable[[float], None],
        url: str,
        connect_timeout: float,
        interval: float = 1.0,
    ) -> None:
        self._tier = tier
        self._apply = apply
        self._confirm = confirm
        self._interval = interval
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=None,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self._task: asyncio.Task[None] | None = None
        self._seen = 0  # highest generation applied
        self._ahead: int | None = None  # the counter, when the last check found it ahead of _seen
        self.connected = False
        self.received = 0
        self.reconnects = 0
        self.lost = 0
        self.ready = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="keystile-invalidation-subscriber"
        )

    def _on_message(self, data: bytes) -> None:
        self.received += 1
        digests, generation = parse_message(data)
        self._apply(digests)
        if generation is None:
            return  # published by a version without generations
        if generation > self._seen + 1:
            self._lose(f"generation {self._seen + 1} skipped")
        self._seen = max(self._seen, generation)

    def _lose(self, why: str) -> None:
        self.lost += 1
        log.warning("invalidation message lost (%s); clearing the in-process cache", why)
        self._apply(None)

    async def _check(self) -> None:
        """Compare the counter with what arrived; confirm, or clear on a loss."""
        try:
            current = await self._tier.generation()
        except RedisUnavailable as e:
            log.debug("generation check failed: %s", e)
            return  # confirms nothing: trust lapses by itself
        if current < self._seen:
            self._lose("the generation counter went back")
            self._seen = current
        elif self._ahead is not None and self._seen < self._ahead:
            self._lose(f"generation {self._ahead} announced but not received")
            raise _Lost("subscription behind the generation counter")
        self._ahead = current if current > self._seen else None
        self._confirm(time.monotonic() + 2 * self._interval)

    async def _run(self) -> None:
        backoff = 0.1
        first = True
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(5):
                    await pubsub.subscribe(self._tier.channel)
                    # Read after subscribing: a later generation is a message this connection gets.
                    self._seen = await self._tier.generation()
                self._ahead = None
                if not first:
                    self.reconnects += 1
                    log.info("invalidation subscription restored; clearing the in-process cache")
                self._apply(None)
                first = False
                self.connected = True
                self.ready.set()
                backoff = 0.1
                await self._tier.retry_pending()
                await self._check()
                last_check = last_ping = time.monotonic()
                while True:
                    msg = await pubsub.get_message(timeout=min(1.0, self._interval))
                    if msg is not None and msg.get("type") == "message":
                        self._on_message(msg["data"])
                    now = time.monotonic()
                    if now - last_check >= self._interval:
                        last_check = now
                        if self._tier.pending_invalidations:
                            await self._tier.retry_pending()
                        await self._check()
                    if now - last_ping > 2.0:
                        last_ping = now
                        async with asyncio.timeout(3):
                            await pubsub.ping()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failure: drop the connection, clear, reconnect
                self._confirm(0.0)
                if self.connected:
                    log.warning("invalidation subscription lost: %s: %s", type(e).__name__, e)
                self.connected = False
                self.ready.set()
            finally:
                try:
                    await asyncio.shield(pubsub.aclose())
                except Exception:  # noqa: S110 - the connection is already broken
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: S110
                pass
        await self._client.aclose()


def tombstone_ttl(store_timeout: float, redis_timeout: float) -> float:
    """How long a tombstone must live: longer than any lookup that could have read the store
    before the write committed, and its fill (sent up to ``FILL_DELAY`` later)."""
    return max(10.0, 2 * (store_timeout + redis_timeout) + FILL_DELAY)


async def publish_invalidation(
    redis: RedisConfig, cache: CacheConfig, store_timeout: float, digests: Sequence[KeyDigest]
) -> bool:
    """For writers that are not a running gateway (the CLI's direct store mode): tombstone and
    publish once. False when Redis could not be reached."""
    tier = RedisTier(redis, cache, tombstone_ttl(store_timeout, redis.socket_timeout))
    try:
        return await tier.invalidate(digests)
    finally:
        await tier.aclose()
