"""Principals and their grants in the SQL store.

Owns: principal rows, grants, and the audit and outbox rows each change writes. Must not: import
the cache or aiohttp.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import msgspec

from gateway.models import (
    Invalidation,
    Principal,
)
from gateway.store import (
    HasKeys,
    NameTaken,
    PrincipalChanges,
    UnknownRole,
)
from gateway.store.sql_base import (
    _PRINCIPAL_COLS,
    Conn,
    SQLBase,
    _j,
    _public,
    read_principal_cursor,
)


class PrincipalQueries(SQLBase):
    async def create_principal(self, principal: Principal, actor: str) -> Principal:
        async with self._tx() as conn:
            if await conn.fetchrow("SELECT 1 FROM principals WHERE name = $1 OR id = $1", principal.name):
                raise NameTaken(f"a principal named {principal.name!r} already exists")
            await conn.execute(
                f"INSERT INTO principals ({_PRINCIPAL_COLS}) VALUES ($1, $2, $3, $4, $5, $6)",
                principal.id,
                principal.name,
                principal.kind,
                principal.disabled,
                principal.created_at,
                _j(principal.metadata),
            )
            await self._write_grants(conn, principal.id, principal.grants, principal.roles)
            created = await self._principal(conn, principal.id)
            await self._audit_change(conn, "principal.create", principal.created_at, actor, None, created)
            return created

    async def get_principal(self, ref: str) -> Principal:
        async with self._read() as conn:
            return await self._principal(conn, ref)

    async def list_principals(self, limit: int, cursor: str | None) -> tuple[list[Principal], str | None]:
        after = read_principal_cursor(cursor) if cursor else ""
        async with self._read() as conn:
            rows = await conn.fetch(
                "SELECT id FROM principals WHERE name > $1 ORDER BY name LIMIT $2", after, limit + 1
            )
            items = [await self._principal(conn, r[0]) for r in rows[:limit]]
        nxt = items[-1].name if len(rows) > limit else None
        return items, nxt

    async def update_principal(
        self, ref: str, changes: PrincipalChanges, actor: str
    ) -> tuple[Principal, Invalidation]:
        async with self._read() as conn:
            pid = (await self._principal(conn, ref)).id
        async with self._tx(pid) as conn:
            before = await self._principal(conn, pid)
            if not isinstance(changes.disabled, msgspec.UnsetType):
                await conn.execute("UPDATE principals SET disabled = $1 WHERE id = $2", changes.disabled, pid)
            if not isinstance(changes.kind, msgspec.UnsetType):
                await conn.execute("UPDATE principals SET kind = $1 WHERE id = $2", changes.kind, pid)
            if not isinstance(changes.metadata, msgspec.UnsetType):
                await conn.execute(
                    "UPDATE principals SET metadata = $1 WHERE id = $2", _j(changes.metadata), pid
                )
            if not isinstance(changes.grants, msgspec.UnsetType) or not isinstance(
                changes.roles, msgspec.UnsetType
            ):
                await conn.execute("DELETE FROM grants WHERE principal_id = $1", pid)
                await self._write_grants(
                    conn,
                    pid,
                    before.grants if isinstance(changes.grants, msgspec.UnsetType) else changes.grants,
                    before.roles if isinstance(changes.roles, msgspec.UnsetType) else changes.roles,
                )
            after = await self._principal(conn, pid)
            if isinstance(changes.disabled, bool) and before.disabled != changes.disabled:
                action = "principal.disable" if changes.disabled else "principal.enable"
            else:
                action = "principal.update"
            await self._audit(
                conn,
                at=time.time(),
                actor=actor,
                action=action,
                target_type="principal",
                target_id=pid,
                principal_id=pid,
                before=_public(before),
                after=_public(after),
            )
            return after, await self._invalidation(conn, await self._digests(conn, "principal_id", pid))

    async def delete_principal(self, ref: str, actor: str, *, with_keys: bool) -> Invalidation:
        async with self._read() as conn:
            pid = (await self._principal(conn, ref)).id
        async with self._tx(pid) as conn:
            before = await self._principal(conn, pid)
            digests = await self._digests(conn, "principal_id", pid)
            row = await conn.fetchrow("SELECT COUNT(*) FROM keys WHERE principal_id = $1", pid)
            assert row is not None
            if row[0] and not with_keys:
                raise HasKeys(
                    f"principal {before.name!r} still has {row[0]} key(s); "
                    "delete them first or pass with_keys=true"
                )
            await conn.execute("DELETE FROM keys WHERE principal_id = $1", pid)
            await conn.execute("DELETE FROM credits WHERE principal_id = $1", pid)
            await conn.execute("DELETE FROM grants WHERE principal_id = $1", pid)
            await conn.execute("DELETE FROM principals WHERE id = $1", pid)
            await self._audit(
                conn,
                at=time.time(),
                actor=actor,
                action="principal.delete",
                target_type="principal",
                target_id=pid,
                principal_id=pid,
                before={**_public(before), "keys_deleted": int(row[0])},
                after=None,
            )
            return await self._invalidation(conn, digests)

    async def _write_grants(
        self,
        conn: Conn,
        pid: str,
        grants: Mapping[str, Sequence[str]],
        roles: Mapping[str, Sequence[str]],
    ) -> None:
        """One grant row per project named by either map: its own scopes and its roles, each of
        which must exist in that project (checked in this transaction: no grant names a role
        deleted meanwhile)."""
        for project in sorted({*grants, *roles}):
            held = sorted(set(roles.get(project, ())))
            if held:
                marks = ", ".join(f"${n}" for n in range(2, len(held) + 2))
                found = await conn.fetch(
                    f"SELECT name FROM roles WHERE project = $1 AND name IN ({marks})", project, *held
                )
                missing = sorted(set(held) - {r[0] for r in found})
                if missing:
                    raise UnknownRole(f"project {project!r} has no role {missing[0]!r}")
            await conn.execute(
                "INSERT INTO grants (principal_id, project, scopes, roles) VALUES ($1, $2, $3, $4)",
                pid,
                project,
                _j(sorted(set(grants.get(project, ())))),
                _j(held),
            )
