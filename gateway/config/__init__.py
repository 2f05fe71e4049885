"""Configuration: the only reader of config files and of the environment.

The package is split by concern (``schema``, ``checks``, ``load``, ``credentials``); every public
name is re-exported here, so callers import from ``gateway.config``.

Owns: the TOML schema as frozen msgspec Structs (every field has a default documented in
``config/reference.toml``), environment overrides, secrets, and validation that reports every
problem at once as ``file: field: problem`` lines. Must not: import aiohttp, the stores or the app.

Environment overrides: ``KEYSTILE_<SECTION>__<FIELD>`` sets ``<field>`` of ``[<section>]``, e.g.
``KEYSTILE_STORE__URL=postgresql://...`` or ``KEYSTILE_PROXY__LISTEN=0.0.0.0:8080``. Values are
read as TOML values when they parse as one (numbers, booleans, arrays), else as strings. Secrets
never live in the file: ``KEYSTILE_KEY_HASH_SECRET`` (or ``security.hash_secret_file``) and
``KEYSTILE_ADMIN_TOKENS`` (comma-separated, or ``admin.tokens_file``).
"""

from gateway.config.checks import REDIS_URL_OPTIONS, check_semantics
from gateway.config.credentials import ADMIN_ROLES, AdminToken, Secrets, admin_token, load_secrets
from gateway.config.load import (
    admin_endpoint,
    config_path,
    decode,
    durations,
    load,
    loads,
    relative_to,
    to_toml_dict,
)
from gateway.config.schema import (
    _SECTION_TYPES,
    ADMIN_TOKEN_ENV,
    ADMIN_TOKENS_ENV,
    ADMIN_URL_ENV,
    CONFIG_ENV,
    DURATION_PATTERN,
    ENV_PREFIX,
    HASH_SECRET_ENV,
    MIN_SECRET_BYTES,
    PREVIOUS_HASH_SECRET_ENV,
    AdminConfig,
    AuthMode,
    CacheConfig,
    Config,
    ConfigError,
    ConsoleConfig,
    Count,
    KeysConfig,
    LimitConfig,
    LimitsConfig,
    LoggingConfig,
    PolicyConfig,
    ProjectPolicyConfig,
    ProxyConfig,
    RedisConfig,
    RouteConfig,
    Seconds,
    SecurityConfig,
    StoreConfig,
    ThrottleConfig,
    TLSConfig,
    UpstreamConfig,
    UsageConfig,
    format_duration,
    parse_duration,
    parse_listen,
)

__all__ = [
    "ADMIN_ROLES",
    "ADMIN_TOKENS_ENV",
    "ADMIN_TOKEN_ENV",
    "ADMIN_URL_ENV",
    "CONFIG_ENV",
    "DURATION_PATTERN",
    "ENV_PREFIX",
    "HASH_SECRET_ENV",
    "MIN_SECRET_BYTES",
    "PREVIOUS_HASH_SECRET_ENV",
    "REDIS_URL_OPTIONS",
    "_SECTION_TYPES",
    "AdminConfig",
    "AdminToken",
    "AuthMode",
    "CacheConfig",
    "Config",
    "ConfigError",
    "ConsoleConfig",
    "Count",
    "KeysConfig",
    "LimitConfig",
    "LimitsConfig",
    "LoggingConfig",
    "PolicyConfig",
    "ProjectPolicyConfig",
    "ProxyConfig",
    "RedisConfig",
    "RouteConfig",
    "Seconds",
    "Secrets",
    "SecurityConfig",
    "StoreConfig",
    "TLSConfig",
    "ThrottleConfig",
    "UpstreamConfig",
    "UsageConfig",
    "admin_endpoint",
    "admin_token",
    "check_semantics",
    "config_path",
    "decode",
    "durations",
    "format_duration",
    "load",
    "load_secrets",
    "loads",
    "parse_duration",
    "parse_listen",
    "relative_to",
    "to_toml_dict",
]
