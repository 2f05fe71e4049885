"""The rules a decoded config must also satisfy (listen addresses, header names, URLs, routes).

Owns: cross-field and semantic checks, each returned as a ``field: problem`` line so every problem
is reported at once. Must not: read files or the environment, open connections.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qsl, urlsplit

from gateway.config.schema import Config, RouteConfig, parse_duration, parse_listen
from gateway.keys import valid_prefix
from gateway.limits.policy import check_policy
from gateway.text import is_token_char

_HEADER_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

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


_LIFETIMES = ("default_lifetime", "max_lifetime", "max_rotation_grace")


def _durations(section: object, where: str, out: list[str]) -> dict[str, float | None]:
    """The section's duration fields that are set, in seconds ("" -> None); bad ones reported."""
    found: dict[str, float | None] = {}
    for field in _LIFETIMES:
        value = getattr(section, field)
        if value is None:
            continue
        try:
            found[field] = parse_duration(value) if value else None
        except ValueError as e:
            out.append(f"{where}.{field}: {e}")
    return found


def _policy_problems(cfg: Config) -> list[str]:
    """``[policy]`` and each ``[policy.projects.<name>]``, the latter with ``[policy]``'s values
    for the fields it leaves out (store values are checked when they are set)."""
    out: list[str] = []
    base = _durations(cfg.policy, "policy", out)
    sections: list[tuple[str, dict[str, float | None]]] = [("policy", base)]
    for project, pp in cfg.policy.projects.items():
        where = f"policy.projects.{project}" if project.isprintable() else "policy.projects"
        if not 0 < len(project) <= 100 or not all(map(is_token_char, project)):
            out.append(f"{where}: {project!r} is not a project name (no spaces, commas, control characters)")
            continue
        sections.append((where, {**base, **_durations(pp, where, out)}))
    for where, d in sections:
        default, longest = d.get("default_lifetime"), d.get("max_lifetime")
        if default is not None and longest is not None and default > longest:
            out.append(f"{where}.default_lifetime: longer than the max_lifetime that applies")
        if (d.get("max_rotation_grace") or 0) > 86400:
            out.append(f"{where}.max_rotation_grace: at most 24h")
    return out


def _limit_problems(where: str, r: RouteConfig) -> list[str]:
    out = []
    for j, lim in enumerate(r.limits):
        try:
            check_policy(lim.name, lim.limit, lim.window)
        except ValueError as e:
            out.append(f"{where}.limits[{j}]: {e}")
    names = [lim.name for lim in r.limits]
    if len(set(names)) != len(names):
        out.append(f"{where}.limits: names must be unique")
    if r.limits and r.auth == "none":
        out.append(f'{where}.limits: limits apply per key and need auth = "required" or "optional"')
    return out


def check_semantics(cfg: Config) -> list[str]:
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
    out.extend(_policy_problems(cfg))
    for field in ("window", "block"):
        if getattr(cfg.throttle, field) > 86400:
            out.append(f"throttle.{field}: at most 86400 seconds")
    for listener in ("proxy", "admin"):
        cert, key = getattr(cfg.tls, f"{listener}_cert_file"), getattr(cfg.tls, f"{listener}_key_file")
        if bool(cert) != bool(key):
            missing = f"{listener}_key_file" if cert else f"{listener}_cert_file"
            out.append(f"tls.{missing}: needed with tls.{listener}_{'cert' if cert else 'key'}_file")
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
        out.extend(_limit_problems(where, r))
    out.extend(_console_problems(cfg))
    return out


def _console_problems(cfg: Config) -> list[str]:
    c = cfg.console
    out: list[str] = []
    if c.listen:
        try:
            parse_listen(c.listen)
        except ValueError as e:
            out.append(f"console.listen: {e}")
        if c.listen in (cfg.proxy.listen, cfg.admin.listen) and not c.listen.endswith(":0"):
            out.append("console.listen: must differ from proxy.listen and admin.listen")
    for i, cidr in enumerate(c.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            out.append(f"console.trusted_proxies[{i}]: {cidr!r} is not an address or CIDR")
    if not _HEADER_TOKEN.match(c.identity_header):
        out.append(f"console.identity_header: {c.identity_header!r} is not a valid header name")
    seconds = {}
    for field in ("session_idle", "session_absolute"):
        try:
            seconds[field] = parse_duration(getattr(c, field))
        except ValueError as e:
            out.append(f"console.{field}: {e}")
    if len(seconds) == 2 and seconds["session_idle"] > seconds["session_absolute"]:
        out.append("console.session_idle: longer than console.session_absolute")
    for project in c.new_user_grants:
        if not project or any(ch in project for ch in " ,") or not project.isprintable():
            out.append(f"console.new_user_grants: {project!r} is not a project name")
    return out
