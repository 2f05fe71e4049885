"""What a limited route answers: the RateLimit fields and the 429 problem.

Owns: the ``RateLimit-Policy`` and ``RateLimit`` fields of draft-ietf-httpapi-ratelimit-headers
(revision 11: a list of policy items, ``"name";q=<quota>;w=<window seconds>`` and
``"name";r=<remaining>;t=<seconds to reset>``) and the 429 body, an RFC 9457 problem of type
``quota-exceeded`` (the type the draft registers) naming the violated policy. Must not: decide;
it formats a ``Verdict``. Answers go through ``gateway.errors``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from gateway import errors
from gateway.limits.gcra import Verdict
from gateway.limits.policy import Policy
from gateway.wire import RawResponse

QUOTA_EXCEEDED: Final = "https://iana.org/assignments/http-problem-types#quota-exceeded"
QUOTA_TITLE: Final = "Request cannot be satisfied as assigned quota has been exceeded"
Headers = tuple[tuple[str, str], ...]

_POLICY_FIELDS: dict[tuple[Policy, ...], str] = {}


def _seconds(value: float) -> int:
    return max(0, math.ceil(value - 1e-9))


def policy_field(policies: Sequence[Policy]) -> str:
    """``RateLimit-Policy``: each policy's quota and window (whole seconds, at least 1)."""
    key = tuple(policies)
    text = _POLICY_FIELDS.get(key)
    if text is None:
        text = ", ".join(f'"{p.name}";q={p.limit};w={max(1, round(p.window))}' for p in key)
        if len(_POLICY_FIELDS) < 10_000:  # policies are few; a bound keeps a surprise cheap
            _POLICY_FIELDS[key] = text
    return text


def fields(v: Verdict) -> Headers:
    """Both fields for a decision."""
    policies = [b.policy for b in v.buckets]
    state = ", ".join(
        f'"{b.policy.name}";r={r};t={_seconds(t)}'
        for b, r, t in zip(v.buckets, v.remaining, v.reset, strict=True)
    )
    return (("RateLimit-Policy", policy_field(policies)), ("RateLimit", state))


def lines(v: Verdict) -> bytes:
    """Both fields as header lines (each ending CRLF), as an accepted request's response adds them."""
    return "".join(f"{k}: {v}\r\n" for k, v in fields(v)).encode("latin-1")


def refused(v: Verdict, with_fields: bool) -> RawResponse:
    """429 for a request a policy refused: ``Retry-After`` (whole seconds, at least 1)."""
    assert v.refused is not None
    name = v.refused.policy.name
    retry = max(1, _seconds(v.retry_after))
    headers = {"Retry-After": str(retry)}
    if with_fields:
        headers.update(fields(v))
    return errors.problem_answer(
        429,
        {
            "type": QUOTA_EXCEEDED,
            "title": QUOTA_TITLE,
            "status": 429,
            "detail": f"The rate limit {name!r} is used up; retry after {retry} s.",
            "violated-policies": [name],
            "error": "rate_limited",
        },
        headers,
    )


def no_credits(owner: str, retry_after: int | None, extra: Headers) -> RawResponse:
    """429 for a request whose key or principal has no credits left."""
    headers = dict(extra)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, retry_after))
    return errors.problem_answer(
        429,
        {
            "type": QUOTA_EXCEEDED,
            "title": QUOTA_TITLE,
            "status": 429,
            "detail": f"The {owner} has no credits left.",
            "violated-policies": ["credits"],
            "error": "credits_exhausted",
        },
        headers,
    )
