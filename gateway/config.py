"""Configuration: the only reader of config files and of the environment.

Owns: the TOML schema as frozen msgspec Structs (every field has a default documented in
``config/reference.toml``), environment overrides, secrets, and validation that reports every
problem at once as ``file: field: problem`` lines. Must not: import aiohttp, the stores or the app.

Environment overrides: ``KEYSTILE_<SECTION>__<FIELD>`` sets ``<field>`` of ``[<section>]``, e.g.
``KEYSTILE_STORE__URL=postgresql://...`` or ``KEYSTILE_PROXY__LISTEN=0.0.0.0:8080``. Values are
read as TOML values when they parse as one (numbers, booleans, arrays), else as strings. Secrets
never live in the file: ``KEYSTILE_KEY_HASH_SECRET`` (or ``security.hash_secret_file``) and
``KEYSTILE_ADMIN_TOKENS`` (comma-separated, or ``admin.tokens_file``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

import msgspec
from msgspec import Meta

from gateway.keys import valid_prefix

ENV_PREFIX = "KEYSTILE_"
HASH_SECRET_ENV = "KEYSTILE_KEY_HASH_SECRET"  # noqa: S105 - a variable name
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


class KeysConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    prefix: str = "ks"
    default_env: Literal["live", "test"] = "live"


class SecurityConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    hash_secret_file: str = ""


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


class PolicyConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_active_keys: Count = 10
    # Lifetimes as durations ("30d", "12h", "90m", "45s"); empty: no default / no maximum.
    default_lifetime: str = ""
    max_lifetime: str = ""
    max_rotation_grace: str = "24h"


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


class RouteConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    prefix: str
    upstream: str
    methods: tuple[str, ...] = ()
    host: str = ""
    auth: AuthMode = "required"
    scopes: tuple[str, ...] = ()
    strip_prefix: bool = False
    preserve_host: bool = False


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


class Secrets(msgspec.Struct, frozen=True):
    hash_secret: bytes
    admin_tokens: tuple[bytes, ...]

    def __repr__(self) -> str:
        return (
            f"Secrets(hash_secret=<{len(self.hash_secret)} bytes>, admin_tokens=<{len(self.admin_tokens)}>)"
        )


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
}

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_HEADER_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def parse_duration(text: str) -> float:
    """``"30d"`` -> seconds. Raises ValueError naming the accepted forms."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"invalid duration {text!r} (use a number with s, m, h or d, e.g. 30d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - explicit ":port" means all


def _msgspec_problem(err: msgspec.ValidationError, base: str) -> str:
    m = _AT.match(str(err))
    assert m
    path = (m.group("path") or "").lstrip(".")
    where = base + ("." + path if path and not path.startswith("[") else path)
    msg = m.group("msg")
    return f"{where or '(top level)'}: {msg[0].lower() + msg[1:] if msg else msg}"


_PLACEHOLDERS: dict[type, dict[str, Any]] = {RouteConfig: {"prefix": "/", "upstream": "http://placeholder"}}


def _each_problem(
    value: Any, typ: type[msgspec.Struct], base: str, first: msgspec.ValidationError
) -> list[str]:
    """msgspec stops at the first error; check field by field to report them all."""
    if not isinstance(value, dict):
        return [_msgspec_problem(first, base)]
    placeholders = _PLACEHOLDERS.get(typ, {})
    out = []
    for field, item in value.items():
        if field not in typ.__struct_fields__:
            out.append(f"{base}.{field}: unknown field")
            continue
        try:
            msgspec.convert({**placeholders, field: item}, typ, strict=False)
        except msgspec.ValidationError as e:
            out.append(_msgspec_problem(e, base))
    out += [f"{base}.{f}: required field is missing" for f in placeholders if f not in value]
    return out or [_msgspec_problem(first, base)]


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], env: Mapping[str, str], problems: list[str]) -> None:
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, field = name[len(ENV_PREFIX) :].lower().partition("__")
        typ = _SECTION_TYPES.get(section)
        if typ is None or field not in typ.__struct_fields__:
            problems.append(f"{name} (environment): no setting {section}.{field}")
            continue
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            continue  # the file's own type error is reported below
        target[field] = _env_value(raw)


# Query options of redis.url that every Redis client of Keystile honours; timeouts have their own
# settings. Anything else would be applied by one client and ignored by the other.
REDIS_URL_OPTIONS = (
    "db",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
)


