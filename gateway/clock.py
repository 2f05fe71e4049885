"""Time, as the gateway reads it: wall time and monotonic time from one object tests can move.

Owns: the ``Clock`` interface, the process-wide ``SYSTEM`` clock and ``ManualClock`` for tests.
Must not: import anything of the gateway.

A component that reads time takes a ``Clock`` (default ``SYSTEM``) and binds the method it needs
once, in its constructor (``self._now = clock.time``), so a request pays one call and never an
attribute chain. ``SYSTEM``'s methods are ``time.time`` and ``time.monotonic`` themselves, so the
bound reads cost what the plain functions do.
"""

from __future__ import annotations

from time import monotonic as _monotonic
from time import time as _time
from typing import Final


class Clock:
    """Wall and monotonic time, one place tests can move."""

    def time(self) -> float:
        """Seconds since the epoch: expiry and grace deadlines, which the store keeps as wall time."""
        raise NotImplementedError

    def monotonic(self) -> float:
        """Seconds that never go back: deadlines within this process (cache entries, blocks)."""
        raise NotImplementedError


class SystemClock(Clock):
    """The machine's clocks: ``time.time`` and ``time.monotonic``."""

    time = staticmethod(_time)
    monotonic = staticmethod(_monotonic)


class ManualClock(Clock):
    """A clock that moves only when told (``advance``): for tests, instead of sleeping."""

    def __init__(self, wall: float = 1_700_000_000.0, mono: float = 1000.0) -> None:
        self._wall = wall
        self._mono = mono

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("a clock never goes back")
        self._wall += seconds
        self._mono += seconds


SYSTEM: Final = SystemClock()
