"""Rate limits and credits in the SQL store.

Owns: the ``limits`` columns of keys and principals, the ``credits`` rows (set, top up, batched
spends, calendar refills), and the audit and outbox rows each change writes. Must not: import the
cache or aiohttp. Every change that alters what a key resolves to (its limits, its principal's,
a credit epoch) records an invalidation of the digests concerned.
"""

from __future__ import annotations

import calendar
import datetime
from collections.abc import Sequence
from typing import Any

import msgspec

from gateway.limits import policy as policy_codec
from gateway.limits.policy import Policy
from gateway.models import CreditState, Invalidation, KeyRecord, Principal, Refill
from gateway.store import NotFound
from gateway.store.sql_base import Conn, SQLBase

_refill_enc = msgspec.json.Encoder()


def next_refill(refill: Refill, now: float) -> float:
    """The first refill boundary (UTC midnight) strictly after ``now``."""
    d = datetime.datetime.fromtimestamp(now, datetime.UTC)
    midnight = d.replace(hour=0, minute=0, second=0, microsecond=0)
    if refill.every == "daily":
        return (midnight + datetime.timedelta(days=1)).timestamp()
    year, month = d.year, d.month
    candidate = midnight.replace(day=refill.day)
    if candidate.timestamp() <= now:
        month += 1
        if month == 13:
            year, month = year + 1, 1
        candidate = candidate.replace(
            year=year, month=month, day=min(refill.day, calendar.monthrange(year, month)[1])
        )
    return candidate.timestamp()


_CREDIT_COLS = (
    "owner, principal_id, remaining, epoch, refill_amount, refill_every, refill_day, refill_mode, "
    "next_refill_at, updated_at"
)


def _credit(row: Any) -> CreditState:
    refill = None
    if row[4] is not None:
        refill = Refill(amount=int(row[4]), every=row[5], day=int(row[6]), mode=row[7])
    return CreditState(
        owner=row[0],
        principal_id=row[1],
        remaining=int(row[2]),
        epoch=int(row[3]),
        refill=refill,
        next_refill_at=row[8],
        updated_at=row[9],
    )


