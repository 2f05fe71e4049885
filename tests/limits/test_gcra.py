"""The decision itself, in this process and in Redis (real, private): exact bursts, no double
burst at a boundary, every policy must pass and a refusal moves nothing. Time is a ManualClock."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from gateway.clock import ManualClock
from gateway.limits.gcra import Bucket, LocalState
from gateway.limits.policy import Policy, check_policy, parse_window
from gateway.limits.redis_state import RedisState
from tests.servers import RedisServer


def _state(kind: str, redis: RedisServer | None) -> LocalState | RedisState:
    if kind == "local":
        return LocalState()
    assert redis is not None
    return RedisState(redis.url, f"t{uuid.uuid4().hex[:8]}:", timeout=1.0, connect_timeout=1.0)


async def _admit(state: LocalState | RedisState, bs: list[Bucket], now: float) -> bool:
    if isinstance(state, LocalState):
        return state.admit(bs, now).refused is None
    reply = await state.admit(bs, now)
    return reply.verdict.refused is None


@pytest.fixture(params=["local", "redis"])
async def state(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    redis = None
    if request.param == "redis":
        redis = RedisServer(tmp_path)
        redis.start()
    s = _state(request.param, redis)
    yield s
    if isinstance(s, RedisState):
        await s.aclose()
    if redis is not None:
        redis.stop()


async def test_a_burst_admits_exactly_the_limit_even_when_concurrent(state: LocalState | RedisState) -> None:
    clock = ManualClock()
    b = [Bucket("k:a:burst", Policy("burst", 10, 1.0))]
    results = await asyncio.gather(*(_admit(state, b, clock.time()) for _ in range(50)))
    assert sum(results) == 10


async def test_no_second_burst_at_a_window_boundary(state: LocalState | RedisState) -> None:
    clock = ManualClock()
    b = [Bucket("k:b:minute", Policy("minute", 60, 60.0))]
    assert sum([await _admit(state, b, clock.time()) for _ in range(60)]) == 60
    clock.advance(59.5)  # a fixed window would open a fresh 60 here or half a second later
    late = sum([await _admit(state, b, clock.time()) for _ in range(60)])
    clock.advance(1.0)
    later = sum([await _admit(state, b, clock.time()) for _ in range(60)])
    # One per second refills: 59 by 59.5 s, then one more.
    assert late == 59
    assert later == 1


async def test_every_policy_must_pass_and_a_refusal_moves_no_bucket(state: LocalState | RedisState) -> None:
    clock = ManualClock()
    burst = Bucket("k:c:burst", Policy("burst", 5, 1.0))
    daily = Bucket("k:c:daily", Policy("daily", 3, 86400.0))
    assert [await _admit(state, [burst, daily], clock.time()) for _ in range(5)] == [
        True,
        True,
        True,
        False,
        False,
    ]
    # The refusals by "daily" consumed nothing of "burst": two more pass alone.
    assert [await _admit(state, [burst], clock.time()) for _ in range(3)] == [True, True, False]


async def test_redis_reports_what_is_left_and_when_it_is_full() -> None:
    s = LocalState()
    clock = ManualClock()
    b = [Bucket("k:d:burst", Policy("burst", 100, 1.0))]
    for _ in range(43):
        v = s.admit(b, clock.time())
    assert v.remaining == [57]
    assert v.reset[0] == pytest.approx(0.43)


def test_policy_rules() -> None:
    assert parse_window("1d") == 86400
    assert parse_window("500ms") == 0.5
    with pytest.raises(ValueError, match="window"):
        parse_window("2w")
    with pytest.raises(ValueError, match="name"):
        check_policy("Bad Name", 1, 1)
    with pytest.raises(ValueError, match="limit"):
        check_policy("ok", 0, 1)
