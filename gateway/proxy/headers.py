"""Header policy: which headers cross the gateway, in which form, and the identity it adds.

Owns: the request headers an upstream gets (hop-by-hop and credential stripping, spoof-proof
identity headers, X-Forwarded-*), the identity header lines, the request target without the key's
query parameter, and which response headers are hop-by-hop. Must not: serialise a message, open
a connection or decide whether a key is valid (it is handed the identity to inject).

Order of header work, both directions: drop hop-by-hop headers (RFC 9110 §7.6.1 plus every header
the ``Connection`` header names) first; then, on requests, drop the key, every header that looks
like an identity header, untrusted forwarding and client-address headers, and method/URL override
headers; only then add Keystile's own headers. Every class Keystile drops is recognised in any case
and with ``_`` for ``-`` (CGI and WSGI servers map both to one variable, and some servers read
``_`` as ``-``): ``X_Forwarded_For``, ``Transfer_Encoding``, ``X_API_Key``. Forwarding headers pass
from a trusted proxy only as spelled with ``-``. Last, a header whose name or value carries a
well-formed key (of this deployment's prefix, checksum checked) is dropped wherever it came from:
no key is forwarded, whatever scheme or header a client put it in.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final
from urllib.parse import unquote_plus

from aiohttp import web

from gateway.config import Config
from gateway.keys import BODY_CHARS, KeyFormat
from gateway.models import IdentityRecord
from gateway.paths import Target
from gateway.routing import Route

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Rebuilt by Keystile on every request (extending an incoming chain only from a trusted proxy).
_REBUILT = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
# Besides Forwarded and every X-Forwarded-*: headers upstreams commonly take for the client's
# address. Believed only from proxy.trusted_proxies.
_CLIENT_ADDRESS = frozenset(
    {
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
        "x-original-forwarded-for",
        "client-ip",
        "cf-connecting-ip",
        "x-cluster-client-ip",
        "fastly-client-ip",
    }
)
# Headers asking an upstream to treat the request as another method or URL (proxy.pass_override_headers).
_OVERRIDE = frozenset(
    {
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
        "x-original-method",
    }
)
# Request header actions (see HeaderPolicy._classify).
_KEEP, _DROP, _AUTHZ, _FWD, _HOST = range(5)
_ACTIONS_MAX = 4096


class UnsafeHeader(ValueError):
    """A header (or the request line) for the wire carries CR, LF or NUL."""


def connection_tokens(values: Iterable[str]) -> set[str]:
    """The header names a ``Connection`` header's values list, lower-case."""
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def connection_listed(value: str) -> frozenset[str]:
    """The names one ``Connection`` value lists that are not hop-by-hop anyway (those go in any
    case): the response headers it removes besides."""
    return frozenset(connection_tokens((value,)) - HOP_BY_HOP)


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def identity_lines(names: tuple[str, str, str, str, str], ident: IdentityRecord) -> str:
    """The identity header lines for ``ident`` (key id, owner, project, scopes, roles), each ending
    CRLF. Raises UnsafeHeader when a value carries CR, LF or NUL."""
    values = (ident.key_id, ident.principal, ident.project, ",".join(ident.scopes), ",".join(ident.roles))
    block = "".join(f"{n}: {v}\r\n" for n, v in zip(names, values, strict=True))
    if block.count("\n") != 5 or block.count("\r") != 5 or "\x00" in block:
        raise UnsafeHeader("CR, LF or NUL in an identity header")
    return block


