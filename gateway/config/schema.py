"""The configuration schema: every section as a frozen msgspec Struct, and the small value parsers.

Owns: field names, types, bounds and defaults (each documented in ``config/reference.toml``), the
environment variable names, ``ConfigError``. Must not: read files or the environment.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

ENV_PREFIX = "KEYSTILE_"
HASH_SECRET_ENV = "KEYSTILE_KEY_HASH_SECRET"  # noqa: S105 - a variable name
# Secrets keys were hashed with before the current one, comma-separated: tried on a miss while a
# rotation re-keys the store (README, "Rotating the hash secret").
PREVIOUS_HASH_SECRET_ENV = "KEYSTILE_KEY_HASH_SECRET_PREVIOUS"  # noqa: S105 - a variable name
ADMIN_TOKENS_ENV = "KEYSTILE_ADMIN_TOKENS"
CONFIG_ENV = "KEYSTILE_CONFIG"
# Where the CLI finds a running admin API, and the admin token it presents there.
ADMIN_URL_ENV = "KEYSTILE_ADMIN_URL"
ADMIN_TOKEN_ENV = "KEYSTILE_ADMIN_TOKEN"  # noqa: S105 - a variable name
MIN_SECRET_BYTES = 32

Seconds = Annotated[float, Meta(gt=0)]
Count = Annotated[int, Meta(gt=0)]
AuthMode = Literal["required", "optional", "none"]


class ConfigError(Exception):
    """Raised with every problem found; ``problems`` are ready-to-print lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ProxyConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    listen: str = "127.0.0.1:8080"
    # Header names a key may arrive in (besides ``Authorization: Bearer``).
    key_headers: tuple[str, ...] = ("X-API-Key",)
    bearer: bool = True
    # Query-string parameter carrying a key; empty disables it (keys in URLs end up in logs).
    query_param: str = ""
    identity_header_prefix: str = "X-Keystile-"
    # Peers whose X-Forwarded-* chain is believed; CIDRs or addresses.
    trusted_proxies: tuple[str, ...] = ()
    whoami_path: str = "/_keystile/whoami"
    # Seconds an idle client keep-alive connection is held.
    keepalive_timeout: Seconds = 75.0
    # Seconds SIGTERM waits for in-flight requests before closing them.
    shutdown_timeout: Seconds = 30.0
    # Seconds a client has to send a complete request head: from opening the connection, and on
    # a keep-alive connection from the first byte of the next head (idle time before it is
    # keepalive_timeout's). A connection that misses it is closed.
    header_timeout: Seconds = 10.0
    # Open client connections per process; a new connection past it is closed at once.
    max_connections: Count = 10_000
    # Accept ";" path parameters (matrix parameters): routes match the segment before ";" and
    # "..;x" counts as "..". Off: any ";" in a path segment, raw or %3B, is refused with 400.
    allow_path_parameters: bool = False
    # Match route prefixes regardless of case, for upstreams that read paths case-insensitively.
    case_insensitive_routes: bool = False
    # Forward X-HTTP-Method-Override, X-Original-URL and the like (dropped by default).
    pass_override_headers: bool = False


class AdminConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    listen: str = "127.0.0.1:8081"
    tokens_file: str = ""


class TLSConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # PEM files per listener: the certificate chain and its private key. Empty: plain HTTP.
    # Re-read on SIGHUP (new connections get the new certificate); turning TLS on or off for a
    # listener takes a restart.
    proxy_cert_file: str = ""
    proxy_key_file: str = ""
    admin_cert_file: str = ""
    admin_key_file: str = ""
    # Oldest protocol accepted: "1.2" (ECDHE with AES-GCM or ChaCha20 only) or "1.3".
    min_version: Literal["1.2", "1.3"] = "1.2"


class ConsoleConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # The key-management console's own listener; empty: no console.
    listen: str = ""
    # Peers whose identity header is believed (self-service mode); CIDRs or addresses. Empty:
    # operator mode only (admin-token sign-in).
    trusted_proxies: tuple[str, ...] = ()
    # The header an authenticating proxy in front sets to the signed-in user's name.
    identity_header: str = "X-Auth-Request-User"
    # Create the principal of a first-time user (with new_user_grants); off: "no access" page.
    auto_create_principals: bool = False
    # project -> scopes, granted to principals the console creates.
    new_user_grants: dict[str, tuple[str, ...]] = {}
    # Sessions end after this long without a request, and this long after sign-in in any case.
    session_idle: str = "30m"
    session_absolute: str = "12h"
    # Off only for plain-HTTP local use: browsers then send the session cookie over HTTP too.
    cookie_secure: bool = True


class KeysConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    prefix: str = "ks"
    default_env: Literal["live", "test"] = "live"


class SecurityConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    hash_secret_file: str = ""
    # Files holding previous hash secrets (one each), as KEYSTILE_KEY_HASH_SECRET_PREVIOUS.
    previous_hash_secret_files: tuple[str, ...] = ()


class StoreConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: str = "sqlite:///keystile.db"
    # PostgreSQL pool bounds.
    pool_min: Count = 2
    pool_max: Count = 10
    # Seconds one store operation may take before it counts as unavailable.
    timeout: Seconds = 5.0


class UpstreamConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    connect_timeout: Seconds = 5.0
    # Seconds without a byte from the upstream before the request fails with 504.
    read_timeout: Seconds = 60.0
    # Open connections per upstream host, 0 for no limit.
    pool_size: Annotated[int, Meta(ge=0)] = 256
    # Seconds an idle upstream connection is kept for reuse.
    keepalive_timeout: Seconds = 30.0
    # Seconds a connection must stay silent after a response before it carries another request;
    # 0 reuses it at once.
    reuse_delay: Annotated[float, Meta(ge=0, le=1)] = 0.003


class CacheConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # In-process tier. An entry lives local_ttl seconds, or local_ttl_synced while this instance
    # can confirm (every sync_interval, by reading the store's invalidation outbox) that it has
    # received every invalidation. local_ttl = 0 turns the tier off.
    local_ttl: Annotated[float, Meta(ge=0)] = 10.0
    local_ttl_synced: Annotated[float, Meta(ge=0)] = 300.0
    sync_interval: Seconds = 1.0
    local_max_entries: Count = 100_000
    # Unknown digests are remembered this long, so random keys do not reach the store.
    negative_ttl: Annotated[float, Meta(ge=0)] = 2.0
    redis_ttl: Seconds = 300.0
    # Unknown digests held in-process, in a space of their own: they never evict valid keys.
    negative_max_entries: Count = 10_000


class RedisConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: str = ""  # empty: no Redis tier
    socket_timeout: Seconds = 0.25
    connect_timeout: Seconds = 0.25
    breaker_failures: Count = 3
    breaker_reset: Seconds = 2.0
    channel: str = "keystile:invalidate"


class ProjectPolicyConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[policy.projects.<project>]``: a field left out falls back to ``[policy]``; a value the
    admin API stored for the project wins over both (``gateway.policies``)."""

    max_active_keys: Count | None = None
    default_lifetime: str | None = None
    max_lifetime: str | None = None
    max_rotation_grace: str | None = None


class PolicyConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_active_keys: Count = 10
    # Lifetimes as durations ("30d", "12h", "90m", "45s"); empty: no default / no maximum.
    default_lifetime: str = ""
    max_lifetime: str = ""
    max_rotation_grace: str = "24h"
    # Per-project values, by project name.
    projects: dict[str, ProjectPolicyConfig] = {}


class UsageConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    flush_interval: Seconds = 5.0
    max_pending: Count = 100_000


class LoggingConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    # Fraction of successful requests written to the access log; errors are always written.
    access_sample: Annotated[float, Meta(ge=0, le=1)] = 1.0


class ThrottleConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # After this many refused keys (invalid or expired) from one client address within ``window``
    # seconds, that address gets 429 for ``block`` seconds before any lookup. 0 turns it off.
    failures: Annotated[int, Meta(ge=0)] = 20
    window: Seconds = 60.0
    block: Seconds = 60.0
    # IPv6 clients are judged by this prefix (one host usually holds a whole /64).
    ipv6_prefix: Annotated[int, Meta(ge=1, le=128)] = 64
    # Client addresses remembered (counting and blocked, each); bounds the throttle's memory.
    max_clients: Count = 100_000


class LimitConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # One rate limit: at most ``limit`` requests at once, refilled at ``limit`` per ``window``
    # (seconds, or a duration such as "1s", "10m", "1d").
    name: str
    limit: Annotated[int, Meta(ge=1, le=1_000_000_000)]
    window: float | str


class LimitsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Send RateLimit-Policy and RateLimit on every response of a limited route.
    headers: bool = True
    # When Redis cannot decide: "open" lets requests pass unlimited, "closed" answers 503.
    # Authentication never depends on this.
    on_redis_failure: Literal["open", "closed"] = "open"
    # Buckets held in-process without Redis (those full again are dropped first).
    max_local_buckets: Count = 100_000
    # Seconds between credit writes to the store, and between checks for due refills.
    credits_flush_interval: Seconds = 1.0
    # With Redis: seconds a busy key may spend units Redis granted it ahead without a round trip
    # (0: every request decided in Redis). Adds at most ceil(lease * limit / window) per span.
    lease: Annotated[float, Meta(ge=0, le=1)] = 0.02


class RouteConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    prefix: str
    upstream: str
    methods: tuple[str, ...] = ()
    host: str = ""
    auth: AuthMode = "required"
    scopes: tuple[str, ...] = ()
    strip_prefix: bool = False
    preserve_host: bool = False
    # Rate limits every key gets on this route (a bucket per key and route).
    limits: tuple[LimitConfig, ...] = ()
    # Credits a request on this route spends from a key or principal that has credits.
    cost: Annotated[int, Meta(ge=0, le=1_000_000)] = 1


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    proxy: ProxyConfig = ProxyConfig()
    admin: AdminConfig = AdminConfig()
    keys: KeysConfig = KeysConfig()
    security: SecurityConfig = SecurityConfig()
    store: StoreConfig = StoreConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    cache: CacheConfig = CacheConfig()
    redis: RedisConfig = RedisConfig()
    policy: PolicyConfig = PolicyConfig()
    usage: UsageConfig = UsageConfig()
    logging: LoggingConfig = LoggingConfig()
    routes: tuple[RouteConfig, ...] = ()
    throttle: ThrottleConfig = ThrottleConfig()
    tls: TLSConfig = TLSConfig()
    console: ConsoleConfig = ConsoleConfig()
    limits: LimitsConfig = LimitsConfig()


_SECTION_TYPES: dict[str, type[msgspec.Struct]] = {
    "proxy": ProxyConfig,
    "admin": AdminConfig,
    "keys": KeysConfig,
    "security": SecurityConfig,
    "store": StoreConfig,
    "upstream": UpstreamConfig,
    "cache": CacheConfig,
    "redis": RedisConfig,
    "policy": PolicyConfig,
    "usage": UsageConfig,
    "logging": LoggingConfig,
    "throttle": ThrottleConfig,
    "tls": TLSConfig,
    "console": ConsoleConfig,
    "limits": LimitsConfig,
}


# One reading of a duration everywhere (config, admin API, CLI): seconds, or a number with a unit.
DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*[smhd]?\s*$"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``"30d"`` or ``"3600"`` (seconds) -> seconds. Raises ValueError naming the accepted forms."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"invalid duration {text!r} (use seconds, or a number with s, m, h or d, e.g. 30d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def format_duration(seconds: float) -> str:
    """Seconds as the largest whole unit that expresses them (``7200`` -> ``"2h"``)."""
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - explicit ":port" means all
