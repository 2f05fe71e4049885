"""Building the limiter from a Config, and its ``/metrics`` families.

Owns: choosing the state (Redis when ``redis.url`` is set, else this process, which ``serve``
logs at start), and the credits ledger's place. Must not: hold request logic.
"""

from __future__ import annotations

import logging

from prometheus_client.core import Metric

from gateway.clock import SYSTEM, Clock
from gateway.config import Config
from gateway.limits.credits import Credits
from gateway.limits.gate import LimitGate
from gateway.limits.redis_state import RedisState
from gateway.observability import counter
from gateway.store import Store

log = logging.getLogger("keystile.limits")


def namespace(cfg: Config) -> str:
    """The Redis key prefix every instance of one deployment shares (that of the cache)."""
    return cfg.redis.channel.rsplit(":", 1)[0] + ":"


async def build_limits(cfg: Config, store: Store | None, clock: Clock = SYSTEM) -> LimitGate:
    redis = None
    if cfg.redis.url:
        redis = RedisState(
            cfg.redis.url,
            namespace(cfg),
            timeout=cfg.redis.socket_timeout,
            connect_timeout=cfg.redis.connect_timeout,
            breaker_failures=cfg.redis.breaker_failures,
            breaker_reset=cfg.redis.breaker_reset,
        )
    else:
        log.warning(
            "rate limits and credits are held in this process (no redis.url): "
            "each instance and each worker enforces them on its own"
        )
    credits = None
    if store is not None:
        credits = Credits(store, interval=cfg.limits.credits_flush_interval, clock=clock)
    return LimitGate(cfg.limits, redis, clock, credits)


def limit_metrics(gate: LimitGate) -> list[Metric]:
    return [counter(name, doc, samples) for name, doc, samples in gate.metrics()]
