"""The embedded SQLite backend.

Owns: the SQLite connections and the SQLite dialect of the shared SQL store. Must not: import the
cache or aiohttp. sqlite3 blocks, so each connection lives on its own single thread: one writer
(transactions serialised by an asyncio lock, ``BEGIN IMMEDIATE``) and one reader (WAL lets it read
while a write is in progress). Placeholders ``$n`` become SQLite's ``?n``.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, Literal, TypeVar
from urllib.parse import quote

import msgspec

from gateway.models import UsageUpdate
from gateway.store import SchemaMismatch, StoreError, StoreUnavailable
from gateway.store.migrations import migrations
from gateway.store.sql import Conn, Row, SQLStore

T = TypeVar("T")
_PLACEHOLDER = re.compile(r"\$(\d+)")
_enc = msgspec.json.Encoder()


@functools.lru_cache(maxsize=2048)
def _sql(text: str) -> str:
    # Cached: statements come from code (one per lookup batch size), and the rewrite is a regex
    # pass over every placeholder, a sizeable part of a lookup's cost next to SQLite's own work.
    return _PLACEHOLDER.sub(r"?\1", text)


def path_of(url: str) -> str:
    """``sqlite:///rel/path.db`` -> ``rel/path.db``; ``sqlite:////abs.db`` -> ``/abs.db``."""
    rest = url.removeprefix("sqlite:")
    if rest.startswith("///"):
        rest = rest[3:]
    elif rest.startswith("//"):
        rest = rest[2:]
    if not rest:
        raise StoreError("sqlite URL names no file (use sqlite:///path/to/keystile.db)")
    return rest


class _Thread:
    """One sqlite3 connection confined to one thread.

    Calls reach the thread through a queue and come back through ``call_soon_threadsafe``: less
    work per round trip than ``run_in_executor``, which wraps each call in a
    concurrent.futures.Future and chains that to an asyncio one.
    """

    def __init__(self, path: str, timeout: float, create: bool = True) -> None:
        self._path = path
        self._timeout = timeout
        self._create = create
        self.db: sqlite3.Connection | None = None
        self._closed = False
        # None stops the thread. A daemon thread: a store never closed must not hold the
        # interpreter at exit (SQLite rolls back a transaction cut short, as after a crash).
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="keystile-sqlite", daemon=True)
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        if self.db is None:
            # mode=rw: a store opened to read never creates an empty database.
            target = self._path if self._create else f"file:{quote(self._path)}?mode=rw"
            self.db = sqlite3.connect(
                target,
                timeout=self._timeout,
                isolation_level=None,
                check_same_thread=False,
                uri=not self._create,
            )
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            # Lookups are random reads by digest: a larger page cache, and the whole file mapped
            # (SQLite caps this at 2 GiB) so a first-seen key's pages are read in place instead of
            # copied in by read().
            self.db.execute("PRAGMA cache_size=-65536")
            self.db.execute(f"PRAGMA mmap_size={MMAP_SIZE}")
        return self.db

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._answer(*job)
            del job  # a result is not kept alive while the thread waits for the next call

    @staticmethod
    def _answer(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], fn: Callable[[], Any]) -> None:
        try:
            result, error = fn(), None
        except BaseException as e:  # delivered to the caller, as an executor would
            result, error = None, e
        try:
            loop.call_soon_threadsafe(_settle, fut, result, error)
        except RuntimeError:  # the loop is closed: nobody waits for this answer
            pass

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreUnavailable("sqlite: the store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, fut, lambda: fn(self._connect())))
        try:
            return await fut
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "unable to open" in str(e) or "disk" in str(e):
                raise StoreUnavailable(f"sqlite: {e}") from None
            raise StoreError(f"sqlite: {e}") from None
        except sqlite3.DatabaseError as e:  # integrity, corruption, "file is not a database"
            raise StoreError(f"sqlite: {e}") from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self.db is not None:
                self.db.close()
                self.db = None

        # Queued behind every call already made; then the thread ends.
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._jobs.put((loop, fut, shut))
        self._jobs.put(None)
        await fut
        self._thread.join(timeout=1.0)  # it has nothing left but to return


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]
MMAP_SIZE: Final = 1 << 31


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled; its call ran anyway
        return
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)


