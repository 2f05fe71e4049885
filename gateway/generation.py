"""A config generation: the pieces built from one Config, which a reload replaces as a whole.

Owns: ``Generation`` (the config and what is built from it: authenticator, forwarder, lifecycle,
request handler), ``build`` (the one builder; start and reload both use it), ``retune`` (what a
reload changes in place in the long-lived pieces) and which settings only a restart applies
(``in_force``). Must not: open the store, Redis or a listener, or close anything but what it
built itself: the app owns the long-lived pieces and hands them in as a ``Base``.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from gateway.auth import Authenticator, MissNote
from gateway.cache import IdentityCache
from gateway.clock import SYSTEM, Clock
from gateway.config import Config
from gateway.handler import LastUsed, ProxyHandler
from gateway.lifecycle import Invalidate, Lifecycle
from gateway.limits.gate import LimitGate
from gateway.observability import AccessLog, Metrics
from gateway.proxy import Forwarder
from gateway.routing import RouteTable
from gateway.store import Store
from gateway.throttle import FailureThrottle
from gateway.tls import LISTENERS
from gateway.tls import files as tls_files
from gateway.usage import UsageRecorder


@dataclass(frozen=True, slots=True)
class Base:
    """The long-lived pieces every generation is built over: one each per process, kept across
    reloads (a reload keeps the cache's entries, the throttle's blocks and the unflushed usage)."""

    hash_secret: bytes
    store: Store
    cache: IdentityCache
    usage: UsageRecorder
    metrics: Metrics
    access_log: AccessLog
    throttle: FailureThrottle
    limits: LimitGate
    last_used: LastUsed
    invalidate: Invalidate
    # Called with the digests an in-process miss looks up (previous hash secrets add theirs).
    on_miss: MissNote | None = None
    clock: Clock = SYSTEM  # every generation reads time from the process's one clock


@dataclass(frozen=True, slots=True)
class Generation:
    """What one config builds. Requests in flight keep the generation they started on."""

    cfg: Config
    authenticator: Authenticator
    forwarder: Forwarder
    lifecycle: Lifecycle
    handler: ProxyHandler


async def build(cfg: Config, base: Base) -> Generation:
    """Every piece that depends on ``cfg``, its upstream pool started. The caller closes the
    forwarder when the generation is retired."""
    forwarder = Forwarder(cfg)
    await forwarder.start()
    try:
        authenticator = Authenticator(cfg, base.hash_secret, base.cache, base.clock, on_miss=base.on_miss)
        handler = ProxyHandler(
            cfg,
            RouteTable(cfg.routes, cfg.proxy.case_insensitive_routes),
            authenticator,
            forwarder,
            base.usage,
            base.metrics,
            base.last_used,
            base.access_log,
            base.throttle,
            base.limits,
            base.clock,
        )
        lifecycle = Lifecycle(cfg, base.hash_secret, base.store, invalidate=base.invalidate, clock=base.clock)
    except BaseException:
        await forwarder.close()
        raise
    return Generation(cfg, authenticator, forwarder, lifecycle, handler)


def retune(cfg: Config, base: Base) -> None:
    """Apply ``cfg`` to the long-lived pieces that a reload changes in place (at start they are
    built from it): the in-process cache's lifetimes and bounds, the throttle, the limits' settings."""
    local = base.cache.local
    local.ttl, local.negative_ttl, local.max_entries, local.synced_ttl = (
        cfg.cache.local_ttl,
        cfg.cache.negative_ttl,
        cfg.cache.local_max_entries,
        cfg.cache.local_ttl_synced,
    )
    local.negative_max_entries = cfg.cache.negative_max_entries
    base.throttle.configure(cfg.throttle, cfg.proxy.trusted_proxies)
    base.limits.configure(cfg.limits)
    base.metrics.add_routes(r.prefix for r in cfg.routes)


def restart_only(a: Config, b: Config) -> list[tuple[str, object, object]]:
    """(setting, in ``a``, in ``b``) for every setting a running process keeps until a restart."""
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


def restart_notes(running: Config, new: Config) -> list[str]:
    """One line per setting that changed but takes effect only after a restart."""
    return [
        f"{name}: changed; takes effect after a restart"
        for name, old, changed in restart_only(running, new)
        if old != changed
    ]


def in_force(running: Config, new: Config) -> Config:
    """``new`` with every setting that needs a restart (``restart_only``) as ``running`` has it:
    what a process started with ``running`` serves once it has reloaded ``new``. A worker started
    later from the two files runs exactly what the workers that reloaded run."""
    cfg = new
    for name, old, changed in restart_only(running, new):
        if old == changed:
            continue
        section, _, field = name.partition(".")
        value = msgspec.structs.replace(getattr(cfg, section), **{field: old}) if field else old
        cfg = msgspec.structs.replace(cfg, **{section: value})
    return cfg
