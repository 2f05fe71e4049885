"""The SQLite backend's connection threads: what callers see when they cancel, fail or close."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from gateway.store import StoreError, StoreUnavailable, open_store
from gateway.store.sqlite import SQLiteStore
from tests.store.test_store import make_principal


async def _store(tmp_path: Path) -> SQLiteStore:
    store = await open_store(f"sqlite:///{tmp_path / 'keys.db'}")
    assert isinstance(store, SQLiteStore)
    await store.migrate()
    return store


async def test_a_cancelled_caller_leaves_the_store_serving(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    try:
        p = await make_principal(store)
        started, ran = threading.Event(), threading.Event()

        def slow(db: sqlite3.Connection) -> int:
            started.set()
            time.sleep(0.2)  # kept: a slow read on the store's thread, cancelled by its caller
            ran.set()
            return 1

        call = asyncio.ensure_future(store._reader.run(slow))
        await asyncio.to_thread(started.wait, 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The next read waits its turn behind the cancelled one, which still ran to its end.
        assert await store.get_principal(p.id) == p
        assert ran.is_set()
    finally:
        await store.close()


async def test_sqlite_errors_reach_the_caller_as_store_errors(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    try:
        with pytest.raises(StoreError, match="no such table"):
            await store._reader.run(lambda db: db.execute("SELECT * FROM nowhere"))
        assert await store.schema_version() > 0  # the thread survived the error
    finally:
        await store.close()


async def test_close_lets_calls_already_made_finish_then_refuses(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    p = await make_principal(store)

    def slow(db: sqlite3.Connection) -> str:
        time.sleep(0.1)  # kept: a slow read still running when close is called
        row = db.execute("SELECT name FROM principals WHERE id = ?", (p.id,)).fetchone()
        return str(row[0])

    queued = asyncio.ensure_future(store._reader.run(slow))
    await asyncio.sleep(0)  # handed to the thread
    await store.close()
    assert queued.done() and queued.result() == "alice"
    with pytest.raises(StoreUnavailable):
        await store.get_principal(p.id)
    assert not store._reader._thread.is_alive() and not store._writer._thread.is_alive()