def _rollback_if_open(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        db.execute("ROLLBACK")


class _Conn(Conn):
    def __init__(self, thread: _Thread) -> None:
        self._t = thread

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        q = _sql(sql)
        return await self._t.run(lambda db: db.execute(q, args).fetchall())

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        q = _sql(sql)
        row: Row | None = await self._t.run(lambda db: db.execute(q, args).fetchone())
        return row

    async def execute(self, sql: str, *args: Any) -> None:
        q = _sql(sql)
        await self._t.run(lambda db: db.execute(q, args))


def _check_file(path: str, create: bool) -> None:
    """Refuse a database that cannot be opened as asked, naming it (absolute: a relative path
    would be read against a directory the operator may not think of)."""
    file = Path(path)
    if not file.parent.is_dir():
        raise StoreUnavailable(f"sqlite: directory {file.parent.absolute()} does not exist")
    if not create and not file.exists():
        raise StoreUnavailable(f"sqlite: no database at {file.absolute()} (create it with: keystile migrate)")


class SQLiteStore(SQLStore):
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    # One reader thread: concurrent lookups would queue on it anyway, and more loads in flight
    # only add CPU and context switches per request.
    lookup_concurrency = 1
    greatest = "MAX"
    ilike = "LIKE"  # SQLite's LIKE is case-insensitive for ASCII

    def __init__(self, path: str, timeout: float, create: bool = True) -> None:
        self.path = path
        self._writer = _Thread(path, timeout, create)
        self._reader = _Thread(path, timeout, create)
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, url: str, *, timeout: float = 5.0, create: bool = True) -> SQLiteStore:
        """``create=False``: a missing database file is an error naming it, not a new empty one."""
        path = path_of(url)
        if path == ":memory:":
            create = True
        else:
            _check_file(path, create)
        store = cls(path, timeout, create)
        await store._writer.run(lambda db: db.execute("SELECT 1"))
        return store

    async def close(self) -> None:
        await self._writer.close()
        await self._reader.close()

    @asynccontextmanager
    async def _tx(self, principal_id: str | None = None) -> AsyncIterator[Conn]:
        async with self._lock:
            await self._writer.run(lambda db: db.execute("BEGIN IMMEDIATE"))
            try:
                yield _Conn(self._writer)
            except BaseException:
                await asyncio.shield(self._writer.run(lambda db: db.execute("ROLLBACK")))
                raise
            else:
                try:
                    await self._writer.run(lambda db: db.execute("COMMIT"))
                except BaseException:
                    # A failed COMMIT (disk full, I/O error) leaves the transaction open.
                    await asyncio.shield(self._writer.run(_rollback_if_open))
                    raise

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Conn]:
        yield _Conn(self._reader)

    async def _usage(self, conn: Conn, updates: Sequence[UsageUpdate]) -> None:
        await conn.execute(
            # The join skips keys deleted since they were used. ORDER BY: rows in key order.
            "INSERT INTO key_usage (key_id, last_used_at, request_count) "
            "SELECT u.id, u.t, u.c "
            "FROM (SELECT value ->> 0 AS id, value ->> 1 AS t, value ->> 2 AS c FROM json_each($1)) AS u "
            "JOIN keys k ON k.id = u.id WHERE true ORDER BY u.id "  # WHERE: SQLite's upsert parsing
            "ON CONFLICT (key_id) DO UPDATE SET "
            "last_used_at = MAX(key_usage.last_used_at, excluded.last_used_at), "
            "request_count = key_usage.request_count + excluded.request_count",
            _enc.encode(updates).decode(),  # array-like structs: [[id, t, c], ...]
        )

    async def schema_version(self) -> int:
        def read(db: sqlite3.Connection) -> int:
            exists = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
            ).fetchone()
            if not exists:
                return 0
            row = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
            return int(row[0])

        return await self._reader.run(read)

    async def migrate(self) -> list[int]:
        steps = migrations("sqlite")
        latest = steps[-1][0] if steps else 0

        def apply(db: sqlite3.Connection) -> list[int]:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations "
                    "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
                )
                current = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
                if current > latest:
                    raise SchemaMismatch(f"database schema {current} is newer than this Keystile ({latest})")
                done = []
                for version, sql in steps:
                    if version <= current:
                        continue
                    body = "\n".join(ln for ln in sql.splitlines() if not ln.lstrip().startswith("--"))
                    for statement in body.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                        (version, time.time()),
                    )
                    done.append(version)
                db.execute("COMMIT")
                return done
            except BaseException:
                db.execute("ROLLBACK")
                raise

        async with self._lock:
            return await self._writer.run(apply)
