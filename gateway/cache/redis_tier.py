"""The Redis tier: identities shared by every instance, stamped so stale ones are refused; a breaker.

Owns: the Redis clients (the lean pipelined one of ``gateway.cache.resp`` for lookups and fills,
a redis-py pool for the rest), the encoding of cached identities, their stamps, tombstones and the
circuit breaker. Must not: touch HTTP or the store; publishing and subscribing belong to
``gateway.cache.invalidation``; the tiered loader in ``gateway.cache.tiers`` decides when to fall
through.

Keys are ``{namespace}id:{hex digest}``; values are msgpack ``[stamp, IdentityRecord]``, ``-`` for a
cached "unknown digest" (short TTL), or ``x`` for a tombstone.

Stamps. Redis can hold values older than it should: restored from a snapshot, a replica promoted
while behind, a tombstone that never arrived because the writer could not reach Redis. Every
identity is therefore written with a stamp, the invalidation ``seq`` the filling process knew to be
committed before it read the store (``Ledger.committed``), and a lookup treats a value as not
cached when this process knows of a later invalidation of that digest or of every key
(``Ledger.stale``: one dict lookup per hit); the store's answer then replaces it (a plain SET, as
an NX fill could not). Why that suffices is in ``gateway.cache.ledger``. "Unknown" values carry no
stamp: a stale one can only refuse a key, for at most its short TTL. Values written by a version
without stamps do not decode, and count as not cached.

Tombstones. An admin write sets tombstones (not DEL) for the digests it changed; fills use
``SET ... NX``, so a load that read the store before the write committed cannot put the old identity
back while the tombstone lives (it outlives any load). A fill waits for the next lookup and goes out
ahead of its MGET in the same write, or alone after ``FILL_DELAY``: a first-seen key then costs one
round trip, not two.

Failure: every command runs under ``socket_timeout`` with no retries, so a frozen Redis costs a
request at most that long; after ``breaker_failures`` consecutive failures the breaker opens and
lookups skip Redis for ``breaker_reset`` seconds, then one probe is let through (half-open).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from typing import Final, Literal

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.cache.ledger import Ledger
from gateway.cache.resp import LeanRedis, RespError, set_nx, set_px
from gateway.clock import SYSTEM, Clock
from gateway.config import CacheConfig, RedisConfig
from gateway.keys import KeyDigest
from gateway.models import IdentityRecord

log = logging.getLogger("keystile.redis")

NEGATIVE: Final = b"-"
TOMBSTONE: Final = b"x"
# Not a stored value: what ``get_many`` reports for an identity older than a known invalidation.
STALE: Final = b"stale"
# Longest a fill waits for a lookup to ride with. A tombstone outlives any load (tombstone_ttl):
# this delay plus the call's deadline stays far inside it.
FILL_DELAY: Final = 0.05


class Stamped(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A cached identity and the invalidation seq its store read reflects (see the module doc)."""

    stamp: int
    identity: IdentityRecord


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Stamped)


class RedisUnavailable(Exception):
    pass


class Breaker:
    """Consecutive-failure circuit breaker: closed → open (skip) → half-open (one probe)."""

    def __init__(self, failures: int, reset: float, clock: Clock = SYSTEM) -> None:
        self._now = clock.monotonic
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
        if self._now() - self._opened_at >= self._reset:
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
            self._opened_at = self._now()


Lookup = dict[KeyDigest, IdentityRecord | bytes | None]


