"""The route table: which upstream serves a request and what it requires.

Owns: compiling ``[[routes]]`` once into immutable matchers and picking the most specific match.
Must not: know about keys, the store or HTTP clients.

Specificity: the longest matching path prefix wins (whole segments: ``/api`` matches ``/api`` and
``/api/x`` but not ``/apix``); on a tie a route naming the host beats one that does not, then one
naming methods beats one that does not, then the earlier route in the file.

Case: prefixes match exactly by default. ``case_insensitive`` (``proxy.case_insensitive_routes``)
matches them without regard to case, for upstreams that read paths so: otherwise ``/ADMIN/x`` would
take a catch-all route while such an upstream serves it as ``/admin/x``. Only matching changes; the
path is forwarded as sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.config import RouteConfig
from gateway.limits.policy import Policy, check_policy
from gateway.paths import Target


@dataclass(frozen=True, slots=True)
class Route:
    index: int
    name: str  # for logs and metrics: the configured prefix
    segments: tuple[str, ...]
    methods: frozenset[str]
    host: str  # "" any, "api.example.com" exact, "*.example.com" any subdomain
    auth: str
    scopes: frozenset[str]
    strip_prefix: bool
    preserve_host: bool
    upstream_origin: str  # scheme://host:port
    upstream_host: str  # Host header value for the upstream
    upstream_base: str  # path prefix on the upstream, "" or "/v1"
    limits: tuple[Policy, ...] = ()  # applied per key on this route
    cost: int = 1  # credits a request spends

    def upstream_path(self, target: Target) -> str:
        path = target.forward_path(len(self.segments) if self.strip_prefix else 0)
        if not self.upstream_base:
            return path
        return self.upstream_base + (path if path != "/" else "/")

    def _host_ok(self, host: str) -> bool:
        if not self.host:
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host


def _compile(i: int, rc: RouteConfig, fold: bool) -> Route:
    u = urlsplit(rc.upstream)
    port = u.port or (443 if u.scheme == "https" else 80)
    default = (u.scheme == "http" and port == 80) or (u.scheme == "https" and port == 443)
    hostname = u.hostname or ""
    host_hdr = f"[{hostname}]" if ":" in hostname else hostname
    if not default:
        host_hdr += f":{port}"
    return Route(
        index=i,
        name=rc.prefix,
        segments=tuple(s.lower() if fold else s for s in rc.prefix.split("/") if s),
        methods=frozenset(m.upper() for m in rc.methods),
        host=rc.host.lower(),
        auth=rc.auth,
        scopes=frozenset(rc.scopes),
        strip_prefix=rc.strip_prefix,
        preserve_host=rc.preserve_host,
        upstream_origin=f"{u.scheme}://{host_hdr}",
        upstream_host=host_hdr,
        upstream_base=u.path.rstrip("/"),
        limits=tuple(check_policy(lim.name, lim.limit, lim.window) for lim in rc.limits),
        cost=rc.cost,
    )


class RouteTable:
    def __init__(self, routes: tuple[RouteConfig, ...], case_insensitive: bool = False) -> None:
        self._fold = case_insensitive
        compiled = [_compile(i, rc, case_insensitive) for i, rc in enumerate(routes)]
        # Most specific first; the match is the first that accepts the request.
        self._routes = sorted(compiled, key=lambda r: (-len(r.segments), not r.host, not r.methods, r.index))
        # Candidates by the first path segment, in the order above: a request only tries the
        # routes that can match its path (then the catch-all ones, which come last anyway).
        self._root = tuple(r for r in self._routes if not r.segments)
        by_first: dict[str, list[Route]] = {}
        for r in self._routes:
            if r.segments:
                by_first.setdefault(r.segments[0], []).append(r)
        self._by_first = {first: (*rs, *self._root) for first, rs in by_first.items()}

    def __len__(self) -> int:
        return len(self._routes)

    def match(self, method: str, host: str, target: Target) -> Route | None:
        segs = target.segments
        if self._fold:
            segs = [s.lower() for s in segs]
        candidates = self._by_first.get(segs[0], self._root) if segs else self._root
        hostname = None
        for r in candidates:
            n = len(r.segments)
            # n == 1: the first segment already matched.
            if n > 1 and (n > len(segs) or tuple(segs[:n]) != r.segments):
                continue
            if r.methods and method not in r.methods:
                continue
            if r.host:
                if hostname is None:
                    hostname = _hostname(host)
                if not r._host_ok(hostname):
                    continue
            return r
        return None


def _hostname(host: str) -> str:
    host = host.lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