def _redis_url_problems(url: str) -> list[str]:
    """Problems with redis.url, never echoing it: it may carry a password."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return [f"redis.url: unsupported scheme {parts.scheme!r} (use redis://, rediss:// or unix://)"]
    out = []
    for name in sorted({n for n, _ in parse_qsl(parts.query, keep_blank_values=True)}):
        if name in ("socket_timeout", "socket_connect_timeout"):
            out.append(f"redis.url: option {name!r}: use redis.socket_timeout / redis.connect_timeout")
        elif name not in REDIS_URL_OPTIONS:
            out.append(f"redis.url: unsupported option {name!r} (supported: {', '.join(REDIS_URL_OPTIONS)})")
    return out


def _check_semantics(cfg: Config) -> list[str]:
    out: list[str] = []
    for field, value in (("proxy.listen", cfg.proxy.listen), ("admin.listen", cfg.admin.listen)):
        try:
            parse_listen(value)
        except ValueError as e:
            out.append(f"{field}: {e}")
    if cfg.proxy.listen == cfg.admin.listen and not cfg.proxy.listen.endswith(":0"):
        out.append("admin.listen: must differ from proxy.listen")
    for i, h in enumerate(cfg.proxy.key_headers):
        if not _HEADER_TOKEN.match(h):
            out.append(f"proxy.key_headers[{i}]: {h!r} is not a valid header name")
        elif h.lower() == "authorization":
            out.append(f"proxy.key_headers[{i}]: use proxy.bearer for the Authorization header")
    if not cfg.proxy.key_headers and not cfg.proxy.bearer and not cfg.proxy.query_param:
        out.append("proxy: no key source enabled (key_headers, bearer and query_param are all off)")
    pfx = cfg.proxy.identity_header_prefix
    if not _HEADER_TOKEN.match(pfx) or len(pfx) < 3:
        out.append(f"proxy.identity_header_prefix: {pfx!r} is not a usable header prefix")
    for i, cidr in enumerate(cfg.proxy.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            out.append(f"proxy.trusted_proxies[{i}]: {cidr!r} is not an address or CIDR")
    if not cfg.proxy.whoami_path.startswith("/"):
        out.append("proxy.whoami_path: must start with /")
    if not valid_prefix(cfg.keys.prefix):
        out.append(f"keys.prefix: {cfg.keys.prefix!r} must be 1-16 lowercase letters or digits")
    scheme = urlsplit(cfg.store.url).scheme
    if scheme not in ("sqlite", "postgresql", "postgres"):
        out.append(f"store.url: unsupported scheme {scheme!r} (use sqlite:///path or postgresql://...)")
    if cfg.store.pool_min > cfg.store.pool_max:
        out.append("store.pool_min: must not exceed store.pool_max")
    if cfg.redis.url:
        out.extend(_redis_url_problems(cfg.redis.url))
    durations = {}
    for field in ("default_lifetime", "max_lifetime", "max_rotation_grace"):
        value = getattr(cfg.policy, field)
        if value:
            try:
                durations[field] = parse_duration(value)
            except ValueError as e:
                out.append(f"policy.{field}: {e}")
    if "default_lifetime" in durations and "max_lifetime" in durations:
        if durations["default_lifetime"] > durations["max_lifetime"]:
            out.append("policy.default_lifetime: longer than policy.max_lifetime")
    if durations.get("max_rotation_grace", 0) > 86400:
        out.append("policy.max_rotation_grace: at most 24h")
    for field in ("window", "block"):
        if getattr(cfg.throttle, field) > 86400:
            out.append(f"throttle.{field}: at most 86400 seconds")
    for i, r in enumerate(cfg.routes):
        where = f"routes[{i}]"
        if not r.prefix.startswith("/"):
            out.append(f"{where}.prefix: must start with /")
        elif "//" in r.prefix or "/./" in r.prefix or "/../" in r.prefix or "%" in r.prefix:
            out.append(f"{where}.prefix: must be a normalized path without encoding")
        u = urlsplit(r.upstream)
        if u.scheme not in ("http", "https") or not u.hostname:
            out.append(f"{where}.upstream: expected an http(s)://host[:port][/path] URL")
        elif u.query or u.fragment or u.username:
            out.append(f"{where}.upstream: must not carry a query, fragment or credentials")
        for j, m in enumerate(r.methods):
            if not m.isalpha() or not m.isupper():
                out.append(f"{where}.methods[{j}]: {m!r} is not an upper-case method")
        if r.auth != "required" and r.scopes:
            out.append(f'{where}.scopes: scopes need auth = "required"')
    return out


def decode(data: dict[str, Any], source: str, env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from parsed TOML plus environment overrides, or raise ConfigError."""
    problems: list[str] = []
    if env is not None:
        _apply_env(data, env, problems)
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name == "routes":
            continue
        typ = _SECTION_TYPES.get(name)
        if typ is None:
            problems.append(f"{source}: {name}: unknown section")
            continue
        try:
            sections[name] = msgspec.convert(value, typ, strict=False)
        except msgspec.ValidationError as e:
            problems.extend(f"{source}: {p}" for p in _each_problem(value, typ, name, e))
    routes: list[RouteConfig] = []
    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list):
        problems.append(f"{source}: routes: expected an array of tables ([[routes]])")
        raw_routes = []
    for i, raw in enumerate(raw_routes):
        try:
            routes.append(msgspec.convert(raw, RouteConfig, strict=False))
        except msgspec.ValidationError as e:
            problems.extend(f"{source}: {p}" for p in _each_problem(raw, RouteConfig, f"routes[{i}]", e))
    if problems:
        raise ConfigError(problems)
    cfg = Config(**sections, routes=tuple(routes))
    semantic = _check_semantics(cfg)
    if semantic:
        raise ConfigError([f"{source}: {p}" for p in semantic])
    return cfg


