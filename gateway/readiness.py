"""Readiness: whether this gateway can serve, as ``/readyz`` reports it.

Owns: the checks and their public wording: the store answers and its schema is migrated, and
this instance's hash secret is the store's current one (all required); Redis and its subscription
(reported, not required: without them Keystile falls back to the store); further notes a caller
adds (the supervisor's workers). Must not: change any state, or put an error's text (hosts, users,
SQL) in a check: that goes to the log only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from gateway.store import Store
from gateway.store.migrations import latest_version

log = logging.getLogger("keystile")


class Breaker(Protocol):
    @property
    def state(self) -> str: ...


class RedisState(Protocol):
    @property
    def breaker(self) -> Breaker: ...


class Subscription(Protocol):
    @property
    def connected(self) -> bool: ...


async def readiness(
    store: Store,
    timeout: float,
    redis: RedisState | None,
    subscriber: Subscription | None,
    notes: Mapping[str, Callable[[], str]],
    key_hashing: Callable[[Sequence[str]], bool] | None = None,
) -> tuple[bool, dict[str, str]]:
    """(ready, one line per check). ``key_hashing`` says whether this instance's hash secret
    fits the fingerprints the store recorded (oldest first)."""
    checks: dict[str, str] = {}
    ready = True
    try:
        version = await asyncio.wait_for(store.schema_version(), timeout)
        checks["store"] = "ok"
        latest = latest_version(store.backend)
        if version < latest:
            ready = False
            checks["schema"] = f"version {version}, needs {latest}: run keystile migrate"
        elif version > latest:
            # A rolling upgrade migrated ahead of this instance; migrations are additive, so
            # it keeps serving until it is replaced (a new start would refuse).
            checks["schema"] = f"version {version}, newer than this instance ({latest})"
        else:
            checks["schema"] = f"version {version}"
        if version >= latest and key_hashing is not None:
            # Another secret became the newest (a rotation started elsewhere, or this instance
            # has the wrong one): keys re-keyed to it would all get 401 here.
            if key_hashing(await asyncio.wait_for(store.hash_secrets(), timeout)):
                checks["key_hashing"] = "ok"
            else:
                ready = False
                checks["key_hashing"] = "the hash secret is not the store's current one: restart with it"
    except Exception as e:
        ready = False
        # Public: the kind of failure only; its text (hosts, users, SQL) goes to the log.
        checks["store"] = f"unavailable: {type(e).__name__}"
        log.warning("readiness: store unavailable: %s: %s", type(e).__name__, e)
    if redis is None:
        checks["redis"] = "disabled"
    else:
        checks["redis"] = f"breaker {redis.breaker.state}, subscription " + (
            "connected" if subscriber is not None and subscriber.connected else "down"
        )
    for name, note in notes.items():
        checks[name] = note()
    return ready, checks
