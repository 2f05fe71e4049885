"""Forwarding: a checked request to its upstream and the answer back to the client.

Three parts, each its own module: ``headers`` (header policy: what crosses, the identity added),
``serialize`` (HTTP/1.1 bytes, with the per-process caches of what upstreams send) and
``exchange`` (``Forwarder``: pools, the send and its retry, streaming the answer). Must not, any of
them: decide whether a key is valid; the handler hands over the identity to inject.
"""

from __future__ import annotations

from gateway.proxy.exchange import Forwarder, UpstreamFailure
from gateway.proxy.headers import HOP_BY_HOP, HeaderPolicy, UnsafeHeader, identity_lines
from gateway.proxy.serialize import RESPONSE_HEADS, ResponseHeads, serialize_head

__all__ = [
    "HOP_BY_HOP",
    "RESPONSE_HEADS",
    "Forwarder",
    "HeaderPolicy",
    "ResponseHeads",
    "UnsafeHeader",
    "UpstreamFailure",
    "identity_lines",
    "serialize_head",
]
