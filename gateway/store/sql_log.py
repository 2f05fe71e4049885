"""What the SQL store records over time: batched usage, the audit log and the invalidation outbox.

Owns: reading and pruning those tables. Must not: import the cache or aiohttp.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.models import (
    AuditEvent,
    Invalidation,
    UsageUpdate,
)
from gateway.store import (
    AuditFilter,
    AuditPage,
)
from gateway.store.sql_base import (
    DIGEST_SIZE,
    Row,
    SQLBase,
    _obj_dec,
    merge_usage,
    read_audit_cursor,
)


class LogQueries(SQLBase):
    async def record_usage(self, updates: Sequence[UsageUpdate]) -> None:
        if not updates:
            return
        async with self._tx() as conn:
            await self._usage(conn, merge_usage(updates))

    async def list_audit(self, flt: AuditFilter) -> AuditPage:
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if flt.key_id is not None:
            where.append(f"target_type = 'key' AND target_id = {arg(flt.key_id)}")
        if flt.principal_id is not None:
            where.append(f"principal_id = {arg(flt.principal_id)}")
        if flt.source is not None:
            where.append(f"source = {arg(flt.source)}")
        if flt.since is not None:
            where.append(f"at >= {arg(flt.since)}")
        if flt.until is not None:
            where.append(f"at < {arg(flt.until)}")
        if flt.cursor:
            where.append(f"id < {arg(read_audit_cursor(flt.cursor))}")
        sql = "SELECT id, at, actor, action, target_type, target_id, before, after, source FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY id DESC LIMIT {arg(flt.limit + 1)}"
        async with self._read() as conn:
            rows = await conn.fetch(sql, *args)
        items = [
            AuditEvent(
                id=int(r[0]),
                at=r[1],
                actor=r[2],
                action=r[3],
                target_type=r[4],
                target_id=r[5],
                before=None if r[6] is None else _obj_dec.decode(r[6]),
                after=None if r[7] is None else _obj_dec.decode(r[7]),
                source=r[8],
            )
            for r in rows[: flt.limit]
        ]
        nxt = str(items[-1].id) if len(rows) > flt.limit else None
        return AuditPage(items, nxt)

    # -- the invalidation outbox -----------------------------------------------------------

    async def latest_invalidation(self) -> int:
        async with self._read() as conn:
            row = await conn.fetchrow("SELECT COALESCE(MAX(seq), 0) FROM invalidations")
        return 0 if row is None else int(row[0])

    async def invalidations_since(self, seq: int, limit: int) -> list[Invalidation]:
        async with self._read() as conn:
            rows = await conn.fetch(
                "SELECT seq, digests FROM invalidations WHERE seq > $1 ORDER BY seq LIMIT $2", seq, limit
            )
        return [_outbox_row(r) for r in rows]

    async def recent_invalidations(self, since: float) -> list[Invalidation]:
        async with self._read() as conn:
            rows = await conn.fetch(
                "SELECT seq, digests FROM invalidations WHERE created_at >= $1 ORDER BY seq", since
            )
        return [_outbox_row(r) for r in rows]

    async def prune_invalidations(self, before: float) -> int:
        async with self._tx() as conn:
            gone = await conn.fetch("DELETE FROM invalidations WHERE created_at < $1 RETURNING seq", before)
        return len(gone)


def _outbox_row(row: Row) -> Invalidation:
    blob = row[1]
    if blob is None:
        return Invalidation(int(row[0]), None)
    raw = bytes(blob)
    return Invalidation(int(row[0]), tuple(raw[i : i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE)))
