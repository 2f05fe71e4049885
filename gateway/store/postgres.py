"""The PostgreSQL backend.

Owns: the asyncpg connection pool, PostgreSQL transactions and locking, the PostgreSQL migration
runner and the translation of every asyncpg/socket error into the store's error tree. All lifecycle
rules live in ``gateway.store.sql``; this module only supplies the seam (``_tx``, ``_read``,
``_usage``). Must not: import the cache, aiohttp or the app, or let an asyncpg exception escape a
Store method.

Concurrency: a writer for a principal takes ``SELECT ... FOR UPDATE`` on the principal's row at the
start of its transaction, so writers for one principal run one after another (READ COMMITTED gives
each later statement a fresh snapshot, so the key-limit count sees the previous writer's insert).
Writers of invalidation outbox rows take one advisory lock from the insert to the commit, so rows
commit in seq order (the last statement of a write: the lock is held for one round trip).
Several instances may migrate at once: the migration runs in one transaction under an advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, cast

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from gateway.keys import KeyDigest
from gateway.models import UsageUpdate
from gateway.store import NameTaken, SchemaMismatch, StoreError, StoreUnavailable
from gateway.store.migrations import migrations
from gateway.store.sql import Conn, Row, SQLStore

# Any constant shared by every Keystile instance; "keys" in ASCII.
_MIGRATION_LOCK = 0x6B657973
# Taken by a writer just before it inserts its invalidation outbox row, held until it commits:
# sequence numbers are handed out at insert, so without it a writer could take seq n, commit after
# the writer of n+1, and a reader that already moved past n+1 would never see n. "ksob" in ASCII.
_OUTBOX_LOCK = 0x6B736F62
# Migrations may wait for another instance's migration and run DDL on a big table.
_MIGRATION_TIMEOUT = 600.0

# Unique constraints that mean "this name is taken" (PostgreSQL's default constraint names).
_NAME_CONSTRAINTS = {
    "principals_name_key": "a principal with this name already exists",
    "keys_principal_id_project_name_key": "a key with this name already exists for this principal "
    "and project",
}

_pg = asyncpg.exceptions
# Client-side misuse or bad input: a bug or a misconfiguration, not an outage.
_NOT_OUTAGES: tuple[type[BaseException], ...] = (
    _pg.ClientConfigurationError,
    _pg.DataError,
    _pg.UnsupportedClientFeatureError,
    _pg.UnsupportedServerFeatureError,
)
# The server cannot be reached, went away, is overloaded or too slow: retryable, HTTP 503.
_OUTAGES: tuple[type[BaseException], ...] = (
    TimeoutError,  # asyncio.TimeoutError is TimeoutError since 3.11
    OSError,  # refused, reset, unreachable, TLS failures
    _pg.InterfaceError,  # connection closed, pool closed or closing
    _pg.PostgresConnectionError,  # SQLSTATE class 08, incl. ConnectionDoesNotExistError
    _pg.OperatorInterventionError,  # class 57: shutdown, CannotConnectNow, query cancelled
    _pg.InsufficientResourcesError,  # class 53: too many connections, disk full, OOM
    _pg.TransactionRollbackError,  # class 40: serialization failure, deadlock; retry
    _pg.ReadOnlySQLTransactionError,  # a failover left us on a standby
)


def _closed(raw: Any) -> bool:
    """Whether a pooled connection has died (the pool may already have taken it back)."""
    try:
        return bool(raw.is_closed())
    except Exception:  # InterfaceError: released back to the pool after it closed
        return True


def _translate(e: BaseException, raw: Any = None) -> StoreError:
    """The store error for an exception raised by asyncpg or the socket under it.

    ``raw``, the connection the error came from, settles the unclassified cases: when the server
    drops a connection just as a query starts, asyncpg may report a protocol-state error
    (InternalClientError) rather than a connection error; with the connection gone it is an outage.
    """
    if isinstance(e, StoreError):
        return e
    if isinstance(e, _pg.UniqueViolationError):
        constraint = getattr(e, "constraint_name", None)
        if constraint in _NAME_CONSTRAINTS:
            return NameTaken(_NAME_CONSTRAINTS[constraint])
        return StoreError(f"postgresql: unique constraint {constraint} violated")
    if isinstance(e, _NOT_OUTAGES):
        return StoreError(f"postgresql: {type(e).__name__}: {e}")
    if isinstance(e, _OUTAGES) or (raw is not None and _closed(raw)):
        return StoreUnavailable(f"postgresql unavailable: {type(e).__name__}: {e}".rstrip(": "))
    return StoreError(f"postgresql: {type(e).__name__}: {e}")


class _Conn(Conn):
    """The ``Conn`` seam over one pooled asyncpg connection; every error leaves as a StoreError."""

    __slots__ = ("_c", "_timeout")

    def __init__(self, raw: Any, timeout: float) -> None:
        self._c = raw
        self._timeout = timeout

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        try:
            rows = await self._c.fetch(sql, *args, timeout=self._timeout)
        except Exception as e:
            raise _translate(e, self._c) from e
        return cast(list[Row], rows)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        try:
            row = await self._c.fetchrow(sql, *args, timeout=self._timeout)
        except Exception as e:
            raise _translate(e, self._c) from e
        return cast(Row | None, row)

    async def execute(self, sql: str, *args: Any) -> None:
        try:
            await self._c.execute(sql, *args, timeout=self._timeout)
        except Exception as e:
            raise _translate(e, self._c) from e


class PostgresStore(SQLStore):
    backend: Literal["sqlite", "postgresql"] = "postgresql"
    greatest = "GREATEST"
    ilike = "ILIKE"
    outbox_lock = f"SELECT pg_advisory_xact_lock({_OUTBOX_LOCK})"

    def _digest_in(self, column: str, digests: list[KeyDigest]) -> tuple[str, list[Any]]:
        # One array parameter: one prepared statement whatever the batch size.
        return f"{column} = ANY($1::bytea[])", [digests]

    def __init__(self, pool: Any, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        timeout: float = 5.0,
        pool_min: int = 2,
        pool_max: int = 10,
    ) -> PostgresStore:
        """Create the pool and its first connections; an unreachable server is StoreUnavailable."""
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=pool_min,
                max_size=max(pool_max, pool_min),
                timeout=timeout,  # connect timeout, per connection attempt
                command_timeout=timeout,
                server_settings={"application_name": "keystile"},
            )
        except Exception as e:
            raise _translate(e) from e
        return cls(pool, timeout)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout=self._timeout)
        except Exception:  # TimeoutError included
            # A connection still in use or a dead server: drop everything now.
            self._pool.terminate()

    # -- the seam --------------------------------------------------------------------------

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[Any]:
        try:
            raw = await self._pool.acquire(timeout=self._timeout)
        except Exception as e:
            raise _translate(e) from e
        try:
            yield raw
        finally:
            # Releasing resets the session (and rolls back an open transaction); if that fails the
            # pool has already discarded the connection, and the work is committed or rolled back.
            with contextlib.suppress(Exception):
                await self._pool.release(raw)

    @asynccontextmanager
    async def _transaction(self, budget: float, principal_id: str | None) -> AsyncIterator[Conn]:
        async with self._acquire() as raw:
            tr = raw.transaction()
            try:
                await tr.start()
            except Exception as e:
                raise _translate(e, raw) from e
            conn = _Conn(raw, budget)
            try:
                if principal_id is not None:
                    await conn.execute("SELECT 1 FROM principals WHERE id = $1 FOR UPDATE", principal_id)
                yield conn
            except BaseException:
                # The original error matters more than a failed rollback on a broken connection;
                # release() rolls back or discards the connection in any case.
                with contextlib.suppress(Exception):
                    await tr.rollback()
                raise
            try:
                await tr.commit()
            except Exception as e:
                raise _translate(e, raw) from e

    def _tx(self, principal_id: str | None = None) -> contextlib.AbstractAsyncContextManager[Conn]:
        return self._transaction(self._timeout, principal_id)

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Conn]:
        async with self._acquire() as raw:
            yield _Conn(raw, self._timeout)

    async def _usage(self, conn: Conn, updates: Sequence[UsageUpdate]) -> None:
        # One statement for the whole batch. An upsert may touch a row only once per statement,
        # so the batch must hold each key once (SQLStore.record_usage merges it).
        await conn.execute(
            # The join skips keys deleted since they were used; key order keeps concurrent
            # flushes from several instances from deadlocking on each other's rows.
            "INSERT INTO key_usage (key_id, last_used_at, request_count) "
            "SELECT u.id, u.t, u.c "
            "FROM unnest($1::text[], $2::float8[], $3::bigint[]) AS u(id, t, c) "
            "JOIN keys k ON k.id = u.id ORDER BY u.id "
            "ON CONFLICT (key_id) DO UPDATE SET "
            "last_used_at = GREATEST(key_usage.last_used_at, EXCLUDED.last_used_at), "
            "request_count = key_usage.request_count + EXCLUDED.request_count",
            [u.key_id for u in updates],
            [float(u.last_used_at) for u in updates],
            [u.count for u in updates],
        )

    # -- schema ----------------------------------------------------------------------------

    async def schema_version(self) -> int:
        async with self._read() as conn:
            exists = await conn.fetchrow("SELECT to_regclass('schema_migrations') IS NOT NULL")
            if exists is None or not exists[0]:
                return 0
            row = await conn.fetchrow("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            return 0 if row is None else int(row[0])

    async def migrate(self) -> list[int]:
        steps = migrations("postgresql")
        latest = steps[-1][0] if steps else 0
        async with self._transaction(max(self._timeout, _MIGRATION_TIMEOUT), None) as conn:
            # Held until commit: a second instance waits here, then finds nothing left to do.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version integer PRIMARY KEY, applied_at double precision NOT NULL)"
            )
            row = await conn.fetchrow("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            current = 0 if row is None else int(row[0])
            if current > latest:
                raise SchemaMismatch(
                    f"database schema is version {current}, newer than this Keystile ({latest}); "
                    "upgrade Keystile"
                )
            done: list[int] = []
            for version, sql in steps:
                if version <= current:
                    continue
                await conn.execute(sql)  # no arguments: the simple protocol runs many statements
                await conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    version,
                    time.time(),
                )
                done.append(version)
            return done
