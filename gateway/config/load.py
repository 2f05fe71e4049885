"""Reading a config: TOML text or file, environment overrides, and every problem as one line.

Owns: ``decode``/``load``/``loads``, the per-field error reporting msgspec does not give, where the
CLI finds a config and an admin API, and the effective config for ``config check``. Must not:
open connections.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from gateway.config.checks import check_semantics
from gateway.config.schema import (
    _SECTION_TYPES,
    ADMIN_TOKEN_ENV,
    ADMIN_URL_ENV,
    CONFIG_ENV,
    ENV_PREFIX,
    Config,
    ConfigError,
    PolicyConfig,
    ProjectPolicyConfig,
    RouteConfig,
    parse_duration,
)

_ROUTE_INDEX = re.compile(r"^routes\[(\d+)\]")
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


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
        if typ is PolicyConfig and field == "projects" and isinstance(item, dict):
            out.extend(_project_problems(item, f"{base}.projects"))
            continue
        try:
            msgspec.convert({**placeholders, field: item}, typ, strict=False)
        except msgspec.ValidationError as e:
            out.append(_msgspec_problem(e, base))
    out += [f"{base}.{f}: required field is missing" for f in placeholders if f not in value]
    return out or [_msgspec_problem(first, base)]


def _project_problems(projects: dict[str, Any], base: str) -> list[str]:
    """``[policy.projects.<name>]`` tables one by one, so a problem names its project (msgspec
    would say ``projects[...]``)."""
    out = []
    for name, table in projects.items():
        try:
            msgspec.convert(table, ProjectPolicyConfig, strict=False)
        except msgspec.ValidationError as e:
            out += _each_problem(table, ProjectPolicyConfig, f"{base}.{name}", e)
    return out


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


def decode(data: dict[str, Any], source: str, env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from parsed TOML plus environment overrides, or raise ConfigError."""
    problems: list[str] = []
    if env is not None:
        _apply_env(data, env, problems)
    sections: dict[str, Any] = {}
    failed: list[str] = []  # sections (and routes[i]) that did not decode: checked no further
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
            failed.append(name)
            problems.extend(f"{source}: {p}" for p in _each_problem(value, typ, name, e))
    routes: list[RouteConfig] = []
    decoded: list[int] = []  # the file's index of each route in ``routes``
    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list):
        problems.append(f"{source}: routes: expected an array of tables ([[routes]])")
        raw_routes = []
    for i, raw in enumerate(raw_routes):
        try:
            routes.append(msgspec.convert(raw, RouteConfig, strict=False))
            decoded.append(i)
        except msgspec.ValidationError as e:
            problems.extend(f"{source}: {p}" for p in _each_problem(raw, RouteConfig, f"routes[{i}]", e))
    cfg = Config(**sections, routes=tuple(routes))
    # The rules between fields too, on what did decode, so that one run reports every problem.
    for p in check_semantics(cfg):
        p = _ROUTE_INDEX.sub(lambda m: f"routes[{decoded[int(m.group(1))]}]", p)
        if not any(p.startswith(f"{s}.") or f" {s}." in p for s in failed):
            problems.append(f"{source}: {p}")
    if problems:
        raise ConfigError(problems)
    return cfg


def load(
    path: str | Path | None, env: Mapping[str, str] | None = None, *, base_dir: str | Path | None = None
) -> Config:
    """Read ``path`` (TOML) and the environment; ``path=None`` means defaults plus environment.

    Relative file paths in the config (a SQLite ``store.url``, the secret files) name files next
    to the config file, whatever the current directory: they are made absolute against
    ``base_dir``, by default the config file's own directory. Without a file they stay relative
    to the current directory."""
    environ = os.environ if env is None else env
    if path is None:
        return decode({}, "(defaults)", environ)
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{source}: cannot read: {e.strerror}"]) from None
    base = Path(base_dir) if base_dir is not None else Path(path).parent
    return relative_to(loads(text, source, environ), base)


def _sqlite_path(url: str) -> str | None:
    """The file part of a ``sqlite:`` URL (as ``gateway.store.sqlite.path_of`` reads it)."""
    if not url.startswith("sqlite:"):
        return None
    rest = url.removeprefix("sqlite:")
    return rest[3:] if rest.startswith("///") else rest[2:] if rest.startswith("//") else rest


def relative_to(cfg: Config, base: Path) -> Config:
    """``cfg`` with its relative file paths made absolute against ``base``."""
    base = base.absolute()

    def fix(p: str) -> str:
        return p if not p or Path(p).is_absolute() else str(base / p)

    store, security, admin = cfg.store, cfg.security, cfg.admin
    db = _sqlite_path(store.url)
    if db and db != ":memory:" and not db.startswith("file:") and not Path(db).is_absolute():
        store = msgspec.structs.replace(store, url="sqlite:///" + fix(db))
    security = msgspec.structs.replace(
        security,
        hash_secret_file=fix(security.hash_secret_file),
        previous_hash_secret_files=tuple(fix(p) for p in security.previous_hash_secret_files),
    )
    admin = msgspec.structs.replace(admin, tokens_file=fix(admin.tokens_file))
    return msgspec.structs.replace(cfg, store=store, security=security, admin=admin)


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
