"""Key and principal lifecycle: the policies, applied once for the admin API and the CLI.

Owns: key generation at creation and rotation, naming rules, lifetime policy, the key limit, and
telling the cache what changed after every committed write. Must not: speak HTTP or format output.

The store records each change's invalidation in the write's own transaction (the outbox every
instance reads), so telling the cache afterwards is the fast path only: if it fails, or the
process dies first, instances still learn of the change from the store.

Policies (``[policy]``): at most ``max_active_keys`` active keys per principal and project (1 gives
the "one key, rotate to replace it" model); ``default_lifetime`` applies when no expiry is asked
for; ``max_lifetime`` caps any expiry; names are unique per principal and project, at most 200
characters, and default to ``API Key name YYYYMMDDHHMMSS`` (UTC; `` (2)``, `` (3)``... when keys
are made within one second).

Characters (``gateway.text``): names, projects, scopes and metadata keys refuse control, format
(bidi, zero-width), separator and unassigned characters; projects and scopes also spaces and
commas. Names lose surrounding spaces and must keep at least one other character.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime

import msgspec

from gateway import keys, text
from gateway.clock import SYSTEM, Clock
from gateway.config import Config, durations, format_duration, parse_duration
from gateway.models import Invalidation, KeyRecord, NewKey, Principal, PrincipalKind
from gateway.store import KeyChanges, NameTaken, PrincipalChanges, Store

MAX_NAME = 200
MAX_TOKEN = 100  # projects and scopes
MAX_NAME_ATTEMPTS = 20  # generated names tried before a NameTaken is reported
Invalidate = Callable[[Invalidation], Awaitable[object]]


class PolicyError(ValueError):
    """A request breaks a policy; ``field`` names the offending input (HTTP 422)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class CreatedKey(msgspec.Struct, frozen=True):
    record: KeyRecord
    secret: str  # shown exactly once


def _check_name(name: str, field: str = "name") -> str:
    """A principal or key name (``gateway.text``: no control, format or unassigned characters),
    without surrounding spaces."""
    bad = text.refused_char(name)
    if bad is not None:
        raise PolicyError(field, f"must not contain {text.describe_char(bad)}")
    name = name.strip()
    if not name:
        raise PolicyError(field, "must not be empty")
    if len(name) > MAX_NAME:
        raise PolicyError(field, f"must be at most {MAX_NAME} characters")
    return name


def _is_token(value: str) -> bool:
    return 0 < len(value) <= MAX_TOKEN and all(map(text.is_token_char, value))


def check_scopes(scopes: Sequence[str], field: str) -> tuple[str, ...]:
    for s in scopes:
        if not _is_token(s):
            raise PolicyError(
                field,
                f"invalid scope {s!r} (1-{MAX_TOKEN} characters; no spaces, commas, control or "
                "invisible characters)",
            )
    return tuple(sorted(set(scopes)))


def check_project(project: str, field: str = "project") -> str:
    if not _is_token(project):
        raise PolicyError(
            field,
            f"must be 1-{MAX_TOKEN} characters without spaces, commas, control or invisible characters",
        )
    return project


