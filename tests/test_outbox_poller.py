"""The outbox poller against a real SQLite store, with its clocks moved by the test: it applies
what no message brought, vouches for the cache after each read, and forgets everything when it
was out of touch longer than the outbox keeps rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gateway.cache.invalidation import OutboxPoller
from gateway.cache.ledger import Ledger
from gateway.clock import ManualClock
from gateway.keys import KeyDigest
from gateway.store import PrincipalChanges, open_store
from tests.store.test_store import T0, make_key, make_principal


async def test_the_poller_applies_what_no_message_brought(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/poll.db")
    await store.migrate()
    clock = ManualClock(wall=T0, mono=50.0)
    applied: list[Sequence[KeyDigest] | None] = []
    confirmed: list[float] = []
    tombstoned: list[Sequence[KeyDigest]] = []
    ledger = Ledger(remember=600, clock=clock)
    poller = OutboxPoller(
        store,
        ledger,
        applied.append,
        confirmed.append,
        interval=1.0,
        timeout=5.0,
        retention=3600.0,
        tombstone=tombstoned.append,
        clock=clock,
    )
    try:
        p = await make_principal(store)
        first, d1 = await make_key(store, p)
        second, d2 = await make_key(store, p, "second")
        _, before = await store.revoke_key(first.id, "a", T0)
        await poller.load()  # recorded before it started: known to the ledger, not applied again
        assert (poller.last_seen, ledger.committed) == (before.seq, before.seq)
        assert ledger.stale(d1, before.seq - 1) and confirmed == [52.0]
        assert await poller.poll() == 0 and applied == []
        assert poller.lag() == 0.0
        clock.advance(7)  # the gauge of /metrics: how long since the outbox was last read to its end
        assert poller.lag() == 7.0
        await poller.poll()
        assert poller.lag() == 0.0

        _, heard = await store.revoke_key(second.id, "a", T0)
        ledger.note(heard.seq, heard.digests)  # as its message would
        _, missed = await store.update_principal(p.id, PrincipalChanges(grants={}), "a")  # never published
        clock.advance(1)
        assert await poller.poll() == 2
        # Only the missed change is news (the other came "by message"): its digests, once.
        assert len(applied) == 1 and sorted(applied[0] or []) == sorted([d1, d2])
        assert tombstoned == applied
        assert poller.delivered == 1 and poller.last_seen == missed.seq
        assert confirmed[-1] == 60.0  # the read began at 58: it vouches until 58 + 2 intervals

        clock.advance(3600)  # no read succeeded for an hour: rows may have been pruned meanwhile
        await poller.poll()
        assert applied[-1] is None and ledger.floor == missed.seq
    finally:
        await store.close()
