"""The identity cache: one front, ``IdentityCache``, over the in-process tier and a loader.

Owns: remembering what a digest resolved to (including "unknown", for a short time), coalescing
concurrent misses and batching misses into few loader calls: the misses of one event-loop turn go
out together, and while ``max_loads`` loads are in flight new misses wait for the next batch.
Must not: touch HTTP or call the store directly; the loader it is given does that (and may itself
go through Redis first, see ``gateway.cache.redis_tier``).

Invalidation: ``invalidate(digests)`` drops local entries and bumps a generation counter; a load
that started before an invalidation does not fill the cache, so a lookup racing a revocation can
never put the revoked identity back. Errors from the loader are never cached.
"""

from __future__ import annotations

import asyncio
import enum
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final

from gateway.clock import SYSTEM, Clock
from gateway.keys import KeyDigest
from gateway.models import IdentityRecord

# Resolves digests; a digest missing from the result could not be resolved (tiers unavailable).
Loader = Callable[[Sequence[KeyDigest]], Awaitable[dict[KeyDigest, IdentityRecord | None]]]


class LookupUnavailable(Exception):
    """No tier could say what a digest is; the request must get 503, never 401."""


# Loads in flight at once, unless the store says otherwise (Store.lookup_concurrency); misses
# arriving meanwhile wait and go out together in the next batch, so under load a Redis MGET or
# store query carries many digests instead of one each.
MAX_CONCURRENT_LOADS: Final = 4


class _Miss(enum.Enum):
    """Not in the tier (an enum member, so ``is MISS`` narrows the type for mypy)."""

    MISS = "MISS"

    def __repr__(self) -> str:
        return "MISS"


MISS: Final = _Miss.MISS

# Lifetimes are shortened per key by up to this fraction, so keys cached together expire apart.
TTL_SPREAD: Final = 0.1
_SPREAD_STEP: Final = TTL_SPREAD / 256


class LocalTier:
    """A bounded in-process map with per-entry expiry; ``None`` values are negative entries.

    Every entry has two deadlines: ``ttl`` after it was stored, and the longer ``synced_ttl`` that
    applies only while ``trusted_until`` (monotonic) lies ahead, that is while whoever sets it (the
    invalidation outbox poller) can confirm that this process has received every invalidation. An
    entry stored while that is not confirmed gets the short deadline only.

    Each key's lifetimes are shortened by up to ``TTL_SPREAD``, by a fraction taken from its digest
    (uniform over keys, the same for every put of one key, no random draw per put). Keys cached in
    the same second (at a restart, or a burst of new keys) then come due over a tenth of their
    lifetime (30 s of 300 s) instead of in the same second, and go back to Redis and the store
    spread over that span.

    Eviction is least-recently-used first, in O(1): a hit moves the entry to the end of an
    OrderedDict (a C call), so when more keys are active than ``max_entries`` the hot ones stay and
    the cold tail cycles. (A plain dict evicting ``next(iter(d))`` is O(n) once the front holds
    deleted slots.)

    Negative entries (``None``: the digest is unknown) live in a space of their own, bounded by
    ``negative_max_entries``, so random well-formed keys, which anyone can mint, can never push a
    valid key out: a flood only cycles the negative space. A digest is in at most one of the two
    maps (a put into one removes it from the other). ``get`` looks at the positive map first, so a
    positive hit stays one dict lookup; only a positive miss also looks at the negative map. The
    negative space is first in, first out, with no reordering on a hit: its entries all live the
    same short ``negative_ttl``, so the oldest is also the closest to expiring.

    Deadlines are monotonic time from ``clock`` (``now``); ``get`` and ``put`` take an explicit
    ``now`` where the caller has one.
    """

    def __init__(
        self,
        ttl: float,
        negative_ttl: float,
        max_entries: int,
        synced_ttl: float = 0.0,
        negative_max_entries: int = 10_000,
        clock: Clock = SYSTEM,
    ) -> None:
        self.now = clock.monotonic
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.synced_ttl = synced_ttl
        self.negative_max_entries = negative_max_entries
        self.trusted_until = 0.0
        # digest -> (deadline while synced, deadline otherwise, identity), least recently used first
        self._data: OrderedDict[KeyDigest, tuple[float, float, IdentityRecord]] = OrderedDict()
        # unknown digest -> deadline, oldest first
        self._negative: OrderedDict[KeyDigest, float] = OrderedDict()
        self.hits = 0
        self.negative_hits = 0
        self.misses = 0

    def get(self, digest: KeyDigest, now: float | None = None) -> IdentityRecord | _Miss | None:
        """What the tier holds for ``digest`` at ``now`` (the tier's clock when None)."""
        if now is None:
            now = self.now()
        entry = self._data.get(digest)
        if entry is None:
            return self._get_negative(digest, now)
        if (entry[0] if now < self.trusted_until else entry[1]) <= now:
            del self._data[digest]
            self.misses += 1
            return MISS
        self._data.move_to_end(digest)
        self.hits += 1
        return entry[2]

    def _get_negative(self, digest: KeyDigest, now: float) -> _Miss | None:
        deadline = self._negative.get(digest)
        if deadline is None:
            self.misses += 1
            return MISS
        if deadline <= now:
            del self._negative[digest]
            self.misses += 1
            return MISS
        self.negative_hits += 1
        return None

    def put(self, digest: KeyDigest, value: IdentityRecord | None, now: float) -> None:
        keep = 1.0 - digest[-1] * _SPREAD_STEP  # a digest's bytes are uniform
        if value is None:
            ttl = min(self.negative_ttl, self.ttl)
            if ttl <= 0:
                return
            self._data.pop(digest, None)  # a known key that became unknown (revoked, deleted)
            negative = self._negative
            if digest in negative:
                del negative[digest]  # re-inserted at the end: first in, first out by deadline
            elif len(negative) >= self.negative_max_entries:
                negative.popitem(last=False)
            negative[digest] = now + ttl * keep
            return
        ttl = self.ttl
        if ttl <= 0:
            return
        long = max(ttl, self.synced_ttl) if now < self.trusted_until else ttl
        if self._negative:
            self._negative.pop(digest, None)
        data = self._data
        if digest in data:
            data.move_to_end(digest)
        elif len(data) >= self.max_entries:
            data.popitem(last=False)
        data[digest] = (now + long * keep, now + ttl * keep, value)

    def discard(self, digest: KeyDigest) -> None:
        self._data.pop(digest, None)
        self._negative.pop(digest, None)

    def clear(self) -> None:
        self._data.clear()
        self._negative.clear()

    def __len__(self) -> int:
        """Positive entries (``negatives`` counts the others)."""
        return len(self._data)

    @property
    def negatives(self) -> int:
        return len(self._negative)


