"""The failed-key throttle on its own: who a client is, windows, blocks and the memory bound.

The clock is injected, so windows and blocks pass without sleeping. Through real sockets:
``tests/adversarial/test_key_flood.py``.
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.clock import ManualClock
from gateway.config import ThrottleConfig
from gateway.throttle import FailureThrottle


def _headers(xff: str | None = None) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({} if xff is None else {"X-Forwarded-For": xff}))


def _throttle(clock: ManualClock, trusted: tuple[str, ...] = (), **cfg: int | float) -> FailureThrottle:
    settings: dict[str, int | float] = {"failures": 3, "window": 60.0, "block": 30.0, **cfg}
    return FailureThrottle(ThrottleConfig(**settings), trusted, clock)  # type: ignore[arg-type]


def test_blocks_at_the_nth_failure_within_a_window_and_releases_after_the_block() -> None:
    clock = ManualClock()
    t = _throttle(clock)
    for _ in range(2):
        t.failed("192.0.2.1")
    assert t.retry_after("192.0.2.1") == 0
    t.failed("192.0.2.1")
    assert t.retry_after("192.0.2.1") == 30 and t.retry_after("192.0.2.2") == 0
    clock.advance(29.5)
    assert t.retry_after("192.0.2.1") == 1
    clock.advance(0.5)
    assert t.retry_after("192.0.2.1") == 0
    assert not t.blocked  # the ended block is gone: the handler's emptiness test is cheap again
    assert (t.blocks, t.refused) == (1, 2)


def test_failures_in_different_windows_do_not_add_up() -> None:
    clock = ManualClock()
    t = _throttle(clock)
    t.failed("192.0.2.1")
    t.failed("192.0.2.1")
    clock.advance(60.0)
    t.failed("192.0.2.1")
    t.failed("192.0.2.1")
    assert t.retry_after("192.0.2.1") == 0
    assert t.counting == 1  # the ended window was dropped, a new one counts


def test_zero_failures_turns_it_off() -> None:
    t = _throttle(ManualClock(), failures=0)
    for _ in range(100):
        t.failed("192.0.2.1")
    assert not t.blocked and t.counting == 0


def test_memory_is_bounded_when_an_attacker_spreads_over_many_addresses() -> None:
    """More clients than ``max_clients``: the oldest count is forgotten (and counted as such),
    blocks already made stay, and the tables never grow past the bound."""
    clock = ManualClock()
    t = _throttle(clock, max_clients=3)
    for _ in range(3):
        t.failed("192.0.2.1")  # blocked
    for i in range(2, 50):
        t.failed(f"192.0.2.{i}")
        t.failed(f"192.0.2.{i}")
        clock.advance(0.01)
    assert t.counting == 3 and len(t.blocked) == 1
    assert t.forgotten == 45
    assert t.retry_after("192.0.2.1") > 0
    assert t.retry_after("192.0.2.2") == 0  # forgotten: two failures, no block
    t.failed("192.0.2.49")  # still counted: its third failure blocks it
    assert t.retry_after("192.0.2.49") > 0
    for i in range(100, 110):  # more blocks than the bound: the earliest-ending ones are lifted
        for _ in range(3):
            t.failed(f"198.51.100.{i}")
    assert len(t.blocked) == 3


def test_ipv6_clients_are_judged_by_their_prefix() -> None:
    t = _throttle(ManualClock())
    none = _headers()
    assert (
        t.client("2001:db8:1:2::1", none) == t.client("2001:db8:1:2:ffff:1:2:3", none) == "2001:db8:1:2::/64"
    )
    assert t.client("2001:db8:1:3::1", none) == "2001:db8:1:3::/64"
    assert t.client("::ffff:192.0.2.7", none) == "192.0.2.7"
    assert t.client("192.0.2.7", none) == "192.0.2.7"
    t48 = _throttle(ManualClock(), ipv6_prefix=48)
    assert t48.client("2001:db8:1:3::1", none) == "2001:db8:1::/48"


def test_a_trusted_proxy_is_judged_by_the_last_untrusted_forwarded_hop() -> None:
    t = _throttle(ManualClock(), trusted=("10.0.0.0/8",))
    # Untrusted peer: its X-Forwarded-For is ignored, whatever it says.
    assert t.client("192.0.2.9", _headers("198.51.100.1")) == "192.0.2.9"
    # Trusted peer: walk from the right past trusted hops; what the client wrote further left
    # (a forged first hop) does not matter.
    assert t.client("10.0.0.1", _headers("203.0.113.5")) == "203.0.113.5"
    assert t.client("10.0.0.1", _headers("198.51.100.1, 203.0.113.5, 10.0.0.2")) == "203.0.113.5"
    assert t.client("10.0.0.1", _headers("[2001:db8::1]:443")) == "2001:db8::/64"
    assert t.client("10.0.0.1", _headers("203.0.113.5:5555")) == "203.0.113.5"
    assert t.client("10.0.0.1", _headers("10.0.0.3")) == "10.0.0.3"  # only proxies: the first
    assert t.client("10.0.0.1", _headers()) == "10.0.0.1"  # no chain: the proxy itself
    assert t.client("10.0.0.1", _headers("unknown")) == "unknown"
