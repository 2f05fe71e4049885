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
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, cast

import aiohttp
import msgspec
from aiohttp import http_parser, web
from prometheus_client.core import Metric

from gateway.admin import create_admin_app
from gateway.auth import Authenticator
from gateway.cache import IdentityCache, LocalTier
from gateway.cache.invalidation import OutboxPoller, Publisher, Subscriber, retention_for
from gateway.cache.ledger import Ledger, remember_for
from gateway.cache.redis_tier import RedisTier, tombstone_ttl
from gateway.cache.tiers import TieredLoader
from gateway.config import Config, ConfigError, Secrets, parse_listen
from gateway.handler import ProxyHandler
from gateway.keys import KeyDigest
from gateway.lifecycle import Lifecycle
from gateway.listener import AdminRunner, ProxyServer
from gateway.models import IdentityRecord, Invalidation
from gateway.observability import AccessLog, Metrics, counter, gauge
from gateway.proxy import Forwarder
from gateway.routing import RouteTable
from gateway.store import Store, open_store
from gateway.store.migrations import latest_version
from gateway.throttle import FailureThrottle
from gateway.tls import LISTENERS, ListenerTLS
from gateway.tls import files as tls_files
from gateway.usage import STOP_WAIT as USAGE_STOP_WAIT
from gateway.usage import UsageRecorder
from gateway.wire import Answer

log = logging.getLogger("keystile")