# The in-process answer for a digest: an identity, None (known unknown) or MISS.
Peek = Callable[[KeyDigest], IdentityRecord | _Miss | None]


class IdentityCache:
    """The front: ``peek`` (in-process only), ``resolve`` (past it), ``lookup`` (both), and
    invalidation. Callers (``gateway.auth``) talk to this object only, never to its tiers."""

    def __init__(self, local: LocalTier, loader: Loader, max_loads: int = MAX_CONCURRENT_LOADS) -> None:
        self.local = local
        # The in-process answer, if any: no I/O, no await. The local tier's own ``get`` (which
        # reads the tier's clock), bound here so that a hit costs one call and nothing else.
        self.peek: Peek = local.get
        self._loader = loader
        self._max_loads = max_loads
        self._generation = 0
        # digest -> the futures of the requests waiting for its lookup
        self._inflight: dict[KeyDigest, list[asyncio.Future[IdentityRecord | None]]] = {}
        self._batch: list[KeyDigest] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.loads = 0
        self.load_errors = 0
        self.invalidations = 0

    async def resolve(self, digest: KeyDigest) -> IdentityRecord | None:
        """Go past the local tier. Raises what the loader raises (e.g. StoreUnavailable).

        Every caller waits on a future of its own, set when the shared lookup ends: a client that
        disconnects cancels only its own wait, never the lookup other requests share (one future
        per caller, where ``asyncio.shield`` would make two and a chain of callbacks)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[IdentityRecord | None] = loop.create_future()
        waiters = self._inflight.get(digest)
        if waiters is None:
            self._inflight[digest] = [fut]
            self._batch.append(digest)
            if not self._scheduled and len(self._tasks) < self._max_loads:
                self._scheduled = True
                loop.call_soon(self._start_batch)
        else:
            waiters.append(fut)
        return await fut

    async def lookup(self, digest: KeyDigest) -> IdentityRecord | None:
        hit = self.peek(digest)
        if hit is not MISS:
            return hit
        return await self.resolve(digest)

    def invalidate(self, digests: Iterable[KeyDigest]) -> None:
        self._generation += 1
        self.invalidations += 1
        for d in digests:
            self.local.discard(d)

    def clear(self) -> None:
        self._generation += 1
        self.invalidations += 1
        self.local.clear()

    def confirm_synced(self, until: float) -> None:
        """Whoever delivers invalidations vouches that none was missed until ``until`` (monotonic):
        local entries may live their long deadline until then."""
        self.local.trusted_until = until

    def apply(self, digests: Sequence[KeyDigest] | None) -> None:
        """An invalidation message: these digests, or everything (None)."""
        if digests is None:
            self.clear()
        else:
            self.invalidate(digests)

    def _start_batch(self) -> None:
        self._scheduled = False
        if not self._batch or len(self._tasks) >= self._max_loads:
            return  # a finishing load starts the next batch
        batch, self._batch = self._batch, []
        task = asyncio.get_running_loop().create_task(self._load(batch))
        self._tasks.add(task)
        task.add_done_callback(self._load_done)

    def _load_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._batch and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start_batch)

    async def _load(self, batch: list[KeyDigest]) -> None:
        generation = self._generation
        self.loads += 1
        try:
            found = await self._loader(batch)
        except BaseException as e:
            self.load_errors += 1
            for d in batch:
                for fut in self._inflight.pop(d):
                    if not fut.done():  # a cancelled waiter's future is done
                        fut.set_exception(e if isinstance(e, Exception) else asyncio.CancelledError())
                        fut.exception()  # retrieved: its waiter may be cancelled before it reads it
            if not isinstance(e, Exception):
                raise
            return
        fill = generation == self._generation
        now = self.local.now()
        for d in batch:
            waiters = self._inflight.pop(d)
            if d not in found:
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(LookupUnavailable())
                        fut.exception()  # retrieved, as above
                continue
            value = found[d]
            if fill:
                self.local.put(d, value, now)
            for fut in waiters:
                if not fut.done():
                    fut.set_result(value)

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        # Misses still waiting for a batch get 503 (never 401) now; left in the batch, a finished
        # load would start their lookup after the close.
        for d in self._batch:
            for fut in self._inflight.pop(d, ()):
                if not fut.done():
                    fut.set_exception(LookupUnavailable())
                    fut.exception()
        self._batch.clear()
        for t in list(self._tasks):
            try:
                await t
            except BaseException:  # noqa: S110 - shutting down
                pass
