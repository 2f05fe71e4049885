"""GCRA state in Redis, shared by every instance: one script decides a request atomically, and the
requests of one event-loop turn go to Redis in one write (one round trip).

Owns: the Lua script (policies and credits of one request checked and moved together), its
encoding (``EVALSHA``, ``EVAL`` again after a Redis restart forgot it), batching per turn, a
breaker, and the count of round trips and their latency. Must not: decide what happens when Redis
cannot be reached (``gate`` does) or know about HTTP.

Time: the deciding process's wall clock, in milliseconds, is passed to the script, so every
instance must keep its clock synchronised (NTP); an instance ``d`` ms ahead lets a bucket refill
up to ``d`` ms early. Keys are ``{namespace}rl:<bucket>``; a value is the bucket's tat in ms, and
expires when the bucket is full again, so idle subjects cost no memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Final

import hiredis

from gateway.cache.redis_tier import Breaker
from gateway.cache.resp import LeanRedis, Reply, RespError, encode
from gateway.limits.gcra import Bucket, Verdict

log = logging.getLogger("keystile.limits")

# KEYS: the policies' buckets, then the credit counters. ARGV: now (ms), the number of policy
# buckets, the credit cost, the units of lease asked for, the units of an expired lease given back,
# then per policy its window (ms) and limit.
# Reply: {code, wait ms, index of the refusing bucket or missing counter (1-based, 0 none),
#         units of lease granted, per policy: units left, ms until full (after this request, the
#         lease not counted); per counter: credits left}
# code 0 accepted, 1 refused by a policy, 2 refused for credits, 3 a counter is not in Redis.
# A lease is granted only to an accepted request and never takes a bucket below half its quota.
SCRIPT: Final = b"""
local now = tonumber(ARGV[1])
local npol = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])
local refund = tonumber(ARGV[5])
local tats, news = {}, {}
local code, wait, which = 0, 0, 0
for i = 1, npol do
  local w = tonumber(ARGV[4 + 2 * i])
  local q = tonumber(ARGV[5 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now) - refund * w / q
  if tat < now then tat = now end
  local new = tat + w / q
  tats[i], news[i] = tat, new
  if new - now > w + 0.001 then
    local need = new - w - now
    if code == 0 or need > wait then code, wait, which = 1, need, i end
  end
end
local credits = {}
for j = npol + 1, #KEYS do
  local c = redis.call('GET', KEYS[j])
  if not c then return {3, 0, j - npol} end
  c = tonumber(c)
  credits[j - npol] = c
  if code == 0 and c < cost then code, which = 2, j - npol end
end
local granted = 0
if code == 0 and lease > 0 then
  granted = lease
  for i = 1, npol do
    local w = tonumber(ARGV[4 + 2 * i])
    local q = tonumber(ARGV[5 + 2 * i])
    local spare = math.floor((now + w - news[i]) * q / w + 0.000001) - math.ceil(q / 2)
    if spare < granted then granted = spare end
  end
  if granted < 0 then granted = 0 end
end
local out = {code, math.ceil(wait), which, granted}
for i = 1, npol do
  local w = tonumber(ARGV[4 + 2 * i])
  local q = tonumber(ARGV[5 + 2 * i])
  local tat = tats[i]
  if code == 0 then tat = news[i] end
  if code == 0 or refund > 0 then
    local keep = tat + granted * w / q
    redis.call('SET', KEYS[i], string.format('%.3f', keep), 'PX', math.max(1, math.ceil(keep - now)))
  end
  out[#out + 1] = math.max(0, math.min(q, math.floor((now + w - tat) * q / w + 0.000001)))
  out[#out + 1] = math.ceil(tat - now)
end
for j = 1, #credits do
  local c = credits[j]
  if code == 0 and cost > 0 then c = redis.call('DECRBY', KEYS[npol + j], cost) end
  out[#out + 1] = c
end
return out
"""
SHA: Final = hashlib.sha1(SCRIPT).hexdigest().encode()  # noqa: S324 - Redis names scripts by SHA-1

ACCEPTED: Final = 0
LIMITED: Final = 1
NO_CREDITS: Final = 2
UNSEEDED: Final = 3


class LimiterUnavailable(Exception):
    """Redis could not decide (unreachable, timed out, breaker open)."""


class RedisReply:
    """The script's answer for one request, decoded."""

    __slots__ = ("code", "credits", "granted", "index", "verdict")

    def __init__(
        self, code: int, index: int, verdict: Verdict, credits: Sequence[int], granted: int = 0
    ) -> None:
        self.code = code
        self.index = index
        self.verdict = verdict
        self.credits = credits
        self.granted = granted  # units of lease granted beyond this request


class _Pending:
    __slots__ = ("args", "buckets", "future", "keys")

    def __init__(
        self, buckets: Sequence[Bucket], keys: list[bytes], args: list[bytes], fut: asyncio.Future[RedisReply]
    ) -> None:
        self.buckets = buckets
        self.keys = keys
        self.args = args
        self.future = fut


class RedisState:
    def __init__(
        self,
        url: str,
        namespace: str,
        *,
        timeout: float,
        connect_timeout: float,
        breaker_failures: int = 3,
        breaker_reset: float = 2.0,
    ) -> None:
        self.redis = LeanRedis(url, timeout=timeout, connect_timeout=connect_timeout)
        self.prefix = namespace + "rl:"
        self.credit_prefix = namespace + "cr:"
        self.breaker = Breaker(breaker_failures, breaker_reset)
        self._queue: list[_Pending] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.round_trips = 0
        self.round_trip_seconds = 0.0
        self.failures = 0

    def prepare(self, buckets: Sequence[Bucket]) -> tuple[list[bytes], list[bytes]]:
        """The script's keys and per-policy arguments for ``buckets`` (made once per plan)."""
        keys = [(self.prefix + b.key).encode() for b in buckets]
        tail = []
        for b in buckets:
            tail.append(repr(b.policy.window * 1000).encode())
            tail.append(str(b.policy.limit).encode())
        return keys, tail

    def admit(
        self,
        buckets: Sequence[Bucket],
        now: float,
        credit_keys: Sequence[str] = (),
        cost: int = 0,
        prepared: tuple[list[bytes], list[bytes]] | None = None,
        lease: int = 0,
        refund: int = 0,
    ) -> asyncio.Future[RedisReply]:
        """The decision for one request, sent with the rest of this turn's. ``lease``: units to
        reserve beyond it for this process (``RedisReply.granted`` says how many it got);
        ``refund``: units of an expired lease this process did not use, given back first."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[RedisReply] = loop.create_future()
        if not self.breaker.allow():
            fut.set_exception(LimiterUnavailable("breaker open"))
            return fut
        keys, tail = prepared if prepared is not None else self.prepare(buckets)
        if credit_keys:
            keys = keys + [(self.credit_prefix + c).encode() for c in credit_keys]
        args = [
            str(int(now * 1000)).encode(),
            str(len(buckets)).encode(),
            str(cost).encode(),
            str(lease).encode(),
            str(refund).encode(),
            *tail,
        ]
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append(_Pending(buckets, keys, args, fut))
        return fut

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        commands = [encode(b"EVALSHA", SHA, str(len(p.keys)).encode(), *p.keys, *p.args) for p in batch]
        try:
            replies = await self._round_trip(commands)
            missing = [i for i, r in enumerate(replies) if _noscript(r)]
            if missing:  # Redis restarted (or flushed its scripts): send the script itself
                again = [
                    encode(b"EVAL", SCRIPT, str(len(batch[i].keys)).encode(), *batch[i].keys, *batch[i].args)
                    for i in missing
                ]
                for i, r in zip(missing, await self._round_trip(again), strict=True):
                    replies[i] = r
        except RespError as e:
            self.failures += 1
            self.breaker.failure()
            err = LimiterUnavailable(str(e))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
                    p.future.exception()  # retrieved: the request may have gone
            return
        self.breaker.success()
        for p, r in zip(batch, replies, strict=True):
            if p.future.done():
                continue
            if not isinstance(r, list):
                p.future.set_exception(LimiterUnavailable(f"script failed: {r}"))
                p.future.exception()
                continue
            p.future.set_result(_decode(p.buckets, r))

    async def _round_trip(self, commands: list[bytes]) -> list[Reply]:
        started = time.perf_counter()
        try:
            return await self.redis.replies(commands)
        finally:
            self.round_trips += 1
            self.round_trip_seconds += time.perf_counter() - started

    async def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """Plain reads (views of the state, never decisions)."""
        got = await self.redis.replies([encode(b"GET", k.encode()) for k in keys])
        return [v if isinstance(v, bytes) else None for v in got]

    async def set_credits(self, owner: str, value: int | None, ttl: float) -> None:
        """Replace (``value``) or drop (None) a credit counter."""
        key = (self.credit_prefix + owner).encode()
        if value is None:
            command = encode(b"DEL", key)
        else:
            command = encode(b"SET", key, str(value).encode(), b"PX", str(int(ttl * 1000)).encode())
        await self.redis.send([command])

    async def seed_credits(self, owner: str, value: int, ttl: float) -> None:
        """Put a counter that is not in Redis (restarted, or a new epoch), unless one got there first."""
        key = (self.credit_prefix + owner).encode()
        await self.redis.send(
            [encode(b"SET", key, str(value).encode(), b"PX", str(int(ttl * 1000)).encode(), b"NX")]
        )

    async def add_credits(self, owner: str, amount: int) -> None:
        """Top up a counter held in Redis (one that is not is read from the store when needed)."""
        key = (self.credit_prefix + owner).encode()
        script = (
            b"if redis.call('EXISTS', KEYS[1]) == 1 then "
            b"return redis.call('INCRBY', KEYS[1], ARGV[1]) end return 0"
        )
        await self.redis.send([encode(b"EVAL", script, b"1", key, str(amount).encode())])

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.redis.aclose()


def _noscript(reply: Reply) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


def _decode(buckets: Sequence[Bucket], r: list[int]) -> RedisReply:
    code, wait_ms, index = int(r[0]), int(r[1]), int(r[2])
    if code == UNSEEDED:
        return RedisReply(code, index, Verdict(buckets, None, 0.0, (), ()), ())
    n = len(buckets)
    remaining = [int(r[4 + 2 * i]) for i in range(n)]
    reset = [int(r[5 + 2 * i]) / 1000 for i in range(n)]
    credits = [int(x) for x in r[4 + 2 * n :]]
    refused = buckets[index - 1] if code == LIMITED else None
    verdict = Verdict(buckets, refused, wait_ms / 1000, remaining, reset)
    return RedisReply(code, index, verdict, credits, int(r[3]))
