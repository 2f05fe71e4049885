"""Usage: last-used timestamps and request counts, bumped in memory and flushed in batches.

Owns: the use log, the per-key pending map and the background flush. Must not: touch HTTP or the
cache. A request only calls ``bump``: an append of its key id to a log (no await, no I/O, no
lookup). The log is cut into segments of ``SEGMENT`` seconds; a use is recorded with the time of
the last use in its segment (at most 0.1 s later than it happened). The log is folded into the
pending map (key id -> last use, count) by C-level passes when it is read: at a flush, for
``last_seen`` and ``pending``, or when it reaches ``log_max`` uses. So a request pays no lookup in a
map of every key used since the last flush and builds no tuple.

The flusher hands what is pending to the store once per interval, in key order and in chunks of at
most ``FLUSH_CHUNK`` keys so that preparing a large batch never holds the event loop for long (a
large batch in one piece would stall every request meanwhile). If the store fails, the chunks not
yet written are merged back (last-used keeps the latest, counts add) and retried, bounded by
``max_pending`` keys — beyond that, new keys' uses are dropped and counted. A chunk is written or
not as a whole, so nothing is counted twice.

A pending value is a tuple of two numbers (no container the collector must keep walking), and a
flush sorts bare key ids and builds each ``UsageUpdate`` once: the loop's thread does as little per
key as it can (no pairs sorted, merged in Python or copied).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Final

from gateway.clock import SYSTEM, Clock
from gateway.models import UsageUpdate
from gateway.store import Store, StoreError

log = logging.getLogger("keystile.usage")

FLUSH_CHUNK: Final = 2000
SORT_RUN: Final = 20_000  # keys sorted in one go: short enough not to hold the loop long
STOP_WAIT: Final = 10.0
# A use's time is kept to this precision: uses within one segment share the time of its last one.
SEGMENT: Final = 0.1
LOG_MAX: Final = 200_000  # uses logged before they are folded anyway (a flush stuck on the store)

Pending = tuple[float, int]  # last_used_at, count


async def _in_key_order(keys: list[str], run: int) -> list[str]:
    """``keys`` sorted, for a flush: its chunks then cover disjoint ranges of the usage table, so
    it writes each page once instead of once per chunk. Runs of ``run`` keys are sorted with the
    loop served between them; the last sort only merges the sorted runs (timsort finds them), so
    no single step holds the loop as long as one sort of every key would."""
    if len(keys) <= run:
        keys.sort()
        return keys
    for start in range(0, len(keys), run):
        keys[start : start + run] = sorted(keys[start : start + run])
        await asyncio.sleep(0)
    keys.sort()
    return keys


class UsageRecorder:
    def __init__(
        self,
        store: Store,
        interval: float,
        max_pending: int,
        chunk: int = FLUSH_CHUNK,
        sort_run: int = SORT_RUN,
        log_max: int = LOG_MAX,
        clock: Clock = SYSTEM,
    ) -> None:
        self._store = store
        self._wall = clock.time  # when a flush finished (uses arrive with their own time)
        self._chunk = chunk
        self._sort_run = sort_run
        self._interval = interval
        self._max = max_pending
        self._pending: dict[str, Pending] = {}  # key_id -> (last_used_at, count)
        # Uses not yet folded into _pending: key ids in request order, cut into segments of
        # SEGMENT seconds, each (end index in _uses, time of its last use).
        self._uses: list[str] = []
        self._segments: list[tuple[int, float]] = []
        self._segment_due = float("-inf")
        self._segment_last = float("-inf")
        self._log_max = log_max
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.flushes = 0
        self.flush_failures = 0
        self.dropped = 0
        self.last_flush_at: float | None = None
        self.oldest_pending_at: float | None = None

    def bump(self, key_id: str, now: float) -> None:
        """One use of ``key_id`` at ``now``: an append to the log, nothing looked up."""
        uses = self._uses
        if not uses and not self._pending:
            self.oldest_pending_at = now
        if now >= self._segment_due:
            self._close_segment(now)
        uses.append(key_id)
        if now > self._segment_last:
            self._segment_last = now
        if len(uses) >= self._log_max:
            self._fold()

    def _close_segment(self, now: float) -> None:
        """The uses logged so far happened at or before ``_segment_last``; a new segment starts."""
        n = len(self._uses)
        if n and (not self._segments or self._segments[-1][0] < n):
            self._segments.append((n, self._segment_last))
        self._segment_due = now + SEGMENT

    def _fold(self) -> None:
        """Move the logged uses into the pending map: per key, its count and the time of the last
        segment it appears in (C-level passes over the log, one Python step per distinct key)."""
        uses = self._uses
        if not uses:
            return
        self._close_segment(self._segment_last)
        segments, self._segments, self._uses = self._segments, [], []
        last: dict[str, float] = {}
        start = 0
        for end, t in segments:  # in time order: a later segment overwrites an earlier one
            last.update(dict.fromkeys(uses[start:end], t))
            start = end
        pending = self._pending
        for k, c in Counter(uses).items():
            t = last[k]
            entry = pending.get(k)
            if entry is None:
                if len(pending) >= self._max:
                    self.dropped += c
                    continue
                pending[k] = (t, c)
            else:
                pending[k] = (t if t > entry[0] else entry[0], entry[1] + c)

    def last_seen(self, key_id: str) -> float | None:
        """The latest use not yet written to the store."""
        self._fold()
        entry = self._pending.get(key_id)
        return None if entry is None else entry[0]

    @property
    def pending(self) -> int:
        """Keys with unwritten usage."""
        self._fold()
        return len(self._pending)

    def lag(self, now: float) -> float:
        """Seconds the oldest unflushed bump has waited."""
        return 0.0 if self.oldest_pending_at is None else now - self.oldest_pending_at

    async def flush(self) -> bool:
        """Write what is pending; on failure keep it for the next try. True when nothing is left."""
        self._fold()
        if not self._pending:
            return True
        pending, since = self._pending, self.oldest_pending_at
        self._pending, self.oldest_pending_at = {}, None
        keys = await _in_key_order(list(pending), self._sort_run)
        for start in range(0, len(keys), self._chunk):
            chunk = [UsageUpdate(k, *pending[k]) for k in keys[start : start + self._chunk]]
            try:
                await self._store.record_usage(chunk)
            except (TimeoutError, StoreError, OSError) as e:
                self.flush_failures += 1
                unwritten = keys[start:]
                log.warning("usage flush of %d keys failed, will retry: %s", len(unwritten), e)
                self._merge_back(unwritten, pending, since)
                return False
        self.flushes += 1
        self.last_flush_at = self._wall()
        return not self._pending

    def _merge_back(self, keys: list[str], old: dict[str, Pending], since: float | None) -> None:
        for k in keys:
            t, c = old[k]
            cur = self._pending.get(k)
            if cur is None:
                if len(self._pending) >= self._max:
                    self.dropped += 1
                    continue
                self._pending[k] = (t, c)
            else:
                self._pending[k] = (max(cur[0], t), cur[1] + c)
        if since is not None and (self.oldest_pending_at is None or since < self.oldest_pending_at):
            self.oldest_pending_at = since

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                async with asyncio.timeout(self._interval):
                    await self._stop.wait()
                return
            except TimeoutError:
                pass
            try:
                await self.flush()
            except Exception:
                log.exception("usage flush crashed")

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="keystile-usage-flush")

    async def aclose(self) -> None:
        """Stop the loop and make the final flush (a few retries if the store blinks).

        A flush in progress is let finish (up to ``STOP_WAIT`` seconds): cancelling it mid-write
        would lose its batch, or leave unknown whether its last chunk was written."""
        if self._task is not None:
            self._stop.set()
            done, _ = await asyncio.wait({self._task}, timeout=STOP_WAIT)
            if not done:
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
            self._task = None
        for attempt in range(3):
            if await self.flush():
                return
            await asyncio.sleep(0.2 * (attempt + 1))
        if self._pending:
            log.error("usage for %d keys could not be written before shutdown", len(self._pending))
