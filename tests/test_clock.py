"""The clock the gateway reads time from: the machine's, or one a test moves."""

from __future__ import annotations

import time

import pytest

from gateway.clock import SYSTEM, ManualClock


def test_the_system_clock_is_the_machines() -> None:
    # The very functions, so a method bound in a constructor costs what time.time() costs.
    assert SYSTEM.time is time.time and SYSTEM.monotonic is time.monotonic
    assert abs(SYSTEM.time() - time.time()) < 5


def test_a_manual_clock_moves_only_when_told_and_never_back() -> None:
    clock = ManualClock(wall=1000.0, mono=5.0)
    now, mono = clock.time, clock.monotonic  # bound once, as the gateway binds them
    assert (now(), mono()) == (1000.0, 5.0)
    clock.advance(2.5)
    assert (now(), mono()) == (1002.5, 7.5)
    with pytest.raises(ValueError):
        clock.advance(-1)
    assert (now(), mono()) == (1002.5, 7.5)
