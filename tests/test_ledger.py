"""The ledger Redis values are judged by: what counts as stale, what is news, what is forgotten."""

from __future__ import annotations

from gateway.cache.ledger import Ledger, remember_for
from gateway.clock import ManualClock

D1, D2, D3 = b"1" * 32, b"2" * 32, b"3" * 32


def test_a_value_is_stale_only_when_an_invalidation_after_its_stamp_is_known() -> None:
    ledger = Ledger(remember=600)
    assert ledger.note(5, [D1, D2]) == [D1, D2]
    assert ledger.committed == 5
    assert ledger.stale(D1, 4) and not ledger.stale(D1, 5) and not ledger.stale(D1, 9)
    assert not ledger.stale(D3, 0)  # never invalidated
    assert ledger.note(5, [D1]) == []  # heard twice (message, then outbox): not news
    assert ledger.note(7, [D2, D3]) == [D2, D3]
    assert ledger.stale(D2, 6) and not ledger.stale(D1, 6)
    assert ledger.note(3, []) == [] and ledger.committed == 7  # never goes back


def test_an_invalidation_of_every_key_raises_the_floor() -> None:
    ledger = Ledger(remember=600)
    assert ledger.note(10, None) is None
    assert ledger.stale(D3, 9) and not ledger.stale(D3, 10)
    assert ledger.note(10, None) == []  # already applied


def test_invalidations_are_forgotten_after_remember() -> None:
    clock = ManualClock(mono=100.0)
    ledger = Ledger(remember=60, clock=clock)
    ledger.note(1, [D1])
    clock.advance(30)
    ledger.note(2, [D1, D2])
    clock.advance(31)
    ledger.expire()  # the first is forgotten, but D1 was invalidated again since
    assert ledger.latest == {D1: 2, D2: 2}
    clock.advance(30)
    ledger.expire()
    assert len(ledger) == 0 and not ledger.stale(D1, 0)
    assert ledger.committed == 2  # what committed stays known


def test_remembered_longer_than_any_redis_value_lives() -> None:
    assert remember_for(300) == 600 and remember_for(10) == 70
