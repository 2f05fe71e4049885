"""Forwarding: header hygiene, identity injection, and one request/response exchange per call.

Owns: building the upstream request (hop-by-hop and credential stripping, spoof-proof identity
headers, X-Forwarded-*), serialising it, choosing how its body travels, the stale-connection retry,
turning the upstream's response into the client's (hop-by-hop headers dropped, body streamed
through aiohttp's response writer) and mapping upstream failures to 502/504. The sockets, pools and
the HTTP/1.1 parser live in ``gateway.upstream``. Must not: decide whether a key is valid; it is
handed the identity to inject.

Order of header work, both directions: drop hop-by-hop headers (RFC 9110 §7.6.1 plus every header
the ``Connection`` header names) first; then, on requests, drop the key, every header that looks
like an identity header, untrusted forwarding and client-address headers, and method/URL override
headers; only then add Keystile's own headers. Every class Keystile drops is recognised in any case
and with ``_`` for ``-`` (CGI and WSGI servers map both to one variable, and some servers read
``_`` as ``-``): ``X_Forwarded_For``, ``Transfer_Encoding``, ``X_API_Key``. Forwarding headers pass
from a trusted proxy only as spelled with ``-``. Last, a header whose name or value carries a
well-formed key (of this deployment's prefix, checksum checked) is dropped wherever it came from:
no key is forwarded, whatever scheme or header a client put it in. Redirects are returned to the
client, never followed; bodies are never decompressed or buffered whole.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final
from urllib.parse import unquote_plus

from aiohttp import web

from gateway import errors, wire
from gateway.config import Config
from gateway.keys import BODY_CHARS, KeyFormat
from gateway.models import IdentityRecord
from gateway.paths import Target
from gateway.routing import Route
from gateway.upstream import BodySource, Connection, Disconnected, Pool, UpstreamError

log = logging.getLogger("keystile.proxy")

HOP_BY_HOP = frozenset(
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
# A request these methods make may be sent twice (RFC 9110 §9.2.2).
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
_LAST_CHUNK = b"0\r\n\r\n"
# Request header actions (see Forwarder._classify).
_KEEP, _DROP, _AUTHZ, _FWD, _HOST = range(5)
_ACTIONS_MAX = 4096

_SPECS: Final = {
    "timeout": errors.UPSTREAM_TIMEOUT,
    "unreachable": errors.UPSTREAM_UNREACHABLE,
    "bad_response": errors.UPSTREAM_BAD_RESPONSE,
    "tls": errors.UPSTREAM_TLS,
}
# Defence in depth: a header Keystile would send upstream carries CR, LF or NUL (the client's own
# headers were refused by the listener's parser, so the value came from Keystile's side).
UNSAFE_HEADER: Final = errors.ErrorSpec(
    500, "unsafe_upstream_header", "A header for the upstream contains a forbidden character."
)


def _connection_tokens(values: Iterable[str]) -> set[str]:
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


class UpstreamFailure(Exception):
    """Raised before any response byte was sent; carries the prebuilt error to send."""

    def __init__(self, spec: errors.ErrorSpec, detail: str) -> None:
        super().__init__(detail)
        self.spec = spec


class UnsafeHeader(ValueError):
    pass


def serialize_head(
    method: str, target: str, headers: list[tuple[str, str]], chunked: bool, checked: str = ""
) -> bytes:
    """The request line and header block, in the given order; refuses CR, LF and NUL anywhere.

    ``checked``: header lines (each ending CRLF) already known to be clean, appended last.
    """
    head = method + " " + target + " HTTP/1.1\r\n"
    if headers:
        head += "\r\n".join(map(": ".join, headers)) + "\r\n"
    # Exactly one CR and one LF per line we wrote: any other one came from a name or value.
    n = len(headers) + 1
    if head.count("\n") != n or head.count("\r") != n or "\x00" in head or " " in target:
        raise UnsafeHeader("CR, LF or NUL in the request line or a header, or a space in the target")
    head += checked + ("Transfer-Encoding: chunked\r\n\r\n" if chunked else "\r\n")
    # Header text came from bytes decoded as UTF-8 with surrogateescape: this restores them.
    return head.encode("utf-8", "surrogateescape")


def identity_lines(names: tuple[str, str, str, str], ident: IdentityRecord) -> str:
    """The identity header lines for ``ident`` (key id, owner, project, scopes), each ending CRLF.
    Raises UnsafeHeader when a value carries CR, LF or NUL."""
    values = (ident.key_id, ident.principal, ident.project, ",".join(ident.scopes))
    block = "".join(f"{n}: {v}\r\n" for n, v in zip(names, values, strict=True))
    if block.count("\n") != 4 or block.count("\r") != 4 or "\x00" in block:
        raise UnsafeHeader("CR, LF or NUL in an identity header")
    return block


# Per-process caches of what upstreams send, bounded against an upstream sending junk.
_CACHE_MAX = 4096
# Reason phrases seen so far → as sent to the client; None lets aiohttp use the standard phrase.
_REASONS: dict[bytes, str | None] = {}
_CTL = bytes(range(32)) + b"\x7f"


def _reason(raw: bytes) -> str | None:
    try:
        return _REASONS[raw]
    except KeyError:
        pass
    # llhttp lets control characters through in the reason phrase: never relay them.
    ok = raw and len(raw.translate(None, _CTL)) == len(raw)
    reason = raw.decode("utf-8", "surrogateescape") if ok else None
    if len(_REASONS) < _CACHE_MAX:
        _REASONS[raw] = reason
    return reason


# Connection header values seen so far → the header names they list that are not hop-by-hop
# anyway (usually none: "keep-alive", "close").
_LISTED: dict[bytes, frozenset[str]] = {}


def _listed(raw: bytes) -> frozenset[str]:
    got = _LISTED.get(raw)
    if got is None:
        got = frozenset(_connection_tokens((raw.decode("latin-1"),)) - HOP_BY_HOP)
        if len(_LISTED) < _CACHE_MAX:
            _LISTED[raw] = got
    return got


# Response header names seen so far → (lower-case name, what client_head(ers) do with it).
_KEEP_H, _DROP_H, _CONN_H, _DATE_H, _LENGTH_H = range(5)
_RAW_NAMES: dict[bytes, tuple[str, int]] = {}
# (status, reason phrase as received) → the status line after the version, as sent to the client.
_TAILS: dict[tuple[int, bytes], bytes] = {}


def _raw_name(raw: bytes) -> tuple[str, int]:
    low = raw.decode("latin-1").lower()  # llhttp allows only token characters
    kind = (
        _CONN_H
        if low == "connection"
        else _DROP_H
        if low in HOP_BY_HOP
        else _DATE_H
        if low == "date"
        else _LENGTH_H
        if low == "content-length"
        else _KEEP_H
    )
    got = (low, kind)
    if len(_RAW_NAMES) < _CACHE_MAX:
        _RAW_NAMES[raw] = got
    return got


def _status_tail(status: int, raw_reason: bytes) -> bytes:
    tail = _TAILS.get((status, raw_reason))
    if tail is None:
        tail = wire.status_tail(status, _reason(raw_reason))
        if len(_TAILS) < _CACHE_MAX:
            _TAILS[(status, raw_reason)] = tail
    return tail


def client_head(raw: list[tuple[bytes, bytes]], status: int, body: bytes, head: bool) -> tuple[bytes, bool]:
    """The header block for a complete upstream response and whether it carries ``Date``.

    Like ``client_headers`` (order and duplicates kept, hop-by-hop and Connection-listed headers
    dropped), with the framing aiohttp would apply: no Content-Length on 1xx/204, one added from the
    body when the upstream framed it otherwise (chunked, or up to close) unless the status or a HEAD
    request forbids a body. Raises UnsafeHeader on CR, LF or NUL inside a name or value.
    """
    lines: list[bytes] = []
    names: list[str] = []
    listed: frozenset[str] = frozenset()
    has_date = has_length = False
    no_body_status = status < 200 or status == 204
    for rname, rvalue in raw:
        low, kind = _RAW_NAMES.get(rname) or _raw_name(rname)
        if kind:
            if kind == _DROP_H:
                continue
            if kind == _CONN_H:
                listed |= _listed(rvalue)
                continue
            if kind == _DATE_H:
                has_date = True
            elif no_body_status:
                continue  # Content-Length on a response that cannot have a body
            else:
                has_length = True
        lines.append(rname + b": " + rvalue + b"\r\n")
        names.append(low)
    if listed:
        lines = [line for line, name in zip(lines, names, strict=True) if name not in listed]
    if not has_length and not no_body_status and status != 304 and not head:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    block = b"".join(lines)
    n = len(lines)
    if block.count(b"\n") != n or block.count(b"\r") != n or b"\x00" in block:
        raise UnsafeHeader("CR, LF or NUL in a response header")
    return block, has_date


def client_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The upstream's response headers for the client: order and duplicates kept, hop-by-hop
    headers and those its ``Connection`` header names dropped."""
    out: list[tuple[str, str]] = []
    listed: frozenset[str] = frozenset()
    for rname, rvalue in raw:
        _, kind = _RAW_NAMES.get(rname) or _raw_name(rname)
        if kind == _DROP_H:
            continue
        if kind == _CONN_H:
            listed |= _listed(rvalue)
            continue
        out.append((rname.decode("latin-1"), rvalue.decode("utf-8", "surrogateescape")))
    if listed:
        out = [p for p in out if p[0].lower() not in listed]
    return out


