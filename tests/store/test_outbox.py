"""The invalidation outbox, against every backend: every change that alters what a key resolves to
leaves a row in its own transaction, readers see rows in commit order, old rows are pruned.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import pytest

from gateway.models import Invalidation
from gateway.store import HasKeys, KeyChanges, KeyNotActive, PrincipalChanges, Store, sql_base
from tests.store.conftest import execute_sql
from tests.store.test_store import MANY, T0, make_key, make_principal, new_secret
from tests.waiting import until


async def waiting_on_a_lock(conn: asyncpg.Connection) -> bool:
    """Whether another session of this database is blocked on a lock."""
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
    )


async def rows(store: Store) -> list[Invalidation]:
    return await store.invalidations_since(0, 1000)


async def test_every_change_records_its_digests_in_order(store: Store) -> None:
    p = await make_principal(store)
    key, d = await make_key(store, p)
    other, d2 = await make_key(store, p, "other")
    assert await rows(store) == []  # creating keys invalidates nothing
    changes = [
        (await store.update_key(key.id, KeyChanges(name="renamed"), "a", max_active=MANY, now=T0))[1],
        (await store.update_principal(p.id, PrincipalChanges(grants={"proj": ("read",)}), "a"))[1],
        (await store.update_principal(p.id, PrincipalChanges(disabled=True), "a"))[1],
        (await store.revoke_key(other.id, "a", T0))[1],
    ]
    new, start = new_secret()
    _, rotated = await store.rotate_key(
        key.id, digest=new, start=start, previous_valid_until=T0 + 60, actor="a", now=T0
    )
    changes.append(rotated)
    changes.append(await store.delete_key(key.id, "a"))
    changes.append(await store.delete_principal(p.id, "a", with_keys=True))
    recorded = await rows(store)
    assert recorded == changes  # what the write returned is what readers find
    assert [c.seq for c in recorded] == sorted({c.seq for c in recorded})
    assert [set(c.digests or ()) for c in recorded] == [
        {d},
        {d, d2},
        {d, d2},
        {d2},
        {d},
        {new, d},  # the current digest and the one still in its grace period
        {d2},
    ]
    assert await store.latest_invalidation() == recorded[-1].seq
    assert await store.invalidations_since(recorded[2].seq, 2) == recorded[3:5]


async def test_a_refused_change_records_nothing(store: Store) -> None:
    p = await make_principal(store)
    key, _ = await make_key(store, p)
    await store.revoke_key(key.id, "a", T0)
    before = await rows(store)
    new, start = new_secret()
    with pytest.raises(KeyNotActive):
        await store.rotate_key(key.id, digest=new, start=start, previous_valid_until=None, actor="a", now=T0)
    with pytest.raises(HasKeys):
        await store.delete_principal(p.id, "a", with_keys=False)
    assert await rows(store) == before


async def test_a_change_too_large_to_list_invalidates_every_key(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql_base, "MAX_INVALIDATION_DIGESTS", 1)
    p = await make_principal(store)
    await make_key(store, p)
    await make_key(store, p, "other")
    _, change = await store.update_principal(p.id, PrincipalChanges(disabled=True), "a")
    assert change.digests is None and await rows(store) == [change]


async def test_old_rows_are_pruned_and_seqs_never_come_back(store: Store, store_url: str) -> None:
    p = await make_principal(store)
    first, _ = await make_key(store, p)
    second, _ = await make_key(store, p, "second")
    _, old = await store.revoke_key(first.id, "a", T0)
    await execute_sql(store_url, f"UPDATE invalidations SET created_at = {time.time() - 7200}")
    _, recent = await store.revoke_key(second.id, "a", T0)
    assert await store.recent_invalidations(time.time() - 3600) == [recent]
    assert await store.prune_invalidations(time.time() - 3600) == 1
    assert await rows(store) == [recent]
    assert await store.prune_invalidations(time.time() - 3600) == 0
    await execute_sql(store_url, "DELETE FROM invalidations")  # pruned to nothing
    assert await store.latest_invalidation() == 0
    later = await store.delete_key(second.id, "a")
    assert later.seq > recent.seq > old.seq  # a reader that saw `recent` still sees `later`


async def test_a_reader_never_skips_a_row_that_commits_late(pg_store: Store, pg_url: str) -> None:
    """A writer that took a seq but has not committed holds back the writers after it, so a
    reader can never see seq n+1 before n and move past n."""
    p = await make_principal(pg_store)
    key, _ = await make_key(pg_store, p)
    slow = await asyncpg.connect(pg_url)
    try:
        tx = slow.transaction()
        await tx.start()
        assert pg_store.outbox_lock is not None  # type: ignore[attr-defined]
        await slow.execute(pg_store.outbox_lock)  # type: ignore[attr-defined]
        first = await slow.fetchval(
            "INSERT INTO invalidations (digests, created_at) VALUES (NULL, $1) RETURNING seq", time.time()
        )
        revoke = asyncio.create_task(pg_store.revoke_key(key.id, "a", T0))
        await until(lambda: waiting_on_a_lock(slow), what="the later writer waiting on the outbox lock")
        assert not revoke.done(), "a later writer committed while an earlier one was open"
        assert await rows(pg_store) == []
        await tx.commit()
        _, change = await asyncio.wait_for(revoke, 5)
    finally:
        await slow.close()
    assert [c.seq for c in await rows(pg_store)] == [first, change.seq] and change.seq > first
