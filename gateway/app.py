"""Wiring: the one place that builds the pieces from a Config and starts and stops them.

Owns: the ``Gateway`` lifecycle (store, cache tiers, invalidation delivery, usage flusher, both
listeners), swapping config generations (``gateway.generation`` builds them) and start-up checks.
Must not: contain request logic or metric definitions; each piece owns its own.

Shutdown order: stop accepting, let in-flight requests finish (up to ``proxy.shutdown_timeout``),
close the upstream pools, write the last usage batch, then close the invalidation delivery, Redis
and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, cast

import aiohttp
from aiohttp import http_parser, web

from gateway import state_metrics
from gateway.admin import create_admin_app
from gateway.auth import Authenticator
from gateway.cache import IdentityCache, LocalTier
from gateway.cache.invalidation import OutboxPoller, Publisher, Subscriber, retention_for
from gateway.cache.ledger import Ledger, remember_for
from gateway.cache.redis_tier import RedisTier, tombstone_ttl
from gateway.cache.tiers import TieredLoader
from gateway.clock import SYSTEM, Clock
from gateway.config import Config, ConfigError, Secrets, parse_listen
from gateway.generation import Base, Generation, restart_notes, retune
from gateway.generation import build as build_generation
from gateway.generation import in_force as in_force  # the CLI's and workers' way to it
from gateway.generation import restart_only as _restart_only  # noqa: F401 (tests read the list here)
from gateway.handler import ProxyHandler
from gateway.hash_secrets import PreviousSecrets, Rekeyer
from gateway.hash_secrets import check as check_hash_secret
from gateway.hash_secrets import fits as hash_secret_fits
from gateway.keys import KeyDigest, secret_fingerprint
from gateway.lifecycle import Lifecycle
from gateway.limits.wiring import build_limits, limit_metrics
from gateway.listener import AdminRunner, ProxyServer
from gateway.models import IdentityRecord, Invalidation
from gateway.observability import AccessLog, Metrics
from gateway.proxy import Forwarder
from gateway.readiness import readiness
from gateway.store import Store, open_store
from gateway.throttle import FailureThrottle
from gateway.tls import ListenerTLS
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
    """One running Keystile: the long-lived pieces, the current config generation, both listeners.

    Every long-lived resource is entered on one exit stack as it is made, so ``stop`` (also after
    a start that failed half-way) closes exactly what exists, in reverse: listeners (the proxy's
    first; in-flight requests finish), retiring upstream pools, the current generation's pool,
    the last usage batch, the subscriber, the outbox poller, cache loads, the publisher, Redis,
    the metrics sync and, if it opened it, the store.
    """

    # Set by start (absent before it, as is everything start builds).
    _gen: Generation
    cache: IdentityCache
    ledger: Ledger
    loader: TieredLoader
    poller: OutboxPoller
    usage: UsageRecorder
    throttle: FailureThrottle

    def __init__(
        self,
        cfg: Config,
        secrets: Secrets,
        *,
        store: Store | None = None,
        metrics_dir: str | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self.cfg = cfg
        self.clock = clock  # every part that reads time reads this one (tests hand a ManualClock)
        self.secrets = secrets
        self.store: Store | None = store
        self._own_store = store is None
        self.metrics = Metrics((r.prefix for r in cfg.routes), multiprocess_dir=metrics_dir)
        self.redis: RedisTier | None = None
        self.publisher: Publisher | None = None
        self.subscriber: Subscriber | None = None
        self._resources = contextlib.AsyncExitStack()
        self._runners: list[web.BaseRunner] = []
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
        # Previous hash secrets, tried on a miss while a rotation re-keys the store.
        self.previous = PreviousSecrets(secrets.previous_hash_secrets, cfg.cache.negative_max_entries)
        self._on_miss = self.previous.note if self.previous else None

    # The current generation's pieces (a reload replaces them together).
    @property
    def generation(self) -> Generation:
        return self._gen

    @property
    def handler(self) -> ProxyHandler:
        return self.generation.handler

    @property
    def authenticator(self) -> Authenticator:
        return self.generation.authenticator

    @property
    def forwarder(self) -> Forwarder:
        return self.generation.forwarder

    @property
    def lifecycle(self) -> Lifecycle:
        return self.generation.lifecycle

    async def _store_load(self, digests: Sequence[KeyDigest]) -> dict[KeyDigest, IdentityRecord]:
        assert self.store is not None
        # The digests of these keys under previous secrets ride in the same query.
        alternates = self.previous.take(digests) if self.previous else {}
        try:
            # asyncio.timeout, not wait_for: no task of its own per lookup batch.
            async with asyncio.timeout(self.cfg.store.timeout):
                found = await self.store.find_identities(
                    [*digests, *alternates] if alternates else digests, self.clock.time()
                )
            return self.rekeyer.found(found, alternates) if alternates else found
        except Exception:
            # The store fails from here: the outbox poller cannot vouch for the in-process cache
            # either. Withdraw its trust now rather than at the next poll.
            self.cache.confirm_synced(0.0)
            raise

    def _on_stop(self, name: str, close: Callable[[], Awaitable[object]], extra: float = 0.0) -> None:
        """Enter a shutdown step: ``close()`` under a bound of ``extra`` plus the step timeout
        (read at stop time); one that overruns is abandoned, named in ``stop_stalls``."""

        async def step() -> None:
            await self._stop_step(name, close(), extra + self.stop_step_timeout)

        self._resources.push_async_callback(step)

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
                create=False,
            )
            self._on_stop("store", self.store.close)
        store = self.store
        sync = asyncio.get_running_loop().create_task(self._sync_metrics(), name="keystile-metrics-sync")
        self._resources.push_async_callback(_cancel, sync)
        await store.check_schema()
        await check_hash_secret(store, self.secrets, self.clock.time())
        self.rekeyer = Rekeyer(
            store,
            secret_fingerprint(self.secrets.hash_secret),
            cfg.store.timeout,
            self.invalidate,
            self._spawn,
        )
        self.ledger = Ledger(remember_for(cfg.cache.redis_ttl), self.clock)
        if cfg.redis.url:
            ttl = tombstone_ttl(cfg.store.timeout, cfg.redis.socket_timeout)
            redis = self.redis = RedisTier(cfg.redis, cfg.cache, ttl, self.ledger, self.clock)
            self._on_stop("redis tier", redis.aclose)
            publisher = self.publisher = Publisher(redis)
            self._on_stop("invalidation publisher", publisher.aclose)
        self.loader = TieredLoader(self.redis, self._store_load, self.clock)
        cache = self.cache = IdentityCache(
            LocalTier(
                cfg.cache.local_ttl,
                cfg.cache.negative_ttl,
                cfg.cache.local_max_entries,
                cfg.cache.local_ttl_synced,
                cfg.cache.negative_max_entries,
                self.clock,
            ),
            self.loader,
            store.lookup_concurrency,
        )
        self._on_stop("cache loads", lambda: cache.aclose())
        # Invalidations: the store's outbox every sync_interval (the backstop, which vouches for
        # the in-process cache), Redis pub/sub at once (the fast path).
        poller = self.poller = OutboxPoller(
            store,
            self.ledger,
            cache.apply,
            cache.confirm_synced,
            interval=cfg.cache.sync_interval,
            timeout=cfg.store.timeout,
            retention=retention_for(cfg.cache.redis_ttl),
            tombstone=self.publisher.tombstone_later if self.publisher is not None else None,
            clock=self.clock,
        )
        self._on_stop("outbox poller", poller.aclose)
        await poller.load()
        poller.start()
        if self.redis is not None:
            subscriber = self.subscriber = Subscriber(
                self.redis,
                cache.apply,
                self.ledger,
                cfg.redis.url,
                cfg.redis.connect_timeout,
                cfg.cache.sync_interval,
            )
            self._on_stop("invalidation subscriber", subscriber.aclose)
            subscriber.start()
        usage = self.usage = UsageRecorder(
            store, cfg.usage.flush_interval, cfg.usage.max_pending, clock=self.clock
        )
        # Its own bound: a flush in progress, then up to three tries of the final one.
        self._on_stop("usage flush", usage.aclose, USAGE_STOP_WAIT + 3 * cfg.store.timeout)
        usage.start()
        self.throttle = FailureThrottle(cfg.throttle, cfg.proxy.trusted_proxies, self.clock)
        limits = self.limits = await build_limits(cfg, store, self.clock)
        self._on_stop("limits", limits.aclose)
        if limits.credits is not None:
            limits.credits.invalidate = self.invalidate
            limits.credits.start()
        self._gen = await build_generation(cfg, self._base())
        self._on_stop("upstream pool", lambda: self._gen.forwarder.close())
        self._resources.push_async_callback(self._end_background)
        self.metrics.add_state(
            state_metrics.collector(
                state_metrics.Sources(
                    cache.local,
                    self.loader,
                    poller,
                    self.throttle,
                    usage,
                    self.redis,
                    self.publisher,
                    self.subscriber,
                    self.clock,
                )
            )
        )
        self.metrics.add_state(lambda: limit_metrics(limits))
        # Listeners close in the order they opened: the proxy's first, so the admin API still
        # answers (/readyz, /metrics) while proxied requests drain.
        self._resources.push_async_callback(self._close_listeners)
        await self._listen_proxy(proxy_sock, reuse_port)
        await self._listen_admin(reuse_port)
        if cfg.console.listen:
            from gateway.console import ConsoleListener

            console = ConsoleListener(self, cfg.console)
            self._runners.append(console.runner)
            await console.start(reuse_port=reuse_port)
            self.console_port = console.port
        self.started_at = self.clock.time()
        log.info(
            "keystile started",
            extra={
                "fields": {
                    "proxy_port": self.proxy_port,
                    "admin_port": self.admin_port,
                    "routes": len(cfg.routes),
                    "store": store.backend,
                }
            },
        )

    def _base(self) -> Base:
        assert self.store is not None
        return Base(
            self.secrets.hash_secret,
            self.store,
            self.cache,
            self.usage,
            self.metrics,
            self.access_log,
            self.throttle,
            self.limits,
            self.last_used,
            self.invalidate,
            self._on_miss,
            self.clock,
        )

    async def _listen_proxy(self, sock: socket.socket | None, reuse_port: bool) -> None:
        cfg = self.cfg
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
        runner = web.ServerRunner(server, shutdown_timeout=cfg.proxy.shutdown_timeout)
        await runner.setup()
        self._runners.append(runner)
        if sock is not None:
            site: web.TCPSite | web.SockSite = web.SockSite(
                runner, sock, ssl_context=self.tls.context("proxy")
            )
        else:
            host, port = parse_listen(cfg.proxy.listen)
            site = web.TCPSite(
                runner,
                host,
                port,
                backlog=1024,
                reuse_port=reuse_port or None,
                ssl_context=self.tls.context("proxy"),
            )
        await site.start()
        self.proxy_port = _bound_port(runner)

    async def _listen_admin(self, reuse_port: bool) -> None:
        app = create_admin_app(self)
        app.router.add_get("/metrics", self._metrics_endpoint)
        runner = AdminRunner(app, access_log=None, shutdown_timeout=5)
        await runner.setup()
        self._runners.append(runner)
        host, port = parse_listen(self.cfg.admin.listen)
        tls = self.tls.context("admin")
        await web.TCPSite(runner, host, port, reuse_port=reuse_port or None, ssl_context=tls).start()
        self.admin_port = _bound_port(runner)

    async def _close_listeners(self) -> None:
        # runner.cleanup() stops accepting, then waits for in-flight handlers up to
        # shutdown_timeout. Each listener is a step of its own: one that hangs does not hold the other.
        runners, self._runners = self._runners, []
        for runner in runners:
            await self._stop_step(
                "listener", runner.cleanup(), self.cfg.proxy.shutdown_timeout + self.stop_step_timeout
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
        notes = restart_notes(self.cfg, cfg)
        cfg = in_force(self.cfg, cfg)  # what needs a restart stays as it runs
        self.tls.reload(cfg)  # first: a certificate that cannot be loaded refuses the whole reload
        base = self._base()
        generation = await build_generation(cfg, base)
        retune(cfg, base)
        retired, self._gen, self.cfg = self._gen, generation, cfg
        self._spawn(self._retire(retired.forwarder, cfg.upstream.read_timeout + cfg.proxy.shutdown_timeout))
        log.info(
            "configuration reloaded", extra={"fields": {"routes": len(cfg.routes), "restart_needed": notes}}
        )
        return notes

    async def _retire(self, forwarder: Forwarder, after: float) -> None:
        try:
            await asyncio.sleep(after)
        finally:
            await forwarder.close()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background; stop cancels it."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _end_background(self) -> None:
        for task in list(self._background):
            task.cancel()  # retiring forwarders close at once
            await self._stop_step(task.get_name(), asyncio.gather(task, return_exceptions=True))

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
        # The current generation's handler (a reload swaps it; connections keep this entry point).
        # Returns the handler's coroutine rather than awaiting it: one coroutine per request, not two.
        return self._gen.handler(request)

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        assert self.store is not None
        return await readiness(
            self.store,
            self.cfg.store.timeout,
            self.redis,
            self.subscriber,
            self.readiness_notes,
            key_hashing=lambda recorded: hash_secret_fits(recorded, self.secrets),
        )

    async def _metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def stop(self) -> None:
        """Close what ``start`` opened, in reverse (see the class docstring); safe to call twice,
        and after a start that failed."""
        try:
            await self._resources.aclose()
        finally:
            self.access_log.flush()
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


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    return 0


def create_app(
    cfg: Config,
    secrets: Secrets,
    *,
    store: Store | None = None,
    metrics_dir: str | None = None,
    clock: Clock = SYSTEM,
) -> Gateway:
    """A Gateway ready to ``await start()``."""
    return Gateway(cfg, secrets, store=store, metrics_dir=metrics_dir, clock=clock)