MIN_AIOHTTP = (3, 14, 3)
# Each shutdown step gets this long (a listener: the drain time plus this); one that hangs is
# abandoned with an error naming it, so SIGTERM always ends the process and later steps still run.
STOP_STEP_TIMEOUT = 5.0


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
    def __init__(
        self, cfg: Config, secrets: Secrets, *, store: Store | None = None, metrics_dir: str | None = None
    ) -> None:
        self.cfg = cfg
        self.secrets = secrets
        self.store: Store | None = store
        self._own_store = store is None
        self.metrics = Metrics((r.prefix for r in cfg.routes), multiprocess_dir=metrics_dir)
        self._runners: list[web.BaseRunner] = []
        self._sites: list[web.TCPSite | web.SockSite] = []
        self._background: set[asyncio.Task[None]] = set()
        self.access_log = AccessLog()
        self.proxy_port = 0
        self.admin_port = 0
        self.console_port = 0  # 0: no console ([console] listen unset)
        self.started_at = 0.0
        self.stop_stalls: list[str] = []  # shutdown steps that had to be abandoned
        self.stop_step_timeout = STOP_STEP_TIMEOUT
        # Further /readyz lines, name -> text read at request time (e.g. the supervisor's workers).
        self.readiness_notes: dict[str, Callable[[], str]] = {}

    async def _store_load(self, digests: Sequence[KeyDigest]) -> dict[KeyDigest, IdentityRecord]:
        assert self.store is not None
        try:
            # asyncio.timeout, not wait_for: no task of its own per lookup batch.
            async with asyncio.timeout(self.cfg.store.timeout):
                return await self.store.find_identities(digests, time.time())
        except Exception:
            # The store fails from here: the outbox poller cannot vouch for the in-process cache
            # either. Withdraw its trust now rather than at the next poll.
            self.cache.confirm_synced(0.0)
            raise

    async def start(self, proxy_sock: socket.socket | None = None, *, reuse_port: bool = False) -> None:
        check_runtime()
        cfg = self.cfg
        try:
            self.tls = ListenerTLS(cfg)
        except ConfigError as e:
            raise StartupError("; ".join(e.problems)) from None
        if self.store is None:
            self.store = await open_store(
                cfg.store.url,
                timeout=cfg.store.timeout,
                pool_min=cfg.store.pool_min,
                pool_max=cfg.store.pool_max,
            )
        await self.store.check_schema()
        self.ledger = Ledger(remember_for(cfg.cache.redis_ttl))
        self.redis: RedisTier | None = None
        self.publisher: Publisher | None = None
        self.subscriber: Subscriber | None = None
        if cfg.redis.url:
            ttl = tombstone_ttl(cfg.store.timeout, cfg.redis.socket_timeout)
            self.redis = RedisTier(cfg.redis, cfg.cache, ttl, self.ledger)
            self.publisher = Publisher(self.redis)
        self.loader = TieredLoader(self.redis, self._store_load)
        self.cache = IdentityCache(
            LocalTier(
                cfg.cache.local_ttl,
                cfg.cache.negative_ttl,
                cfg.cache.local_max_entries,
                cfg.cache.local_ttl_synced,
                cfg.cache.negative_max_entries,
            ),
            self.loader,
            self.store.lookup_concurrency,
        )
        # Invalidations: the store's outbox every sync_interval (the backstop, which vouches for
        # the in-process cache), Redis pub/sub at once (the fast path).
        self.poller = OutboxPoller(
            self.store,
            self.ledger,
            self.cache.apply,
            self.cache.confirm_synced,
            interval=cfg.cache.sync_interval,
            timeout=cfg.store.timeout,
            retention=retention_for(cfg.cache.redis_ttl),
            tombstone=self.publisher.tombstone_later if self.publisher is not None else None,
        )
        await self.poller.load()
        self.poller.start()
        if self.redis is not None:
            self.subscriber = Subscriber(
                self.redis,
                self.cache.apply,
                self.ledger,
                cfg.redis.url,
                cfg.redis.connect_timeout,
                cfg.cache.sync_interval,
            )
            self.subscriber.start()
        self.authenticator = Authenticator(cfg, self.secrets.hash_secret, self.cache)
        self.lifecycle = Lifecycle(cfg, self.secrets.hash_secret, self.store, invalidate=self.invalidate)
        self.forwarder = Forwarder(cfg)
        await self.forwarder.start()
        self.usage = UsageRecorder(self.store, cfg.usage.flush_interval, cfg.usage.max_pending)
        self.usage.start()
        self.throttle = FailureThrottle(cfg.throttle, cfg.proxy.trusted_proxies)
        self.handler = ProxyHandler(
            cfg,
            RouteTable(cfg.routes, cfg.proxy.case_insensitive_routes),
            self.authenticator,
            self.forwarder,
            self.usage,
            self.metrics,
            self.last_used,
            self.access_log,
            self.throttle,
        )

        server = ProxyServer(
            # aiohttp awaits the handler, then calls prepare/write_eof and reads keep_alive on
            # what it returns: a StreamResponse, or a wire.RawResponse offering exactly those.
            cast(Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], self._dispatch),
            handler_cancellation=True,
            keepalive_timeout=cfg.proxy.keepalive_timeout,
            access_log=None,
            header_timeout=cfg.proxy.header_timeout,
            max_connections=cfg.proxy.max_connections,
        )
        self.metrics.add_state(server.stats.metrics)
        proxy_runner = web.ServerRunner(server, shutdown_timeout=cfg.proxy.shutdown_timeout)
        await proxy_runner.setup()
        self._runners.append(proxy_runner)
        if proxy_sock is not None:
            site: web.TCPSite | web.SockSite = web.SockSite(
                proxy_runner, proxy_sock, ssl_context=self.tls.context("proxy")
            )
        else:
            host, port = parse_listen(cfg.proxy.listen)
            site = web.TCPSite(
                proxy_runner,
                host,
                port,
                backlog=1024,
                reuse_port=reuse_port or None,
                ssl_context=self.tls.context("proxy"),
            )
        await site.start()
        self._sites.append(site)
        self.proxy_port = _bound_port(proxy_runner)

        self.metrics.add_state(self._state_metrics)
        self._metrics_sync = asyncio.get_running_loop().create_task(
            self._sync_metrics(), name="keystile-metrics-sync"
        )
        admin_app = create_admin_app(self)
        admin_app.router.add_get("/metrics", self._metrics_endpoint)
        admin_runner = AdminRunner(admin_app, access_log=None, shutdown_timeout=5)
        await admin_runner.setup()
        self._runners.append(admin_runner)
        host, port = parse_listen(cfg.admin.listen)
        admin_site = web.TCPSite(
            admin_runner, host, port, reuse_port=reuse_port or None, ssl_context=self.tls.context("admin")
        )
        await admin_site.start()
        self._sites.append(admin_site)
        self.admin_port = _bound_port(admin_runner)
        if cfg.console.listen:
            from gateway.console import ConsoleListener

            console = ConsoleListener(self, cfg.console)
            self._runners.append(console.runner)
            await console.start(reuse_port=reuse_port)
            self.console_port = console.port
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

    async def invalidate(self, change: Invalidation) -> None:
        """After a committed admin write: forget its digests here, tombstone them in Redis and tell
        every other instance at once. The store already holds the change's outbox row, so if Redis
        cannot be told (or this process dies now) the others apply it at their next outbox read."""
        self.cache.apply(change.digests)
        self.ledger.note(change.seq, change.digests)
        if self.publisher is not None:
            await self.publisher.publish(change)

    async def reload(self, cfg: Config) -> list[str]:
        """Apply a new, already validated config without dropping connections.

        Routes, upstreams, timeouts, key sources, policies and cache TTLs change at once; requests
        in flight finish on the objects they started with, and the old upstream pool is closed
        once they can no longer need it. Returns one note per changed setting that only takes
        effect after a restart.
        """
        notes = [
            f"{name}: changed; takes effect after a restart"
            for name, old, new in _restart_only(self.cfg, cfg)
            if old != new
        ]
        cfg = in_force(self.cfg, cfg)  # what needs a restart stays as it runs
        self.tls.reload(cfg)  # first: a certificate that cannot be loaded refuses the whole reload
        forwarder = Forwarder(cfg)
        await forwarder.start()
        authenticator = Authenticator(cfg, self.secrets.hash_secret, self.cache)
        local = self.cache.local
        local.ttl, local.negative_ttl, local.max_entries, local.synced_ttl = (
            cfg.cache.local_ttl,
            cfg.cache.negative_ttl,
            cfg.cache.local_max_entries,
            cfg.cache.local_ttl_synced,
        )
        local.negative_max_entries = cfg.cache.negative_max_entries
        self.throttle.configure(cfg.throttle, cfg.proxy.trusted_proxies)
        self.metrics.add_routes(r.prefix for r in cfg.routes)
        handler = ProxyHandler(
            cfg,
            RouteTable(cfg.routes, cfg.proxy.case_insensitive_routes),
            authenticator,
            forwarder,
            self.usage,
            self.metrics,
            self.last_used,
            self.access_log,
            self.throttle,
        )
        assert self.store is not None
        lifecycle = Lifecycle(cfg, self.secrets.hash_secret, self.store, invalidate=self.invalidate)
        retired = self.forwarder
        self.cfg, self.handler, self.forwarder = cfg, handler, forwarder
        self.authenticator, self.lifecycle = authenticator, lifecycle
        task = asyncio.get_running_loop().create_task(
            self._retire(retired, self.cfg.upstream.read_timeout + self.cfg.proxy.shutdown_timeout)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        log.info(
            "configuration reloaded", extra={"fields": {"routes": len(cfg.routes), "restart_needed": notes}}
        )
        return notes

    async def _retire(self, forwarder: Forwarder, after: float) -> None:
        try:
            await asyncio.sleep(after)
        finally:
            await forwarder.close()

    async def last_used(self, key_id: str) -> float | None:
        """A key's last use: the unflushed one in memory, else the stored one."""
        pending = self.usage.last_seen(key_id)
        if pending is not None:
            return pending
        assert self.store is not None
        try:
            return (await asyncio.wait_for(self.store.get_key(key_id), self.cfg.store.timeout)).last_used_at
        except Exception:  # the answer is about the key, not its history: go on without it
            return None

    async def _sync_metrics(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.metrics.sync()

    def _dispatch(self, request: web.BaseRequest) -> Coroutine[Any, Any, Answer]:
        # The current handler (a reload swaps it; connections keep this entry point). Returns the
        # handler's coroutine rather than awaiting it: one coroutine per request, not two.
        return self.handler(request)

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """Ready when the store answers and the schema is migrated. Redis is reported, not
        required: without it Keystile falls back to the store."""
        checks: dict[str, str] = {}
        ready = True
        assert self.store is not None
        try:
            version = await asyncio.wait_for(self.store.schema_version(), self.cfg.store.timeout)
            checks["store"] = "ok"
            latest = latest_version(self.store.backend)
            if version < latest:
                ready = False
                checks["schema"] = f"version {version}, needs {latest}: run keystile migrate"
            elif version > latest:
                # A rolling upgrade migrated ahead of this instance; migrations are additive, so
                # it keeps serving until it is replaced (a new start would refuse).
                checks["schema"] = f"version {version}, newer than this instance ({latest})"
            else:
                checks["schema"] = f"version {version}"
        except Exception as e:
            ready = False
            # Public: the kind of failure only; its text (hosts, users, SQL) goes to the log.
            checks["store"] = f"unavailable: {type(e).__name__}"
            log.warning("readiness: store unavailable: %s: %s", type(e).__name__, e)
        if self.redis is None:
            checks["redis"] = "disabled"
        else:
            sub = self.subscriber
            checks["redis"] = f"breaker {self.redis.breaker.state}, subscription " + (
                "connected" if sub is not None and sub.connected else "down"
            )
        for name, note in self.readiness_notes.items():
            checks[name] = note()
        return ready, checks

    async def _metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    def _state_metrics(self) -> list[Metric]:
        local = self.cache.local
        tiers = [
            ({"tier": "local", "result": "hit"}, local.hits),
            ({"tier": "local", "result": "miss"}, local.misses),
            ({"tier": "local", "result": "negative_hit"}, local.negative_hits),
            ({"tier": "store", "result": "load"}, self.loader.store_loads),
            ({"tier": "store", "result": "error"}, self.loader.store_errors),
        ]
        out: list[Metric] = []
        if self.redis is not None:
            r = self.redis
            tiers += [
                ({"tier": "redis", "result": "hit"}, r.hits),
                ({"tier": "redis", "result": "miss"}, r.misses),
                ({"tier": "redis", "result": "negative_hit"}, r.negative_hits),
                ({"tier": "redis", "result": "stale"}, r.stale),
                ({"tier": "redis", "result": "error"}, r.errors),
            ]
            state = {"closed": 0, "half_open": 1, "open": 2}[r.breaker.state]
            out.append(
                gauge("keystile_redis_breaker_state", "Redis breaker: 0 closed, 1 half-open, 2 open.", state)
            )
            out.append(
                counter(
                    "keystile_redis_breaker_opens", "Times the Redis breaker opened.", [({}, r.breaker.opens)]
                )
            )
        if self.publisher is not None:
            out.append(
                counter(
                    "keystile_invalidations_unpublished",
                    "Invalidations this process could not publish (instances applied them from the store).",
                    [({}, self.publisher.failures)],
                )
            )
        if self.subscriber is not None:
            sub = self.subscriber
            out.append(
                counter(
                    "keystile_invalidations_received", "Invalidation messages applied.", [({}, sub.received)]
                )
            )
            out.append(
                gauge(
                    "keystile_invalidation_subscription_up", "1 when subscribed.", 1 if sub.connected else 0
                )
            )
            out.append(
                counter(
                    "keystile_invalidations_lost",
                    "Invalidation messages found missing (each cleared the in-process cache).",
                    [({}, sub.lost)],
                )
            )
        poller = self.poller
        out.append(
            counter(
                "keystile_invalidation_outbox_reads",
                "Reads of the store's invalidation outbox, by result.",
                [({"result": "ok"}, poller.polls), ({"result": "error"}, poller.failures)],
            )
        )
        out.append(
            counter(
                "keystile_invalidations_from_store",
                "Invalidations first learned from the store's outbox (no message had brought them).",
                [({}, poller.delivered)],
            )
        )
        out.append(
            gauge(
                "keystile_invalidation_lag_seconds",
                "Seconds since this process last read the store's invalidation outbox to its end.",
                poller.lag(),
            )
        )
        out.append(
            gauge(
                "keystile_cache_in_sync",
                "1 while this process can confirm it missed no invalidation.",
                1 if local.trusted_until > time.monotonic() else 0,
            )
        )
        out.append(counter("keystile_cache_lookups", "Identity lookups by tier and result.", tiers))
        out.append(gauge("keystile_cache_local_entries", "Entries in the in-process cache.", len(local)))
        out.append(
            gauge(
                "keystile_cache_local_negative_entries",
                "Unknown keys remembered in the in-process cache.",
                local.negatives,
            )
        )
        out.extend(self._throttle_metrics())
        u = self.usage
        out.append(
            counter("keystile_usage_flushes", "Usage batches written to the store.", [({}, u.flushes)])
        )
        out.append(
            counter(
                "keystile_usage_flush_failures",
                "Usage batches that failed and were kept.",
                [({}, u.flush_failures)],
            )
        )
        out.append(gauge("keystile_usage_pending_keys", "Keys with unflushed usage.", u.pending))
        out.append(
            gauge("keystile_usage_flush_lag_seconds", "Age of the oldest unflushed use.", u.lag(time.time()))
        )
        out.append(
            counter("keystile_usage_dropped", "Usage bumps dropped at the pending bound.", [({}, u.dropped)])
        )
        return out

    def _throttle_metrics(self) -> list[Metric]:
        t = self.throttle
        return [
            counter(
                "keystile_throttle_refused",
                "Keyed requests refused with 429 before any lookup: their client was blocked.",
                [({}, t.refused)],
            ),
            counter(
                "keystile_throttle_blocks", "Times a client was blocked after failed keys.", [({}, t.blocks)]
            ),
            counter(
                "keystile_throttle_forgotten",
                "Clients whose failure count was dropped at throttle.max_clients while counting.",
                [({}, t.forgotten)],
            ),
            gauge("keystile_throttle_blocked_clients", "Clients blocked now.", len(t.blocked)),
            gauge(
                "keystile_throttle_counting_clients", "Clients with failed keys being counted.", t.counting
            ),
        ]

    async def stop(self) -> None:
        # runner.cleanup() stops accepting, then waits for in-flight handlers up to
        # shutdown_timeout; the proxy runner goes first.
        drain = self.cfg.proxy.shutdown_timeout + self.stop_step_timeout
        for runner in self._runners:
            await self._stop_step("listener", runner.cleanup(), drain)
        self._sites.clear()
        self._runners.clear()
        for task in list(self._background):
            task.cancel()  # retiring forwarders close at once
            await self._stop_step(task.get_name(), asyncio.gather(task, return_exceptions=True))
        if hasattr(self, "usage"):
            # Its own bound: a flush in progress, then up to three tries of the final one.
            limit = USAGE_STOP_WAIT + 3 * self.cfg.store.timeout + self.stop_step_timeout
            await self._stop_step("usage flush", self.usage.aclose(), limit)
        if hasattr(self, "cache"):
            await self._stop_step("cache loads", self.cache.aclose())
        if getattr(self, "poller", None) is not None:
            await self._stop_step("outbox poller", self.poller.aclose())
        if getattr(self, "subscriber", None) is not None:
            assert self.subscriber is not None
            await self._stop_step("invalidation subscriber", self.subscriber.aclose())
        if getattr(self, "publisher", None) is not None:
            assert self.publisher is not None
            await self._stop_step("invalidation publisher", self.publisher.aclose())
        if getattr(self, "redis", None) is not None:
            assert self.redis is not None
            await self._stop_step("redis tier", self.redis.aclose())
        if hasattr(self, "forwarder"):
            await self._stop_step("upstream pool", self.forwarder.close())
        if self.store is not None and self._own_store:
            await self._stop_step("store", self.store.close())
        self.access_log.flush()
        sync: asyncio.Task[None] | None = getattr(self, "_metrics_sync", None)
        if sync is not None:
            sync.cancel()
            await asyncio.gather(sync, return_exceptions=True)
        self.metrics.sync()  # with workers, the last tallies reach the shared files
        if self.started_at:
            log.info("keystile stopped")

    async def _stop_step(self, name: str, aw: Awaitable[object], seconds: float | None = None) -> None:
        seconds = self.stop_step_timeout if seconds is None else seconds
        try:
            async with asyncio.timeout(seconds):
                await aw
        except TimeoutError:
            self.stop_stalls.append(name)
            log.error("shutdown: %s did not finish within %g s; going on without it", name, seconds)


def _restart_only(a: Config, b: Config) -> list[tuple[str, object, object]]:
    return [
        ("proxy.listen", a.proxy.listen, b.proxy.listen),
        ("proxy.keepalive_timeout", a.proxy.keepalive_timeout, b.proxy.keepalive_timeout),
        ("proxy.shutdown_timeout", a.proxy.shutdown_timeout, b.proxy.shutdown_timeout),
        ("proxy.header_timeout", a.proxy.header_timeout, b.proxy.header_timeout),
        ("proxy.max_connections", a.proxy.max_connections, b.proxy.max_connections),
        ("admin", a.admin, b.admin),
        ("console", a.console, b.console),
        ("security", a.security, b.security),
        ("store", a.store, b.store),
        ("redis", a.redis, b.redis),
        ("cache.redis_ttl", a.cache.redis_ttl, b.cache.redis_ttl),
        ("cache.sync_interval", a.cache.sync_interval, b.cache.sync_interval),
        ("usage", a.usage, b.usage),
        ("logging.level", a.logging.level, b.logging.level),
        ("tls.min_version", a.tls.min_version, b.tls.min_version),
        *_tls_switches(a, b),
    ]


def _tls_switches(a: Config, b: Config) -> list[tuple[str, object, object]]:
    """A listener's TLS files as restart-only settings when TLS is turned on or off for it; new
    files for a listener that stays on TLS are loaded by the reload (listed as unchanged here)."""
    out: list[tuple[str, object, object]] = []
    for name in LISTENERS:
        switched = (tls_files(a.tls, name) is None) != (tls_files(b.tls, name) is None)
        for part in ("cert", "key"):
            field = f"{name}_{part}_file"
            old = getattr(a.tls, field)
            out.append((f"tls.{field}", old, getattr(b.tls, field) if switched else old))
    return out


def in_force(running: Config, new: Config) -> Config:
    """``new`` with every setting that needs a restart (``_restart_only``) as ``running`` has it:
    what a process started with ``running`` serves once it has reloaded ``new``. A worker started
    later from the two files runs exactly what the workers that reloaded run."""
    cfg = new
    for name, old, changed in _restart_only(running, new):
        if old == changed:
            continue
        section, _, field = name.partition(".")
        value = msgspec.structs.replace(getattr(cfg, section), **{field: old}) if field else old
        cfg = msgspec.structs.replace(cfg, **{section: value})
    return cfg


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    return 0


def create_app(
    cfg: Config, secrets: Secrets, *, store: Store | None = None, metrics_dir: str | None = None
) -> Gateway:
    """A Gateway ready to ``await start()``."""
    return Gateway(cfg, secrets, store=store, metrics_dir=metrics_dir)
