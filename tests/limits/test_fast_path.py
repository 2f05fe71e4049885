"""The in-process fast path (one bucket, no credits) answers exactly as the general path does:
the same fields, the same refusals, the same state, whatever the timing (Hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.clock import ManualClock
from gateway.config import LimitsConfig
from gateway.limits.gate import LimitGate
from gateway.limits.policy import Policy
from gateway.models import IdentityRecord
from gateway.wire import RawResponse

IDENT = IdentityRecord(
    key_id="key_fast", digest=b"d" * 32, start="ks_live_x", principal_id="prn_p", principal="p",
    project="p1", scopes=(), expires_at=None, env="live",
)  # fmt: skip


class Route:
    name = "/limited"
    cost = 1

    def __init__(self, policy: Policy) -> None:
        self.limits = (policy,)


def general(gate: LimitGate, route: Route) -> RawResponse | bytes:
    plan = gate.plan(route, IDENT)  # type: ignore[arg-type]
    return gate.answer(gate.local.admit(plan.buckets, gate._now()), plan)


def shape(answer: object) -> object:
    if isinstance(answer, RawResponse):
        return ("refused", answer.status, bytes(answer.body))
    return answer


@settings(max_examples=60, deadline=None)
@given(
    limit=st.integers(1, 50),
    window=st.sampled_from([0.5, 1.0, 7.0, 60.0, 86400.0]),
    steps=st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=80),
    headers=st.booleans(),
)
def test_the_fast_path_answers_as_the_general_one(
    limit: int, window: float, steps: list[float], headers: bool
) -> None:
    route = Route(Policy("burst", limit, window))
    fast_clock, slow_clock = ManualClock(), ManualClock()
    cfg = LimitsConfig(headers=headers)
    fast, slow = LimitGate(cfg, None, fast_clock), LimitGate(cfg, None, slow_clock)
    for gap in steps:
        fast_clock.advance(gap)
        slow_clock.advance(gap)
        a = fast.admit_now(route, IDENT)  # type: ignore[arg-type]
        b = general(slow, route)
        assert shape(a) == shape(b)
    key = fast.plan(route, IDENT).buckets[0].key  # type: ignore[arg-type]
    assert fast.local.tat(key, fast_clock.time()) == slow.local.tat(key, slow_clock.time())
    fast._count_accepted()
    slow._count_accepted()
    assert fast.decisions == slow.decisions
