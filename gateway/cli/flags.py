"""Flag values: the text an operator types turned into the values commands use.

Owns: lists (``a,b``), ``NAME=VALUE`` pairs and grants, durations (``30d``), times (UNIX seconds,
ISO 8601, or a duration ago) and ``--workers``. A value that cannot be read is a usage error
(``Fail`` with exit code 2) naming the flag. Must not: print, or check what the admin API checks
(the API's own Structs do, ``admin_commands.build``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from gateway import config as config_mod
from gateway.cli.runner import Fail


def workers(value: str) -> int:
    """``--workers``: a positive count, or ``auto`` (0 here: one per usable CPU, resolved at start)."""
    if value == "auto":
        return 0
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def csv_list(text: str | None) -> list[str] | None:
    return None if text is None else [p for p in text.split(",") if p]


def pairs(items: Sequence[str] | None, flag: str) -> dict[str, str] | None:
    """``["a=1", "b=2"]`` -> ``{"a": "1", "b": "2"}``."""
    if items is None:
        return None
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise Fail(f"keystile: {flag}: expected NAME=VALUE, got {item!r}", 2)
        out[k] = v
    return out


def grants(items: Sequence[str] | None, flag: str = "--grant") -> dict[str, list[str]] | None:
    """``PROJECT=a,b`` flags (``--grant`` scopes, ``--role`` roles) -> project -> names."""
    given = pairs(items, flag)
    return None if given is None else {p: csv_list(scopes) or [] for p, scopes in given.items()}


def duration(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    try:
        return config_mod.parse_duration(text)
    except ValueError as e:
        raise Fail(f"keystile: {flag}: {e}", 2) from None


def parse_expiry(text: str | None) -> float | None:
    """``30d``/``12h`` -> seconds from now."""
    return duration(text, "--expires-in")


def when(text: str | None, flag: str) -> float | None:
    """UNIX seconds, an ISO 8601 time (UTC unless it says otherwise), or a duration ago (``2h``)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return time.time() - config_mod.parse_duration(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise Fail(f"keystile: {flag}: expected UNIX seconds, an ISO 8601 time or a duration", 2) from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()
