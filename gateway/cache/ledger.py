"""What this process knows of committed invalidations: the ledger Redis values are judged by.

Owns: the highest invalidation ``seq`` known to be committed (``committed``), per digest the seq of
the latest invalidation of it (``latest``, kept ``remember`` seconds), and a ``floor`` raised by
invalidations of every key. Must not: do I/O; the store poller, the subscriber and the writer
feed it (``gateway.cache.invalidation``), the Redis tier reads it (``gateway.cache.redis_tier``).

Why it is enough. The store hands out seqs in commit order, so knowing that ``n`` committed means
knowing every seq below ``n`` committed too. A process stamps what it writes to Redis with
``committed`` as it was before it read the store: every invalidation up to the stamp is reflected
in the value. An invalidation not reflected in a value therefore has a larger seq, committed after
the store read, so it is younger than the value; a value lives at most ``cache.redis_ttl``. A
process that remembers every invalidation for longer than that (``remember``, preloaded from the
store at start) can thus refuse every stale value, however it got into Redis: restored from a
snapshot, a replica promoted while behind, a tombstone that never arrived.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from gateway.clock import SYSTEM, Clock
from gateway.keys import KeyDigest


def remember_for(redis_ttl: float) -> float:
    """How long an invalidation must be remembered: longer than any Redis value can live, with
    room for clock skew between the writer that recorded it and the readers (a minute)."""
    return redis_ttl + max(redis_ttl, 60.0)


class Ledger:
    def __init__(self, remember: float, clock: Clock = SYSTEM) -> None:
        self.remember = remember
        self._clock = clock.monotonic
        self.committed = 0  # every invalidation up to this seq has committed
        self.floor = 0  # values stamped below this are stale for every digest
        self.latest: dict[KeyDigest, int] = {}
        # (forget at, seq, digests), in the order noted: what to drop from ``latest`` when
        self._forget: deque[tuple[float, int, Sequence[KeyDigest]]] = deque()

    def stale(self, digest: KeyDigest, stamp: int) -> bool:
        """Whether a value stamped ``stamp`` may predate a known invalidation of ``digest``."""
        return stamp < self.floor or stamp < self.latest.get(digest, 0)

    def note(self, seq: int, digests: Sequence[KeyDigest] | None) -> list[KeyDigest] | None:
        """A committed invalidation. Returns what is news: the digests not yet known to be
        invalidated at ``seq`` or later (``[]``: nothing), or None when it is an unknown invalidation
        of every key."""
        if seq > self.committed:
            self.committed = seq
        if digests is None:
            if seq <= self.floor:
                return []
            self.floor = seq
            return None
        latest = self.latest
        news = [d for d in digests if latest.get(d, 0) < seq]
        for d in news:
            latest[d] = seq
        if news:
            self._forget.append((self._clock() + self.remember, seq, news))
        return news

    def expire(self) -> None:
        """Forget invalidations older than ``remember`` (called periodically)."""
        now, forget, latest = self._clock(), self._forget, self.latest
        while forget and forget[0][0] <= now:
            _, seq, digests = forget.popleft()
            for d in digests:
                if latest.get(d) == seq:
                    del latest[d]

    def __len__(self) -> int:
        return len(self.latest)
