"""The lifecycle logic shared by the SQL backends, written once over a small connection seam.

Owns: every query and rule of the store (limits, unique names, audit rows, usage merge). A backend
supplies ``_tx()`` (a transaction that serialises writers for one principal), ``_read()`` (a
connection for plain reads) and the few dialect differences below. Must not: import the cache or
aiohttp. SQL is written with ``$1``-style placeholders; SQLite receives them as ``?1``.

Every write that changes what a key resolves to ends its transaction with ``_invalidation``: one
row in the ``invalidations`` outbox, committed with the change or not at all (see
``gateway.store``). A backend whose transactions may commit out of seq order takes
``outbox_lock`` first, so rows become visible in seq order.
"""

from __future__ import annotations

import operator
import re
import time
from abc import abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from itertools import islice
from typing import Any, Protocol

import msgspec

from gateway.keys import KeyDigest
from gateway.models import (
    AuditEvent,
    IdentityRecord,
    Invalidation,
    KeyRecord,
    NewKey,
    Principal,
    UsageUpdate,
)
from gateway.store import (
    AuditFilter,
    AuditPage,
    HasKeys,
    KeyChanges,
    KeyFilter,
    KeyNotActive,
    LimitExceeded,
    NameTaken,
    NotFound,
    Page,
    PrincipalChanges,
    Store,
)

Row = Sequence[Any]
_json_enc = msgspec.json.Encoder()
_scopes_dec = msgspec.json.Decoder(tuple[str, ...])
_meta_dec = msgspec.json.Decoder(dict[str, str])
_obj_dec = msgspec.json.Decoder(dict[str, Any])

DIGEST_SIZE = 32  # HMAC-SHA256 (gateway.keys.digest): outbox rows hold digests back to back
# A change naming more digests than this is recorded as "every key": readers clear their caches
# instead of holding a list this long.
MAX_INVALIDATION_DIGESTS = 10_000


class Conn(Protocol):
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...
    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...
    async def execute(self, sql: str, *args: Any) -> None: ...


def _j(value: object) -> str:
    return _json_enc.encode(value).decode()


# Cursors are positions in a listing's order, so every string of the documented shape is a valid
# cursor (the admin API's document carries these patterns): keys ``<created_at>~<id>``
# (``repr`` of the float, exact), audit events ``<id>``, principals the last name listed.
# ``(?!\n)$``: Python's ``$`` would also match before a trailing newline.
KEY_CURSOR = r"^-?[0-9]{1,20}(\.[0-9]{1,20})?(e[-+]?[0-9]{1,3})?~[A-Za-z0-9_]{1,64}(?!\n)$"
AUDIT_CURSOR = r"^[0-9]{1,18}(?!\n)$"
PRINCIPAL_CURSOR = r"^[^\x00]*$"  # any name; nothing stored holds a NUL
_KEY_CURSOR, _AUDIT_CURSOR = re.compile(KEY_CURSOR), re.compile(AUDIT_CURSOR)


def key_cursor(at: float, key_id: str) -> str:
    return f"{at!r}~{key_id}"


def read_key_cursor(cursor: str) -> tuple[float, str]:
    """Raises ValueError for anything not shaped like a key cursor."""
    if not _KEY_CURSOR.search(cursor):
        raise ValueError("invalid cursor")
    at, _, key_id = cursor.partition("~")
    return float(at), key_id


def read_audit_cursor(cursor: str) -> int:
    if not _AUDIT_CURSOR.search(cursor):
        raise ValueError("invalid cursor")
    return int(cursor)


def read_principal_cursor(cursor: str) -> str:
    if "\x00" in cursor:
        raise ValueError("invalid cursor")
    return cursor


