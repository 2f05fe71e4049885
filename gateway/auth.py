"""Authentication: which key a request presents, what it resolves to, and the 401/403 decision.

Owns: reading the key from the configured places, the format check, the digest, the cache lookup,
and what a connection remembers of its key (``KeyMemory``). The decision itself (expiry, grace,
scopes) is ``gateway.decision``'s, which every path here ends in. Must not: forward requests, call
the store or reach past the cache's front (``IdentityCache``).

A keep-alive connection that presents the key it presented before skips the format check and the
hashing (its digest is in the connection's ``KeyMemory``, which ``gateway.listener`` gives every
proxy connection); the cache lookup and the decision run on every request.

Precedence: ``Authorization: Bearer`` wins over ``X-API-Key`` when both are sent (a bearer token is
the stronger statement of who is calling); ``Authorization`` with another scheme is ignored and
passed to the upstream. Ambiguous credentials are refused with 400 before any route is chosen: two
``Authorization`` headers, a key header (or the key query parameter) sent twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from hashlib import sha256
from hmac import compare_digest
from typing import Final

from multidict import CIMultiDictProxy, MultiMapping

from gateway.cache import MISS, IdentityCache
from gateway.clock import SYSTEM, Clock
from gateway.config import Config
from gateway.decision import (
    EXPIRED,
    INSUFFICIENT_SCOPE,
    INVALID,
    MISSING,
    OK,
    REFUSED_INVALID,
    REFUSED_MISSING,
    REFUSED_UNAVAILABLE,
    UNAVAILABLE,
    Decision,
    Outcome,
    decide,
    outcome,
    validity,
)
from gateway.keys import Digester, KeyDigest, KeyFormat

# Told of every in-process miss (its digest and key) during a hash-secret rotation: the store
# lookup then also tries the key's digests under the previous secrets (gateway.hash_secrets).
MissNote = Callable[[KeyDigest, str], None]

# The outcomes and the decision are gateway.decision's; they are named here too, where the
# callers of authentication (the handler, the admin API) look for them.
__all__ = [
    "AMBIGUOUS",
    "EXPIRED",
    "INSUFFICIENT_SCOPE",
    "INVALID",
    "MISSING",
    "OK",
    "UNAVAILABLE",
    "Authenticator",
    "Decision",
    "KeyMemory",
    "Outcome",
    "Presented",
    "decide",
]


class Presented:
    """Where the key came from, so the forwarder strips exactly that."""

    __slots__ = ("from_bearer", "key")

    def __init__(self, key: str | None, from_bearer: bool) -> None:
        self.key = key
        self.from_bearer = from_bearer


# Credentials that cannot be read one way only (see ``Authenticator.presented``).
AMBIGUOUS: Final = Presented("", False)


class KeyMemory:
    """What one client connection remembers of the last well-formed key presented on it: the key,
    its digest and the ``Authenticator`` that checked it (a reload builds a new one, whose secret
    may differ). Read and written only by ``Authenticator.check``; ``gateway.listener`` gives each
    proxy connection one, so it lives exactly as long as the connection."""

    __slots__ = ("by", "digest", "key")

    def __init__(self) -> None:
        self.key = ""
        self.digest: KeyDigest = b""
        self.by: object = None


class Authenticator:
    def __init__(
        self,
        cfg: Config,
        secret: bytes,
        cache: IdentityCache,
        clock: Clock = SYSTEM,
        on_miss: MissNote | None = None,
    ) -> None:
        self._headers = tuple(cfg.proxy.key_headers)
        self._bearer = cfg.proxy.bearer
        self._query = cfg.proxy.query_param
        self._format = KeyFormat(cfg.keys.prefix)
        self._hmac = Digester(secret)
        # SHA-256 of a key -> its HMAC digest. Even with its pads precomputed (keys.Digester) the
        # keyed digest costs two compressions and two state copies, a plain one half that; the
        # mapping never changes while the secret stays, so it needs no invalidation. Bounded
        # like the in-process cache, oldest first out (O(1) with an OrderedDict); raw keys are
        # never kept.
        self._memo: OrderedDict[bytes, KeyDigest] = OrderedDict()
        self._memo_max = cfg.cache.local_max_entries
        self.cache = cache
        self._peek = cache.peek
        self._now = clock.time  # expiry is wall time (the store's)
        # Set during a hash-secret rotation only; never called on a hit.
        self._on_miss = on_miss

    def presented(self, headers: CIMultiDictProxy[str], query: MultiMapping[str] | None) -> Presented:
        """The key a request carries, or ``Presented(None)``; ``""`` means "sent but unusable".

        ``AMBIGUOUS`` (answer 400) when it carries more than one ``Authorization`` header (a
        singleton field, RFC 9110 §11.6.2: which one an upstream reads is anyone's guess), or a key
        header or the query parameter more than once."""
        auth = headers.getall("Authorization", ())
        if auth:
            if len(auth) > 1:
                return AMBIGUOUS
            value = auth[0]
            # "Bearer", any case, then spaces or tabs (RFC 9110 says 1*SP; a tab is read the same
            # way rather than passing a key upstream as an unknown scheme).
            if self._bearer and len(value) > 6 and value[6] in " \t" and value[:6].lower() == "bearer":
                return Presented(value[7:].strip(), True)
        for name in self._headers:
            values = headers.getall(name, ())
            if len(values) == 1:
                return Presented(values[0].strip(), False)
            if values:
                return AMBIGUOUS
        if self._query and query is not None:
            values = query.getall(self._query, ())
            if values:
                return Presented(values[0], False) if len(values) == 1 else AMBIGUOUS
        return Presented(None, False)

    def _digest(self, raw: bytes) -> KeyDigest:
        short = sha256(raw).digest()
        d = self._memo.get(short)
        if d is None:
            d = self._hmac(raw)
            memo = self._memo
            if len(memo) >= self._memo_max:
                memo.popitem(last=False)
            memo[short] = d
        return d

    def check(
        self, key: str | None, scopes: frozenset[str] = frozenset(), conn: KeyMemory | None = None
    ) -> Decision | KeyDigest:
        """The decision when it is known without waiting (missing, malformed, or answered by the
        in-process tier), else the digest ``resolve`` must look up. No I/O, no await.

        ``conn``: the client connection's memory. When the key equals (constant-time compare) the
        last well-formed key this authenticator checked on it, its digest is reused: no format
        check, no hashing. The digest is still looked up below on every request."""
        if key is None:
            return REFUSED_MISSING
        if conn is not None and conn.by is self and key.isascii() and compare_digest(key, conn.key):
            d = conn.digest
        else:
            raw = self._format.checked(key)
            if raw is None:
                return REFUSED_INVALID
            # Inlined _digest: this is every authenticated request's path.
            d = self._memo.get(sha256(raw).digest()) or self._digest(raw)
            if conn is not None:
                conn.key, conn.digest, conn.by = key, d, self
        ident = self._peek(d)
        if ident is MISS:
            if self._on_miss is not None:
                self._on_miss(d, key)
            return d
        return decide(ident, scopes, self._now())

    async def resolve(self, d: KeyDigest, scopes: frozenset[str] = frozenset()) -> Decision:
        """The decision for a digest the in-process tier did not answer. Never raises: a failed
        lookup is ``UNAVAILABLE``, never "unknown"."""
        try:
            ident = await self.cache.resolve(d)
        except Exception:
            return REFUSED_UNAVAILABLE
        return decide(ident, scopes, self._now())

    async def decision(self, key: str | None, scopes: frozenset[str] = frozenset()) -> Decision:
        """The decision for ``key`` on a route needing ``scopes``, through every tier."""
        known = self.check(key, scopes)
        if isinstance(known, bytes):
            return await self.resolve(known, scopes)
        return known

    async def verify(self, key: str | None, scopes: Iterable[str]) -> Outcome:
        """The proxy's decision for a route needing ``scopes``, as ``(outcome, identity)``: ``OK``
        when the key may pass (the admin API's verify)."""
        return outcome(await self.decision(key, frozenset(scopes)))

    async def identify(self, key: str | None) -> Outcome:
        """Whether the key is valid, as ``(outcome, identity)``, its grant and scopes aside
        (whoami)."""
        return validity(await self.decision(key))

    def known_valid(self, key: str | None) -> bool:
        """True when the in-process tier already holds ``key`` as a valid key (its grant and
        scopes aside): no lookup, no await."""
        known = self.check(key)
        return not isinstance(known, bytes) and validity(known)[0] == OK
