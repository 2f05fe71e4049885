"""Shared fixtures: a real recording upstream and Keystile started in-process on real sockets."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop

from gateway import config as config_mod
from gateway.app import Gateway, create_app
from gateway.clock import SYSTEM, Clock
from gateway.config import Config, Secrets
from gateway.lifecycle import Lifecycle
from gateway.store import Store, open_store
from tests.admin_client import AdminAPI
from tests.servers import PgCluster, RedisServer, require_server
from tests.upstream import RecordingUpstream

HASH_SECRET = secrets.token_bytes(32)
ADMIN_TOKEN = "test-admin-token-" + secrets.token_hex(8)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on uvloop, the loop Keystile serves on."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may kill or freeze."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of this test's own (initdb + pg_ctl), which it may stop and start."""
    cluster = PgCluster()
    try:
        cluster.init()
        cluster.start()
    except RuntimeError as e:
        cluster.destroy()
        require_server("postgresql", f"private cluster: {e}")
    yield cluster
    cluster.destroy()


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    up = RecordingUpstream()
    await up.start()
    yield up
    await up.stop()


def make_config(data: dict[str, Any]) -> Config:
    base: dict[str, Any] = {
        "proxy": {"listen": "127.0.0.1:0"},
        "admin": {"listen": "127.0.0.1:0"},
    }
    for section, values in data.items():
        if section == "routes":
            base["routes"] = values
        else:
            base.setdefault(section, {}).update(values)
    if "proxy" in data and "listen" not in data["proxy"]:
        base["proxy"]["listen"] = "127.0.0.1:0"
    return config_mod.decode(base, "(test)")


@dataclass
class Running:
    gateway: Gateway
    store: Store
    lifecycle: Lifecycle
    cfg: Config

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.admin_port}"

    @property
    def port(self) -> int:
        return self.gateway.proxy_port

    async def key(
        self, owner: str = "alice", project: str = "p1", grant: tuple[str, ...] = ("read", "write"), **kw: Any
    ) -> str:
        """Create (if needed) a principal with a grant, then a key; returns the secret."""
        try:
            await self.store.get_principal(owner)
        except Exception:
            await self.lifecycle.create_principal(owner, grants={project: list(grant)}, actor="test")
        created = await self.lifecycle.create_key(owner, project, actor="test", **kw)
        return created.secret


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def keystile(tmp_path: Path, upstream: RecordingUpstream) -> AsyncIterator[GatewayFactory]:
    """``await keystile(routes=[...], proxy={...})`` starts a Gateway; all are stopped afterwards.
    ``clock=ManualClock()`` runs it on a clock the test moves (expiry, grace, cache lifetimes)."""
    started: list[Running] = []

    async def start(
        routes: list[dict[str, Any]] | None = None,
        store_obj: Store | None = None,
        clock: Clock = SYSTEM,
        **sections: Any,
    ) -> Running:
        if routes is None:
            routes = [
                {"prefix": "/public", "upstream": upstream.url, "auth": "none"},
                {"prefix": "/opt", "upstream": upstream.url, "auth": "optional"},
                {"prefix": "/admin", "upstream": upstream.url, "scopes": ["admin"]},
                {"prefix": "/", "upstream": upstream.url},
            ]
        data: dict[str, Any] = {
            "store": {"url": f"sqlite:///{tmp_path}/ks-{len(started)}.db"},
            "routes": routes,
        }
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        cfg = make_config(data)
        store = store_obj or await open_store(cfg.store.url)
        await store.migrate()
        gw = create_app(cfg, Secrets(HASH_SECRET, (ADMIN_TOKEN.encode(),)), store=store, clock=clock)
        await gw.start()
        running = Running(gw, store, gw.lifecycle, cfg)
        started.append(running)
        return running

    yield start
    for r in started:
        await r.gateway.stop()
        await r.store.close()


@pytest.fixture
async def admin() -> AsyncIterator[Callable[..., AdminAPI]]:
    """``admin(running)`` -> a client for its admin API (token ``ADMIN_TOKEN`` unless given) that
    checks every answer against the OpenAPI document."""
    async with aiohttp.ClientSession() as session:

        def connect(running: Running, token: str | None = ADMIN_TOKEN) -> AdminAPI:
            return AdminAPI(session, running.admin_url, token)

        yield connect