class LimitQueries(SQLBase):
    # -- rate limits -----------------------------------------------------------------------

    async def set_key_limits(
        self, key_id: str, limits: Sequence[Policy], actor: str, now: float
    ) -> tuple[KeyRecord, Invalidation]:
        owner = await self.get_key(key_id)
        async with self._tx(owner.principal_id) as conn:
            before = await self._key_row(conn, key_id)
            await conn.execute(
                "UPDATE keys SET limits = $1 WHERE id = $2", policy_codec.encode(limits), key_id
            )
            after = await self._key_row(conn, key_id)
            await self._audit_change(conn, "key.limits", now, actor, before, after)
            return after, await self._invalidation(conn, await self._digests(conn, "id", key_id))

    async def set_principal_limits(
        self, ref: str, limits: Sequence[Policy], actor: str, now: float
    ) -> tuple[Principal, Invalidation]:
        async with self._read() as conn:
            pid = (await self._principal(conn, ref)).id
        async with self._tx(pid) as conn:
            before = await self._principal(conn, pid)
            await conn.execute(
                "UPDATE principals SET limits = $1 WHERE id = $2", policy_codec.encode(limits), pid
            )
            after = await self._principal(conn, pid)
            await self._audit_change(conn, "principal.limits", now, actor, before, after)
            return after, await self._invalidation(conn, await self._digests(conn, "principal_id", pid))

    # -- credits ---------------------------------------------------------------------------

    async def get_credits(self, owner: str) -> CreditState | None:
        async with self._read() as conn:
            return await self._credit_row(conn, owner)

    async def _credit_row(self, conn: Conn, owner: str) -> CreditState | None:
        row = await conn.fetchrow(f"SELECT {_CREDIT_COLS} FROM credits WHERE owner = $1", owner)
        return None if row is None else _credit(row)

    async def _owner_digests(self, conn: Conn, owner: str, principal_id: str) -> list[bytes]:
        if owner == principal_id:
            return await self._digests(conn, "principal_id", principal_id)
        return await self._digests(conn, "id", owner)

    async def change_credits(
        self,
        owner: str,
        principal_id: str,
        *,
        remaining: int | None = None,
        add: int | None = None,
        refill: Refill | msgspec.UnsetType | None = msgspec.UNSET,
        remove: bool = False,
        actor: str,
        now: float,
        action: str = "credits.set",
    ) -> tuple[CreditState | None, Invalidation]:
        """Set (``remaining``), top up (``add``), change the refill, or remove the credits of a
        key or principal (``owner`` its id). Every change starts a new epoch, so the instances
        reload the owner's identities and read the new balance from here."""
        async with self._tx(principal_id) as conn:
            before = await self._credit_row(conn, owner)
            if remove:
                await conn.execute("DELETE FROM credits WHERE owner = $1", owner)
                after = None
            else:
                if before is None and remaining is None and add is None:
                    remaining = 0
                balance = before.remaining if before is not None else 0
                if remaining is not None:
                    balance = remaining
                if add is not None:
                    balance += add
                rf = before.refill if before is not None and isinstance(refill, msgspec.UnsetType) else refill
                if isinstance(rf, msgspec.UnsetType):
                    rf = None
                due = None if rf is None else next_refill(rf, now)
                args = (
                    owner,
                    principal_id,
                    balance,
                    None if rf is None else rf.amount,
                    None if rf is None else rf.every,
                    None if rf is None else rf.day,
                    None if rf is None else rf.mode,
                    due,
                    now,
                )
                if before is None:
                    await conn.execute(
                        f"INSERT INTO credits ({_CREDIT_COLS}) "
                        "VALUES ($1, $2, $3, 1, $4, $5, $6, $7, $8, $9)",
                        *args,
                    )
                else:
                    await conn.execute(
                        "UPDATE credits SET principal_id = $2, remaining = $3, epoch = epoch + 1, "
                        "refill_amount = $4, refill_every = $5, refill_day = $6, refill_mode = $7, "
                        "next_refill_at = $8, updated_at = $9 WHERE owner = $1",
                        *args,
                    )
                after = await self._credit_row(conn, owner)
            await self._audit(
                conn,
                at=now,
                actor=actor,
                action=action,
                target_type="principal" if owner == principal_id else "key",
                target_id=owner,
                principal_id=principal_id,
                before=None if before is None else msgspec.to_builtins(before),
                after=None if after is None else msgspec.to_builtins(after),
            )
            return after, await self._invalidation(conn, await self._owner_digests(conn, owner, principal_id))

    async def spend_credits(self, spends: Sequence[tuple[str, int, int]]) -> None:
        """Write batched spends ``(owner, epoch, amount)``; a spend of an older epoch is dropped
        (the balance it was counted against was replaced)."""
        if not spends:
            return
        async with self._tx() as conn:
            for owner, epoch, amount in sorted(spends):
                await conn.execute(
                    "UPDATE credits SET remaining = remaining - $1 WHERE owner = $2 AND epoch = $3",
                    amount,
                    owner,
                    epoch,
                )

    async def due_refills(self, now: float) -> list[tuple[str, str]]:
        """``(owner, principal_id)`` of every refill due at ``now``."""
        async with self._read() as conn:
            rows = await conn.fetch(
                "SELECT owner, principal_id FROM credits WHERE next_refill_at <= $1 ORDER BY owner", now
            )
        return [(r[0], r[1]) for r in rows]

    async def refill_credits(
        self, owner: str, principal_id: str, now: float
    ) -> tuple[CreditState, Invalidation] | None:
        """Apply the refill of ``owner`` if it is still due (another instance may have applied it:
        then None). Audited as ``credits.refill`` by the actor ``refill``."""
        async with self._tx(principal_id) as conn:
            before = await self._credit_row(conn, owner)
            if (
                before is None
                or before.refill is None
                or before.next_refill_at is None
                or before.next_refill_at > now
            ):
                return None
            rf = before.refill
            balance = rf.amount if rf.mode == "replace" else before.remaining + rf.amount
            await conn.execute(
                "UPDATE credits SET remaining = $1, epoch = epoch + 1, next_refill_at = $2, updated_at = $3 "
                "WHERE owner = $4",
                balance,
                next_refill(rf, now),
                now,
                owner,
            )
            after = await self._credit_row(conn, owner)
            assert after is not None
            await self._audit(
                conn,
                at=now,
                actor="refill",
                action="credits.refill",
                target_type="principal" if owner == principal_id else "key",
                target_id=owner,
                principal_id=principal_id,
                before=msgspec.to_builtins(before),
                after=msgspec.to_builtins(after),
            )
            return after, await self._invalidation(conn, await self._owner_digests(conn, owner, principal_id))


__all__ = ["LimitQueries", "NotFound", "next_refill"]
