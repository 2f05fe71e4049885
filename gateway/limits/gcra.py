"""The decision: GCRA over several policies at once, and its state held in this process.

Owns: ``Bucket`` (one policy applied to one subject: a key, a principal's pool, a key on a route),
``Verdict`` (pass or refuse, which policy refused, what is left of each), the GCRA arithmetic and
``LocalState``, the per-process fallback used without Redis. Must not: do I/O or know about HTTP.

GCRA (the generic cell rate algorithm) keeps one number per bucket, the theoretical arrival time
``tat``: a policy of ``q`` per ``w`` seconds spaces requests ``w / q`` apart and tolerates a burst of
``q``. A request at ``now`` is accepted when ``max(tat, now) + w/q - now <= w``, and then moves
``tat`` by ``w/q``. So at most ``q`` pass at once, then one every ``w/q``: over any span of ``s``
seconds at most ``q + s*q/w`` pass, and never a second full burst at a boundary, as a fixed window
allows. Every policy of a request must accept it; when one refuses, no bucket moves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from gateway.limits.policy import Policy


class Bucket:
    """A policy applied to one subject; ``key`` names its state (in Redis, or here)."""

    __slots__ = ("key", "policy")

    def __init__(self, key: str, policy: Policy) -> None:
        self.key = key
        self.policy = policy


class Verdict:
    """What the limiter decided for one request.

    ``remaining``/``reset``: per bucket, in the order asked, the units left and the seconds until
    the policy's full quota is back. ``refused``: the bucket that refused (None: accepted).
    ``retry_after``: seconds until the request would be accepted."""

    __slots__ = ("buckets", "refused", "remaining", "reset", "retry_after")

    def __init__(
        self,
        buckets: Sequence[Bucket],
        refused: Bucket | None,
        retry_after: float,
        remaining: Sequence[int],
        reset: Sequence[float],
    ) -> None:
        self.buckets = buckets
        self.refused = refused
        self.retry_after = retry_after
        self.remaining = remaining
        self.reset = reset


# Tolerance for float rounding: wall times near 1.7e9 s carry ~0.2 us of it, and a burst's sum
# of intervals must not lose its last unit to it.
EPSILON: Final = 1e-6


def step(tat: float, now: float, limit: int, window: float) -> tuple[bool, float, float]:
    """One policy's answer: (accepted, the tat after it, seconds to wait when refused)."""
    interval = window / limit
    new = max(tat, now) + interval
    if new - now > window + EPSILON:
        return False, tat, new - window - now
    return True, new, 0.0


def left(tat: float, now: float, limit: int, window: float) -> tuple[int, float]:
    """Units left and seconds until the quota is full again, given the bucket's ``tat``."""
    tat = max(tat, now)
    interval = window / limit
    return max(0, min(limit, math.floor((now + window - tat) / interval + EPSILON))), tat - now


class LocalState:
    """GCRA state in this process (no Redis): exact for one process, per process with several.

    Bounded: past ``max_entries`` buckets the ones already full again (their ``tat`` passed) are
    dropped, which forgets nothing."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._tat: dict[str, float] = {}
        self._max = max_entries

    def admit(self, buckets: Sequence[Bucket], now: float) -> Verdict:
        # step() and left() inlined: this runs on every request of a limited route.
        tats = self._tat
        news: list[float] = []
        refused: Bucket | None = None
        wait = 0.0
        for b in buckets:
            p = b.policy
            tat = tats.get(b.key, now)
            new = (tat if tat > now else now) + p.window / p.limit
            if new - now > p.window + EPSILON:
                news.append(tat if tat > now else now)
                if new - p.window - now >= wait:
                    refused, wait = b, new - p.window - now
            else:
                news.append(new)
        if refused is None:
            for b, new in zip(buckets, news, strict=True):
                tats[b.key] = new
            if len(tats) > self._max:
                self._sweep(now)
            after = news
        else:
            after = [max(tats.get(b.key, now), now) for b in buckets]
        remaining = []
        reset = []
        for b, tat in zip(buckets, after, strict=True):
            p = b.policy
            n = int((now + p.window - tat) * p.limit / p.window + EPSILON)
            remaining.append(n if n > 0 else 0)
            reset.append(tat - now)
        return Verdict(buckets, refused, wait, remaining, reset)

    def take_one(self, bucket: Bucket, interval: float, now: float) -> float | None:
        """A request that fills only ``bucket``: its ``tat`` after it when accepted (moved),
        None when refused (nothing moved; ``admit`` says why and for how long). ``interval`` is
        the policy's ``window / limit``."""
        tats = self._tat
        tat = tats.get(bucket.key, now)
        new = (tat if tat > now else now) + interval
        if new - now > bucket.policy.window + EPSILON:
            return None
        tats[bucket.key] = new
        if len(tats) > self._max:
            self._sweep(now)
        return new

    def tat(self, key: str, now: float) -> float:
        return max(self._tat.get(key, now), now)

    def _sweep(self, now: float) -> None:
        for k in [k for k, t in self._tat.items() if t <= now]:
            del self._tat[k]

    def __len__(self) -> int:
        return len(self._tat)


UNLIMITED: Final = Verdict((), None, 0.0, (), ())
