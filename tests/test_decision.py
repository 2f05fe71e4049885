"""One decision on every path: the proxy's (check, then resolve), the admin verify's, whoami's
and the throttle's "known valid", each against ``decision.decide`` as an injected clock moves
across a key's expiry and a rotation's grace. Real SQLite store behind the cache front; no sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway import decision
from gateway.auth import Authenticator, KeyMemory
from gateway.cache import MISS, IdentityCache, LocalTier
from gateway.clock import ManualClock
from gateway.keys import KeyDigest
from gateway.models import IdentityRecord
from tests.conftest import HASH_SECRET, GatewayFactory, Running

READ, ADMIN = frozenset({"read"}), frozenset({"admin"})


def _authenticator(
    gw: Running, clock: ManualClock, secret: bytes, ttl: float = 86400.0
) -> tuple[Authenticator, IdentityCache]:
    """An authenticator over a cache of its own, both on ``clock``, loading from the real store."""

    async def load(digests: Sequence[KeyDigest]) -> dict[KeyDigest, IdentityRecord | None]:
        found = await gw.store.find_identities(digests, clock.time())
        return {d: found.get(d) for d in digests}

    local = LocalTier(ttl=ttl, negative_ttl=60.0, max_entries=100, clock=clock)
    cache = IdentityCache(local, load)
    return Authenticator(gw.cfg, secret, cache, clock=clock), cache


async def _every_path(auth: Authenticator, key: str, scopes: frozenset[str]) -> dict[str, object]:
    """What each path answers for ``key`` on a route needing ``scopes``."""
    known = auth.check(key, scopes)
    proxy = await auth.resolve(known, scopes) if isinstance(known, bytes) else known
    return {
        "proxy": decision.outcome(proxy)[0],
        "verify": (await auth.verify(key, scopes))[0],
        "whoami": (await auth.identify(key))[0],
        "known_valid": auth.known_valid(key),
    }


def _expected(outcome: str, valid_key: bool) -> dict[str, object]:
    return {
        "proxy": outcome,
        "verify": outcome,
        "whoami": "ok" if valid_key else outcome,
        "known_valid": valid_key,
    }


async def test_every_path_decides_alike_as_the_clock_passes_expiry_and_grace(
    keystile: GatewayFactory,
) -> None:
    gw = await keystile()
    clock = ManualClock(wall=time.time(), mono=1000.0)
    auth, cache = _authenticator(gw, clock, HASH_SECRET)
    expiring = await gw.key(scopes=["read"], expires_in=3600)
    old = await gw.lifecycle.create_key("alice", "p1", scopes=["read"], actor="test")
    new = await gw.lifecycle.rotate_key(old.record.id, grace=600, actor="test")

    for key in (expiring, old.secret, new.secret):
        assert await _every_path(auth, key, READ) == _expected("ok", True)
        assert await _every_path(auth, key, ADMIN) == _expected("insufficient_scope", True)
    loads = cache.loads

    clock.advance(601)  # the old secret's grace is over: refused like an unknown key
    assert await _every_path(auth, old.secret, READ) == _expected("invalid", False)
    assert await _every_path(auth, new.secret, READ) == _expected("ok", True)
    clock.advance(3000)  # past the first key's expiry
    assert await _every_path(auth, expiring, READ) == _expected("expired", False)
    assert await _every_path(auth, expiring, ADMIN) == _expected("expired", False)
    assert cache.loads == loads  # all of it decided on what the in-process tier holds

    # Each answer is decide's, at the clock's time, on the identity the cache front holds.
    for key in (expiring, old.secret, new.secret):
        memory = KeyMemory()
        auth.check(key, frozenset(), memory)  # the connection's memory holds the digest
        ident = await cache.lookup(memory.digest)
        for scopes in (READ, ADMIN, frozenset()):
            assert (
                decision.outcome(decision.decide(ident, scopes, clock.time()))[0]
                == (await auth.verify(key, scopes))[0]
            )


async def test_the_in_process_tier_ends_entries_by_its_clock(keystile: GatewayFactory) -> None:
    gw = await keystile()
    clock = ManualClock(wall=time.time(), mono=1000.0)
    auth, cache = _authenticator(gw, clock, HASH_SECRET, ttl=600.0)
    key = await gw.key()
    d = auth.check(key)
    assert isinstance(d, bytes) and cache.peek(d) is MISS
    assert (await auth.identify(key))[0] == "ok"
    assert isinstance(cache.peek(d), IdentityRecord)
    clock.advance(539)  # under the TTL less its spread (up to a tenth): still held
    assert isinstance(cache.peek(d), IdentityRecord)
    clock.advance(61)  # past the TTL
    assert cache.peek(d) is MISS


async def test_a_connection_reuses_a_digest_only_with_the_authenticator_that_made_it(
    keystile: GatewayFactory,
) -> None:
    """After a reload (a new authenticator, maybe a new secret) a connection's remembered digest
    is not reused: the key is hashed again with the new authenticator's secret."""
    gw = await keystile()
    clock = ManualClock(wall=time.time(), mono=1000.0)
    first, _ = _authenticator(gw, clock, HASH_SECRET)
    other, _ = _authenticator(gw, clock, b"another secret".ljust(32, b"."))
    key = await gw.key()
    memory = KeyMemory()
    assert (await first.identify(key))[0] == "ok"
    assert isinstance(first.check(key, READ, memory), IdentityRecord)
    assert memory.by is first and memory.key == key
    remembered = memory.digest
    # Under the other secret the digest differs, and the store knows no such key.
    known = other.check(key, READ, memory)
    assert isinstance(known, bytes) and known != remembered
    assert decision.outcome(await other.resolve(known, READ))[0] == "invalid"
    assert memory.by is other and memory.digest == known
