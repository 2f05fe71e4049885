"""Invalidation delivery: every instance learns of a changed key fast through Redis, surely through
the store.

Owns: the Redis message format, the one publisher the gateway and the CLI share (``Publisher``),
the subscriber that applies messages (``Subscriber``, the fast path) and the poller of the store's
invalidation outbox (``OutboxPoller``, the backstop, which also vouches for the in-process cache).
Must not: touch HTTP or import the store: the poller is handed an ``Outbox``, which the store is.

The path of one change:

1. The admin write commits the change and its outbox row (``seq``, digests) in one transaction.
2. The writer drops the digests from its own cache, notes them in its ledger, tombstones them in
   Redis and publishes them; every subscriber drops and notes them at once (milliseconds).
3. Every ``cache.sync_interval`` every process reads the outbox rows after the last one it saw (one
   indexed query) and applies those it had not heard of: drops them, notes them and tombstones
   them in Redis (best effort). A lost message, a writer cut off from Redis, a writer killed
   before it published: the change still arrives within about one interval.

Trust: in-process entries live ``cache.local_ttl_synced`` only while those reads succeed. A read
that began at ``t`` proves that every change committed before ``t`` has been applied, and vouches
until ``t + 2 * interval``; a failed read withdraws it at once, and entries fall back to
``cache.local_ttl``. Redis values are judged by the ledger (``gateway.cache.ledger``): one older
than an invalidation this process knows of is refused, whatever Redis went through.

Messages are ``hex,hex,...,s<seq>,g<n>``, or ``*`` ("forget everything") followed by ``g<n>``.
``g<n>`` comes from ``INCR {namespace}gen`` in the script that publishes, so generations arrive in
order: a subscriber that sees one skipped, the counter ahead of the messages for two checks, or the
counter gone back (Redis restarted), has lost messages and clears its in-process cache at once
instead of waiting for the next read of the outbox. A parser that predates seqs or generations
skips the parts it does not know (they are not hex) and applies the rest.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.cache.ledger import Ledger, remember_for
from gateway.cache.redis_tier import RedisTier, RedisUnavailable, tombstone_ttl
from gateway.clock import SYSTEM, Clock
from gateway.config import CacheConfig, RedisConfig
from gateway.keys import KeyDigest
from gateway.models import Invalidation

log = logging.getLogger("keystile.invalidation")

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
# Outbox rows read per query; a poll reads until it has caught up.
POLL_BATCH: Final = 500
# Seconds between one process's prunes of old outbox rows (the first at a random point in it,
# so instances started together do not prune together).
PRUNE_EVERY: Final = 300.0

Apply = Callable[[Sequence[KeyDigest] | None], None]


def retention_for(redis_ttl: float) -> float:
    """How long outbox rows are kept: well past the ledger's memory (a starting process reads that
    much), and an hour at least, so a process whose reads failed for a while catches up."""
    return max(3600.0, 2 * remember_for(redis_ttl))


def message(change: Invalidation) -> str:
    """The payload published for ``change`` (the script adds the generation)."""
    if change.digests is None:
        return "*"
    return ",".join([*(d.hex() for d in change.digests), f"s{change.seq}"])


def parse_message(data: bytes) -> tuple[list[KeyDigest] | None, int | None, int | None]:
    """A message: its digests (None for "forget everything"), its seq and generation, if given."""
    if data == CLEAR_ALL:
        return None, None, None
    out = []
    seq = generation = None
    for part in data.split(b","):
        tag, number = part[:1], part[1:]
        if tag in (b"g", b"s") and number.isdigit():
            if tag == b"g":
                generation = int(number)
            else:
                seq = int(number)
            continue
        try:
            out.append(bytes.fromhex(part.decode()))
        except ValueError:
            continue
    return out, seq, generation


class Publisher:
    """Tombstones and publishes committed invalidations: the gateway's and the CLI's one way to
    tell Redis. Best effort, bounded by the Redis timeout: the outbox delivers what it cannot."""

    def __init__(self, tier: RedisTier) -> None:
        self._tier = tier
        self.published = 0
        self.failures = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def publish(self, change: Invalidation) -> bool:
        """True when Redis took it; False when instances will learn of it from the store."""
        tier = self._tier
        pipe = tier.client.pipeline(transaction=False)
        if change.digests is not None:
            tier.tombstones(pipe, change.digests)
        pipe.eval(_PUBLISH, 1, tier.generation_key, tier.channel, message(change))
        try:
            await tier.guard("invalidate", pipe.execute())
        except RedisUnavailable as e:
            self.failures += 1
            log.warning(
                "invalidation %d not published (%s); instances apply it from the store instead",
                change.seq,
                e,
            )
            return False
        self.published += 1
        return True

    def tombstone_later(self, digests: Sequence[KeyDigest]) -> None:
        """Tombstone in the background (for changes learned from the store): whatever Redis
        still holds for them stops being served to versions that cannot judge stamps, and stops
        blocking fills."""
        task = asyncio.get_running_loop().create_task(self._tombstone(digests))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tombstone(self, digests: Sequence[KeyDigest]) -> None:
        pipe = self._tier.client.pipeline(transaction=False)
        self._tier.tombstones(pipe, digests)
        try:
            await self._tier.guard("tombstone", pipe.execute())
        except RedisUnavailable as e:
            log.debug("tombstones skipped: %s", e)

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def publish_invalidation(
    redis: RedisConfig, cache: CacheConfig, store_timeout: float, change: Invalidation
) -> bool:
    """For writers that are not a running gateway (the CLI's direct store mode): tombstone and
    publish once. False when Redis could not be reached."""
    tier = RedisTier(redis, cache, tombstone_ttl(store_timeout, redis.socket_timeout))
    try:
        return await Publisher(tier).publish(change)
    finally:
        await tier.aclose()


class Outbox(Protocol):
    """The store's invalidation outbox, as the poller reads it (``gateway.store.Store`` is one)."""

    async def latest_invalidation(self) -> int: ...
    async def invalidations_since(self, seq: int, limit: int) -> list[Invalidation]: ...
    async def recent_invalidations(self, since: float) -> list[Invalidation]: ...
    async def prune_invalidations(self, before: float) -> int: ...


class OutboxPoller:
    """Reads the store's outbox every ``interval``, applies what this process had not heard of,
    and vouches for the in-process cache while it can (see the module doc).

    ``apply`` drops digests (None: everything) from the in-process cache; ``confirm(until)`` lets
    its entries live their long lifetime until then (monotonic; 0 withdraws it); ``tombstone``
    (optional) tombstones digests in Redis in the background. ``clock`` must be the local tier's:
    ``confirm`` deadlines are in its monotonic time.
    """

    def __init__(
        self,
        outbox: Outbox,
        ledger: Ledger,
        apply: Apply,
        confirm: Callable[[float], None],
        *,
        interval: float,
        timeout: float,
        retention: float,
        tombstone: Callable[[Sequence[KeyDigest]], None] | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self._outbox = outbox
        self._ledger = ledger
        self._apply = apply
        self._confirm = confirm
        self._tombstone = tombstone
        self._interval = interval
        self._timeout = timeout
        self._retention = retention
        self._clock = clock.monotonic  # reads' start, vouching deadlines (the local tier's time)
        self._wall = clock.time  # outbox row times, written as wall time
        self._task: asyncio.Task[None] | None = None
        self._last_ok = self._wall()  # wall time of the last read that succeeded
        self._failing = False
        self.last_seen = 0  # every row up to this seq has been applied
        self.polls = 0
        self.failures = 0
        self.delivered = 0  # rows that were news: no message had brought them
        self.pruned = 0

    async def load(self) -> None:
        """At start: where the outbox stands, and the recent invalidations that Redis values may
        predate. Raises what the store raises."""
        started = self._clock()
        async with asyncio.timeout(self._timeout):
            latest = await self._outbox.latest_invalidation()
        async with asyncio.timeout(self._timeout):
            recent = await self._outbox.recent_invalidations(self._wall() - self._ledger.remember)
        for change in recent:
            self._ledger.note(change.seq, change.digests)
        self._ledger.note(latest, ())
        self.last_seen = latest
        self._last_ok = self._wall()
        self._confirm(started + 2 * self._interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="keystile-outbox-poller")

    def lag(self) -> float:
        """Seconds since this process last read the outbox to its end: a change written before then
        has been applied here, so a revocation applies within this plus one interval."""
        return max(0.0, self._wall() - self._last_ok)

    async def poll(self) -> int:
        """Read and apply every row after ``last_seen``; returns how many. Raises what the store
        raises (what was applied before stays applied)."""
        started = self._clock()
        out_of_touch = self._wall() - self._last_ok > self._retention / 2
        count = 0
        while True:
            async with asyncio.timeout(self._timeout):
                rows = await self._outbox.invalidations_since(self.last_seen, POLL_BATCH)
            for change in rows:
                self._take(change)
            count += len(rows)
            if len(rows) < POLL_BATCH:
                break
        if out_of_touch:
            # Rows this process never read may have been pruned meanwhile: forget everything.
            log.warning("the invalidation outbox was unread for too long; clearing the in-process cache")
            self._ledger.note(self.last_seen, None)
            self._apply(None)
        self._last_ok = self._wall()
        self._confirm(started + 2 * self._interval)
        self._ledger.expire()
        self.polls += 1
        return count

    def _take(self, change: Invalidation) -> None:
        news = self._ledger.note(change.seq, change.digests)
        self.last_seen = max(self.last_seen, change.seq)
        if news is None:
            self.delivered += 1
            self._apply(None)
        elif news:
            self.delivered += 1
            self._apply(news)
            if self._tombstone is not None:
                self._tombstone(news)

    async def _run(self) -> None:
        next_prune = self._clock() + random.uniform(0, PRUNE_EVERY)
        while True:
            started = self._clock()
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._confirm(0.0)
                self.failures += 1
                if not self._failing:
                    log.warning(
                        "cannot read the invalidation outbox (%s: %s); in-process entries fall back "
                        "to cache.local_ttl until it answers",
                        type(e).__name__,
                        e,
                    )
                self._failing = True
            else:
                if self._failing:
                    log.info("the invalidation outbox answers again")
                self._failing = False
                if started >= next_prune:
                    next_prune = started + PRUNE_EVERY
                    await self._prune()
            await asyncio.sleep(max(0.0, self._interval - (self._clock() - started)))

    async def _prune(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                self.pruned += await self._outbox.prune_invalidations(self._wall() - self._retention)
        except Exception as e:  # another instance prunes next time
            log.debug("pruning the invalidation outbox failed: %s: %s", type(e).__name__, e)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class _Lost(Exception):
    """This subscription missed an invalidation message."""


class Subscriber:
    """Applies invalidation messages to this instance's in-process cache and ledger.

    On every subscription the in-process cache is cleared first: messages sent while the
    subscription was down are lost, and clearing is the fast answer (the outbox poller would bring
    them within an interval). Every ``interval`` the subscriber reads the generation counter.
    Behind it for two checks in a row, a generation skipped, or the counter gone backwards (Redis
    restarted or was flushed) means a message was lost: clear, and resubscribe when the
    connection itself may be stuck.
    """

    def __init__(
        self,
        tier: RedisTier,
        apply: Apply,
        ledger: Ledger,
        url: str,
        connect_timeout: float,
        interval: float = 1.0,
    ) -> None:
        self._tier = tier
        self._apply = apply
        self._ledger = ledger
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
        digests, seq, generation = parse_message(data)
        self._apply(digests)
        if seq is not None and digests is not None:
            self._ledger.note(seq, digests)
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
        """Compare the counter with what arrived; clear on a loss."""
        try:
            current = await self._tier.generation()
        except RedisUnavailable as e:
            log.debug("generation check failed: %s", e)
            return
        if current < self._seen:
            self._lose("the generation counter went back")
            self._seen = current
        elif self._ahead is not None and self._seen < self._ahead:
            self._lose(f"generation {self._ahead} announced but not received")
            raise _Lost("subscription behind the generation counter")
        self._ahead = current if current > self._seen else None

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
                await self._check()
                # Scheduling of checks and pings, like the loop's own timers: machine time.
                last_check = last_ping = time.monotonic()
                while True:
                    msg = await pubsub.get_message(timeout=min(1.0, self._interval))
                    if msg is not None and msg.get("type") == "message":
                        self._on_message(msg["data"])
                    now = time.monotonic()
                    if now - last_check >= self._interval:
                        last_check = now
                        await self._check()
                    if now - last_ping > 2.0:
                        last_ping = now
                        async with asyncio.timeout(3):
                            await pubsub.ping()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failure: drop the connection, clear, reconnect
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
