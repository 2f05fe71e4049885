"""The tiered loader behind the in-process cache: Redis first, then the primary store.

Owns: the fall-through order and what is written back. Must not: touch HTTP. A digest absent from
the result could not be resolved (both tiers failed): the cache reports it as unavailable, never as
unknown. Store answers (found or not) are written back to Redis without making the request wait,
stamped with the invalidation seq known committed before the store was read; they replace the
Redis values found stale (see ``gateway.cache.redis_tier``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from gateway.cache.redis_tier import STALE, RedisTier, RedisUnavailable
from gateway.clock import SYSTEM, Clock
from gateway.keys import KeyDigest
from gateway.models import IdentityRecord

log = logging.getLogger("keystile.cache")

StoreLoad = Callable[[Sequence[KeyDigest]], Awaitable[dict[KeyDigest, IdentityRecord]]]


class TieredLoader:
    def __init__(self, redis: RedisTier | None, store_load: StoreLoad, clock: Clock = SYSTEM) -> None:
        self.redis = redis
        self._wall = clock.time  # Redis TTLs end by a key's expiry, which is wall time
        self._store_load = store_load
        self.store_loads = 0
        self.store_errors = 0

    async def __call__(self, digests: Sequence[KeyDigest]) -> dict[KeyDigest, IdentityRecord | None]:
        out: dict[KeyDigest, IdentityRecord | None] = {}
        need: Sequence[KeyDigest] = digests
        stale: list[KeyDigest] = []
        redis = self.redis
        if redis is not None and redis.breaker.allow():
            try:
                got = await redis.get_many(digests)
            except RedisUnavailable as e:
                log.warning("redis lookup failed, using the store: %s", e)
                got = {}
            need = []
            for d in digests:
                value = got.get(d, b"")
                if value is None or isinstance(value, IdentityRecord):
                    out[d] = value
                else:  # not cached, tombstoned by a recent write, or stale
                    need.append(d)
                    if value is STALE:
                        stale.append(d)
        if not need:
            return out
        # Before the store read: every invalidation up to it is reflected in what the read returns.
        stamp = redis.ledger.committed if redis is not None else 0
        self.store_loads += 1
        try:
            stored = await self._store_load(need)
        except Exception as e:
            self.store_errors += 1
            log.warning("store lookup of %d digests failed: %s: %s", len(need), type(e).__name__, e)
            return out
        fresh = {d: stored.get(d) for d in need}
        out.update(fresh)
        if redis is not None:
            redis.fill_later(fresh, self._wall(), stamp, stale)
        return out
