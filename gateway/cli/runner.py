"""How a command runs: its event loop, its config, its store, and how it fails.

Owns: ``run`` (the one place that installs uvloop), ``load`` (config and secrets through
``gateway.config``), ``with_store`` (a short-lived store for one command) and ``Fail`` (a one-line
failure for the operator with its exit code). Must not: print, or read the environment itself.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from gateway import config as config_mod
from gateway.config import Config, Secrets
from gateway.store import Store, open_store

T = TypeVar("T")


class Fail(Exception):
    """A one-line failure for the operator, with an exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def run(coro: Coroutine[Any, Any, T]) -> T:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def load(args: argparse.Namespace, *, need_secret: bool = True) -> tuple[Config, Secrets]:
    path = config_mod.config_path(getattr(args, "config", None))
    cfg = config_mod.load(path)
    return cfg, config_mod.load_secrets(cfg, require_hash_secret=need_secret)


async def with_store(cfg: Config, fn: Callable[[Store], Awaitable[T]]) -> T:
    store = await open_store(cfg.store.url, timeout=cfg.store.timeout, pool_min=1, pool_max=2, create=False)
    try:
        await store.check_schema()
        return await fn(store)
    finally:
        await store.close()
