"""The connection seam and shared pieces of the SQL store.

Owns: the ``Conn`` protocol, row decoding, listing cursors, the usage merge, and ``SQLBase``: the
abstract backend hooks (``_tx()`` a transaction that serialises writers for one principal,
``_read()`` a connection for plain reads, ``_usage()``) and the helpers every group of queries
uses (audit rows, outbox rows, row lookups). Must not: import the cache or aiohttp. SQL is written
with ``$1``-style placeholders; SQLite receives them as ``?1``.

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
from gateway.limits import policy as policy_codec
from gateway.models import (
    Invalidation,
    KeyRecord,
    Principal,
    UsageUpdate,
    source_of,
)
from gateway.store import (
    NameTaken,
    NotFound,
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
    "k.request_count + COALESCE(u.request_count, 0), k.metadata, k.previous_valid_until, k.limits"
)
_KEY_FROM = "FROM keys k JOIN principals p ON p.id = k.principal_id LEFT JOIN key_usage u ON u.key_id = k.id"
_PRINCIPAL_COLS = "id, name, kind, disabled, created_at, metadata"
# What the hot path needs to know about a key, its principal and its grant in the key's project.
_IDENTITY_SELECT = (
    "SELECT k.id, k.digest, k.previous_digest, k.previous_valid_until, k.start, "
    "k.principal_id, p.name, k.project, k.scopes, k.expires_at, k.env, g.scopes, "
    "k.limits, p.limits, kc.epoch, pc.epoch, g.roles "
    "FROM keys k JOIN principals p ON p.id = k.principal_id LEFT JOIN grants g "
    "ON g.principal_id = k.principal_id AND g.project = k.project "
    "LEFT JOIN credits kc ON kc.owner = k.id LEFT JOIN credits pc ON pc.owner = k.principal_id"
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
        limits=policy_codec.decode(row[15]),
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


class SQLBase(Store):
    """The connection seam and the helpers every group of queries uses."""

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
            "INSERT INTO audit (at, actor, action, target_type, target_id, principal_id, before, after, "
            "source) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            at,
            str(actor),
            action,
            target_type,
            target_id,
            principal_id,
            None if before is None else _j(before),
            None if after is None else _j(after),
            source_of(actor),
        )

    async def _audit_change(
        self,
        conn: Conn,
        action: str,
        at: float,
        actor: str,
        before: KeyRecord | Principal | None,
        after: KeyRecord | Principal | None,
    ) -> None:
        """The audit row of a change to one key or principal (``before``/``after`` None where it
        did not exist); a key's row names its principal, a principal's names itself."""
        subject = after if after is not None else before
        assert subject is not None
        owner = subject.principal_id if isinstance(subject, KeyRecord) else subject.id
        await self._audit(
            conn,
            at=at,
            actor=actor,
            action=action,
            target_type="key" if isinstance(subject, KeyRecord) else "principal",
            target_id=subject.id,
            principal_id=owner,
            before=None if before is None else _public(before),
            after=None if after is None else _public(after),
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
        row = await conn.fetchrow(
            f"SELECT {_PRINCIPAL_COLS}, limits FROM principals WHERE id = $1 OR name = $1", ref
        )
        if row is None:
            raise NotFound(f"principal {ref!r} not found")
        grants = await conn.fetch(
            "SELECT project, scopes, roles FROM grants WHERE principal_id = $1 ORDER BY project", row[0]
        )
        return Principal(
            id=row[0],
            name=row[1],
            kind=row[2],
            disabled=bool(row[3]),
            created_at=row[4],
            metadata=_meta_dec.decode(row[5]),
            grants={g[0]: _scopes_dec.decode(g[1]) for g in grants},
            roles={g[0]: held for g in grants if (held := _scopes_dec.decode(g[2]))},
            limits=policy_codec.decode(row[6]),
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
