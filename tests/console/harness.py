"""Keystile with its console, run on a loop of its own in a background thread, for browser tests.

Playwright's sync API drives chromium from the test's thread; the gateway, its store and an echo
upstream run on a uvloop in a second thread, reached through ``run`` (setup through the real
lifecycle) and real sockets (the browser, ``proxy_status``)."""

from __future__ import annotations

import asyncio
import http.client
import shutil
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from gateway.app import Gateway, create_app
from gateway.config import Secrets
from gateway.echo import start_echo
from gateway.lifecycle import Lifecycle
from gateway.store import Store, open_store
from tests.conftest import ADMIN_TOKEN, HASH_SECRET, make_config
from tests.servers import require_server

T = TypeVar("T")


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        require_server("chromium", "no chromium on PATH (scripts/test installs it with apt-get)")
    return path


class Loop:
    """A uvloop in a daemon thread; ``run`` awaits a coroutine there from the caller's thread."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="console-gateway", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Served:
    """One running gateway with its console."""

    def __init__(self, loop: Loop, gateway: Gateway, store: Store) -> None:
        self._loop = loop
        self.gateway = gateway
        self.store = store

    @property
    def lifecycle(self) -> Lifecycle:
        return self.gateway.lifecycle

    @property
    def console(self) -> str:
        return f"http://127.0.0.1:{self.gateway.console_port}"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(coro)

    def principal(self, name: str, grants: dict[str, list[str]]) -> None:
        self.run(self.lifecycle.create_principal(name, grants=dict(grants), actor="test"))

    def key(self, owner: str, project: str, **kw: Any) -> tuple[str, str]:
        """A key made through the lifecycle: (key id, secret)."""
        created = self.run(self.lifecycle.create_key(owner, project, actor="test", **kw))
        return created.record.id, created.secret

    def proxy_status(self, secret: str, path: str = "/hello") -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.gateway.proxy_port, timeout=10)
        try:
            conn.request("GET", path, headers={"X-API-Key": secret})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()


class Harness:
    """Gateways with consoles on one background loop; ``stop`` ends them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = Loop()
        self.served: list[Served] = []
        self.echo_runner, self.echo_port = self.loop.run(start_echo())

    def start(self, **sections: Any) -> Served:
        async def go() -> Served:
            data: dict[str, Any] = {
                "store": {"url": f"sqlite:///{self.tmp}/console-{len(self.served)}.db"},
                "usage": {"flush_interval": 0.2},
                "routes": [{"prefix": "/", "upstream": f"http://127.0.0.1:{self.echo_port}"}],
                "console": {"listen": "127.0.0.1:0", "cookie_secure": False},
            }
            for name, values in sections.items():
                data.setdefault(name, {}).update(values)
            cfg = make_config(data)
            store = await open_store(cfg.store.url)
            await store.migrate()
            gw = create_app(cfg, Secrets(HASH_SECRET, (ADMIN_TOKEN.encode(),)), store=store)
            await gw.start()
            return Served(self.loop, gw, store)

        served = self.loop.run(go())
        self.served.append(served)
        return served

    def stop(self) -> None:
        async def go() -> None:
            for s in self.served:
                await s.gateway.stop()
                await s.store.close()
            await self.echo_runner.cleanup()

        self.loop.run(go())
        self.loop.close()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
