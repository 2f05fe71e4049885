"""The SQL store both backends share: one class composed of its groups of queries.

Owns: nothing of its own; it joins the query groups (``sql_keys``, ``sql_principals``,
``sql_access``, ``sql_log``, ``sql_limits``, ``sql_secrets``) over the connection seam of
``sql_base`` and re-exports the names backends and the admin API use. A backend subclasses
``SQLStore`` and supplies ``_tx()``, ``_read()`` and ``_usage()``. Must not: import the cache or aiohttp.
"""

from __future__ import annotations

from gateway.store.sql_access import AccessQueries
from gateway.store.sql_base import (
    AUDIT_CURSOR,
    KEY_CURSOR,
    PRINCIPAL_CURSOR,
    Conn,
    Row,
    SQLBase,
    key_cursor,
    merge_usage,
    read_audit_cursor,
    read_key_cursor,
    read_principal_cursor,
)
from gateway.store.sql_keys import KeyQueries
from gateway.store.sql_limits import LimitQueries
from gateway.store.sql_log import LogQueries
from gateway.store.sql_principals import PrincipalQueries
from gateway.store.sql_secrets import SecretQueries

__all__ = [
    "AUDIT_CURSOR",
    "KEY_CURSOR",
    "PRINCIPAL_CURSOR",
    "Conn",
    "Row",
    "SQLBase",
    "SQLStore",
    "key_cursor",
    "merge_usage",
    "read_audit_cursor",
    "read_key_cursor",
    "read_principal_cursor",
]


class SQLStore(KeyQueries, PrincipalQueries, AccessQueries, LogQueries, LimitQueries, SecretQueries):
    """Every query of the store, over a backend's connections."""
