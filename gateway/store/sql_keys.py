"""Keys in the SQL store: the hot-path loader and every step of a key's life.

Owns: key rows, their limits and unique names, and the audit and outbox rows each change writes.
Must not: import the cache or aiohttp.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec

from gateway.keys import KeyDigest
from gateway.limits import policy as policy_codec
from gateway.models import (
    IdentityRecord,
    Invalidation,
    KeyRecord,
    NewKey,
)
from gateway.store import (
    KeyChanges,
    KeyFilter,
    KeyNotActive,
    LimitExceeded,
    Page,
)
from gateway.store.sql_base import (
    _IDENTITY_SELECT,
    _KEY_COLS,
    _KEY_FROM,
    Conn,
    Row,
    SQLBase,
    _j,
    _key,
    _scopes_dec,
    key_cursor,
    read_key_cursor,
)


class KeyQueries(SQLBase):
    # -- hot-path loader -------------------------------------------------------------------

    async def find_identities(
        self, digests: Sequence[KeyDigest], now: float
    ) -> dict[KeyDigest, IdentityRecord]:
        if not digests:
            return {}
        out: dict[KeyDigest, IdentityRecord] = {}
        async with self._read() as conn:
            for i in range(0, len(digests), 500):
                chunk = list(digests[i : i + 500])
                current, params = self._digest_in("k.digest", chunk)
                previous, _ = self._digest_in("k.previous_digest", chunk)
                # One indexed probe per digest column, each joined directly: cheaper than
                # collecting ids first (one statement, no second round of lookups by id).
                rows = await conn.fetch(
                    f"{_IDENTITY_SELECT} WHERE {current} AND k.revoked_at IS NULL AND NOT p.disabled "
                    f"UNION ALL {_IDENTITY_SELECT} WHERE {previous} AND k.previous_digest IS NOT NULL "
                    "AND k.revoked_at IS NULL AND NOT p.disabled",
                    *params,
                )
                wanted = set(chunk)
                role_scopes = await self._role_scopes(conn, rows)
                for r in rows:
                    granted = None if r[11] is None else _scopes_dec.decode(r[11])
                    roles = () if r[16] is None else _scopes_dec.decode(r[16])
                    if roles and granted is not None:
                        # The grant's own scopes and those of its roles (only roles that exist).
                        roles = tuple(n for n in roles if (r[7], n) in role_scopes)
                        extra = [s for n in roles for s in role_scopes[r[7], n]]
                        granted = tuple(sorted({*granted, *extra}))
                    own = None if r[8] is None else _scopes_dec.decode(r[8])
                    if granted is None:
                        scopes: tuple[str, ...] = ()
                    elif own is None:
                        scopes = granted
                    else:
                        scopes = tuple(s for s in own if s in granted)
                    base = dict(
                        key_id=r[0],
                        start=r[4],
                        principal_id=r[5],
                        principal=r[6],
                        project=r[7],
                        scopes=scopes,
                        env=r[10],
                        member=granted is not None,
                        roles=roles,
                        limits=policy_codec.decode(r[12]),
                        pool_limits=policy_codec.decode(r[13]),
                        credits=int(r[14] or 0),
                        pool_credits=int(r[15] or 0),
                    )
                    cur, prev = bytes(r[1]), None if r[2] is None else bytes(r[2])
                    if cur in wanted:
                        out[cur] = IdentityRecord(digest=cur, expires_at=r[9], **base)
                    if prev is not None and prev in wanted and r[3] is not None and r[3] > now:
                        until = r[3] if r[9] is None else min(r[3], r[9])
                        out[prev] = IdentityRecord(digest=prev, expires_at=until, grace_until=r[3], **base)
        return out

    async def _role_scopes(self, conn: Conn, rows: Sequence[Row]) -> dict[tuple[str, str], tuple[str, ...]]:
        """(project, role) -> scopes, for the roles the grants of ``rows`` name: one query, and
        none when no grant names a role."""
        projects = sorted({r[7] for r in rows if r[16] is not None and r[16] != "[]"})
        if not projects:
            return {}
        marks = ", ".join(f"${n}" for n in range(1, len(projects) + 1))
        found = await conn.fetch(
            f"SELECT project, name, scopes FROM roles WHERE project IN ({marks})", *projects
        )
        return {(f[0], f[1]): _scopes_dec.decode(f[2]) for f in found}

    # -- keys ------------------------------------------------------------------------------

    async def create_key(self, new: NewKey, *, max_active: int, actor: str) -> KeyRecord:
        async with self._tx(new.principal_id) as conn:
            await self._principal(conn, new.principal_id)
            await self._name_free(conn, new.principal_id, new.project, new.name, None)
            active = await self._count_active(conn, new.principal_id, new.project, new.created_at)
            if active >= max_active:
                hint = (
                    " (one key per principal and project: rotate the existing key instead)"
                    if max_active == 1
                    else ""
                )
                raise LimitExceeded(
                    f"principal already has {active} active key(s) in project {new.project!r}; "
                    f"the limit is {max_active}{hint}"
                )
            await conn.execute(
                "INSERT INTO keys (id, digest, name, start, env, principal_id, project, scopes, "
                "metadata, created_at, expires_at, digest_secret) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                new.id,
                new.digest,
                new.name,
                new.start,
                new.env,
                new.principal_id,
                new.project,
                None if new.scopes is None else _j(sorted(set(new.scopes))),
                _j(new.metadata),
                new.created_at,
                new.expires_at,
                new.digest_secret,
            )
            rec = await self._key_row(conn, new.id)
            await self._audit_change(conn, "key.create", new.created_at, actor, None, rec)
            return rec

    async def get_key(self, key_id: str) -> KeyRecord:
        async with self._read() as conn:
            return await self._key_row(conn, key_id)

    async def list_keys(self, flt: KeyFilter, now: float) -> Page:
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if flt.principal_id is not None:
            where.append(f"(k.principal_id = {arg(flt.principal_id)} OR p.name = ${len(args)})")
        if flt.project is not None:
            where.append(f"k.project = {arg(flt.project)}")
        if flt.status == "revoked":
            where.append("k.revoked_at IS NOT NULL")
        elif flt.status == "expired":
            where.append(f"k.revoked_at IS NULL AND k.expires_at <= {arg(now)}")
        elif flt.status == "active":
            where.append(f"k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > {arg(now)})")
        if flt.q:
            pattern = "%" + flt.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append(f"k.name {self.ilike} {arg(pattern)} ESCAPE '\\'")
        if flt.cursor:
            at, kid = read_key_cursor(flt.cursor)
            where.append(f"(k.created_at < {arg(at)} OR (k.created_at = ${len(args)} AND k.id < {arg(kid)}))")
        sql = f"SELECT {_KEY_COLS} {_KEY_FROM}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY k.created_at DESC, k.id DESC LIMIT {arg(flt.limit + 1)}"
        async with self._read() as conn:
            rows = await conn.fetch(sql, *args)
        items = [_key(r) for r in rows[: flt.limit]]
        nxt = key_cursor(items[-1].created_at, items[-1].id) if len(rows) > flt.limit else None
        return Page(items, nxt)

    async def update_key(
        self, key_id: str, changes: KeyChanges, actor: str, *, max_active: int, now: float
    ) -> tuple[KeyRecord, Invalidation]:
        owner = await self.get_key(key_id)
        async with self._tx(owner.principal_id) as conn:
            before = await self._key_row(conn, key_id)
            sets: list[str] = []
            args: list[Any] = []
            if not isinstance(changes.name, msgspec.UnsetType):
                await self._name_free(conn, before.principal_id, before.project, changes.name, key_id)
                args.append(changes.name)
                sets.append(f"name = ${len(args)}")
            if not isinstance(changes.expires_at, msgspec.UnsetType):
                reviving = before.status(now) == "expired" and (
                    changes.expires_at is None or changes.expires_at > now
                )
                if (
                    reviving
                    and await self._count_active(conn, before.principal_id, before.project, now) >= max_active
                ):
                    raise LimitExceeded(
                        f"extending this expired key would exceed the limit of {max_active} active keys"
                    )
                args.append(changes.expires_at)
                sets.append(f"expires_at = ${len(args)}")
            if not isinstance(changes.scopes, msgspec.UnsetType):
                args.append(None if changes.scopes is None else _j(sorted(set(changes.scopes))))
                sets.append(f"scopes = ${len(args)}")
            if not isinstance(changes.metadata, msgspec.UnsetType):
                args.append(_j(changes.metadata))
                sets.append(f"metadata = ${len(args)}")
            if sets:
                args.append(key_id)
                await conn.execute(f"UPDATE keys SET {', '.join(sets)} WHERE id = ${len(args)}", *args)
            after = await self._key_row(conn, key_id)
            await self._audit_change(conn, "key.update", now, actor, before, after)
            return after, await self._invalidation(conn, await self._digests(conn, "id", key_id))

    async def revoke_key(self, key_id: str, actor: str, now: float) -> tuple[KeyRecord, Invalidation]:
        owner = await self.get_key(key_id)
        async with self._tx(owner.principal_id) as conn:
            before = await self._key_row(conn, key_id)
            if before.revoked_at is not None:  # revoked already: nothing changes, nothing is audited
                return before, Invalidation(0, ())
            digests = await self._digests(conn, "id", key_id)
            await conn.execute(
                "UPDATE keys SET revoked_at = $1, previous_digest = NULL, previous_valid_until = NULL "
                "WHERE id = $2",
                now,
                key_id,
            )
            after = await self._key_row(conn, key_id)
            await self._audit_change(conn, "key.revoke", now, actor, before, after)
            return after, await self._invalidation(conn, digests)

    async def delete_key(self, key_id: str, actor: str) -> Invalidation:
        owner = await self.get_key(key_id)
        async with self._tx(owner.principal_id) as conn:
            before = await self._key_row(conn, key_id)
            digests = await self._digests(conn, "id", key_id)
            await conn.execute("DELETE FROM keys WHERE id = $1", key_id)
            await conn.execute("DELETE FROM credits WHERE owner = $1", key_id)
            await self._audit_change(conn, "key.delete", time.time(), actor, before, None)
            return await self._invalidation(conn, digests)

    async def rotate_key(
        self,
        key_id: str,
        *,
        digest: KeyDigest,
        start: str,
        previous_valid_until: float | None,
        actor: str,
        now: float,
        digest_secret: str | None = None,
    ) -> tuple[KeyRecord, Invalidation]:
        owner = await self.get_key(key_id)
        async with self._tx(owner.principal_id) as conn:
            before = await self._key_row(conn, key_id)
            status = before.status(now)
            if status != "active":
                raise KeyNotActive(f"key {key_id!r} is {status}; only an active key can be rotated")
            old = await self._digests(conn, "id", key_id)
            row = await conn.fetchrow("SELECT digest FROM keys WHERE id = $1", key_id)
            assert row is not None
            keep = previous_valid_until is not None and previous_valid_until > now
            await conn.execute(
                "UPDATE keys SET digest = $1, start = $2, previous_digest = $3, previous_valid_until = $4, "
                "digest_secret = $6 WHERE id = $5",
                digest,
                start,
                bytes(row[0]) if keep else None,
                previous_valid_until if keep else None,
                key_id,
                digest_secret,
            )
            after = await self._key_row(conn, key_id)
            await self._audit_change(conn, "key.rotate", now, actor, before, after)
            return after, await self._invalidation(conn, old)

    # -- usage and audit -------------------------------------------------------------------
