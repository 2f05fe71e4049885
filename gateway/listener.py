"""The proxy listener's server: aiohttp's low-level ``web.Server`` whose connections remember a key.

Owns: ``KeyedConnection``, the per-connection slots holding the last well-formed key a client
presented on that connection and its digest, and ``ProxyServer``, which makes those connections.
A keep-alive client sends the same key on every request; with the digest remembered, requests after
the first skip the format check and both hashes. Must not: decide anything about a key. ``auth``
reads and writes the slots (comparing keys in constant time) and still looks the digest up in the
cache on every request, so a revocation applies to an open connection at once.

The key stays in memory only while its connection is open (or until it presents another one): the
same lifetime as the buffers the request arrived in. Nothing process-wide keeps raw keys.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.turn import BatchedTransport, turn_writes


class KeyedConnection(RequestHandler):
    """One client connection to the proxy listener (aiohttp's protocol) plus the remembered key."""

    __slots__ = ("key_by", "key_digest", "key_seen")

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.key_seen = ""  # the last well-formed key presented here
        self.key_digest = b""  # its digest
        self.key_by: object = None  # the Authenticator that checked it (a reload builds a new one)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiohttp then writes (responses, 100-continue, errors) and closes through this wrapper:
        # everything sent on the connection waits for the end of the loop's turn, in order.
        batched = BatchedTransport(cast(asyncio.Transport, transport), turn_writes(self._loop))
        super().connection_made(batched)


class ProxyServer(web.Server):
    """``web.Server`` making ``KeyedConnection`` protocols (aiohttp calls the server per connection)."""

    def __call__(self) -> RequestHandler:
        return KeyedConnection(self, loop=self._loop, **self._kwargs)
