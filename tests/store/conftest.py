"""Fixtures for the store suite: every test runs against SQLite and against a real PostgreSQL.

PostgreSQL: ``KEYSTILE_TEST_PG_DSN`` names a server and a database to connect to for
administration (default ``postgresql://postgres@127.0.0.1:5432/postgres``). The suite creates its
own database ``keystile_test_<random>`` once per session, migrates it, empties it before each test
and drops it at the end. An unreachable server skips the PostgreSQL half locally and fails it under
``CI=true`` (see ``tests.servers.require_server``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import pytest

from gateway.store import Store, open_store
from gateway.store.sqlite import path_of
from tests.servers import require_server

T = TypeVar("T")

BACKENDS = ["sqlite", "postgresql"]
PG_DSN_ENV = "KEYSTILE_TEST_PG_DSN"
DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
TABLES = "audit, key_usage, keys, grants, principals, invalidations, hash_secrets"


def _run(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a private loop in a private thread.

    Session setup and teardown happen outside the per-test event loops; a thread keeps
    ``asyncio.run`` from touching the main thread's current loop.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        async def main() -> T:
            return await factory()

        try:
            box["value"] = asyncio.run(main())
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target, name="store-test-admin")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    result: T = box["value"]
    return result


def _redact(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


@dataclass(frozen=True)
class PgServer:
    """The PostgreSQL server under test; creates and drops throwaway databases."""

    admin_dsn: str

    def url(self, database: str) -> str:
        return urlunsplit(urlsplit(self.admin_dsn)._replace(path="/" + database))

    def create_database(self) -> str:
        name = f"keystile_test_{secrets.token_hex(6)}"

        async def create() -> None:
            conn = await asyncpg.connect(self.admin_dsn, timeout=5)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        _run(create)
        return name

    def drop_database(self, name: str) -> None:
        async def drop() -> None:
            conn = await asyncpg.connect(self.admin_dsn, timeout=5)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()

        _run(drop)


@pytest.fixture(scope="session")
def pg_server() -> PgServer:
    dsn = os.environ.get(PG_DSN_ENV) or DEFAULT_PG_DSN

    async def probe() -> None:
        conn = await asyncpg.connect(dsn, timeout=3)
        await conn.close()

    try:
        _run(probe)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        require_server("PostgreSQL", f"cannot connect to {_redact(dsn)} ({PG_DSN_ENV}): {e!r}")
    return PgServer(dsn)


@pytest.fixture(scope="session")
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A migrated database for the whole session; tests empty it before use."""
    name = pg_server.create_database()
    url = pg_server.url(name)
    try:

        async def migrate() -> None:
            store = await open_store(url, pool_min=1, pool_max=1)
            try:
                await store.migrate()
            finally:
                await store.close()

        _run(migrate)
        yield url
    finally:
        pg_server.drop_database(name)


async def execute_sql(url: str, sql: str) -> None:
    """Run raw SQL against the database behind ``url``, bypassing the store."""
    if url.startswith("sqlite:"):
        db = sqlite3.connect(path_of(url))
        try:
            db.executescript(sql)
        finally:
            db.close()
        return
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _open_empty(url: str, **options: int) -> Store:
    store = await open_store(url, pool_min=1, **options)
    try:
        if store.backend == "sqlite":
            await store.migrate()
        else:
            await execute_sql(url, f"TRUNCATE {TABLES} RESTART IDENTITY")
    except BaseException:
        await store.close()
        raise
    return store


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keystile.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """A migrated, empty store of each backend."""
    s = await _open_empty(store_url)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[Store]:
    """A migrated, empty PostgreSQL store with room for concurrent transactions."""
    s = await _open_empty(pg_url, pool_max=20)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(params=BACKENDS)
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a brand-new, unmigrated database of each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    url: str = request.getfixturevalue("fresh_pg_url")
    yield url


@pytest.fixture
def fresh_pg_url(pg_server: PgServer) -> Iterator[str]:
    """The URL of a brand-new, unmigrated PostgreSQL database, dropped afterwards."""
    name = pg_server.create_database()
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)