class RedisTier:
    def __init__(
        self,
        cfg: RedisConfig,
        cache: CacheConfig,
        tombstone_ttl: float,
        ledger: Ledger | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self._cfg = cfg
        self._ttl = cache.redis_ttl
        self._negative_ttl = max(cache.negative_ttl, 0.001)
        self.tombstone_ttl = tombstone_ttl
        self.ledger = ledger if ledger is not None else Ledger(0.0)
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
        self.breaker = Breaker(cfg.breaker_failures, cfg.breaker_reset, clock)
        self._deadline = max(cfg.socket_timeout, cfg.connect_timeout)
        self._fills: set[asyncio.Task[None]] = set()
        self._fill_queue: list[bytes] = []  # encoded SET commands, oldest first
        self._fill_timer: asyncio.TimerHandle | None = None
        self.hits = 0
        self.negative_hits = 0
        self.misses = 0
        self.stale = 0
        self.errors = 0

    def key(self, digest: KeyDigest) -> str:
        return self._prefix + digest.hex()

    async def guard(self, what: str, coro: object) -> object:
        """Run one redis-py call under the hard deadline, feeding the breaker."""
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
        """One MGET. Values: an identity, ``None`` (known unknown), TOMBSTONE, or STALE (an
        identity older than an invalidation this process knows of); absent = not cached.
        Fills waiting to be written go out ahead of it, in the same write."""
        try:
            raw = await self.lookups.mget([self._prefix + d.hex() for d in digests], self._take_fills())
        except RespError as e:
            self.errors += 1
            self.breaker.failure()
            raise RedisUnavailable(f"mget: {e}") from None
        self.breaker.success()
        # Ledger.stale, inlined: a hit costs one dict lookup more than an unstamped value would.
        floor, latest = self.ledger.floor, self.ledger.latest
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
                    cached = _dec.decode(value)
                except msgspec.DecodeError:  # written by another version: stale
                    self.stale += 1
                    out[d] = STALE
                    continue
                stamp = cached.stamp
                if stamp < floor or stamp < latest.get(d, 0):
                    self.stale += 1
                    out[d] = STALE
                else:
                    self.hits += 1
                    out[d] = cached.identity
        return out

    def fill_later(
        self,
        values: dict[KeyDigest, IdentityRecord | None],
        now: float,
        stamp: int = 0,
        replace: Collection[KeyDigest] = (),
    ) -> None:
        """Write store answers back without making the request wait: with the next lookup's MGET
        (one round trip for both), or alone after ``FILL_DELAY`` if no lookup comes.

        ``stamp``: the invalidation seq known committed before the store was read (0 claims
        nothing: the value counts as older than every invalidation known). A digest in
        ``replace`` held a stale value: it is overwritten; every other fill is NX (a tombstone or a
        newer fill stays)."""
        if not values or not self.breaker.allow():
            return
        for d, ident in values.items():
            put = set_px if d in replace else set_nx
            if ident is None:
                self._fill_queue.append(put(self.key(d), NEGATIVE, int(self._negative_ttl * 1000)))
                continue
            ttl = self._ttl
            if ident.expires_at is not None:
                ttl = min(ttl, max(ident.expires_at - now, 1.0))
            self._fill_queue.append(put(self.key(d), _enc.encode(Stamped(stamp, ident)), int(ttl * 1000)))
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

    def tombstones(self, pipe: aioredis.client.Pipeline, digests: Sequence[KeyDigest]) -> None:
        """Queue on ``pipe`` the tombstones of ``digests`` (they replace whatever is cached)."""
        px = int(self.tombstone_ttl * 1000)
        for d in digests:
            pipe.set(self.key(d), TOMBSTONE, px=px)

    async def generation(self) -> int:
        """The invalidation counter; 0 before the first invalidation (or after Redis lost it).
        Not counted by the breaker: it guards lookups, this is a background check."""
        try:
            async with asyncio.timeout(self._deadline):
                raw = await self.client.get(self.generation_key)
        except (RedisError, OSError, TimeoutError) as e:
            raise RedisUnavailable(f"generation: {type(e).__name__}: {e}") from None
        return int(raw) if raw else 0

    async def aclose(self) -> None:
        self._take_fills()  # best effort, like every fill
        for t in list(self._fills):
            t.cancel()
        await self.lookups.aclose()
        await self.client.aclose()


def tombstone_ttl(store_timeout: float, redis_timeout: float) -> float:
    """How long a tombstone must live: longer than any lookup that could have read the store
    before the write committed, and its fill (sent up to ``FILL_DELAY`` later)."""
    return max(10.0, 2 * (store_timeout + redis_timeout) + FILL_DELAY)
