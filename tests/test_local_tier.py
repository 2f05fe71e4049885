"""The in-process tier's lifetimes: keys cached together expire apart, never later than the TTL."""

from __future__ import annotations

import hashlib

from gateway.cache import MISS, TTL_SPREAD, LocalTier
from gateway.keys import KeyDigest
from gateway.models import IdentityRecord


def _digest(i: int) -> KeyDigest:
    return KeyDigest(hashlib.sha256(b"key %d" % i).digest())


def _record(i: int) -> IdentityRecord:
    return IdentityRecord(f"key_{i}", _digest(i), "ks_live_x", "prn_1", "alice", "default", (), None, "live")


def _alive(tier: LocalTier, n: int, now: float) -> int:
    return sum(tier.get(_digest(i), now) is not MISS for i in range(n))


def test_keys_cached_in_one_instant_expire_over_a_span_and_never_late() -> None:
    n, ttl = 400, 100.0
    tier = LocalTier(ttl=ttl, negative_ttl=2.0, max_entries=10_000)
    for i in range(n):
        tier.put(_digest(i), _record(i), 0.0)
    assert _alive(tier, n, ttl * (1 - TTL_SPREAD) - 0.01) == n  # none before the span starts
    midway = _alive(tier, n, ttl * (1 - TTL_SPREAD / 2))
    assert n * 0.3 < midway < n * 0.7  # about half have expired halfway through it
    assert _alive(tier, n, ttl) == 0  # a lifetime is never longer than the TTL


def test_the_synced_lifetime_and_negative_entries_are_spread_too() -> None:
    n = 400
    tier = LocalTier(ttl=10.0, negative_ttl=2.0, max_entries=10_000, synced_ttl=300.0)
    tier.trusted_until = 1e9
    for i in range(n):
        tier.put(_digest(i), _record(i), 0.0)
        tier.put(_digest(n + i), None, 0.0)
    assert _alive(tier, n, 269.9) == n
    assert 0 < _alive(tier, n, 285.0) < n
    assert _alive(tier, n, 300.0) == 0
    negatives = [tier.get(_digest(n + i), 1.9) for i in range(n)]
    assert negatives.count(MISS) not in (0, n)  # negative entries: between 1.8 and 2 s
    assert all(tier.get(_digest(n + i), 2.0) is MISS for i in range(n))


def test_negative_entries_never_evict_valid_keys() -> None:
    """Unknown digests have their own bounded space: any number of them leaves every valid key in."""
    tier = LocalTier(ttl=60.0, negative_ttl=2.0, max_entries=5, negative_max_entries=10)
    for i in range(5):
        tier.put(_digest(i), _record(i), 0.0)
    for i in range(1000, 1500):  # a flood of unknown keys
        tier.put(_digest(i), None, 0.1)
    assert len(tier) == 5 and tier.negatives == 10  # the newest unknowns, first in first out
    assert all(tier.get(_digest(i), 0.2) == _record(i) for i in range(5))
    assert tier.get(_digest(1499), 0.2) is None  # a negative hit
    assert tier.get(_digest(1000), 0.2) is MISS  # pushed out by later unknowns only
    assert (tier.hits, tier.negative_hits, tier.misses) == (5, 1, 1)


def test_a_digest_lives_in_one_space_at_a_time() -> None:
    tier = LocalTier(ttl=60.0, negative_ttl=2.0, max_entries=5, negative_max_entries=5)
    d = _digest(1)
    tier.put(d, None, 0.0)
    tier.put(d, _record(1), 0.0)  # created after it was looked up as unknown
    assert tier.get(d, 0.1) == _record(1) and tier.negatives == 0
    tier.put(d, None, 0.2)  # revoked: the store now says unknown
    assert tier.get(d, 0.3) is None and len(tier) == 0
    tier.discard(d)
    assert tier.get(d, 0.3) is MISS
    tier.put(d, None, 0.4)
    tier.put(_digest(2), _record(2), 0.4)
    tier.clear()
    assert len(tier) == 0 and tier.negatives == 0