# Usage lives in key_usage (migration 3); keys.last_used_at/request_count hold what versions before
# it wrote, so a key's values are the later time and the sum of the two.
_KEY_COLS = (
    "k.id, k.name, k.start, k.env, k.principal_id, p.name, k.project, k.scopes, k.created_at, "
    "k.expires_at, k.revoked_at, "
    "CASE WHEN u.last_used_at IS NULL OR u.last_used_at < k.last_used_at "
    "THEN k.last_used_at ELSE u.last_used_at END, "
    "k.request_count + COALESCE(u.request_count, 0), k.metadata, k.previous_valid_until"
)
_KEY_FROM = "FROM keys k JOIN principals p ON p.id = k.principal_id LEFT JOIN key_usage u ON u.key_id = k.id"
_PRINCIPAL_COLS = "id, name, kind, disabled, created_at, metadata"
# What the hot path needs to know about a key, its principal and its grant in the key's project.
_IDENTITY_SELECT = (
    "SELECT k.id, k.digest, k.previous_digest, k.previous_valid_until, k.start, "
    "k.principal_id, p.name, k.project, k.scopes, k.expires_at, k.env, g.scopes "
    "FROM keys k JOIN principals p ON p.id = k.principal_id LEFT JOIN grants g "
    "ON g.principal_id = k.principal_id AND g.project = k.project"
)


def _key(row: Row) -> KeyRecord:
    return KeyRecord(
        id=row[0],
        name=row[1],
        start=row[2],
        env=row[3],
        principal_id=row[4],
        principal=row[5],
        project=row[6],
        scopes=None if row[7] is None else _scopes_dec.decode(row[7]),
        created_at=row[8],
        expires_at=row[9],
        revoked_at=row[10],
        last_used_at=row[11],
        request_count=row[12],
        metadata=_meta_dec.decode(row[13]),
        previous_valid_until=row[14],
    )


def merge_usage(updates: Sequence[UsageUpdate]) -> list[UsageUpdate]:
    """One update per key (latest time, summed count), in key order.

    The usage upsert may touch a row only once per statement (PostgreSQL refuses a second touch;
    an ``UPDATE ... FROM`` would silently apply one arbitrary row), so a batch names each key once. Key order
    makes concurrent flushes from several instances lock rows in the same order (no deadlock).

    A batch that already names each key once, in order (the usage flusher's) is returned as it is,
    after one pass that checks it.
    """
    keys = [u.key_id for u in updates]
    if all(map(operator.lt, keys, islice(keys, 1, None))):
        return list(updates)
    merged: dict[str, UsageUpdate] = {}
    for u in updates:
        seen = merged.get(u.key_id)
        merged[u.key_id] = (
            u
            if seen is None
            else UsageUpdate(u.key_id, max(seen.last_used_at, u.last_used_at), seen.count + u.count)
        )
    return [merged[k] for k in sorted(merged)]


def _public(rec: KeyRecord | Principal) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(rec)
    return data


