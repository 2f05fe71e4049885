"""The scrape-time metrics of the long-lived pieces: cache tiers, Redis breaker, invalidation
delivery, throttle and usage buffer (part of observability; ``Metrics.add_state`` takes them).

Owns: each metric's name, help text and labels, read from the pieces' own counters at scrape time.
The pieces are described by the protocols below, so this module knows their counters only, not
their classes. Must not: import the store, the cache, the proxy or the app, or change any state.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.core import Metric

from gateway.clock import SYSTEM, Clock
from gateway.observability import counter, gauge


class LocalCounts(Protocol):
    """The in-process tier (``gateway.cache.LocalTier``)."""

    hits: int
    misses: int
    negative_hits: int
    @property
    def negatives(self) -> int: ...
    trusted_until: float
    def __len__(self) -> int: ...


class LoaderCounts(Protocol):
    """The tiered loader (``gateway.cache.tiers.TieredLoader``)."""

    store_loads: int
    store_errors: int


class BreakerState(Protocol):
    @property
    def state(self) -> str: ...
    @property
    def opens(self) -> int: ...


class RedisCounts(Protocol):
    """The Redis tier (``gateway.cache.redis_tier.RedisTier``)."""

    hits: int
    misses: int
    negative_hits: int
    stale: int
    errors: int
    @property
    def breaker(self) -> BreakerState: ...


class PublisherCounts(Protocol):
    failures: int


class SubscriberCounts(Protocol):
    received: int
    lost: int
    connected: bool


class PollerCounts(Protocol):
    polls: int
    failures: int
    delivered: int
    def lag(self) -> float: ...


class ThrottleCounts(Protocol):
    refused: int
    blocks: int
    forgotten: int
    @property
    def blocked(self) -> Sized: ...
    @property
    def counting(self) -> int: ...


class UsageCounts(Protocol):
    flushes: int
    flush_failures: int
    @property
    def pending(self) -> int: ...
    dropped: int
    def lag(self, now: float) -> float: ...


@dataclass(frozen=True, slots=True)
class Sources:
    """The pieces whose state is published; ``None`` for those not configured (no Redis)."""

    local: LocalCounts
    loader: LoaderCounts
    poller: PollerCounts
    throttle: ThrottleCounts
    usage: UsageCounts
    redis: RedisCounts | None = None
    publisher: PublisherCounts | None = None
    subscriber: SubscriberCounts | None = None
    clock: Clock = SYSTEM


def collector(src: Sources) -> Callable[[], list[Metric]]:
    """For ``Metrics.add_state``: every state metric, read when called."""

    def collect() -> list[Metric]:
        return [
            *cache_metrics(src),
            *invalidation_metrics(src),
            *throttle_metrics(src.throttle),
            *usage_metrics(src.usage, src.clock),
        ]

    return collect


def cache_metrics(src: Sources) -> list[Metric]:
    local = src.local
    tiers = [
        ({"tier": "local", "result": "hit"}, local.hits),
        ({"tier": "local", "result": "miss"}, local.misses),
        ({"tier": "local", "result": "negative_hit"}, local.negative_hits),
        ({"tier": "store", "result": "load"}, src.loader.store_loads),
        ({"tier": "store", "result": "error"}, src.loader.store_errors),
    ]
    out: list[Metric] = []
    if src.redis is not None:
        r = src.redis
        tiers += [
            ({"tier": "redis", "result": "hit"}, r.hits),
            ({"tier": "redis", "result": "miss"}, r.misses),
            ({"tier": "redis", "result": "negative_hit"}, r.negative_hits),
            ({"tier": "redis", "result": "stale"}, r.stale),
            ({"tier": "redis", "result": "error"}, r.errors),
        ]
        state = {"closed": 0, "half_open": 1, "open": 2}[r.breaker.state]
        out.append(
            gauge("keystile_redis_breaker_state", "Redis breaker: 0 closed, 1 half-open, 2 open.", state)
        )
        out.append(
            counter(
                "keystile_redis_breaker_opens", "Times the Redis breaker opened.", [({}, r.breaker.opens)]
            )
        )
    out.append(
        gauge(
            "keystile_cache_in_sync",
            "1 while this process can confirm it missed no invalidation.",
            1 if local.trusted_until > src.clock.monotonic() else 0,
        )
    )
    out.append(counter("keystile_cache_lookups", "Identity lookups by tier and result.", tiers))
    out.append(gauge("keystile_cache_local_entries", "Entries in the in-process cache.", len(local)))
    out.append(
        gauge(
            "keystile_cache_local_negative_entries",
            "Unknown keys remembered in the in-process cache.",
            local.negatives,
        )
    )
    return out


def invalidation_metrics(src: Sources) -> list[Metric]:
    out: list[Metric] = []
    if src.publisher is not None:
        out.append(
            counter(
                "keystile_invalidations_unpublished",
                "Invalidations this process could not publish (instances applied them from the store).",
                [({}, src.publisher.failures)],
            )
        )
    if src.subscriber is not None:
        sub = src.subscriber
        out.append(
            counter("keystile_invalidations_received", "Invalidation messages applied.", [({}, sub.received)])
        )
        out.append(
            gauge("keystile_invalidation_subscription_up", "1 when subscribed.", 1 if sub.connected else 0)
        )
        out.append(
            counter(
                "keystile_invalidations_lost",
                "Invalidation messages found missing (each cleared the in-process cache).",
                [({}, sub.lost)],
            )
        )
    poller = src.poller
    out.append(
        counter(
            "keystile_invalidation_outbox_reads",
            "Reads of the store's invalidation outbox, by result.",
            [({"result": "ok"}, poller.polls), ({"result": "error"}, poller.failures)],
        )
    )
    out.append(
        counter(
            "keystile_invalidations_from_store",
            "Invalidations first learned from the store's outbox (no message had brought them).",
            [({}, poller.delivered)],
        )
    )
    out.append(
        gauge(
            "keystile_invalidation_lag_seconds",
            "Seconds since this process last read the store's invalidation outbox to its end.",
            poller.lag(),
        )
    )
    return out


def throttle_metrics(t: ThrottleCounts) -> list[Metric]:
    return [
        counter(
            "keystile_throttle_refused",
            "Keyed requests refused with 429 before any lookup: their client was blocked.",
            [({}, t.refused)],
        ),
        counter(
            "keystile_throttle_blocks", "Times a client was blocked after failed keys.", [({}, t.blocks)]
        ),
        counter(
            "keystile_throttle_forgotten",
            "Clients whose failure count was dropped at throttle.max_clients while counting.",
            [({}, t.forgotten)],
        ),
        gauge("keystile_throttle_blocked_clients", "Clients blocked now.", len(t.blocked)),
        gauge("keystile_throttle_counting_clients", "Clients with failed keys being counted.", t.counting),
    ]


def usage_metrics(u: UsageCounts, clock: Clock = SYSTEM) -> list[Metric]:
    return [
        counter("keystile_usage_flushes", "Usage batches written to the store.", [({}, u.flushes)]),
        counter(
            "keystile_usage_flush_failures",
            "Usage batches that failed and were kept.",
            [({}, u.flush_failures)],
        ),
        gauge("keystile_usage_pending_keys", "Keys with unflushed usage.", u.pending),
        gauge("keystile_usage_flush_lag_seconds", "Age of the oldest unflushed use.", u.lag(clock.time())),
        counter("keystile_usage_dropped", "Usage bumps dropped at the pending bound.", [({}, u.dropped)]),
    ]
