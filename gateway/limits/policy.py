"""A limit: ``{name, limit, window}``, its validation and its text forms.

Owns: the ``Policy`` record (carried by ``IdentityRecord`` for a key's and its principal's limits,
and by a route for its defaults), the rules a policy must follow, and reading one from config or
an admin request. Must not: decide anything about a request (``gcra`` does) or do I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Final

import msgspec

# A policy's name appears in the RateLimit fields as a structured-field string and in the problem
# body: a short token keeps both trivially safe.
NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9_.-]{0,31}$"
_NAME = re.compile(NAME_PATTERN)
MAX_LIMIT: Final = 1_000_000_000
MAX_WINDOW: Final = 366 * 86400.0
MIN_WINDOW: Final = 0.001
MAX_POLICIES: Final = 8
# The spacing of a policy's requests (window / limit) must stay well above the precision of a
# wall-clock time in float seconds (~0.2 us in this century), or a bucket would never move.
MIN_INTERVAL: Final = 1e-5
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class Policy(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """At most ``limit`` requests at once, refilled at ``limit`` per ``window`` seconds."""

    name: str
    limit: int
    window: float

    @property
    def window_text(self) -> str:
        return window_text(self.window)


def parse_window(value: float | int | str) -> float:
    """Seconds from a number of seconds or a duration (``"1s"``, ``"500ms"``, ``"1d"``)."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"invalid window {value!r} (seconds, or a duration such as 1s, 10m, 1d)")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        seconds = float(value)
    if not MIN_WINDOW <= seconds <= MAX_WINDOW:
        raise ValueError(f"window must be between 1ms and 366d, got {seconds:g} s")
    return seconds


def window_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"


def check_policy(name: str, limit: int, window: float | int | str) -> Policy:
    """A valid policy, or ValueError saying what is wrong."""
    if not _NAME.match(name):
        raise ValueError(
            f"name {name!r} must be 1-32 of a-z, 0-9, '_', '.', '-', starting with a letter or digit"
        )
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    seconds = parse_window(window)
    if seconds / limit < MIN_INTERVAL:
        raise ValueError(
            f"limit {limit} per {window_text(seconds)} is finer than one request per 10 us "
            "(wall-clock times carry too little precision below that)"
        )
    return Policy(name, int(limit), seconds)


def check_policies(items: Iterable[Policy]) -> tuple[Policy, ...]:
    """A set of policies applying together: at most ``MAX_POLICIES``, names unique."""
    out = tuple(items)
    if len(out) > MAX_POLICIES:
        raise ValueError(f"at most {MAX_POLICIES} limits")
    names = [p.name for p in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"limit names must be unique, {', '.join(dupes)} repeats")
    return out


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(tuple[Policy, ...])


def encode(policies: Sequence[Policy]) -> str | None:
    """The store's column value (None: no limits)."""
    return _enc.encode(policies).decode() if policies else None


def decode(text: str | None) -> tuple[Policy, ...]:
    return _dec.decode(text) if text else ()