def _check_grants(grants: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    out = {}
    for project, scopes in grants.items():
        # The field names the project, unless printing it could do harm (repr escapes it).
        field = f"grants.{project}" if project.isprintable() else "grants"
        if not _is_token(project):
            raise PolicyError(
                field,
                f"invalid project {project!r} (1-{MAX_TOKEN} characters; no spaces, commas, "
                "control or invisible characters)",
            )
        out[project] = check_scopes(scopes, field)
    return out


def check_metadata(metadata: Mapping[str, str], field: str = "metadata") -> dict[str, str]:
    """Metadata keys follow the name rule (values are free-form text)."""
    for key in metadata:
        bad = text.refused_char(key)
        if bad is not None:
            raise PolicyError(field, f"key {key!r} contains {text.describe_char(bad)}")
    return dict(metadata)


def _seconds(value: float | str, field: str) -> float:
    """A duration as the API takes it: seconds, or text such as ``"30d"`` (``parse_duration``)."""
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as e:
            raise PolicyError(field, str(e)) from None
    return value


def _check_granted(principal: Principal, project: str, scopes: Sequence[str] | None) -> None:
    """A key's scopes narrow its owner's grant: a scope outside it is refused, by name."""
    if scopes is None:
        return
    missing = sorted(set(scopes) - set(principal.grants.get(project, ())))
    if missing:
        raise PolicyError(
            "scopes", f"not granted to {principal.name} in project {project}: {', '.join(missing)}"
        )


def default_name(now: float) -> str:
    return "API Key name " + datetime.fromtimestamp(now, UTC).strftime("%Y%m%d%H%M%S")


class Lifecycle:
    def __init__(
        self,
        cfg: Config,
        secret: bytes,
        store: Store,
        invalidate: Invalidate | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self.cfg = cfg
        self.now = clock.time  # creation, expiry and revocation times are wall time (the store's)
        self._secret = secret
        self._fingerprint = keys.secret_fingerprint(secret)
        self.store = store
        self._invalidate = invalidate
        self.default_lifetime, self.max_lifetime, self.max_grace = durations(cfg.policy)

    async def _changed(self, change: Invalidation) -> None:
        """After a committed write: tell every instance at once (awaited, bounded by the Redis
        timeout). The store already holds the change's outbox row: this only makes it fast."""
        if self._invalidate is not None and change.seq:
            await self._invalidate(change)

    async def publish(self, change: Invalidation) -> None:
        """Tell every instance of a change committed outside these methods (limits, credits)."""
        await self._changed(change)

    def _expiry(
        self, now: float, expires_at: float | None, expires_in: float | str | None, field: str
    ) -> float | None:
        if expires_at is not None and expires_in is not None:
            raise PolicyError(field, "give expires_at or expires_in, not both")
        explicit = expires_at is not None
        if expires_in is not None:
            expires_in = _seconds(expires_in, field)
            if expires_in <= 0:
                raise PolicyError(field, "must be positive")
            # Any positive lifetime is accepted, however short (even one that rounds to now).
            expires_at = now + expires_in
        if expires_at is None and self.default_lifetime is not None:
            expires_at = now + self.default_lifetime
        if expires_at is not None:
            if explicit and expires_at <= now:
                raise PolicyError(field, "must be in the future")
            if self.max_lifetime is not None and expires_at - now > self.max_lifetime + 1:
                raise PolicyError(
                    field,
                    "exceeds the maximum key lifetime: policy.max_lifetime is "
                    f"{self.cfg.policy.max_lifetime}",
                )
        elif self.max_lifetime is not None:
            expires_at = now + self.max_lifetime
        return expires_at

    # -- principals ------------------------------------------------------------------------

    async def create_principal(
        self,
        name: str,
        *,
        kind: PrincipalKind = "user",
        grants: dict[str, Sequence[str]] | None = None,
        metadata: dict[str, str] | None = None,
        actor: str,
    ) -> Principal:
        name = _check_name(name)
        g = _check_grants(grants or {})
        return await self.store.create_principal(
            Principal(
                id=keys.generate_id("prn"),
                name=name,
                kind=kind,
                disabled=False,
                created_at=self.now(),
                grants=g,
                metadata=check_metadata(metadata or {}),
            ),
            actor,
        )

    async def update_principal(
        self,
        ref: str,
        *,
        grants: dict[str, Sequence[str]] | msgspec.UnsetType = msgspec.UNSET,
        disabled: bool | msgspec.UnsetType = msgspec.UNSET,
        metadata: dict[str, str] | msgspec.UnsetType = msgspec.UNSET,
        actor: str,
    ) -> Principal:
        checked: dict[str, tuple[str, ...]] | msgspec.UnsetType = msgspec.UNSET
        if not isinstance(grants, msgspec.UnsetType):
            checked = _check_grants(grants)
        if not isinstance(metadata, msgspec.UnsetType):
            metadata = check_metadata(metadata)
        principal, change = await self.store.update_principal(
            ref, PrincipalChanges(grants=checked, disabled=disabled, metadata=metadata), actor
        )
        await self._changed(change)
        return principal

    async def delete_principal(self, ref: str, *, with_keys: bool, actor: str) -> None:
        await self._changed(await self.store.delete_principal(ref, actor, with_keys=with_keys))

    # -- keys ------------------------------------------------------------------------------

    async def create_key(
        self,
        owner: str,
        project: str,
        *,
        name: str | None = None,
        scopes: Sequence[str] | None = None,
        expires_at: float | None = None,
        expires_in: float | str | None = None,
        env: str | None = None,
        metadata: dict[str, str] | None = None,
        actor: str,
    ) -> CreatedKey:
        now = self.now()
        project = check_project(project)
        env = env or self.cfg.keys.default_env
        if env not in keys.ENVIRONMENTS:
            raise PolicyError("env", "must be live or test")
        named = name is not None
        name = _check_name(name) if name is not None else default_name(now)
        narrowed = None if scopes is None else check_scopes(scopes, "scopes")
        metadata = check_metadata(metadata or {})
        expiry = self._expiry(
            now, expires_at, expires_in, "expires_at" if expires_at is not None else "expires_in"
        )
        principal = await self.store.get_principal(owner)
        _check_granted(principal, project, narrowed)
        secret = keys.generate_key(self.cfg.keys.prefix, env)
        new = NewKey(
            id=keys.generate_id("key"),
            digest=keys.digest(self._secret, secret),
            name=name,
            start=keys.display_start(secret),
            env=env,
            principal_id=principal.id,
            project=project,
            scopes=narrowed,
            created_at=now,
            expires_at=expiry,
            metadata=metadata or {},
            digest_secret=self._fingerprint,
        )
        # A generated name is unique to the second; keys made within one second get " (2)", ...
        attempt = 1
        while True:
            try:
                record = await self.store.create_key(
                    new, max_active=self.cfg.policy.max_active_keys, actor=actor
                )
                return CreatedKey(record, secret)
            except NameTaken:
                attempt += 1
                if named or attempt > MAX_NAME_ATTEMPTS:
                    raise
                new = msgspec.structs.replace(new, name=f"{default_name(now)} ({attempt})")

    async def update_key(
        self,
        key_id: str,
        *,
        name: str | msgspec.UnsetType = msgspec.UNSET,
        expires_at: float | msgspec.UnsetType | None = msgspec.UNSET,
        expires_in: float | str | msgspec.UnsetType = msgspec.UNSET,
        scopes: Sequence[str] | msgspec.UnsetType | None = msgspec.UNSET,
        metadata: dict[str, str] | msgspec.UnsetType = msgspec.UNSET,
        actor: str,
    ) -> KeyRecord:
        now = self.now()
        expire_now, field = False, "expires_at"
        if not isinstance(expires_in, msgspec.UnsetType):
            field = "expires_in"
            if not isinstance(expires_at, msgspec.UnsetType):
                raise PolicyError("expires_in", "give expires_at or expires_in, not both")
            seconds = _seconds(expires_in, "expires_in")
            if seconds < 0:
                raise PolicyError("expires_in", "must not be negative")
            # 0 expires the key now; any positive time is accepted, however short.
            expires_at, expire_now = now + seconds, seconds == 0
        if expire_now:
            pass  # at once: neither in the future nor beyond any lifetime
        elif isinstance(expires_at, float | int) and not isinstance(expires_at, bool):
            if expires_at <= now and field == "expires_at":
                raise PolicyError(field, "must be in the future")
            if self.max_lifetime is not None:
                created = (await self.store.get_key(key_id)).created_at
                if expires_at - created > self.max_lifetime + 1:
                    raise PolicyError(
                        field,
                        "exceeds the maximum key lifetime: policy.max_lifetime is "
                        f"{self.cfg.policy.max_lifetime}",
                    )
        elif expires_at is None and self.max_lifetime is not None:
            raise PolicyError("expires_at", "cannot be cleared: keys must expire (policy.max_lifetime)")
        if not isinstance(scopes, msgspec.UnsetType) and scopes is not None:
            scopes = check_scopes(scopes, "scopes")
            current = await self.store.get_key(key_id)
            _check_granted(await self.store.get_principal(current.principal_id), current.project, scopes)
        changes = KeyChanges(
            name=name if isinstance(name, msgspec.UnsetType) else _check_name(name),
            expires_at=expires_at,
            scopes=scopes
            if isinstance(scopes, msgspec.UnsetType) or scopes is None
            else check_scopes(scopes, "scopes"),
            metadata=metadata if isinstance(metadata, msgspec.UnsetType) else check_metadata(metadata),
        )
        record, change = await self.store.update_key(
            key_id, changes, actor, max_active=self.cfg.policy.max_active_keys, now=now
        )
        await self._changed(change)
        return record

    async def revoke_key(self, key_id: str, *, actor: str) -> KeyRecord:
        record, change = await self.store.revoke_key(key_id, actor, self.now())
        await self._changed(change)
        return record

    async def delete_key(self, key_id: str, *, actor: str) -> None:
        await self._changed(await self.store.delete_key(key_id, actor))

    async def rotate_key(self, key_id: str, *, grace: float = 0.0, actor: str) -> CreatedKey:
        if grace < 0:
            raise PolicyError("grace_seconds", "must not be negative")
        if grace > self.max_grace:
            raise PolicyError(
                "grace_seconds",
                f"{format_duration(grace)} is longer than allowed: policy.max_rotation_grace is "
                f"{self.cfg.policy.max_rotation_grace or '0s'}",
            )
        now = self.now()
        current = await self.store.get_key(key_id)
        secret = keys.generate_key(self.cfg.keys.prefix, current.env)
        record, change = await self.store.rotate_key(
            key_id,
            digest=keys.digest(self._secret, secret),
            start=keys.display_start(secret),
            previous_valid_until=now + grace if grace > 0 else None,
            actor=actor,
            now=now,
            digest_secret=self._fingerprint,
        )
        await self._changed(change)
        return CreatedKey(record, secret)
