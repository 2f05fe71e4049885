"""Forwarding: one upstream client for the process, header hygiene, identity injection, streaming.

Owns: building the upstream request (hop-by-hop and credential stripping, spoof-proof identity
headers, X-Forwarded-*), the keep-alive pool, streaming both bodies, and mapping upstream failures
to 502/504. Must not: decide whether a key is valid; it is handed the identity to inject.

Order of header work, both directions: drop hop-by-hop headers (RFC 9110 §7.6.1 plus every header
the ``Connection`` header names) first; then, on requests, drop the key, every header that looks
like an identity header (any case, ``_`` for ``-``) and untrusted forwarding headers; only then add
Keystile's own headers. Redirects are returned to the client, never followed; bodies are never
decompressed or buffered whole.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from urllib.parse import unquote_plus

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway import errors
from gateway.config import Config
from gateway.models import IdentityRecord
from gateway.paths import Target
from gateway.routing import Route

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
_FORWARDING = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"})
# Headers aiohttp's client would otherwise add on its own.
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def _connection_tokens(values: Iterable[str]) -> set[str]:
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


class UpstreamFailure(Exception):
    """Raised before any response byte was sent; carries the prebuilt error to send."""

    def __init__(self, spec: errors.ErrorSpec, detail: str) -> None:
        super().__init__(detail)
        self.spec = spec


class Forwarder:
    def __init__(self, cfg: Config) -> None:
        p = cfg.proxy
        self._identity_prefix = _norm(p.identity_header_prefix)
        pfx = p.identity_header_prefix
        self._h_key_id = pfx + "Key-Id"
        self._h_owner = pfx + "Owner"
        self._h_project = pfx + "Project"
        self._h_scopes = pfx + "Scopes"
        self._key_headers = frozenset(_norm(h) for h in p.key_headers)
        self._query_param = p.query_param
        self._trusted = tuple(ipaddress.ip_network(c, strict=False) for c in p.trusted_proxies)
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=cfg.upstream.connect_timeout, sock_read=cfg.upstream.read_timeout
        )
        self._pool_size = cfg.upstream.pool_size
        self._keepalive = cfg.upstream.keepalive_timeout
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=self._pool_size,
            keepalive_timeout=self._keepalive,
            ttl_dns_cache=60,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO,
            trust_env=False,
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _trusted_peer(self, peer: str | None) -> bool:
        if not self._trusted or not peer:
            return False
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(addr in net for net in self._trusted)

    def upstream_headers(
        self,
        request: web.BaseRequest,
        route: Route,
        from_bearer: bool,
        ident: IdentityRecord | None,
    ) -> CIMultiDict[str]:
        src = request.headers
        drop = _connection_tokens(src.getall("Connection", ()))
        trusted = self._trusted_peer(request.remote)
        out: CIMultiDict[str] = CIMultiDict()
        prefix = self._identity_prefix
        for name, value in src.items():
            low = name.lower()
            if low in HOP_BY_HOP or low in drop or low == "expect":
                continue
            n = _norm(name)
            if n.startswith(prefix) or n in self._key_headers:
                continue
            if low == "authorization" and from_bearer:
                continue
            if low in _FORWARDING and not (trusted and low == "forwarded"):
                continue
            if low == "host":
                if route.preserve_host:
                    out.add(name, value)
                continue
            out.add(name, value)
        if not route.preserve_host:
            out["Host"] = route.upstream_host
        # X-Forwarded-*: extend the chain only when the peer is a trusted proxy.
        peer = request.remote or ""
        if trusted:
            chain = ", ".join(src.getall("X-Forwarded-For", ()))
            out["X-Forwarded-For"] = f"{chain}, {peer}" if chain else peer
            out["X-Forwarded-Proto"] = src.get("X-Forwarded-Proto", request.scheme)
            out["X-Forwarded-Host"] = src.get("X-Forwarded-Host", src.get("Host", ""))
        else:
            out["X-Forwarded-For"] = peer
            out["X-Forwarded-Proto"] = request.scheme
            out["X-Forwarded-Host"] = src.get("Host", "")
        if ident is not None:
            out[self._h_key_id] = ident.key_id
            out[self._h_owner] = ident.principal
            out[self._h_project] = ident.project
            out[self._h_scopes] = ",".join(ident.scopes)
        return out

    def upstream_url(self, route: Route, target: Target, strip_query_key: bool) -> str:
        url = route.upstream_origin + route.upstream_path(target)
        query = target.query
        if strip_query_key and query and self._query_param:
            kept = [
                part for part in query.split("&") if unquote_plus(part.partition("=")[0]) != self._query_param
            ]
            query = "&".join(kept)
        return url + ("?" + query if query else "")

    async def forward(
        self,
        request: web.BaseRequest,
        route: Route,
        target: Target,
        headers: CIMultiDict[str],
        strip_query_key: bool,
    ) -> tuple[web.StreamResponse, int]:
        """Send the request upstream and stream the answer back; returns (response, upstream status).

        Raises UpstreamFailure when nothing has been sent to the client yet.
        """
        session = self._session
        assert session is not None, "Forwarder.start() was not called"
        url = self.upstream_url(route, target, strip_query_key)
        data = request.content if request.body_exists else None
        try:
            upstream = await session.request(
                request.method,
                URL(url, encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
                compress=None,
                chunked=None,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as e:
            raise UpstreamFailure(errors.UPSTREAM_TIMEOUT, f"timeout: {e!r}") from None
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            raise UpstreamFailure(errors.UPSTREAM_UNREACHABLE, f"connection: {e!r}") from None
        except aiohttp.ClientResponseError as e:
            raise UpstreamFailure(errors.UPSTREAM_BAD_RESPONSE, f"bad response: {e.message}") from None
        except aiohttp.ClientPayloadError as e:
            # The client's own body failed while we were sending it.
            raise UpstreamFailure(errors.UPSTREAM_UNREACHABLE, f"payload: {e!r}") from None
        except aiohttp.ClientError as e:
            raise UpstreamFailure(errors.UPSTREAM_BAD_RESPONSE, f"client error: {e!r}") from None

        try:
            out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            drop = _connection_tokens(upstream.headers.getall("Connection", ()))
            for name, value in upstream.headers.items():
                low = name.lower()
                if low in HOP_BY_HOP or low in drop:
                    continue
                out.headers.add(name, value)
            await out.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await out.write(chunk)
            except (TimeoutError, aiohttp.ClientError) as e:
                # Headers are gone already: cut the connection so the client sees a truncated body
                # rather than a clean end.
                log.warning("upstream failed mid-response on route %s: %r", route.name, e)
                _abort(request)
                return out, upstream.status
            await out.write_eof()
            return out, upstream.status
        finally:
            upstream.release()


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
