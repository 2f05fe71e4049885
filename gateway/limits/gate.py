"""The limiter as the proxy sees it: pass (with the fields to add) or the answer to send instead.

Owns: which buckets a request fills (the route's defaults per key, the key's own limits, its
principal's pool), asking the state (Redis when configured, else this process), the failure policy
(``limits.on_redis_failure``: open lets requests pass unlimited, closed answers 503; one log line
per outage) and the decision counters. Must not: authenticate (it runs after a key passed, so a
Redis outage can never let an invalid key through), look anything up in the store or forward.

A request on a route without limits, by a key without limits or credits, never reaches this
module: the handler tests three attributes first.

Leases (Redis only, ``limits.lease`` seconds, 0 turns them off): a plan that is busy (at least
``LEASE_MIN`` requests since it last asked) asks, with its next decision, for as many units as it
saw requests, at most ``LEASE_MAX``. The script grants them only while every bucket keeps at least
half its quota, so near a limit every request is decided in Redis, one by one. The process then
accepts that many requests of the plan without a round trip, until the lease expires; units left
at expiry go back with the plan's next decision. Nothing is admitted that Redis did not grant: the
bound this adds is that a unit granted at ``t`` may be used up to ``t + lease``, so over any span
at most ``ceil(lease * limit / window)`` more pass than GCRA alone would let through (README
"Limits"). A lease also outlives a Redis outage by at most ``lease`` seconds.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from gateway import errors
from gateway.clock import SYSTEM, Clock
from gateway.limits import answers
from gateway.limits.gcra import EPSILON, Bucket, LocalState, Verdict, left
from gateway.limits.policy import Policy
from gateway.limits.redis_state import LimiterUnavailable, RedisState
from gateway.models import IdentityRecord
from gateway.wire import RawResponse

if TYPE_CHECKING:
    from gateway.config import LimitsConfig
    from gateway.limits.credits import Credits
    from gateway.routing import Route

log = logging.getLogger("keystile.limits")

# What an accepted request adds to its response: header lines, each ending CRLF ("" for none).
Fields = bytes
NO_FIELDS: Final[Fields] = b""
# A plan asks for a lease once it saw this many requests since it last asked, for at most this many units.
LEASE_MIN: Final = 4
LEASE_MAX: Final = 1024


def owner_buckets(scope: str, owner: str, policies: tuple[Policy, ...]) -> list[Bucket]:
    """The buckets of a key's (``scope`` "k") or a principal's ("p") own policies."""
    return [Bucket(f"{scope}:{owner}:{p.name}:{p.limit}:{p.window!r}", p) for p in policies]


def buckets(route: Route, ident: IdentityRecord) -> list[Bucket]:
    """Every bucket a request fills: the route's per key, the key's, the principal's pool."""
    out = []
    kid = ident.key_id
    for p in route.limits:
        out.append(Bucket(f"r:{route.name}:{kid}:{p.name}:{p.limit}:{p.window!r}", p))
    for p in ident.limits:
        out.append(Bucket(f"k:{kid}:{p.name}:{p.limit}:{p.window!r}", p))
    pid = ident.principal_id
    for p in ident.pool_limits:
        out.append(Bucket(f"p:{pid}:{p.name}:{p.limit}:{p.window!r}", p))
    return out


