"""The admin API's wire types for rate limits and credits.

Owns: the request and response Structs of the limits and credits routes. Must not: hold logic
beyond building a view from records.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import UNSET, Meta, UnsetType

from gateway.admin.schemas import _Request, _Response
from gateway.limits.policy import MAX_LIMIT, MAX_POLICIES, NAME_PATTERN, Policy
from gateway.models import CreditState

WINDOW_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,3})?(ms|s|m|h|d)$"


class LimitSpec(_Request):
    """At most ``limit`` requests at once, refilled at ``limit`` per ``window``."""

    name: Annotated[str, Meta(pattern=NAME_PATTERN, description="a-z, 0-9, '_', '.', '-'; 1-32")]
    limit: Annotated[float, Meta(ge=1, le=MAX_LIMIT, multiple_of=1)]
    window: Annotated[
        str, Meta(pattern=WINDOW_PATTERN, description="a duration: 500ms, 1s, 10m, 1h, 1d (1ms-366d)")
    ]


class LimitsBody(_Request):
    """Left out: unchanged."""

    limits: Annotated[
        list[LimitSpec], Meta(max_length=MAX_POLICIES, description="replaces every limit; [] removes them")
    ] | UnsetType = UNSET


class LimitView(_Response):
    name: str
    limit: int
    window: Annotated[float, Meta(description="seconds")]
    remaining: Annotated[int | None, Meta(description="units left now; null when it cannot be read")] = None
    reset: Annotated[float | None, Meta(description="seconds until the full quota is back")] = None


class RefillSpec(_Request):
    amount: Annotated[float, Meta(ge=0, le=10**15, multiple_of=1)]
    every: Literal["daily", "monthly"]
    mode: Literal["replace", "add"] = "replace"
    day: Annotated[int, Meta(ge=1, le=28, description="monthly: the day of the month (UTC)")] = 1


class CreditsBody(_Request):
    """Set the balance (``remaining``), top it up (``add``; with ``remaining``: after setting it),
    change the refill (``refill``, null removes it) or remove the credits (``remove``: the owner
    is no longer limited by credits; it takes no other field)."""

    remaining: Annotated[float, Meta(ge=0, le=10**15, multiple_of=1)] | None = None
    add: Annotated[float, Meta(ge=1, le=10**15, multiple_of=1)] | None = None
    refill: RefillSpec | UnsetType | None = UNSET
    remove: bool = False


class CreditsView(_Response):
    owner: str
    remaining: Annotated[int, Meta(description="credits left now")]
    refill: RefillSpec | None
    next_refill_at: Annotated[float | None, Meta(description="UNIX seconds, UTC")]


PoolLimits = Annotated[list[LimitView], Meta(description="a key's principal's limits, shared by its keys")]


class LimitsView(_Response):
    """A key's or principal's limits, what is left of each, and its credits."""

    owner: str
    limits: list[LimitView]
    pool_limits: PoolLimits
    credits: CreditsView | None = None
    pool_credits: CreditsView | None = None


def limit_view(p: Policy, left: tuple[int, float] | None = None) -> LimitView:
    return LimitView(
        name=p.name,
        limit=p.limit,
        window=p.window,
        remaining=None if left is None else left[0],
        reset=None if left is None else left[1],
    )


def credits_view(c: CreditState | None, remaining: int | None = None) -> CreditsView | None:
    if c is None:
        return None
    refill = None
    if c.refill is not None:
        refill = RefillSpec(
            amount=c.refill.amount, every=c.refill.every, mode=c.refill.mode, day=c.refill.day
        )
    return CreditsView(
        owner=c.owner,
        remaining=c.remaining if remaining is None else remaining,
        refill=refill,
        next_refill_at=c.next_refill_at,
    )
