"""Credits on the hot path: spending a route's ``cost`` exactly, writing spends in batches, and
applying calendar refills.

Owns: the live counters (in Redis, shared, moved by the limiter's script together with the rate
limits; without Redis in this process), seeding a counter from the store when it is not there,
the spends not yet written (``pending``), the background task that writes them and applies due
refills. Must not: know about HTTP or decide failure policy (``gate`` does both).

Counters are named ``<owner id>:<epoch>``; a set, top-up or refill starts a new epoch in the store
and invalidates the owner's identities, so every instance switches to a counter seeded from the
new balance. Bounds, documented in the README: spends are exact while Redis keeps its counters;
when Redis loses them (restart), a counter is seeded from the store, which lacks the spends the
other instances had not yet written (at most ``limits.credits_flush_interval`` of spending); a
change made through the admin API or a refill drops the spends of the old epoch not yet written
(the same bound, in the client's favour).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from gateway.clock import SYSTEM, Clock
from gateway.limits import answers
from gateway.limits.gcra import Bucket
from gateway.limits.redis_state import NO_CREDITS, UNSEEDED, LimiterUnavailable
from gateway.models import IdentityRecord, Invalidation
from gateway.store import Store
from gateway.wire import RawResponse

if TYPE_CHECKING:
    from gateway.limits.gate import Fields, LimitGate

log = logging.getLogger("keystile.limits")

COUNTER_TTL = 86400.0  # a counter not used for a day is read from the store again


def counters(ident: IdentityRecord) -> list[tuple[str, int]]:
    """(owner, epoch) of each balance a request by ``ident`` spends from."""
    out = []
    if ident.credits:
        out.append((ident.key_id, ident.credits))
    if ident.pool_credits:
        out.append((ident.principal_id, ident.pool_credits))
    return out


class Credits:
    def __init__(
        self,
        store: Store,
        *,
        interval: float,
        invalidate: Callable[[Invalidation], Awaitable[None]] | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self.store = store
        self.interval = interval
        self.invalidate = invalidate
        self._now = clock.time
        self.pending: Counter[tuple[str, int]] = Counter()  # spends not yet written
        self.local: dict[tuple[str, int], int] = {}  # counters without Redis
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0
        self.flush_failures = 0
        self.refills = 0
        self.refused = 0

    async def spend(
        self, gate: LimitGate, bs: list[Bucket], ident: IdentityRecord, cost: int
    ) -> RawResponse | Fields:
        owned = counters(ident)
        now = self._now()
        if gate.redis is None:
            return await self._spend_here(gate, bs, ident, owned, cost, now)
        names = [f"{o}:{e}" for o, e in owned]
        try:
            reply = await gate.redis.admit(bs, now, names, cost)
            if reply.code == UNSEEDED:
                o, e = owned[reply.index - 1]
                await gate.redis.seed_credits(names[reply.index - 1], await self._balance(o, e), COUNTER_TTL)
                reply = await gate.redis.admit(bs, now, names, cost)
        except Exception as err:  # Redis, or the store seeding a counter
            return gate.failed(bs, err)
        gate.recovered()
        if reply.code == UNSEEDED:  # dropped again at once: treat as unavailable
            return gate.failed(bs, LimiterUnavailable("credit counter vanished"))
        if reply.code == NO_CREDITS:
            self.refused += 1
            o, _ = owned[reply.index - 1]
            return answers.no_credits("key" if o == ident.key_id else "principal", None, ())
        answer = gate.answer(reply.verdict)
        if isinstance(answer, bytes):
            for c in owned:
                self.pending[c] += cost
        return answer

    async def _spend_here(
        self,
        gate: LimitGate,
        bs: list[Bucket],
        ident: IdentityRecord,
        owned: Sequence[tuple[str, int]],
        cost: int,
        now: float,
    ) -> RawResponse | Fields:
        local = self.local
        for c in owned:
            if c not in local:
                try:
                    value = await self._balance(*c)
                except Exception as err:
                    return gate.failed(bs, err)
                local.setdefault(c, value)
        for c in owned:
            if local[c] < cost:
                self.refused += 1
                return answers.no_credits("key" if c[0] == ident.key_id else "principal", None, ())
        answer: RawResponse | Fields = gate.answer(gate.local.admit(bs, now)) if bs else b""
        if isinstance(answer, bytes):
            for c in owned:
                local[c] -= cost
                self.pending[c] += cost
        return answer

    async def _balance(self, owner: str, epoch: int) -> int:
        """The stored balance of ``owner`` at ``epoch``, less this process's unwritten spends."""
        state = await self.store.get_credits(owner)
        if state is None or state.epoch != epoch:
            return 0  # removed or replaced meanwhile: the new identity brings the new epoch
        return state.remaining - self.pending.get((owner, epoch), 0)

    # -- background ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="credits")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.tick()

    async def tick(self) -> None:
        """Write pending spends, then apply the refills due now."""
        await self.flush()
        try:
            due = await self.store.due_refills(self._now())
        except Exception as e:
            log.warning("credit refills could not be read: %s: %s", type(e).__name__, e)
            return
        for owner, principal_id in due:
            try:
                done = await self.store.refill_credits(owner, principal_id, self._now())
            except Exception as e:
                log.warning("credit refill failed: %s: %s", type(e).__name__, e)
                continue
            if done is None:
                continue  # another instance applied it
            self.refills += 1
            if self.invalidate is not None:
                await self.invalidate(done[1])

    async def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, Counter()
        try:
            await self.store.spend_credits([(o, e, n) for (o, e), n in batch.items()])
        except Exception as e:
            self.flush_failures += 1
            self.pending.update(batch)  # kept for the next try
            log.warning("credit spends could not be written: %s: %s", type(e).__name__, e)
            return
        self.flushes += 1

    def forget(self, owners: set[str]) -> None:
        """Drop this process's counters of ``owners`` (their epoch changed)."""
        for c in [c for c in self.local if c[0] in owners]:
            del self.local[c]

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()