class Plan:
    """What a request by one identity on one route fills, worked out once and reused while that
    identity record is the one the cache holds: the buckets, the bytes of both RateLimit fields
    with only the numbers left to fill in, and (Redis) the plan's lease."""

    __slots__ = (
        "accepted",
        "asking",
        "buckets",
        "demand",
        "ident",
        "interval",
        "intervals",
        "lease_left",
        "lease_tats",
        "lease_until",
        "redis",
        "route",
        "state_format",
    )

    def __init__(self, route: Route, ident: IdentityRecord) -> None:
        self.ident = ident
        self.route = route
        bs = self.buckets = buckets(route, ident)
        # "RateLimit-Policy: ...\r\nRateLimit: "name";r=%d;t=%d, ...\r\n" (names are tokens: no '%')
        head = (
            b"RateLimit-Policy: " + answers.policy_field([b.policy for b in bs]).encode() + b"\r\nRateLimit: "
        )
        items = b", ".join([b'"%s";r=%%d;t=%%d' % b.policy.name.encode() for b in bs])
        self.state_format = head + items + b"\r\n"
        self.intervals = [b.policy.window / b.policy.limit for b in bs]
        # One bucket (the common case): its spacing, for the in-process fast path; else 0.
        self.interval = self.intervals[0] if len(bs) == 1 else 0.0
        self.redis: tuple[list[bytes], list[bytes]] | None = None  # the script's arguments
        # The lease (Redis): units left, usable until, each bucket's tat in Redis after it.
        self.lease_left = 0
        self.lease_until = 0.0
        self.lease_tats: list[float] = []
        self.asking = False  # a request of this plan is asking for a lease
        self.demand = 0  # requests since the plan last asked
        self.accepted = 0  # requests accepted, not yet counted by policy (LimitGate.decisions)

    def take_lease(self, old: Plan) -> None:
        """Carry ``old``'s lease over when the identity record changed but its buckets did not."""
        if old.lease_left and [b.key for b in old.buckets] == [b.key for b in self.buckets]:
            self.lease_left, self.lease_until, self.lease_tats = (
                old.lease_left,
                old.lease_until,
                old.lease_tats,
            )
            old.lease_left = 0

    def fields(self, tats: Sequence[float], now: float) -> Fields:
        """Both fields, given each bucket's tat (at least ``now``)."""
        vals: list[int] = []
        for tat, b in zip(tats, self.buckets, strict=True):
            p = b.policy
            n = int((now + p.window - tat) * p.limit / p.window + EPSILON)
            vals += (n if n > 0 else 0, math.ceil(tat - now - EPSILON))
        return self.state_format % tuple(vals)

    def lease_fields(self, now: float) -> Fields:
        """The fields of a request accepted on the lease: each bucket as if the units still
        leased were not taken."""
        left = self.lease_left
        if self.interval:  # one bucket: as ``fields``, without the lists
            p = self.buckets[0].policy
            tat = self.lease_tats[0] - left * self.interval
            if tat < now:
                tat = now
            n = int((now + p.window - tat) * p.limit / p.window + EPSILON)
            return self.state_format % (n if n > 0 else 0, math.ceil(tat - now - EPSILON))
        tats = []
        for tat, interval in zip(self.lease_tats, self.intervals, strict=True):
            tat -= left * interval
            tats.append(tat if tat > now else now)
        return self.fields(tats, now)


MAX_PLANS: Final = 50_000


