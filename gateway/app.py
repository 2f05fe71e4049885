"""Wiring: the one place that builds the pieces from a Config and starts and stops them.

Owns: the ``Gateway`` lifecycle (store, cache, usage flusher, upstream client, both listeners) and
start-up checks. Must not: contain request logic; each piece owns its own.

Shutdown order: stop accepting, let in-flight requests finish (up to ``proxy.shutdown_timeout``),
write the last usage batch, then close the upstream client and the store.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Sequence

import aiohttp
from aiohttp import http_parser, web

from gateway.admin import create_admin_app
from gateway.auth import Authenticator
from gateway.cache import IdentityCache, LocalTier
from gateway.cache.redis_tier import RedisTier, Subscriber
from gateway.cache.tiers import TieredLoader
from gateway.config import Config, Secrets, parse_listen
from gateway.handler import ProxyHandler
from gateway.keys import KeyDigest
from gateway.lifecycle import Lifecycle
from gateway.models import IdentityRecord
from gateway.observability import Metrics
from gateway.proxy import Forwarder
from gateway.routing import RouteTable
from gateway.store import Store, open_store
from gateway.usage import UsageRecorder

log = logging.getLogger("keystile")

MIN_AIOHTTP = (3, 14, 3)


class StartupError(Exception):
    """Start-up refused; the message is one line for the operator."""


def check_runtime() -> None:
    """aiohttp must be recent and use its C HTTP parser (the pure-Python one is laxer)."""
    version = tuple(int(p) for p in aiohttp.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_AIOHTTP:
        raise StartupError(
            f"aiohttp {aiohttp.__version__} is too old: {'.'.join(map(str, MIN_AIOHTTP))} or newer "
            "is required (earlier releases have request-smuggling CVEs)"
        )
    if http_parser.HttpRequestParser.__module__ != "aiohttp._http_parser":
        raise StartupError(
            "aiohttp's C HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS set, or no compiled "
            "wheel); Keystile refuses to run on the pure-Python parser"
        )


class Gateway:
    def __init__(self, cfg: Config, secrets: Secrets, *, store: Store | None = None) -> None:
        self.cfg = cfg
        self.secrets = secrets
        self.store: Store | None = store
        self._own_store = store is None
        self.metrics = Metrics()
        self._runners: list[web.BaseRunner] = []
        self._sites: list[web.TCPSite | web.SockSite] = []
        self.proxy_port = 0
        self.admin_port = 0
        self.started_at = 0.0

    async def _store_load(self, digests: Sequence[KeyDigest]) -> dict[KeyDigest, IdentityRecord]:
        assert self.store is not None
        return await asyncio.wait_for(
            self.store.find_identities(digests, time.time()), self.cfg.store.timeout
        )

    async def start(self, proxy_sock: socket.socket | None = None) -> None:
        check_runtime()
        cfg = self.cfg
        if self.store is None:
            self.store = await open_store(
                cfg.store.url,
                timeout=cfg.store.timeout,
                pool_min=cfg.store.pool_min,
                pool_max=cfg.store.pool_max,
            )
        await self.store.check_schema()
        self.redis: RedisTier | None = None
        self.subscriber: Subscriber | None = None
        if cfg.redis.url:
            # A tombstone must outlive any lookup that could have read the store before the write.
            tombstone_ttl = max(10.0, 2 * (cfg.store.timeout + cfg.redis.socket_timeout))
            self.redis = RedisTier(cfg.redis, cfg.cache, tombstone_ttl)
        self.loader = TieredLoader(self.redis, self._store_load)
        self.cache = IdentityCache(
            LocalTier(cfg.cache.local_ttl, cfg.cache.negative_ttl, cfg.cache.local_max_entries),
            self.loader,
        )
        if self.redis is not None:
            self.subscriber = Subscriber(
                self.redis, self.cache.apply, cfg.redis.url, cfg.redis.connect_timeout
            )
            self.subscriber.start()
        self.authenticator = Authenticator(cfg, self.secrets.hash_secret, self.cache)
        self.lifecycle = Lifecycle(cfg, self.secrets.hash_secret, self.store, invalidate=self.invalidate)
        self.forwarder = Forwarder(cfg)
        await self.forwarder.start()
        self.usage = UsageRecorder(self.store, cfg.usage.flush_interval, cfg.usage.max_pending)
        self.usage.start()
        self.handler = ProxyHandler(
            cfg, RouteTable(cfg.routes), self.authenticator, self.forwarder, self.usage, self.metrics
        )

        server = web.Server(
            self._dispatch,
            handler_cancellation=True,
            keepalive_timeout=cfg.proxy.keepalive_timeout,
            access_log=None,
        )
        proxy_runner = web.ServerRunner(server, shutdown_timeout=cfg.proxy.shutdown_timeout)
        await proxy_runner.setup()
        self._runners.append(proxy_runner)
        if proxy_sock is not None:
            site: web.TCPSite | web.SockSite = web.SockSite(proxy_runner, proxy_sock)
        else:
            host, port = parse_listen(cfg.proxy.listen)
            site = web.TCPSite(proxy_runner, host, port, backlog=1024)
        await site.start()
        self._sites.append(site)
        self.proxy_port = _bound_port(proxy_runner)

        admin_runner = web.AppRunner(create_admin_app(self), access_log=None, shutdown_timeout=5)
        await admin_runner.setup()
        self._runners.append(admin_runner)
        host, port = parse_listen(cfg.admin.listen)
        admin_site = web.TCPSite(admin_runner, host, port)
        await admin_site.start()
        self._sites.append(admin_site)
        self.admin_port = _bound_port(admin_runner)
        self.started_at = time.time()
        log.info(
            "keystile started",
            extra={
                "fields": {
                    "proxy_port": self.proxy_port,
                    "admin_port": self.admin_port,
                    "routes": len(cfg.routes),
                    "store": self.store.backend,
                }
            },
        )

    async def invalidate(self, digests: Sequence[KeyDigest]) -> None:
        """After a committed admin write: forget these digests here, tombstone them in Redis and tell
        every other instance. If Redis is unreachable the invalidation is retried in the background;
        other instances then converge within ``cache.local_ttl``."""
        self.cache.invalidate(digests)
        if self.redis is not None:
            await self.redis.invalidate(digests)

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self.handler(request)

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        checks: dict[str, str] = {}
        ready = True
        try:
            assert self.store is not None
            await asyncio.wait_for(self.store.check_schema(), self.cfg.store.timeout)
            checks["store"] = "ok"
        except Exception as e:
            ready = False
            checks["store"] = f"unavailable: {type(e).__name__}: {e}"
        return ready, checks

    async def stop(self) -> None:
        # runner.cleanup() stops accepting, then waits for in-flight handlers up to
        # shutdown_timeout; the proxy runner goes first.
        for runner in self._runners:
            await runner.cleanup()
        self._sites.clear()
        self._runners.clear()
        if hasattr(self, "usage"):
            await self.usage.aclose()
        if hasattr(self, "cache"):
            await self.cache.aclose()
        if getattr(self, "subscriber", None) is not None:
            assert self.subscriber is not None
            await self.subscriber.aclose()
        if getattr(self, "redis", None) is not None:
            assert self.redis is not None
            await self.redis.aclose()
        if hasattr(self, "forwarder"):
            await self.forwarder.close()
        if self.store is not None and self._own_store:
            await self.store.close()
        if self.started_at:
            log.info("keystile stopped")


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    return 0


def create_app(cfg: Config, secrets: Secrets, *, store: Store | None = None) -> Gateway:
    """A Gateway ready to ``await start()``."""
    return Gateway(cfg, secrets, store=store)
