"""Authentication: which key a request presents, what it resolves to, and the 401/403 decision.

Owns: reading the key from the configured places, the format check, the digest, the cache lookup
and the scope check. Must not: forward requests or call the store (it only sees the cache front).

A keep-alive connection that presents the key it presented before skips the format check and the
hashing (its digest is remembered on the connection, ``gateway.listener``); the cache lookup and
every check after it run on every request.

Precedence: ``Authorization: Bearer`` wins over ``X-API-Key`` when both are sent (a bearer token is
the stronger statement of who is calling); ``Authorization`` with another scheme is ignored and
passed to the upstream. Ambiguous credentials are refused with 400 before any route is chosen: two
``Authorization`` headers, a key header (or the key query parameter) sent twice.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from hashlib import sha256
from hmac import compare_digest
from time import monotonic
from typing import Final, Protocol

from multidict import CIMultiDictProxy, MultiMapping

from gateway.cache import MISS, IdentityCache
from gateway.config import Config
from gateway.keys import Digester, KeyDigest, KeyFormat
from gateway.models import IdentityRecord

OK: Final = "ok"
MISSING: Final = "missing"
INVALID: Final = "invalid"
EXPIRED: Final = "expired"
INSUFFICIENT_SCOPE: Final = "insufficient_scope"
UNAVAILABLE: Final = "unavailable"


class Presented:
    """Where the key came from, so the forwarder strips exactly that."""

    __slots__ = ("from_bearer", "key")

    def __init__(self, key: str | None, from_bearer: bool) -> None:
        self.key = key
        self.from_bearer = from_bearer


# Credentials that cannot be read one way only (see ``Authenticator.presented``).
AMBIGUOUS: Final = Presented("", False)


class KeyMemory(Protocol):
    """Where a connection remembers its last well-formed key (``gateway.listener``)."""

    key_seen: str
    key_digest: KeyDigest
    key_by: object


class Authenticator:
    def __init__(self, cfg: Config, secret: bytes, cache: IdentityCache) -> None:
        self._headers = tuple(cfg.proxy.key_headers)
        self._bearer = cfg.proxy.bearer
        self._query = cfg.proxy.query_param
        self._format = KeyFormat(cfg.keys.prefix)
        self._hmac = Digester(secret)
        # SHA-256 of a key -> its HMAC digest. Even with its pads precomputed (keys.Digester) the
        # keyed digest costs two compressions and two state copies (~0.6 us), a plain one ~0.3 us;
        # the mapping never changes while the secret stays, so it needs no invalidation. Bounded
        # like the in-process cache, oldest first out (O(1) with an OrderedDict); raw keys are
        # never kept.
        self._memo: OrderedDict[bytes, KeyDigest] = OrderedDict()
        self._memo_max = cfg.cache.local_max_entries
        self.cache = cache
        self._local_get = cache.local.get

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

        A decision is the identity itself when the key may pass (a route needing ``scopes``), else
        an ``(outcome, identity)`` refusal: returning the record bare saves every accepted request
        a tuple and an unpacking.

        ``conn``: the client connection's memory. When the key equals (constant-time compare) the
        last well-formed key this authenticator checked on it, its digest is reused: no format
        check, no hashing. The digest is still looked up below on every request."""
        if key is None:
            return _REFUSED_MISSING
        if conn is not None and conn.key_by is self and key.isascii() and compare_digest(key, conn.key_seen):
            d = conn.key_digest
        else:
            raw = self._format.checked(key)
            if raw is None:
                return _REFUSED_INVALID
            # Inlined _digest, cache.peek and decide: this is every authenticated request's path.
            d = self._memo.get(sha256(raw).digest()) or self._digest(raw)
            if conn is not None:
                conn.key_seen, conn.key_digest, conn.key_by = key, d, self
        ident = self._local_get(d, monotonic())
        if ident is MISS:
            return d
        if ident is None:
            return _REFUSED_INVALID
        if ident.expires_at is not None and time.time() >= ident.expires_at:
            return _expired(ident)
        if not ident.member or (scopes and not scopes.issubset(ident.scopes)):
            return INSUFFICIENT_SCOPE, ident
        return ident

    def known_valid(self, key: str | None) -> bool:
        """True when the in-process tier already holds ``key`` as a key that may pass (its
        project's grant aside): no lookup, no await."""
        known = self.check(key)
        return isinstance(known, IdentityRecord) or (
            isinstance(known, tuple) and known[0] == INSUFFICIENT_SCOPE
        )

    async def identify(self, key: str | None) -> tuple[str, IdentityRecord | None]:
        """(outcome, identity), scopes not checked. Never raises: a failed lookup is
        ``UNAVAILABLE``, never "unknown"."""
        known = self.check(key)
        if isinstance(known, bytes):
            known = await self.resolve(known)
        if isinstance(known, IdentityRecord):
            return OK, known
        if known[0] == INSUFFICIENT_SCOPE:  # a known key outside its project: still a valid key
            return OK, known[1]
        return known

    async def resolve(self, d: KeyDigest, scopes: frozenset[str] = frozenset()) -> Decision:
        """The decision for a digest the in-process tier did not answer."""
        try:
            ident = await self.cache.resolve(d)
        except Exception:
            return UNAVAILABLE, None
        return decide(ident, scopes)


# A key may pass (its identity), or is refused (outcome, identity if the key is known).
Decision = IdentityRecord | tuple[str, IdentityRecord | None]
_REFUSED_MISSING: Final = (MISSING, None)
_REFUSED_INVALID: Final = (INVALID, None)


def decide(ident: object, scopes: frozenset[str] = frozenset()) -> Decision:
    """The decision for what a tier answered: unknown, expired, outside the scopes, or valid."""
    if ident is None:
        return INVALID, None
    assert isinstance(ident, IdentityRecord)
    if ident.expires_at is not None and time.time() >= ident.expires_at:
        return _expired(ident)
    if not ident.member or (scopes and not scopes.issubset(ident.scopes)):
        return INSUFFICIENT_SCOPE, ident
    return ident


def _expired(ident: IdentityRecord) -> Decision:
    """A key past its expiry is told so, but a rotated-out secret past its grace is refused like
    an unknown key: "expired" would confirm that it once was a real secret."""
    if ident.grace_until is not None and time.time() >= ident.grace_until:
        return _REFUSED_INVALID
    return EXPIRED, ident


def permits_scopes(ident: IdentityRecord, required: Iterable[str]) -> bool:
    """A key needs a grant in its project and every required scope (403 otherwise)."""
    return ident.member and set(required).issubset(ident.scopes)