class Forwarder:
    def __init__(self, cfg: Config) -> None:
        p = cfg.proxy
        self._identity_prefix = _norm(p.identity_header_prefix)
        pfx = p.identity_header_prefix
        self._identity_names = (pfx + "Key-Id", pfx + "Owner", pfx + "Project", pfx + "Scopes")
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
        up = cfg.upstream
        self._connect_timeout = up.connect_timeout
        self._read_timeout = up.read_timeout
        self._pool_size = up.pool_size
        self._keepalive = up.keepalive_timeout
        self._reuse_delay = up.reuse_delay
        self._pools: dict[str, Pool] = {}  # by Route.upstream_origin
        self._ssl: ssl.SSLContext | None = None
        self._started = False

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        self._started = False
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per upstream origin: open, idle, waiting connections and buffered response bytes."""
        return {origin: pool.stats() for origin, pool in self._pools.items()}

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
        drop = _connection_tokens(conn_hdr) if conn_hdr else None
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

    def _request_target(self, route: Route, target: Target, strip_query_key: bool) -> str:
        path = route.upstream_path(target)
        query = target.query
        if strip_query_key and query and self._query_param:
            kept = [
                part for part in query.split("&") if unquote_plus(part.partition("=")[0]) != self._query_param
            ]
            query = "&".join(kept)
        return path + "?" + query if query else path

    def upstream_url(self, route: Route, target: Target, strip_query_key: bool) -> str:
        return route.upstream_origin + self._request_target(route, target, strip_query_key)

    def _new_pool(self, origin: str) -> Pool:
        assert self._started, "Forwarder.start() was not called"
        ctx = None
        if origin.startswith("https:"):
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
                self._ssl.set_alpn_protocols(["http/1.1"])
            ctx = self._ssl
        pool = Pool(
            asyncio.get_running_loop(),
            origin,
            ssl_context=ctx,
            limit=self._pool_size,
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            keepalive_timeout=self._keepalive,
            reuse_delay=self._reuse_delay,
        )
        self._pools[origin] = pool
        return pool

    async def forward(
        self,
        request: web.BaseRequest,
        route: Route,
        target: Target,
        headers: list[tuple[str, str]],
        ident: IdentityRecord | None,
        strip_query_key: bool,
    ) -> tuple[wire.Answer, int]:
        """Send the request upstream and stream the answer back; returns (response, upstream status).

        Raises UpstreamFailure when nothing has been sent to the client yet.
        """
        pool = self._pools.get(route.upstream_origin) or self._new_pool(route.upstream_origin)
        method = request.method
        # The body: none; all of it already received (sent with the head, replayable); or
        # streamed from the client as it arrives, with exactly its Content-Length or re-chunked.
        has_body = request.body_exists
        source: BodySource | None = None
        length: int | None = None
        body = b""
        chunked = False
        if has_body:
            content = request.content
            length = request.content_length
            chunked = length is None
            if content.is_eof():
                try:
                    body = content.read_nowait(-1)
                except Exception as e:
                    raise UpstreamFailure(errors.UPSTREAM_UNREACHABLE, f"client body: {e!r}") from None
                if length is not None and len(body) != length:
                    raise UpstreamFailure(errors.UPSTREAM_UNREACHABLE, "client body incomplete")
                if chunked:
                    body = (b"%x\r\n%b\r\n" % (len(body), body) + _LAST_CHUNK) if body else _LAST_CHUNK
            else:
                source = content
        path = self._request_target(route, target, strip_query_key)
        try:
            lines = "" if ident is None else self.identity(ident)
            head = serialize_head(method, path, headers, chunked, lines)
        except UnsafeHeader as e:
            raise UpstreamFailure(UNSAFE_HEADER, str(e)) from None
        if source is None:
            head += body

        retried = False
        while True:
            try:
                conn, reused = await pool.acquire(fresh=retried)
            except UpstreamError as e:
                raise UpstreamFailure(_SPECS[e.kind], str(e)) from None
            pump: asyncio.Task[None] | None = None
            try:
                conn.begin(method == "HEAD")
                if source is None:
                    conn.send(head)
                else:
                    pump = conn.send_streaming(head, source, length)
                await conn.read_head()
                break
            except UpstreamError as e:
                _release(pool, conn, pump, False)
                # Stale keep-alive race: a reused connection died before answering. Send again,
                # once and on a new connection, when the request can be replayed in full and
                # sending it twice is harmless: its method is idempotent (RFC 9110 §9.2.2), or
                # not one byte of it went out.
                if (
                    reused
                    and not retried
                    and isinstance(e, Disconnected)
                    and not e.got_bytes
                    and (e.unsent or method in _IDEMPOTENT)
                    and (pump is None or not conn.body_started)
                ):
                    retried = True
                    log.debug("stale upstream connection on route %s (%s); retrying", route.name, e)
                    continue
                raise UpstreamFailure(_SPECS[e.kind], str(e)) from None
            except BaseException:
                _release(pool, conn, pump, False)
                raise

        released = False
        try:
            status = conn.status
            if conn.complete:
                # The whole response is here: free the connection first, then answer in one write.
                data = conn.take_body()
                _release(pool, conn, pump, True)
                released = True
                try:
                    block, has_date = client_head(conn.headers, status, data, method == "HEAD")
                except UnsafeHeader as e:
                    raise UpstreamFailure(errors.UPSTREAM_BAD_RESPONSE, f"response header: {e}") from None
                # aiohttp's server writes it (prepare) once the handler returns.
                tail = _status_tail(status, conn.reason)
                return wire.RawResponse(status, tail, block, data, not has_date), status

            reason = _reason(conn.reason)
            hdrs = client_headers(conn.headers)
            try:
                out = web.StreamResponse(status=status, reason=reason, headers=hdrs)
                await out.prepare(request)
            except ValueError as e:
                raise UpstreamFailure(errors.UPSTREAM_BAD_RESPONSE, f"response header: {e}") from None
            try:
                while chunk := await conn.read_body():
                    await out.write(chunk)
            except UpstreamError as e:
                # Headers are gone already: cut the connection so the client sees a truncated body
                # rather than a clean end.
                log.warning("upstream failed mid-response on route %s: %s", route.name, e)
                _abort(request)
                return out, status
            except ConnectionError:  # the client went away
                _abort(request)
                return out, status
            _release(pool, conn, pump, True)
            released = True
            try:
                await out.write_eof()
            except ConnectionError:
                _abort(request)
            return out, status
        finally:
            if not released:
                _release(pool, conn, pump, False)


def _release(pool: Pool, conn: Connection, pump: asyncio.Task[None] | None, ok: bool) -> None:
    reuse = conn.finish() and ok
    if pump is not None and not pump.done() and not conn.body_sent:
        pump.cancel()
    pool.release(conn, reuse)


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