def load(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (TOML) and the environment; ``path=None`` means defaults plus environment."""
    environ = os.environ if env is None else env
    if path is None:
        return decode({}, "(defaults)", environ)
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{source}: cannot read: {e.strerror}"]) from None
    return loads(text, source, environ)


def loads(text: str, source: str, env: Mapping[str, str] | None = None) -> Config:
    """A Config from TOML text already read (``source`` names it in errors) and the environment."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{source}: invalid TOML: {e}"]) from None
    return decode(data, source, os.environ if env is None else env)


def config_path(explicit: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The config file to read: the ``--config`` flag, else ``KEYSTILE_CONFIG``, else none."""
    environ = os.environ if env is None else env
    return explicit or environ.get(CONFIG_ENV) or None


def admin_endpoint(
    url: str | None, token: str | None, env: Mapping[str, str] | None = None
) -> tuple[str | None, str | None]:
    """The admin API the CLI talks to: ``--admin-url``/``--token``, else ``KEYSTILE_ADMIN_URL`` and
    ``KEYSTILE_ADMIN_TOKEN``. Each is None when neither is given."""
    environ = os.environ if env is None else env
    return url or environ.get(ADMIN_URL_ENV) or None, token or environ.get(ADMIN_TOKEN_ENV) or None


def load_secrets(
    cfg: Config, env: Mapping[str, str] | None = None, *, require_hash_secret: bool = True
) -> Secrets:
    """Read the key-hashing secret and admin tokens from the environment or the named files."""
    environ = os.environ if env is None else env
    problems: list[str] = []
    secret = environ.get(HASH_SECRET_ENV, "").encode()
    if not secret and cfg.security.hash_secret_file:
        secret = _read_secret_file(cfg.security.hash_secret_file, "security.hash_secret_file", problems)
    if require_hash_secret and len(secret) < MIN_SECRET_BYTES and not problems:
        what = "is not set" if not secret else f"is shorter than {MIN_SECRET_BYTES} bytes"
        problems.append(f"{HASH_SECRET_ENV}: {what} (generate one with: keystile secret)")
    tokens = [t.strip() for t in environ.get(ADMIN_TOKENS_ENV, "").split(",") if t.strip()]
    if cfg.admin.tokens_file:
        text = _read_secret_file(cfg.admin.tokens_file, "admin.tokens_file", problems).decode()
        tokens += [t.strip() for t in text.splitlines() if t.strip() and not t.startswith("#")]
    for t in tokens:
        if len(t) < 16:
            problems.append("admin token: shorter than 16 characters")
            break
    if problems:
        raise ConfigError(problems)
    return Secrets(secret, tuple(t.encode() for t in tokens))


def _read_secret_file(path: str, field: str, problems: list[str]) -> bytes:
    try:
        return Path(path).read_bytes().strip()
    except OSError as e:
        problems.append(f"{field}: cannot read {path}: {e.strerror}")
        return b""


def durations(policy: PolicyConfig) -> tuple[float | None, float | None, float]:
    """(default lifetime, max lifetime, max rotation grace) in seconds, from a validated policy."""
    d = parse_duration(policy.default_lifetime) if policy.default_lifetime else None
    m = parse_duration(policy.max_lifetime) if policy.max_lifetime else None
    g = parse_duration(policy.max_rotation_grace) if policy.max_rotation_grace else 0.0
    return d, m, g


def to_toml_dict(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data (for ``config check``); secrets are not part of it."""
    data: dict[str, Any] = msgspec.to_builtins(cfg)
    store = data.get("store", {})
    url = urlsplit(store.get("url", ""))
    if url.password:
        store["url"] = store["url"].replace(f":{url.password}@", ":****@")
    redis = data.get("redis", {})
    rurl = urlsplit(redis.get("url", ""))
    if rurl.password:
        redis["url"] = redis["url"].replace(f":{rurl.password}@", ":****@")
    return data