class SQLStore(Store):
    # Dialect: how to take the larger of two values, and case-insensitive LIKE.
    greatest = "GREATEST"
    ilike = "ILIKE"
    # A statement run before inserting an outbox row, held until commit, when concurrent writers
    # could otherwise commit their rows out of seq order.
    outbox_lock: str | None = None

    @abstractmethod
    def _tx(self, principal_id: str | None = None) -> AbstractAsyncContextManager[Conn]:
        """A transaction; writers for one principal must be serialised by it."""

    def _digest_in(self, column: str, digests: list[KeyDigest]) -> tuple[str, list[Any]]:
        """``column`` matches one of ``digests``: the SQL fragment and its parameters (the
        fragment may be used twice in one statement with the same parameters)."""
        marks = ", ".join(f"${n}" for n in range(1, len(digests) + 1))
        return f"{column} IN ({marks})", list(digests)

    @abstractmethod
    def _read(self) -> AbstractAsyncContextManager[Conn]: ...

    @abstractmethod
    async def _usage(self, conn: Conn, updates: Sequence[UsageUpdate]) -> None:
        """The one-statement usage merge; ``updates`` names each key at most once."""

    # -- helpers ---------------------------------------------------------------------------

    async def _audit(
        self,
        conn: Conn,
        *,
        at: float,
        actor: str,
        action: str,
        target_type: str,
        target_id: str,
        principal_id: str | None,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> None:
        await conn.execute(
            "INSERT INTO audit (at, actor, action, target_type, target_id, principal_id, before, after) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            at,
            actor,
            action,
            target_type,
            target_id,
            principal_id,
            None if before is None else _j(before),
            None if after is None else _j(after),
        )

    async def _invalidation(self, conn: Conn, digests: Sequence[KeyDigest]) -> Invalidation:
        """Record in the outbox, inside the caller's transaction, that ``digests`` changed.

        The last statement of a write: the outbox lock (if any) is held from here to the commit,
        which keeps that stretch short. No digests, no row."""
        if not digests:
            return Invalidation(0, ())
        every = len(digests) > MAX_INVALIDATION_DIGESTS
        if any(len(d) != DIGEST_SIZE for d in digests):
            raise ValueError("an outbox row holds 32-byte digests only")
        if self.outbox_lock is not None:
            await conn.execute(self.outbox_lock)
        row = await conn.fetchrow(
            "INSERT INTO invalidations (digests, created_at) VALUES ($1, $2) RETURNING seq",
            None if every else b"".join(digests),
            time.time(),
        )
        assert row is not None
        return Invalidation(int(row[0]), None if every else tuple(digests))

    async def _principal(self, conn: Conn, ref: str) -> Principal:
        row = await conn.fetchrow(f"SELECT {_PRINCIPAL_COLS} FROM principals WHERE id = $1 OR name = $1", ref)
        if row is None:
            raise NotFound(f"principal {ref!r} not found")
        grants = await conn.fetch(
            "SELECT project, scopes FROM grants WHERE principal_id = $1 ORDER BY project", row[0]
        )
        return Principal(
            id=row[0],
            name=row[1],
            kind=row[2],
            disabled=bool(row[3]),
            created_at=row[4],
            metadata=_meta_dec.decode(row[5]),
            grants={g[0]: _scopes_dec.decode(g[1]) for g in grants},
        )

    async def _key_row(self, conn: Conn, key_id: str) -> KeyRecord:
        row = await conn.fetchrow(f"SELECT {_KEY_COLS} {_KEY_FROM} WHERE k.id = $1", key_id)
        if row is None:
            raise NotFound(f"key {key_id!r} not found")
        return _key(row)

    async def _digests(self, conn: Conn, where: str, arg: str) -> list[KeyDigest]:
        rows = await conn.fetch(f"SELECT digest, previous_digest FROM keys WHERE {where} = $1", arg)
        return [bytes(d) for r in rows for d in r if d is not None]

    async def _count_active(self, conn: Conn, principal_id: str, project: str, now: float) -> int:
        row = await conn.fetchrow(
            "SELECT COUNT(*) FROM keys WHERE principal_id = $1 AND project = $2 "
            "AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $3)",
            principal_id,
            project,
            now,
        )
        assert row is not None
        return int(row[0])

    async def _name_free(
        self, conn: Conn, principal_id: str, project: str, name: str, except_id: str | None
    ) -> None:
        row = await conn.fetchrow(
            "SELECT id FROM keys WHERE principal_id = $1 AND project = $2 AND name = $3",
            principal_id,
            project,
            name,
        )
        if row is not None and row[0] != except_id:
            raise NameTaken(f"a key named {name!r} already exists for this principal and project")

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
                # collecting ids first (measured 13 -> 8 us per digest on 1M keys in SQLite).
                rows = await conn.fetch(
                    f"{_IDENTITY_SELECT} WHERE {current} AND k.revoked_at IS NULL AND NOT p.disabled "
                    f"UNION ALL {_IDENTITY_SELECT} WHERE {previous} AND k.previous_digest IS NOT NULL "
                    "AND k.revoked_at IS NULL AND NOT p.disabled",
                    *params,
                )
                wanted = set(chunk)
                for r in rows:
                    granted = None if r[11] is None else _scopes_dec.decode(r[11])
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
                    )
                    cur, prev = bytes(r[1]), None if r[2] is None else bytes(r[2])
                    if cur in wanted:
                        out[cur] = IdentityRecord(digest=cur, expires_at=r[9], **base)
                    if prev is not None and prev in wanted and r[3] is not None and r[3] > now:
                        until = r[3] if r[9] is None else min(r[3], r[9])
                        out[prev] = IdentityRecord(digest=prev, expires_at=until, grace_until=r[3], **base)
        return out

    # -- principals ------------------------------------------------------------------------

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
            for project, scopes in principal.grants.items():
                await conn.execute(
                    "INSERT INTO grants (principal_id, project, scopes) VALUES ($1, $2, $3)",
                    principal.id,
                    project,
                    _j(sorted(set(scopes))),
                )
            created = await self._principal(conn, principal.id)
            await self._audit(
                conn,
                at=principal.created_at,
                actor=actor,
                action="principal.create",
                target_type="principal",
                target_id=principal.id,
                principal_id=principal.id,
                before=None,
                after=_public(created),
            )
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
            if not isinstance(changes.metadata, msgspec.UnsetType):
                await conn.execute(
                    "UPDATE principals SET metadata = $1 WHERE id = $2", _j(changes.metadata), pid
                )
            if not isinstance(changes.grants, msgspec.UnsetType):
                await conn.execute("DELETE FROM grants WHERE principal_id = $1", pid)
                for project, scopes in changes.grants.items():
                    await conn.execute(
                        "INSERT INTO grants (principal_id, project, scopes) VALUES ($1, $2, $3)",
                        pid,
                        project,
                        _j(sorted(set(scopes))),
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
                "metadata, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
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
            )
            rec = await self._key_row(conn, new.id)
            await self._audit(
                conn,
                at=new.created_at,
                actor=actor,
                action="key.create",
                target_type="key",
                target_id=new.id,
                principal_id=new.principal_id,
                before=None,
                after=_public(rec),
            )
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
            await self._audit(
                conn,
                at=now,
                actor=actor,
                action="key.update",
                target_type="key",
                target_id=key_id,
                principal_id=before.principal_id,
                before=_public(before),
                after=_public(after),
            )
            return after, await self._invalidation(conn, await self._digests(conn, "id", key_id))

    async def revoke_key(self, key_id: str, actor: str, now: float) -> tuple[KeyRecord, Invalidation]:
        owner = await self.get_key(key_id)
        async with self._tx(owner.principal_id) as conn:
            before = await self._key_row(conn, key_id)
            digests = await self._digests(conn, "id", key_id)
            if before.revoked_at is None:
                await conn.execute(
                    "UPDATE keys SET revoked_at = $1, previous_digest = NULL, previous_valid_until = NULL "
                    "WHERE id = $2",
                    now,
                    key_id,
                )
            after = await self._key_row(conn, key_id)
            await self._audit(
                conn,
                at=now,
                actor=actor,
                action="key.revoke",
                target_type="key",
                target_id=key_id,
                principal_id=before.principal_id,
                before=_public(before),
                after=_public(after),
            )
            return after, await self._invalidation(conn, digests)

    async def delete_key(self, key_id: str, actor: str) -> Invalidation:
        owner = await self.get_key(key_id)
        async with self._tx(owner.principal_id) as conn:
            before = await self._key_row(conn, key_id)
            digests = await self._digests(conn, "id", key_id)
            await conn.execute("DELETE FROM keys WHERE id = $1", key_id)
            await self._audit(
                conn,
                at=time.time(),
                actor=actor,
                action="key.delete",
                target_type="key",
                target_id=key_id,
                principal_id=before.principal_id,
                before=_public(before),
                after=None,
            )
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
                "UPDATE keys SET digest = $1, start = $2, previous_digest = $3, previous_valid_until = $4 "
                "WHERE id = $5",
                digest,
                start,
                bytes(row[0]) if keep else None,
                previous_valid_until if keep else None,
                key_id,
            )
            after = await self._key_row(conn, key_id)
            await self._audit(
                conn,
                at=now,
                actor=actor,
                action="key.rotate",
                target_type="key",
                target_id=key_id,
                principal_id=before.principal_id,
                before=_public(before),
                after=_public(after),
            )
            return after, await self._invalidation(conn, old)

    # -- usage and audit -------------------------------------------------------------------

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
        if flt.since is not None:
            where.append(f"at >= {arg(flt.since)}")
        if flt.until is not None:
            where.append(f"at < {arg(flt.until)}")
        if flt.cursor:
            where.append(f"id < {arg(read_audit_cursor(flt.cursor))}")
        sql = "SELECT id, at, actor, action, target_type, target_id, before, after FROM audit"
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
