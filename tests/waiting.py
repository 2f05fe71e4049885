"""Waiting for a condition instead of a fixed time: a test ends as soon as what it waits for holds,
and fails with a message naming it when that takes longer than ``timeout``."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(
    check: Callable[[], T | Awaitable[T]],
    timeout: float = 5.0,
    what: str = "the condition",
    every: float = 0.01,
) -> T:
    """Call ``check`` (plain or async) every ``every`` seconds until it returns something truthy;
    returns that. Raises AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s (last: {got!r})")
        await asyncio.sleep(every)

