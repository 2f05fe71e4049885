"""The usage recorder against real stores: chunked flushes land whole, a failed chunk is retried
and nothing is counted twice, and shutdown waits for a flush in progress."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.models import UsageUpdate
from gateway.store import Store, StoreUnavailable
from gateway.store.sqlite import SQLiteStore
from gateway.usage import SEGMENT, UsageRecorder
from tests.store.test_store import T0, all_keys, make_key, make_principal
from tests.waiting import until


async def _keys(store: Store, n: int) -> list[str]:
    owner = await make_principal(store)
    return [(await make_key(store, owner, f"k{i}"))[0].id for i in range(n)]


async def test_a_flush_in_chunks_writes_every_key(store: Store) -> None:
    ids = await _keys(store, 5)
    usage = UsageRecorder(store, interval=3600, max_pending=100, chunk=2)
    for i, key_id in enumerate(ids):
        for n in range(i + 1):
            usage.bump(key_id, T0 + 10 * i + n)
    assert await usage.flush()
    got = {k.id: (k.last_used_at, k.request_count) for k in await all_keys(store)}
    assert got == {key_id: (T0 + 10 * i + i, i + 1) for i, key_id in enumerate(ids)}
    assert usage.pending == 0 and usage.flushes == 1


class FlakyStore(SQLiteStore):
    """A real SQLite store whose usage writes fail on chosen calls (a fault-injection seam)."""

    fail_calls: frozenset[int] = frozenset()
    delay = 0.0
    calls = 0
    written: list[list[str]]  # the key ids of each call, in the order they were handed over

    async def record_usage(self, updates: Sequence[UsageUpdate]) -> None:
        self.calls += 1
        self.written.append([u.key_id for u in updates])
        if self.calls in self.fail_calls:
            raise StoreUnavailable("sqlite: injected failure")
        if self.delay:
            await asyncio.sleep(self.delay)
        await super().record_usage(updates)


async def _flaky(tmp_path: Path) -> FlakyStore:
    store = await FlakyStore.open(f"sqlite:///{tmp_path}/flaky.db")
    store.written = []
    await store.migrate()
    return store


async def test_a_failed_chunk_is_retried_and_nothing_counts_twice(tmp_path: Path) -> None:
    store = await _flaky(tmp_path)
    try:
        ids = await _keys(store, 5)
        store.fail_calls = frozenset({2})  # the second chunk of the first flush
        usage = UsageRecorder(store, interval=3600, max_pending=100, chunk=2)
        for key_id in ids:
            usage.bump(key_id, T0)
            usage.bump(key_id, T0 + 1)
        assert not await usage.flush()
        assert usage.pending == 3  # the failed chunk and the one after it; the first is written
        usage.bump(ids[4], T0 + 5)  # a request while the store is down
        assert await usage.flush()
        got = {k.id: (k.last_used_at, k.request_count) for k in await all_keys(store)}
        assert got == {**{key_id: (T0 + 1, 2) for key_id in ids[:4]}, ids[4]: (T0 + 5, 3)}
    finally:
        await store.close()


@pytest.mark.parametrize("sort_run", [100, 2], ids=["one sort", "runs merged"])
async def test_a_flush_hands_over_its_keys_in_order_across_chunks(tmp_path: Path, sort_run: int) -> None:
    # Chunks in key order cover disjoint ranges of the usage table: each page of it is written once
    # per flush, not once per chunk. Bumped in reverse order, so arrival order cannot pass this.
    store = await _flaky(tmp_path)
    try:
        ids = sorted(await _keys(store, 9))
        usage = UsageRecorder(store, interval=3600, max_pending=100, chunk=4, sort_run=sort_run)
        for key_id in reversed(ids):
            usage.bump(key_id, T0)
        assert await usage.flush()
        assert store.written == [ids[0:4], ids[4:8], ids[8:9]]
        assert {k.id: k.request_count for k in await all_keys(store)} == dict.fromkeys(ids, 1)
    finally:
        await store.close()


async def test_shutdown_lets_a_flush_in_progress_finish(tmp_path: Path) -> None:
    store = await _flaky(tmp_path)
    try:
        ids = await _keys(store, 3)
        store.delay = 0.3  # each chunk's write is slow: shutdown arrives mid-flush
        usage = UsageRecorder(store, interval=0.05, max_pending=100, chunk=1)
        usage.start()
        for key_id in ids:
            usage.bump(key_id, T0)
        await until(lambda: store.calls == 1, what="the periodic flush's first chunk")
        assert store.calls == 1
        await usage.aclose()
        got = {k.id: (k.last_used_at, k.request_count) for k in await all_keys(store)}
        assert got == dict.fromkeys(ids, (T0, 1))
    finally:
        await store.close()


# -- the use log: what a request's bump turns into -----------------------------------------


async def _recorder(tmp_path: Path, **kw: int) -> tuple[SQLiteStore, UsageRecorder, list[str]]:
    store = await SQLiteStore.open(f"sqlite:///{tmp_path}/usage.db")
    await store.migrate()
    ids = await _keys(store, 3)
    return store, UsageRecorder(store, interval=3600, **{"max_pending": 100, **kw}), ids


async def test_uses_within_a_segment_share_its_last_time(tmp_path: Path) -> None:
    store, usage, (a, b, _) = await _recorder(tmp_path)
    try:
        usage.bump(a, T0)
        usage.bump(a, T0 + 0.01)
        usage.bump(b, T0 + 0.05)  # the segment that began at T0 ends with this use
        usage.bump(b, T0 + SEGMENT + 0.01)
        assert usage.last_seen(a) == T0 + 0.05  # never more than SEGMENT late
        assert usage.last_seen(b) == T0 + SEGMENT + 0.01
        usage.bump(a, T0 + 7)  # after a fold, a later use still moves the time on
        assert await usage.flush()
        got = {k.id: (k.last_used_at, k.request_count) for k in await all_keys(store)}
        assert got[a] == (T0 + 7, 3) and got[b] == (T0 + SEGMENT + 0.01, 2)
    finally:
        await store.close()


async def test_a_clock_stepping_back_never_moves_last_use_back(tmp_path: Path) -> None:
    store, usage, (a, b, _) = await _recorder(tmp_path)
    try:
        usage.bump(a, T0 + 100)
        usage.bump(b, T0 + 1)  # the wall clock was stepped back
        usage.bump(a, T0 + 2)
        assert usage.last_seen(a) == T0 + 100
        assert usage.last_seen(b) == T0 + 100  # shares the segment's time, never earlier
        usage.bump(a, T0 + 50)  # a later fold: still not earlier than what was pending
        assert usage.last_seen(a) == T0 + 100
    finally:
        await store.close()


async def test_a_long_log_is_folded_early_and_the_pending_bound_drops_and_counts(tmp_path: Path) -> None:
    store, usage, (a, b, c) = await _recorder(tmp_path, max_pending=2, log_max=10)
    try:
        for i in range(12):  # folded at the 10th use, with no flush and no clock movement
            usage.bump(a if i % 2 else b, T0)
        assert usage._uses == [b, a]
        usage.bump(c, T0)  # a third key: over the bound of 2 pending keys
        usage.bump(c, T0)
        assert usage.pending == 2 and usage.dropped == 2
        assert await usage.flush()
        got = {k.id: k.request_count for k in await all_keys(store)}
        assert got == {a: 6, b: 6, c: 0}
    finally:
        await store.close()


async def test_flush_lag_counts_from_the_first_use_not_yet_written(tmp_path: Path) -> None:
    store, usage, (a, b, _) = await _recorder(tmp_path)
    try:
        assert usage.lag(T0) == 0.0
        usage.bump(a, T0)
        usage.bump(b, T0 + 3)
        assert usage.lag(T0 + 4) == 4.0
        assert await usage.flush()
        assert usage.lag(T0 + 5) == 0.0
        usage.bump(a, T0 + 6)
        assert usage.lag(T0 + 8) == 2.0
    finally:
        await store.close()