class HeaderPolicy:
    """One config generation's request header policy (``proxy.*`` settings, the key prefix)."""

    def __init__(self, cfg: Config) -> None:
        p = cfg.proxy
        self._identity_prefix = _norm(p.identity_header_prefix)
        pfx = p.identity_header_prefix
        self._identity_names = (
            pfx + "Key-Id",
            pfx + "Owner",
            pfx + "Project",
            pfx + "Scopes",
            pfx + "Roles",
        )
        # Identity lines by digest, kept with the record they were built from: a record the cache
        # replaced (new object) is rebuilt. Bounded like the in-process cache, oldest first out
        # (O(1) with an OrderedDict; see LocalTier).
        self._identity: OrderedDict[bytes, tuple[IdentityRecord, str]] = OrderedDict()
        self._identity_max = cfg.cache.local_max_entries
        self._key_headers = frozenset(_norm(h) for h in p.key_headers)
        self._pass_override = p.pass_override_headers
        # What a key looks like, for dropping any header that carries one (_carries_key): values
        # shorter than a key cannot, and the rest are searched for the prefix before any regex.
        prefix = cfg.keys.prefix
        self._key_format = KeyFormat(prefix)
        self._key_len = len(prefix) + len("_live_") + BODY_CHARS
        self._key_mark = prefix + "_"
        self._key_shape = re.compile(re.escape(prefix) + rf"_(?:live|test)_[0-9A-Za-z]{{{BODY_CHARS}}}")
        self._query_param = p.query_param
        self._trusted = tuple(ipaddress.ip_network(c, strict=False) for c in p.trusted_proxies)
        self._actions: dict[str, int] = {}

    def _trusted_peer(self, peer: str | None) -> bool:
        if not self._trusted or not peer:
            return False
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(addr in net for net in self._trusted)

    def _classify(self, name: str) -> int:
        """What ``upstream_headers`` does with a request header name; cached, bounded (a name
        carrying a key is dropped and never cached)."""
        low = name.lower()
        n = low.replace("_", "-")  # the name as a server reading "_" as "-" sees it
        if n in HOP_BY_HOP or n == "expect":
            act = _DROP
        elif n.startswith(self._identity_prefix) or n in self._key_headers:
            act = _DROP
        elif n in _OVERRIDE:
            act = _KEEP if self._pass_override else _DROP
        elif low == "authorization":
            act = _AUTHZ
        elif n in _REBUILT:
            act = _DROP
        elif n == "forwarded" or n.startswith("x-forwarded") or n in _CLIENT_ADDRESS:
            act = _FWD if n == low else _DROP  # a proxy never spells them with "_"
        elif n == "content-length" and n != low:
            act = _DROP  # framing spelled with "_": another server could take it for the real one
        elif low == "host":
            act = _HOST
        else:
            act = _KEEP
        if len(name) >= self._key_len and self._carries_key(name):
            return _DROP
        if len(self._actions) < _ACTIONS_MAX:
            self._actions[name] = act
        return act

    def _carries_key(self, text: str) -> bool:
        """Whether ``text`` contains a well-formed key of this deployment (checksum checked)."""
        if self._key_mark not in text:
            return False
        return any(self._key_format.well_formed(m.group(0)) for m in self._key_shape.finditer(text))

    def identity(self, ident: IdentityRecord) -> str:
        """The identity header lines for ``ident``; raises UnsafeHeader."""
        hit = self._identity.get(ident.digest)
        if hit is not None and hit[0] is ident:
            return hit[1]
        block = identity_lines(self._identity_names, ident)
        cache = self._identity
        if ident.digest not in cache and len(cache) >= self._identity_max:
            cache.popitem(last=False)
        cache[ident.digest] = (ident, block)
        return block

    def upstream_headers(
        self, request: web.BaseRequest, route: Route, from_bearer: bool
    ) -> list[tuple[str, str]]:
        """The client's headers as the upstream gets them, without the identity (``identity``)."""
        src = request.headers
        conn_hdr = src.getall("Connection", ())
        drop = connection_tokens(conn_hdr) if conn_hdr else None
        peer = request.remote or ""
        trusted = self._trusted_peer(peer)
        preserve_host = route.preserve_host
        actions = self._actions
        out: list[tuple[str, str]] = []
        has_host = False
        key_len, key_mark = self._key_len, self._key_mark
        for name, value in src.items():
            act = actions.get(name)
            if act is None:
                act = self._classify(name)
            if act:
                if act == _DROP:
                    continue
                if act == _AUTHZ:
                    if from_bearer:
                        continue
                elif act == _FWD:
                    if not trusted:  # forwarding headers pass only from a trusted proxy
                        continue
                elif act == _HOST:
                    if not preserve_host:
                        continue
                    has_host = True
            if drop and name.lower() in drop:
                continue
            if len(value) >= key_len and key_mark in value and self._carries_key(value):
                continue
            out.append((name, value))
        if not has_host:
            out.append(("Host", route.upstream_host))
        # X-Forwarded-*: extend the chain only when the peer is a trusted proxy.
        if trusted:
            chain = ", ".join(src.getall("X-Forwarded-For", ()))
            forwarded = [
                ("X-Forwarded-For", f"{chain}, {peer}" if chain else peer),
                ("X-Forwarded-Proto", src.get("X-Forwarded-Proto", request.scheme)),
                ("X-Forwarded-Host", src.get("X-Forwarded-Host", src.get("Host", ""))),
            ]
            out += [(k, v) for k, v in forwarded if len(v) < key_len or not self._carries_key(v)]
        else:
            out.append(("X-Forwarded-For", peer))
            out.append(("X-Forwarded-Proto", request.scheme))
            host = src.get("Host", "")
            if len(host) < key_len or not self._carries_key(host):
                out.append(("X-Forwarded-Host", host))
        return out

    def request_target(self, route: Route, target: Target, strip_query_key: bool) -> str:
        """The target an upstream gets: the route's path, and the query without the key's
        parameter when the request presented a key (``strip_query_key``)."""
        path = route.upstream_path(target)
        query = target.query
        if strip_query_key and query and self._query_param:
            kept = [
                part for part in query.split("&") if unquote_plus(part.partition("=")[0]) != self._query_param
            ]
            query = "&".join(kept)
        return path + "?" + query if query else path
