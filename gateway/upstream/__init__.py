"""The upstream leg: a lean keep-alive HTTP/1.1 client transport.

Owns: connections to upstream origins (``pool``), the byte-level exchange on each (``connection``)
and the failures it reports (``errors``). Must not: know about routes, keys, identities or header
hygiene (``gateway.proxy`` owns those and hands this package a cleaned header block), nor write to
the client's connection.
"""

from __future__ import annotations

from gateway.upstream.connection import HIGH_WATER, BodySource, Connection
from gateway.upstream.errors import (
    BadResponse,
    ClientBodyError,
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    ReadTimeout,
    TLSFailed,
    UpstreamError,
)
from gateway.upstream.pool import Pool, parse_origin

__all__ = [
    "HIGH_WATER",
    "BadResponse",
    "BodySource",
    "ClientBodyError",
    "ConnectFailed",
    "ConnectTimeout",
    "Connection",
    "Disconnected",
    "Pool",
    "ReadTimeout",
    "TLSFailed",
    "UpstreamError",
    "parse_origin",
]
