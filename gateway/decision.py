"""The key decision: what a resolved identity allows, given the scopes a route needs and the time.

Owns: the outcomes (``OK``, ``MISSING``, ``INVALID``, ``EXPIRED``, ``INSUFFICIENT_SCOPE``,
``UNAVAILABLE``), the ``Decision`` type, and ``decide``: expiry, the end of a rotation grace, the
project grant and the scopes, written once. Every path decides through it: the proxy
(``Authenticator.check``/``resolve``), whoami and the throttle's "known valid" test
(``validity``), and the admin API's verify (``Authenticator.verify``). Must not: read a clock
(``now`` is passed in), look anything up or know about HTTP.
"""

from __future__ import annotations

from typing import Final

from gateway.models import IdentityRecord

OK: Final = "ok"
MISSING: Final = "missing"
INVALID: Final = "invalid"
EXPIRED: Final = "expired"
INSUFFICIENT_SCOPE: Final = "insufficient_scope"
UNAVAILABLE: Final = "unavailable"

# (outcome, the identity when the key is known)
Outcome = tuple[str, IdentityRecord | None]
# A key may pass (its identity itself: an accepted request builds no tuple), or is refused.
Decision = IdentityRecord | Outcome

REFUSED_MISSING: Final[Outcome] = (MISSING, None)
REFUSED_INVALID: Final[Outcome] = (INVALID, None)
REFUSED_UNAVAILABLE: Final[Outcome] = (UNAVAILABLE, None)


def decide(ident: IdentityRecord | None, scopes: frozenset[str], now: float) -> Decision:
    """The decision for what the cache answered (``None``: an unknown key) on a route needing
    ``scopes``, at wall time ``now``: unknown, expired, outside its grant or scopes, or valid.

    A key past its expiry is told so, but a rotated-out secret past its grace is refused like an
    unknown key: "expired" would confirm that it once was a real secret. A key needs a grant in
    its project (``member``) and every required scope (403 otherwise)."""
    if ident is None:
        return REFUSED_INVALID
    expires_at = ident.expires_at
    if expires_at is not None and now >= expires_at:
        grace_until = ident.grace_until
        if grace_until is not None and now >= grace_until:
            return REFUSED_INVALID
        return EXPIRED, ident
    if not ident.member or (scopes and not scopes.issubset(ident.scopes)):
        return INSUFFICIENT_SCOPE, ident
    return ident


def outcome(decision: Decision) -> Outcome:
    """A decision as ``(outcome, identity)``: ``(OK, identity)`` when the key may pass."""
    if isinstance(decision, IdentityRecord):
        return OK, decision
    return decision


def validity(decision: Decision) -> Outcome:
    """Whether the key itself is valid, its project grant and the scopes aside (whoami, the
    throttle): a known key refused only for its grant or scopes is ``(OK, identity)``."""
    if isinstance(decision, IdentityRecord):
        return OK, decision
    if decision[0] == INSUFFICIENT_SCOPE:
        return OK, decision[1]
    return decision