class LimitGate:
    def __init__(
        self,
        cfg: LimitsConfig,
        redis: RedisState | None,
        clock: Clock = SYSTEM,
        credits: Credits | None = None,
    ) -> None:
        self.local = LocalState(cfg.max_local_buckets)
        self.redis = redis
        self.credits = credits
        self._now = clock.time
        self.configure(cfg)
        # (policy, outcome) -> requests; outcomes: accepted, refused, unavailable
        self.decisions: Counter[tuple[str, str]] = Counter()
        # route name -> key id -> plan (two lookups of strings that cache their hash: cheaper
        # than building a tuple key per request)
        self._plans: dict[str, dict[str, Plan]] = {}
        self._plan_count = 0
        self.unavailable = 0
        self.outages = 0
        self.leases = 0  # leases granted
        self.leased = 0  # requests accepted on a lease (without a round trip)
        self._down = False

    def configure(self, cfg: LimitsConfig) -> None:
        """A reload's settings (the state, Redis or local, stays)."""
        self.with_fields = cfg.headers
        self.closed = cfg.on_redis_failure == "closed"
        self.lease_time = cfg.lease

    def plan(self, route: Route, ident: IdentityRecord) -> Plan:
        per_route = self._plans.get(route.name)
        plan = None if per_route is None else per_route.get(ident.key_id)
        # ``is``: a changed key (new limits, a new credit epoch) is a new record, and a reload
        # makes new routes (perhaps with other limits).
        if plan is None or plan.ident is not ident or plan.route is not route:
            plan = self._new_plan(route, ident, plan)
        return plan

    def _new_plan(self, route: Route, ident: IdentityRecord, old: Plan | None) -> Plan:
        if self._plan_count >= MAX_PLANS:
            self._count_accepted()
            self._plans.clear()
            self._plan_count = 0
            old = None
        plan = Plan(route, ident)
        if old is not None:
            plan.take_lease(old)
            self._count_plan(old)
        else:
            self._plan_count += 1
        self._plans.setdefault(route.name, {})[ident.key_id] = plan
        return plan

    def plans(self) -> list[Plan]:
        return [p for per_route in self._plans.values() for p in per_route.values()]

    def admit_now(self, route: Route, ident: IdentityRecord) -> RawResponse | Fields | None:
        """The answer of ``admit`` when it needs no waiting: in-process state, or a request the
        plan's lease covers (Redis), no credits to spend. None: call ``admit``."""
        plan = self.plan(route, ident)
        if route.cost and (ident.credits or ident.pool_credits) and self.credits is not None:
            return None
        if self.redis is not None:
            plan.demand += 1
            if plan.lease_left:
                now = self._now()
                if now < plan.lease_until:
                    plan.lease_left -= 1
                    self.leased += 1
                    plan.accepted += 1
                    return plan.lease_fields(now) if self.with_fields else NO_FIELDS
            return None
        if plan.interval:
            # One bucket: no verdict object, the same effect and fields (tests/limits/test_fast_path.py).
            now = self._now()
            b = plan.buckets[0]
            tat = self.local.take_one(b, plan.interval, now)
            if tat is not None:
                plan.accepted += 1
                if not self.with_fields:
                    return NO_FIELDS
                p = b.policy
                n = int((now + p.window - tat) * p.limit / p.window + EPSILON)  # as LocalState.admit
                return plan.state_format % (n if n > 0 else 0, math.ceil(tat - now - EPSILON))
        if not plan.buckets:
            return NO_FIELDS
        return self.answer(self.local.admit(plan.buckets, self._now()), plan)

    async def admit(self, route: Route, ident: IdentityRecord) -> RawResponse | Fields:
        """The fields to add to the response, or the refusal to answer instead."""
        plan = self.plan(route, ident)
        bs = plan.buckets
        cost = route.cost
        credit = self.credits
        if credit is not None and (ident.credits or ident.pool_credits) and cost:
            return await credit.spend(self, bs, ident, cost)
        if not bs:
            return NO_FIELDS
        now = self._now()
        if self.redis is None:
            return self.answer(self.local.admit(bs, now), plan)
        if plan.redis is None:
            plan.redis = self.redis.prepare(bs)
        refund = lease = 0
        if plan.lease_left and now >= plan.lease_until:
            refund, plan.lease_left = plan.lease_left, 0  # expired: given back with this decision
        if self.lease_time and not plan.asking and plan.demand >= LEASE_MIN:
            lease, plan.demand, plan.asking = min(plan.demand, LEASE_MAX), 0, True
        try:
            reply = await self.redis.admit(bs, now, prepared=plan.redis, lease=lease, refund=refund)
        except LimiterUnavailable as e:
            return self.failed(bs, e)  # a refund lost with it stays taken until the buckets refill
        finally:
            if lease:
                plan.asking = False
        self.recovered()
        v = reply.verdict
        if reply.granted and v.refused is None:
            self.leases += 1
            plan.lease_tats = [
                now + t + reply.granted * i for t, i in zip(v.reset, plan.intervals, strict=True)
            ]
            plan.lease_left = reply.granted
            plan.lease_until = now + self.lease_time
        return self.answer(v, plan)

    def answer(self, v: Verdict, plan: Plan | None = None) -> RawResponse | Fields:
        if v.refused is not None:
            self.decisions[v.refused.policy.name, "refused"] += 1
            return answers.refused(v, self.with_fields)
        if plan is not None:
            plan.accepted += 1
        else:
            for b in v.buckets:
                self.decisions[b.policy.name, "accepted"] += 1
        if not self.with_fields or not v.buckets:
            return NO_FIELDS
        if plan is None:
            return answers.lines(v)
        vals: list[int] = []
        for r, t in zip(v.remaining, v.reset, strict=True):
            vals += (r, math.ceil(t - EPSILON))
        return plan.state_format % tuple(vals)

    def _count_plan(self, plan: Plan) -> None:
        n, plan.accepted = plan.accepted, 0
        if n:
            for b in plan.buckets:
                self.decisions[b.policy.name, "accepted"] += n

    def _count_accepted(self) -> None:
        """Fold the plans' accepted requests into ``decisions`` (when metrics are read)."""
        for per_route in self._plans.values():
            for plan in per_route.values():
                if plan.accepted:
                    self._count_plan(plan)

    def failed(self, bs: list[Bucket], e: Exception) -> RawResponse | Fields:
        """Redis could not decide: the failure policy's answer."""
        self.unavailable += 1
        for b in bs:
            self.decisions[b.policy.name, "unavailable"] += 1
        if not self._down:
            self._down = True
            self.outages += 1
            log.warning(
                "rate limits cannot reach Redis (%s): requests %s until it is back",
                e,
                "are refused with 503" if self.closed else "pass unlimited",
            )
        return errors.LIMITS_UNAVAILABLE.response() if self.closed else NO_FIELDS

    def recovered(self) -> None:
        if self._down:
            self._down = False
            log.warning("rate limits reach Redis again")

    def metrics(self) -> list[tuple[str, str, list[tuple[dict[str, str], float]]]]:
        """(name, help, samples) of the counters, for ``/metrics``."""
        self._count_accepted()
        out: list[tuple[str, str, list[tuple[dict[str, str], float]]]] = [
            (
                "keystile_limit_decisions",
                "Rate limit decisions by policy and outcome (accepted, refused, unavailable).",
                [({"policy": p, "outcome": o}, float(n)) for (p, o), n in sorted(self.decisions.items())],
            ),
            (
                "keystile_limit_redis_outages",
                "Times the limiter lost Redis (each logged once).",
                [({}, float(self.outages))],
            ),
        ]
        if self.redis is not None:
            r = self.redis
            out.append(
                ("keystile_limit_round_trips", "Limiter round trips to Redis.", [({}, float(r.round_trips))])
            )
            out.append(
                (
                    "keystile_limit_round_trip_seconds",
                    "Time spent in limiter round trips to Redis.",
                    [({}, r.round_trip_seconds)],
                )
            )
            out.append(
                ("keystile_limit_leases", "Leases Redis granted this process.", [({}, float(self.leases))])
            )
            out.append(
                (
                    "keystile_limit_leased_decisions",
                    "Requests accepted on a lease, without a round trip to Redis.",
                    [({}, float(self.leased))],
                )
            )
        c = self.credits
        if c is not None:
            out.append(
                (
                    "keystile_credit_refusals",
                    "Requests refused for lack of credits.",
                    [({}, float(c.refused))],
                )
            )
            out.append(
                (
                    "keystile_credit_flushes",
                    "Batches of credit spends written to the store.",
                    [({}, float(c.flushes))],
                )
            )
            out.append(
                ("keystile_credit_refills", "Credit refills this process applied.", [({}, float(c.refills))])
            )
        return out

    async def peek(self, bs: list[Bucket]) -> list[tuple[int, float]] | None:
        """What is left of each bucket now, moving nothing (None: Redis cannot be read)."""
        now = self._now()
        if self.redis is None:
            tats = [self.local.tat(b.key, now) for b in bs]
        else:
            try:
                raw = await self.redis.get([self.redis.prefix + b.key for b in bs])
            except Exception:
                return None
            tats = [now if v is None else max(now, float(v) / 1000) for v in raw]
        return [left(t, now, b.policy.limit, b.policy.window) for t, b in zip(tats, bs, strict=True)]

    async def credits_left(self, owner: str, epoch: int, stored: int) -> int:
        """The live balance of ``owner`` at ``epoch`` (``stored``: the store's)."""
        credit = self.credits
        pending = 0 if credit is None else credit.pending.get((owner, epoch), 0)
        if self.redis is None:
            if credit is not None and (owner, epoch) in credit.local:
                return credit.local[owner, epoch]
            return stored - pending
        try:
            (value,) = await self.redis.get([self.redis.credit_prefix + f"{owner}:{epoch}"])
        except Exception:
            value = None
        return stored - pending if value is None else int(value)

    async def aclose(self) -> None:
        if self.credits is not None:
            await self.credits.aclose()
        if self.redis is not None:
            await self.redis.aclose()
