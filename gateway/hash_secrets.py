"""The hash secret across instances and rotations: the fingerprint check, and previous secrets.

Owns: whether this instance's secrets fit the store (``check`` at start, ``fits`` for
readiness), the previous secrets' digests tried when a key is not found under the current one
(``PreviousSecrets``) and the figures of ``keystile secret status`` (``status``). Must not: keep,
log or return a secret or a key; touch HTTP or the cache.

The store records fingerprints (``gateway.keys.secret_fingerprint``), newest last; the newest is
the secret keys are hashed with, or being re-keyed to during a rotation. With N the newest:

- nothing recorded (a store migrated without a secret): the current secret is recorded;
- N is the current secret's: fine;
- N is one of the previous secrets' and the current one is not recorded: a rotation starts here;
  the current secret is recorded as the newest, and keys found under a previous secret are
  re-keyed to it (``Store.rekey``, which re-checks that it is still the newest);
- N is one of the previous secrets' and the current one is recorded: an instance still on an
  older secret that already knows the newer one (the first step of a rolling rotation); it finds
  re-keyed keys through that previous secret and re-keys nothing;
- anything else: refused, naming the variable. An instance with a wrong secret would answer 401
  to every key.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import msgspec

from gateway.config import HASH_SECRET_ENV, PREVIOUS_HASH_SECRET_ENV, Secrets
from gateway.keys import Digester, KeyDigest, secret_fingerprint
from gateway.models import IdentityRecord, Invalidation
from gateway.store import Store, StoreError

log = logging.getLogger("keystile")


class SecretMismatch(StoreError):
    code = "hash_secret_mismatch"


MISMATCH = (
    f"{HASH_SECRET_ENV} is not the secret this store's keys are hashed with (its fingerprint is not "
    f"the one keystile migrate recorded); set the deployment's secret, or to rotate to a new one list "
    f"the old one in {PREVIOUS_HASH_SECRET_ENV}"
)


def fits(recorded: Sequence[str], secrets: Secrets) -> bool:
    """Whether an instance with ``secrets`` may serve a store that recorded ``recorded``."""
    if not recorded:
        return True
    newest = recorded[-1]
    return newest == secret_fingerprint(secrets.hash_secret) or any(
        newest == secret_fingerprint(p) for p in secrets.previous_hash_secrets
    )


async def check(store: Store, secrets: Secrets, now: float) -> None:
    """Refuse (``SecretMismatch``) secrets that do not fit the store; record the current secret's
    fingerprint when nothing is recorded or a rotation starts (see the module docstring)."""
    current = secret_fingerprint(secrets.hash_secret)
    recorded = await store.hash_secrets()
    if not fits(recorded, secrets):
        raise SecretMismatch(MISMATCH)
    if current not in recorded:
        await store.record_hash_secret(current, now)
        if not fits(await store.hash_secrets(), secrets):  # another instance recorded its own meanwhile
            raise SecretMismatch(MISMATCH)


class SecretStatus(msgspec.Struct, frozen=True, kw_only=True):
    """How many usable keys depend on which secret (``keystile secret status``)."""

    fingerprint: str  # the current secret's
    newest: bool  # whether it is the newest recorded (keys are re-keyed to it)
    recorded: list[str]
    current_keys: int
    previous_keys: int  # hashed with a secret of KEYSTILE_KEY_HASH_SECRET_PREVIOUS
    other_keys: int  # hashed with a secret this instance does not know (or unknown)


async def status(store: Store, secrets: Secrets, now: float) -> SecretStatus:
    current = secret_fingerprint(secrets.hash_secret)
    previous = {secret_fingerprint(p) for p in secrets.previous_hash_secrets}
    recorded = await store.hash_secrets()
    counts = await store.keys_by_secret(now)
    return SecretStatus(
        fingerprint=current,
        newest=bool(recorded) and recorded[-1] == current,
        recorded=recorded,
        current_keys=counts.get(current, 0),
        previous_keys=sum(n for fp, n in counts.items() if fp in previous),
        other_keys=sum(n for fp, n in counts.items() if fp != current and fp not in previous),
    )


class PreviousSecrets:
    """The digests of a missed key under each previous secret, for the store lookup to try too.

    ``note`` is called on an in-process miss (never on a hit) with the key and its current digest;
    the store loader ``take``s the alternates of the digests it loads, so they go out in the same
    query. Bounded like the negative space: a miss answered by Redis leaves its note behind until
    it is pushed out. Keeps digests only, never a key.
    """

    def __init__(self, secrets: Sequence[bytes], max_pending: int) -> None:
        self._digesters = tuple(Digester(s) for s in secrets)
        self._pending: OrderedDict[KeyDigest, tuple[KeyDigest, ...]] = OrderedDict()
        self._max = max_pending

    def __bool__(self) -> bool:
        return bool(self._digesters)

    def note(self, digest: KeyDigest, key: str) -> None:
        if digest in self._pending:
            return
        raw = key.encode("ascii")
        if len(self._pending) >= self._max:
            self._pending.popitem(last=False)
        self._pending[digest] = tuple(d(raw) for d in self._digesters)

    def take(self, digests: Sequence[KeyDigest]) -> dict[KeyDigest, KeyDigest]:
        """Previous-secret digest -> the current digest it stands for, for ``digests``."""
        out: dict[KeyDigest, KeyDigest] = {}
        pending = self._pending
        for d in digests:
            for alt in pending.pop(d, ()):
                out[alt] = d
        return out


class Rekeyer:
    """Keys the store found under a previous secret: they answer for the current digest at once,
    and are re-keyed to it in the background (the request does not wait), once per key at a time.
    ``spawn`` runs a coroutine in the gateway's background; ``invalidate`` spreads the change."""

    def __init__(
        self,
        store: Store,
        fingerprint: str,
        timeout: float,
        invalidate: Callable[[Invalidation], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self._store = store
        self._fingerprint = fingerprint
        self._timeout = timeout
        self._invalidate = invalidate
        self._spawn = spawn
        self.busy: set[str] = set()  # key ids being re-keyed now
        self.rekeyed = 0

    def found(
        self, found: dict[KeyDigest, IdentityRecord], alternates: dict[KeyDigest, KeyDigest]
    ) -> dict[KeyDigest, IdentityRecord]:
        """``found`` with identities found by a previous digest moved to the current one."""
        for alt, current in alternates.items():
            ident = found.pop(alt, None)
            if ident is None or current in found:
                continue
            found[current] = msgspec.structs.replace(ident, digest=current)
            if ident.key_id not in self.busy:
                self.busy.add(ident.key_id)
                self._spawn(self._rekey(ident.key_id, alt, current, previous=ident.grace_until is not None))
        return found

    async def _rekey(self, key_id: str, old: KeyDigest, new: KeyDigest, *, previous: bool) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                change = await self._store.rekey(key_id, old, new, self._fingerprint, previous=previous)
            if change.digests:
                self.rekeyed += 1
                await self._invalidate(change)
        except Exception as e:  # the next use tries again
            log.warning("re-keying %s to the current hash secret failed: %s: %s", key_id, type(e).__name__, e)
        finally:
            self.busy.discard(key_id)
