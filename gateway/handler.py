"""The proxy listener's request pipeline: sanity checks, route, authenticate, forward, log.

Owns: the order of decisions for one request and turning outcomes into responses. Must not: parse
keys, query the store or speak to upstreams itself; it calls ``auth``, ``routing`` and ``proxy``.
A request refused here never reaches an upstream.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
from aiohttp import HttpVersion10, HttpVersion11, web

from gateway import auth, errors
from gateway.auth import Authenticator
from gateway.clock import SYSTEM, Clock
from gateway.config import Config
from gateway.limits.gate import LimitGate
from gateway.listener import key_memory
from gateway.models import IdentityRecord, IdentityView
from gateway.observability import AccessLog, Metrics
from gateway.paths import BadPath, parse_target
from gateway.proxy import Forwarder, UpstreamFailure
from gateway.routing import RouteTable
from gateway.throttle import FailureThrottle
from gateway.usage import UsageRecorder
from gateway.wire import Answer

log = logging.getLogger("keystile.proxy")

_OUTCOME_ERRORS: Final = {
    auth.MISSING: errors.MISSING_KEY,
    auth.INVALID: errors.INVALID_KEY,
    auth.EXPIRED: errors.EXPIRED_KEY,
    auth.UNAVAILABLE: errors.AUTH_UNAVAILABLE,
    auth.INSUFFICIENT_SCOPE: errors.INSUFFICIENT_SCOPE,
}


# Refusals that count towards the failed-key throttle: a key was presented and it is not (or no
# longer) valid. Malformed keys count too (they are answered invalid_api_key alike); a missing key,
# a valid key without the scopes and 503s never do.
_THROTTLE_COUNTS: Final = frozenset((auth.INVALID, auth.EXPIRED))
THROTTLED: Final = "throttled"

_whoami_enc = msgspec.json.Encoder()
# The last use of a key: unflushed in memory, else stored (None when unknown or unavailable).
LastUsed = Callable[[str], Awaitable[float | None]]


class _Seen:
    """What one request revealed, for the access log and counters."""

    __slots__ = ("ident", "outcome", "route", "upstream_ms", "upstream_status")

    def __init__(self) -> None:
        self.route = "-"
        self.outcome: str | None = None
        self.ident: IdentityRecord | None = None
        self.upstream_status: int | None = None
        self.upstream_ms: float | None = None


class ProxyHandler:
    """Callable handed to aiohttp's low-level ``web.Server``; one instance per config generation."""

    def __init__(
        self,
        cfg: Config,
        routes: RouteTable,
        authenticator: Authenticator,
        forwarder: Forwarder,
        usage: UsageRecorder,
        metrics: Metrics,
        last_used: LastUsed | None = None,
        access_log: AccessLog | None = None,
        throttle: FailureThrottle | None = None,
        limits: LimitGate | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self.cfg = cfg
        self._wall = clock.time  # a use's time, as the store keeps it
        self.routes = routes
        self.auth = authenticator
        self.forwarder = forwarder
        self.usage = usage
        self._last_used = last_used
        self.metrics = metrics
        self._whoami = cfg.proxy.whoami_path
        self._query_keys = bool(cfg.proxy.query_param)
        self._path_params = cfg.proxy.allow_path_parameters
        self._log_access = cfg.logging.access_log
        self.access_log = access_log or AccessLog()
        self._sample = cfg.logging.access_sample
        # Shared across reloads (the Gateway owns it), so a reload lifts no block.
        self.throttle = throttle or FailureThrottle(cfg.throttle, cfg.proxy.trusted_proxies)
        self._blocked = self.throttle.blocked  # tested for emptiness on every keyed request
        self.limits = limits

    async def __call__(self, request: web.BaseRequest) -> Answer:
        started = time.perf_counter()
        seen = _Seen()
        resp = await self._handle(request, seen)
        self.metrics.request(
            seen.route,
            resp.status,
            seen.outcome,
            time.perf_counter() - started,
            None if seen.upstream_ms is None else seen.upstream_ms / 1000,
        )
        if self._log_access and (resp.status >= 400 or self._sample >= 1.0 or random.random() < self._sample):
            self._access(request, resp.status, started, seen)
        return resp

    async def _handle(self, request: web.BaseRequest, seen: _Seen) -> Answer:
        version = request.version
        if version != HttpVersion11 and version != HttpVersion10:
            # llhttp parses "HTTP/2.0" and "HTTP/0.9" request lines; neither is forwarded as 1.1.
            return errors.VERSION_NOT_SUPPORTED.closing()
        hosts = request.headers.getall("Host", ())
        if len(hosts) > 1:
            return errors.MULTIPLE_HOSTS.response()
        try:
            target = parse_target(request.raw_path, self._path_params)
        except BadPath as e:
            return errors.error_response(400, "bad_request", str(e))
        presented = self.auth.presented(request.headers, request.query if self._query_keys else None)
        if presented is auth.AMBIGUOUS:
            return errors.AMBIGUOUS_CREDENTIALS.response()

        if target.path == self._whoami:
            seen.route = "whoami"
            if self._blocked and presented.key is not None and not self.auth.known_valid(presented.key):
                refused = self._throttled(request, seen)
                if refused is not None:
                    return refused
            seen.outcome, seen.ident = await self.auth.identify(presented.key)
            if seen.outcome != auth.OK or seen.ident is None:
                if seen.outcome in _THROTTLE_COUNTS:
                    self.throttle.failed(self.throttle.client(request.remote, request.headers))
                return _OUTCOME_ERRORS[seen.outcome].response()
            return await self._whoami_response(seen.ident)

        route = self.routes.match(request.method, hosts[0] if hosts else "", target)
        if route is None:
            return errors.NO_ROUTE.response()
        seen.route = route.name
        ident = None
        extra = b""  # header lines Keystile adds to the answer (the RateLimit fields)
        if route.auth != "none" and not (route.auth == "optional" and presented.key is None):
            # No await on an in-process answer.
            known = self.auth.check(presented.key, route.scopes, key_memory(request))
            if not isinstance(known, IdentityRecord):
                # A blocked client gets no lookup and no verdict on its key. A key this process
                # already holds as valid still passes: it costs nothing, and one client failing
                # behind a shared address (NAT, an egress proxy) does not lock out the working
                # keys of the others.
                if self._blocked and presented.key is not None:
                    refused = self._throttled(request, seen)
                    if refused is not None:
                        return refused
                if isinstance(known, bytes):
                    known = await self.auth.resolve(known, route.scopes)
            if not isinstance(known, IdentityRecord):
                seen.outcome, seen.ident = known
                if known[0] in _THROTTLE_COUNTS:
                    self.throttle.failed(self.throttle.client(request.remote, request.headers))
                return _OUTCOME_ERRORS[known[0]].response()
            seen.outcome, seen.ident = auth.OK, known
            ident = known
            self.usage.bump(ident.key_id, self._wall())
            # After authentication: whatever the limiter's state, no invalid key passes here.
            if self.limits is not None and (
                route.limits or ident.limits or ident.pool_limits or ident.credits or ident.pool_credits
            ):
                admitted = self.limits.admit_now(route, ident)  # in-process: no await
                if admitted is None:
                    admitted = await self.limits.admit(route, ident)
                if not isinstance(admitted, bytes):  # the key passed: its auth outcome stays "ok"
                    return admitted
                extra = admitted
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        headers = self.forwarder.upstream_headers(request, route, presented.from_bearer)
        up_started = time.perf_counter()
        resp: Answer
        try:
            resp, seen.upstream_status = await self.forwarder.forward(
                request, route, target, headers, ident, strip_query_key=presented.key is not None, extra=extra
            )
        except UpstreamFailure as e:
            log.warning("upstream failure on route %s: %s", route.name, e)
            self.metrics.upstream_error(e.spec.code)
            resp = e.spec.response()
        seen.upstream_ms = (time.perf_counter() - up_started) * 1000
        return resp

    def _throttled(self, request: web.BaseRequest, seen: _Seen) -> Answer | None:
        """The 429 for a client the throttle has blocked, else None."""
        wait = self.throttle.retry_after(self.throttle.client(request.remote, request.headers))
        if not wait:
            return None
        seen.outcome = THROTTLED
        return errors.throttled(wait).response()

    async def _whoami_response(self, ident: IdentityRecord) -> Answer:
        last = None if self._last_used is None else await self._last_used(ident.key_id)
        return errors.json_answer(200, _whoami_enc.encode(IdentityView.of(ident, last)))

    def _access(self, request: web.BaseRequest, status: int, started: float, seen: _Seen) -> None:
        ident, upstream_ms = seen.ident, seen.upstream_ms
        fields = {
            "route": seen.route,
            "method": request.method,
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "client": request.remote,
            "key_id": ident.key_id if ident else None,
            "principal": ident.principal if ident else None,
            "upstream_status": seen.upstream_status,
            "upstream_ms": None if upstream_ms is None else round(upstream_ms, 3),
        }
        self.access_log.write(fields)
