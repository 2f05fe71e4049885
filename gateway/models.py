"""Record types shared by the store, the cache, auth, admin and the CLI.

Owns: plain data. Must not: do I/O or hold behaviour beyond small derived properties.
Times are UNIX seconds (float, UTC) everywhere inside Keystile; only the edges format them.
"""

from __future__ import annotations

from typing import Literal, Self

import msgspec

from gateway.limits.policy import Policy

KeyStatus = Literal["active", "expired", "revoked"]
PrincipalKind = Literal["user", "service"]
# Where an admin change came from, as the audit log records it.
AuditSource = Literal["api", "cli", "console"]
AUDIT_SOURCES: tuple[AuditSource, ...] = ("api", "cli", "console")


class Actor(str):
    """Who makes a change (a token id, ``cli``, a signed-in principal) and through what.

    A ``str`` carrying its ``source``, so every call that takes an actor's name takes an ``Actor``
    as well and the store's audit row records both; a plain ``str`` counts as source ``api``.
    """

    source: AuditSource

    def __new__(cls, name: str, source: AuditSource = "api") -> Actor:
        self = super().__new__(cls, name)
        self.source = source
        return self


def source_of(actor: str) -> AuditSource:
    return actor.source if isinstance(actor, Actor) else "api"


class IdentityRecord(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What the hot path needs to know about a key, resolved from its digest.

    Cached in-process and in Redis (msgpack, array-like for size and decode speed). ``scopes`` are
    the effective scopes: the principal's grant in the project, narrowed by the key's own scopes.
    ``expires_at`` already accounts for a rotation grace period. ``gc=False``: it holds only
    strings, numbers and a tuple of strings, so it can never be part of a reference cycle, and a
    cache of many of them adds nothing to the collector's full passes.
    """

    key_id: str
    digest: bytes
    start: str
    principal_id: str
    principal: str
    project: str
    scopes: tuple[str, ...]
    expires_at: float | None
    env: str
    # False when the principal holds no grant in the key's project: the key is known but may
    # reach nothing that needs an identity (403, not 401).
    member: bool = True
    # Set only on the identity of a rotated-out secret: the end of its grace. From then on the old
    # secret is answered exactly like an unknown key, also while this record is still cached.
    grace_until: float | None = None
    # The principal's roles in the key's project (their scopes are already in ``scopes``).
    roles: tuple[str, ...] = ()
    # Rate limits of the key itself and of its principal's pool (shared by all its keys).
    limits: tuple[Policy, ...] = ()
    pool_limits: tuple[Policy, ...] = ()
    # Credit epochs (0: no credits): the key's own and its principal's. A "set" starts a new
    # epoch, so a counter is named by owner and epoch (see gateway.limits.credits).
    credits: int = 0
    pool_credits: int = 0

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class IdentityView(msgspec.Struct, frozen=True, kw_only=True):
    """What a valid key acts as, as whoami and verify show it: never the secret or digest."""

    key_id: str
    start: str
    principal: str
    principal_id: str
    project: str
    scopes: list[str]
    env: str
    expires_at: float | None
    last_used_at: float | None = None
    roles: list[str] = []

    @classmethod
    def of(cls, ident: IdentityRecord, last_used_at: float | None) -> Self:
        return cls(
            key_id=ident.key_id,
            start=ident.start + "…",
            principal=ident.principal,
            principal_id=ident.principal_id,
            project=ident.project,
            scopes=list(ident.scopes),
            env=ident.env,
            expires_at=ident.expires_at,
            last_used_at=last_used_at,
            roles=list(ident.roles),
        )


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    kind: PrincipalKind
    disabled: bool
    created_at: float
    grants: dict[str, tuple[str, ...]]  # project -> scopes
    metadata: dict[str, str] = {}
    # project -> names of the project's roles the principal holds; a project here is always in
    # ``grants`` too (with the scopes granted directly, perhaps none).
    roles: dict[str, tuple[str, ...]] = {}
    limits: tuple[Policy, ...] = ()


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A key as the admin side sees it: never the secret, never the digest."""

    id: str
    name: str
    start: str
    env: str
    principal_id: str
    principal: str
    project: str
    scopes: tuple[str, ...] | None  # None: all of the principal's grant in the project
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None
    request_count: int
    metadata: dict[str, str] = {}
    # After a rotation with grace, the previous secret keeps working until this time.
    previous_valid_until: float | None = None
    limits: tuple[Policy, ...] = ()

    def status(self, now: float) -> KeyStatus:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


class NewKey(msgspec.Struct, frozen=True, kw_only=True):
    """Everything needed to insert a key; the secret itself is not part of it, only its digest."""

    id: str
    digest: bytes
    name: str
    start: str
    env: str
    principal_id: str
    project: str
    scopes: tuple[str, ...] | None
    created_at: float
    expires_at: float | None
    metadata: dict[str, str] = {}
    # Fingerprint of the hash secret ``digest`` was made with (gateway.keys.secret_fingerprint).
    digest_secret: str | None = None


class UsageUpdate(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A batched bump: the latest use seen and how many requests since the last flush.

    ``gc=False``: a string and two numbers can never form a cycle, and a flush makes one per key
    (tracked, 100k of them cost the collector more than building them)."""

    key_id: str
    last_used_at: float
    count: int


class AuditEvent(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    at: float
    actor: str
    action: str
    target_type: str
    target_id: str
    before: dict[str, object] | None
    after: dict[str, object] | None
    source: AuditSource = "api"


class Role(msgspec.Struct, frozen=True, kw_only=True):
    """A named set of scopes in one project; a grant naming it grants its scopes."""

    project: str
    name: str
    scopes: tuple[str, ...]
    description: str = ""
    created_at: float
    updated_at: float


class ProjectPolicy(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One project's own policy values, as stored; a field left ``UNSET`` falls back to the
    config (``[policy.projects.<name>]``, then ``[policy]``). Lifetimes in seconds, ``None``: no
    default / no maximum; a grace of 0 allows none."""

    max_active_keys: int | msgspec.UnsetType = msgspec.UNSET
    default_lifetime: float | msgspec.UnsetType | None = msgspec.UNSET
    max_lifetime: float | msgspec.UnsetType | None = msgspec.UNSET
    max_rotation_grace: float | msgspec.UnsetType = msgspec.UNSET


class Invalidation(msgspec.Struct, frozen=True):
    """What one committed admin write changed, as recorded in the store's invalidation outbox.

    ``seq`` is the outbox row's position: it grows in commit order, so a reader that has seen
    ``seq`` knows every row before it has committed too (0: no row, nothing changed). ``digests``
    are the key digests whose cached identities are now wrong; ``None`` means every key (a change
    too large to list)."""

    seq: int
    digests: tuple[bytes, ...] | None


class Refill(msgspec.Struct, frozen=True, kw_only=True):
    """A calendar refill of credits, in UTC: ``daily`` at midnight, or ``monthly`` at midnight
    starting day ``day`` (1-28). ``replace`` sets the balance to ``amount``; ``add`` adds it."""

    amount: int
    every: Literal["daily", "monthly"]
    mode: Literal["replace", "add"] = "replace"
    day: int = 1


class CreditState(msgspec.Struct, frozen=True, kw_only=True):
    """A key's or a principal's credits as the store holds them (spends are written in batches).

    ``epoch`` grows with every set and refill: counters of spending are named by owner and epoch,
    so spends counted against an older balance never reach a newer one."""

    owner: str
    principal_id: str
    remaining: int
    epoch: int
    refill: Refill | None
    next_refill_at: float | None
    updated_at: float
