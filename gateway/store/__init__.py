"""The primary store: the interface every backend implements, its errors, and ``open_store``.

Owns: the durable record of principals, grants, keys, usage and audit. Must not: import the cache,
aiohttp or the app. Every mutating call is one transaction that also writes its audit row, so a
failed call leaves nothing behind.

The invalidation outbox: a write that changes what keys resolve to also records, in the same
transaction, an ``Invalidation`` row (the digests it changed) and returns it. Rows get a ``seq``
that grows in commit order; every instance reads the rows after the last it saw
(``invalidations_since``) to learn of changes even when no message reached it, and old rows are
pruned (``prune_invalidations``).

Errors::

    StoreError
    ├── StoreUnavailable   the backend cannot be reached or timed out (HTTP 503)
    ├── SchemaMismatch     the database schema is newer than this code, or not migrated
    ├── NotFound           the named principal or key does not exist (404)
    └── Conflict           the change would break a rule (409)
        ├── NameTaken      a principal name, or a key name within principal+project, is in use
        ├── LimitExceeded  the principal already has the maximum of active keys in the project
        ├── HasKeys        a principal with keys cannot be deleted without ``with_keys``
        ├── KeyNotActive   only an active key can be rotated
        └── UnknownRole    a grant names a role its project does not define

Roles (``gateway.models.Role``) are named scope sets of a project; a grant names roles besides its
own scopes. Changing or deleting a role changes what every key of every principal holding it
resolves to: the write records all of their digests in the outbox, like a grant change.
Per-project policies (``ProjectPolicy``) change no key's identity and record no invalidation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import msgspec

from gateway.keys import KeyDigest
from gateway.limits.policy import Policy
from gateway.models import (
    AuditEvent,
    AuditSource,
    CreditState,
    IdentityRecord,
    Invalidation,
    KeyRecord,
    KeyStatus,
    NewKey,
    Principal,
    ProjectPolicy,
    Refill,
    Role,
    UsageUpdate,
)


class StoreError(Exception):
    code = "store_error"


class StoreUnavailable(StoreError):
    code = "store_unavailable"


class SchemaMismatch(StoreError):
    code = "schema_mismatch"


class NotFound(StoreError):
    code = "not_found"


class Conflict(StoreError):
    code = "conflict"


class NameTaken(Conflict):
    code = "name_taken"


class LimitExceeded(Conflict):
    code = "key_limit_reached"


class HasKeys(Conflict):
    code = "principal_has_keys"


class KeyNotActive(Conflict):
    code = "key_not_active"


class UnknownRole(Conflict):
    code = "unknown_role"


class KeyFilter(msgspec.Struct, frozen=True, kw_only=True):
    principal_id: str | None = None
    project: str | None = None
    status: KeyStatus | None = None
    q: str | None = None  # case-insensitive substring of the name
    limit: int = 50
    cursor: str | None = None


class KeyChanges(msgspec.Struct, frozen=True, kw_only=True):
    """Fields to change; ``UNSET`` leaves a field alone, ``None`` clears expiry or scopes."""

    name: str | msgspec.UnsetType = msgspec.UNSET
    expires_at: float | msgspec.UnsetType | None = msgspec.UNSET
    scopes: tuple[str, ...] | msgspec.UnsetType | None = msgspec.UNSET
    metadata: dict[str, str] | msgspec.UnsetType = msgspec.UNSET


class PrincipalChanges(msgspec.Struct, frozen=True, kw_only=True):
    """``grants`` replaces the scopes granted directly, ``roles`` the roles held (project ->
    names); a project named by either is one the principal is a member of."""

    grants: dict[str, tuple[str, ...]] | msgspec.UnsetType = msgspec.UNSET
    roles: dict[str, tuple[str, ...]] | msgspec.UnsetType = msgspec.UNSET
    disabled: bool | msgspec.UnsetType = msgspec.UNSET
    metadata: dict[str, str] | msgspec.UnsetType = msgspec.UNSET


class AuditFilter(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str | None = None
    principal_id: str | None = None
    source: AuditSource | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100
    cursor: str | None = None


class Page(msgspec.Struct, frozen=True):
    items: list[KeyRecord]
    next_cursor: str | None


class AuditPage(msgspec.Struct, frozen=True):
    items: list[AuditEvent]
    next_cursor: str | None


class Store(ABC):
    """A primary store. Methods raise the errors above; nothing else escapes."""

    backend: Literal["sqlite", "postgresql"]
    # Identity lookups worth having in flight at once. More than the store can serve in parallel
    # only splits the misses into smaller batches, each paying the fixed cost of a query.
    lookup_concurrency: int = 4

    @abstractmethod
    async def close(self) -> None: ...

    # schema
    @abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied."""

    @abstractmethod
    async def schema_version(self) -> int: ...

    async def check_schema(self) -> None:
        """Refuse a database that is not migrated or is newer than this code."""
        from gateway.store.migrations import latest_version

        current, latest = await self.schema_version(), latest_version(self.backend)
        if current > latest:
            raise SchemaMismatch(
                f"database schema is version {current}, newer than this Keystile ({latest}); upgrade Keystile"
            )
        if current < latest:
            raise SchemaMismatch(
                f"database schema is version {current}, this Keystile needs {latest}; run: keystile migrate"
            )

    async def ping(self) -> None:
        await self.schema_version()

    # the hot-path loader
    @abstractmethod
    async def find_identities(
        self, digests: Sequence[KeyDigest], now: float
    ) -> dict[KeyDigest, IdentityRecord]:
        """Resolve many digests in one query; unknown, revoked or disabled ones are absent."""

    async def find_identity(self, digest: KeyDigest, now: float) -> IdentityRecord | None:
        return (await self.find_identities([digest], now)).get(digest)

    # principals
    @abstractmethod
    async def create_principal(self, principal: Principal, actor: str) -> Principal: ...

    @abstractmethod
    async def get_principal(self, ref: str) -> Principal:
        """By id or by name."""

    @abstractmethod
    async def list_principals(self, limit: int, cursor: str | None) -> tuple[list[Principal], str | None]: ...

    @abstractmethod
    async def update_principal(
        self, ref: str, changes: PrincipalChanges, actor: str
    ) -> tuple[Principal, Invalidation]:
        """Returns the new principal and the recorded invalidation of its keys' digests."""

    @abstractmethod
    async def delete_principal(self, ref: str, actor: str, *, with_keys: bool) -> Invalidation: ...

    # keys
    @abstractmethod
    async def create_key(self, new: NewKey, *, max_active: int, actor: str) -> KeyRecord: ...

    @abstractmethod
    async def get_key(self, key_id: str) -> KeyRecord: ...

    @abstractmethod
    async def list_keys(self, flt: KeyFilter, now: float) -> Page: ...

    @abstractmethod
    async def update_key(
        self, key_id: str, changes: KeyChanges, actor: str, *, max_active: int, now: float
    ) -> tuple[KeyRecord, Invalidation]: ...

    @abstractmethod
    async def revoke_key(self, key_id: str, actor: str, now: float) -> tuple[KeyRecord, Invalidation]: ...

    @abstractmethod
    async def delete_key(self, key_id: str, actor: str) -> Invalidation: ...

    @abstractmethod
    async def rotate_key(
        self,
        key_id: str,
        *,
        digest: KeyDigest,
        start: str,
        previous_valid_until: float | None,
        actor: str,
        now: float,
        digest_secret: str | None = None,
    ) -> tuple[KeyRecord, Invalidation]:
        """Give the key a new secret; the old digest stays valid until ``previous_valid_until``."""

    # roles
    @abstractmethod
    async def list_roles(self, project: str) -> list[Role]:
        """The project's roles by name."""

    @abstractmethod
    async def get_role(self, project: str, name: str) -> Role: ...

    @abstractmethod
    async def put_role(self, role: Role, actor: str) -> tuple[Role, Invalidation]:
        """Create or replace a role; the invalidation names the keys of every principal holding it."""

    @abstractmethod
    async def delete_role(self, project: str, name: str, actor: str) -> Invalidation:
        """Delete a role and take it out of every grant naming it."""

    # per-project policies
    @abstractmethod
    async def get_project_policy(self, project: str) -> ProjectPolicy | None:
        """The project's stored policy values; None when it has none."""

    @abstractmethod
    async def put_project_policy(self, project: str, policy: ProjectPolicy, actor: str) -> ProjectPolicy: ...

    @abstractmethod
    async def delete_project_policy(self, project: str, actor: str) -> None:
        """Forget the project's stored values (NotFound when it has none)."""

    # usage and audit
    @abstractmethod
    async def record_usage(self, updates: Sequence[UsageUpdate]) -> None:
        """One statement: last_used_at only moves forward, counts add up."""

    @abstractmethod
    async def list_audit(self, flt: AuditFilter) -> AuditPage: ...

    # the hash secret (fingerprints only, see gateway.hash_secrets)
    @abstractmethod
    async def hash_secrets(self) -> list[str]:
        """The recorded fingerprints of hash secrets, oldest first (the last is the one keys are
        re-keyed to)."""

    @abstractmethod
    async def record_hash_secret(self, fingerprint: str, now: float) -> None:
        """Record ``fingerprint`` as the newest (nothing when already recorded). The first one
        recorded is also given to every key that has none (keys written before it existed)."""

    @abstractmethod
    async def rekey(
        self, key_id: str, old: KeyDigest, new: KeyDigest, fingerprint: str, *, previous: bool
    ) -> Invalidation:
        """Replace the key's digest ``old`` (its rotation-grace digest when ``previous``) by
        ``new``, made with the secret of ``fingerprint``, only while that is the newest recorded;
        records the outbox row of both digests. ``Invalidation(0, ())`` when nothing changed."""

    @abstractmethod
    async def keys_by_secret(self, now: float) -> dict[str | None, int]:
        """Usable keys (not revoked, not expired) by the fingerprint of their digest's secret."""

    # the invalidation outbox
    @abstractmethod
    async def latest_invalidation(self) -> int:
        """The seq of the newest recorded invalidation; 0 when none is kept."""

    @abstractmethod
    async def invalidations_since(self, seq: int, limit: int) -> list[Invalidation]:
        """At most ``limit`` recorded invalidations after ``seq``, oldest first (one indexed read)."""

    @abstractmethod
    async def recent_invalidations(self, since: float) -> list[Invalidation]:
        """The invalidations recorded at or after ``since`` (UNIX time), oldest first."""

    @abstractmethod
    async def prune_invalidations(self, before: float) -> int:
        """Delete the invalidations recorded before ``before``; returns how many."""

    # rate limits and credits (gateway.store.sql_limits)
    @abstractmethod
    async def set_key_limits(
        self, key_id: str, limits: Sequence[Policy], actor: str, now: float
    ) -> tuple[KeyRecord, Invalidation]: ...

    @abstractmethod
    async def set_principal_limits(
        self, ref: str, limits: Sequence[Policy], actor: str, now: float
    ) -> tuple[Principal, Invalidation]: ...

    @abstractmethod
    async def get_credits(self, owner: str) -> CreditState | None: ...

    @abstractmethod
    async def change_credits(
        self,
        owner: str,
        principal_id: str,
        *,
        remaining: int | None = None,
        add: int | None = None,
        refill: Refill | msgspec.UnsetType | None = msgspec.UNSET,
        remove: bool = False,
        actor: str,
        now: float,
        action: str = "credits.set",
    ) -> tuple[CreditState | None, Invalidation]: ...

    @abstractmethod
    async def spend_credits(self, spends: Sequence[tuple[str, int, int]]) -> None: ...

    @abstractmethod
    async def due_refills(self, now: float) -> list[tuple[str, str]]: ...

    @abstractmethod
    async def refill_credits(
        self, owner: str, principal_id: str, now: float
    ) -> tuple[CreditState, Invalidation] | None: ...


async def open_store(
    url: str, *, timeout: float = 5.0, pool_min: int = 2, pool_max: int = 10, create: bool = True
) -> Store:
    """Open the backend named by ``url`` (``sqlite:///path`` or ``postgresql://...``).

    ``create=False`` for every use but migrating: a SQLite file that does not exist is then
    ``StoreUnavailable`` naming its path, never a new empty database."""
    if url.startswith("sqlite:"):
        from gateway.store.sqlite import SQLiteStore

        return await SQLiteStore.open(url, timeout=timeout, create=create)
    if url.startswith(("postgresql:", "postgres:")):
        from gateway.store.postgres import PostgresStore

        return await PostgresStore.open(url, timeout=timeout, pool_min=pool_min, pool_max=pool_max)
    raise StoreError(f"unsupported store URL scheme: {url.split(':', 1)[0]!r}")
