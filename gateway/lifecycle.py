"""Key and principal lifecycle: the policies, applied once for the admin API and the CLI.

Owns: key generation at creation and rotation, naming rules, lifetime policy, the key limit, and
telling the cache what changed after every committed write. Must not: speak HTTP or format output.

The store records each change's invalidation in the write's own transaction (the outbox every
instance reads), so telling the cache afterwards is the fast path only: if it fails, or the
process dies first, instances still learn of the change from the store.

Policies (``[policy]``, per project ``[policy.projects.<name>]`` and the values stored for a project,
resolved by ``gateway.policies``; ``policy(project)`` is the one answer every caller gets): at most
``max_active_keys`` active keys per principal and project (1 gives the "one key, rotate to replace
it" model); ``default_lifetime`` applies when no expiry is asked for; ``max_lifetime`` caps any
expiry; ``max_rotation_grace`` caps a rotation's grace. Names are unique per principal and project,
at most 200 characters, and default to ``API Key name YYYYMMDDHHMMSS`` (UTC; `` (2)``, `` (3)``...
when keys are made within one second).

Roles: a role is a named set of scopes in a project (``put_role``); a principal's grant in a project
names roles besides scopes, and its keys act with the union of both (narrowed by a key's own
scopes). A role change reaches every key of every holder at once (the store's outbox, then the
cache).

Characters (``gateway.text``): names, projects, scopes, roles and metadata keys refuse control, format
(bidi, zero-width), separator and unassigned characters; projects and scopes also spaces and
commas. Names lose surrounding spaces and must keep at least one other character.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime

import msgspec

from gateway import keys, text
from gateway.clock import SYSTEM, Clock
from gateway.config import Config, format_duration, parse_duration
from gateway.models import (
    Invalidation,
    KeyRecord,
    NewKey,
    Principal,
    PrincipalKind,
    ProjectPolicy,
    Role,
)
from gateway.policies import EffectivePolicy, duration_text, resolve
from gateway.store import KeyChanges, NameTaken, NotFound, PrincipalChanges, Store

MAX_NAME = 200
MAX_TOKEN = 100  # projects and scopes
MAX_NAME_ATTEMPTS = 20  # generated names tried before a NameTaken is reported
MAX_GRACE = 86400  # the longest rotation grace any policy may allow
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


def check_role_name(name: str, field: str = "role") -> str:
    if not _is_token(name):
        raise PolicyError(
            field,
            f"invalid role name {name!r} (1-{MAX_TOKEN} characters; no spaces, commas, control or "
            "invisible characters)",
        )
    return name


def _check_grants(grants: Mapping[str, Sequence[str]], what: str = "grants") -> dict[str, tuple[str, ...]]:
    """Project -> scopes (or, with ``what="roles"``, role names), each checked."""
    out = {}
    for project, scopes in grants.items():
        # The field names the project, unless printing it could do harm (repr escapes it).
        field = f"{what}.{project}" if project.isprintable() else what
        if not _is_token(project):
            raise PolicyError(
                field,
                f"invalid project {project!r} (1-{MAX_TOKEN} characters; no spaces, commas, "
                "control or invisible characters)",
            )
        if what == "roles":
            out[project] = tuple(sorted({check_role_name(r, field) for r in scopes}))
        else:
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


def _limit_text(cfg: Config, pol: EffectivePolicy, field: str) -> str:
    """Which setting sets ``field`` in ``pol`` and its value, for refusals: ``policy.max_lifetime
    is 30d``, ``policy.projects.p1.max_lifetime is 7d`` or the value stored for the project."""
    source = pol.sources[field]
    if source == "config":
        return f"policy.{field} is {getattr(cfg.policy, field) or '0s'}"
    if source == "config.project":
        return f"policy.projects.{pol.project}.{field} is {getattr(cfg.policy.projects[pol.project], field)}"
    return f"the {field} stored for project {pol.project} is {duration_text(getattr(pol, field)) or '0s'}"


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

    async def _changed(self, change: Invalidation) -> None:
        """After a committed write: tell every instance at once (awaited, bounded by the Redis
        timeout). The store already holds the change's outbox row: this only makes it fast."""
        if self._invalidate is not None and change.seq:
            await self._invalidate(change)

    async def holds(self, principal: Principal, project: str) -> tuple[tuple[str, ...], frozenset[str]]:
        """What ``principal`` holds in ``project``: the roles it holds that exist, and its scopes
        granted directly or through them (as the keys' identities resolve them)."""
        held = principal.roles.get(project, ())
        defined = {r.name: r.scopes for r in await self.store.list_roles(project)} if held else {}
        roles = tuple(n for n in held if n in defined)
        return roles, frozenset({*principal.grants.get(project, ()), *(s for n in roles for s in defined[n])})

    async def _check_granted(self, principal: Principal, project: str, scopes: Sequence[str] | None) -> None:
        """A key's scopes narrow what its owner holds in the project (granted scopes and those of
        the roles it holds): a scope outside it is refused, by name."""
        if scopes is None:
            return
        _, allowed = await self.holds(principal, project)
        missing = sorted(set(scopes) - allowed)
        if missing:
            raise PolicyError(
                "scopes", f"not granted to {principal.name} in project {project}: {', '.join(missing)}"
            )

    async def publish(self, change: Invalidation) -> None:
        """Tell every instance of a change committed outside these methods (limits, credits)."""
        await self._changed(change)

    async def policy(self, project: str) -> EffectivePolicy:
        """The policy values that apply in ``project`` (``gateway.policies``): what the admin API,
        the CLI and the console enforce and show."""
        return resolve(self.cfg, project, await self.store.get_project_policy(project))

    def _expiry(
        self,
        now: float,
        expires_at: float | None,
        expires_in: float | str | None,
        field: str,
        pol: EffectivePolicy,
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
        if expires_at is None and pol.default_lifetime is not None:
            expires_at = now + pol.default_lifetime
        if expires_at is not None:
            if explicit and expires_at <= now:
                raise PolicyError(field, "must be in the future")
            if pol.max_lifetime is not None and expires_at - now > pol.max_lifetime + 1:
                raise PolicyError(
                    field, "exceeds the maximum key lifetime: " + _limit_text(self.cfg, pol, "max_lifetime")
                )
        elif pol.max_lifetime is not None:
            expires_at = now + pol.max_lifetime
        return expires_at

    # -- principals ------------------------------------------------------------------------

    async def create_principal(
        self,
        name: str,
        *,
        kind: PrincipalKind = "user",
        grants: dict[str, Sequence[str]] | None = None,
        metadata: dict[str, str] | None = None,
        roles: dict[str, Sequence[str]] | None = None,
        actor: str,
    ) -> Principal:
        name = _check_name(name)
        g = _check_grants(grants or {})
        held = await self._check_roles(roles or {})
        return await self.store.create_principal(
            Principal(
                id=keys.generate_id("prn"),
                name=name,
                kind=kind,
                disabled=False,
                created_at=self.now(),
                grants={**dict.fromkeys(held, ()), **g},
                metadata=check_metadata(metadata or {}),
                roles={p: r for p, r in held.items() if r},
            ),
            actor,
        )

    async def _check_roles(self, roles: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
        """Project -> role names, each a role its project defines (422 naming the project)."""
        held = _check_grants(roles, "roles")
        for project, names in held.items():
            defined = {r.name for r in await self.store.list_roles(project)}
            for n in names:
                if n not in defined:
                    field = f"roles.{project}" if project.isprintable() else "roles"
                    raise PolicyError(field, f"project {project!r} has no role {n!r}")
        return held

    async def update_principal(
        self,
        ref: str,
        *,
        grants: dict[str, Sequence[str]] | msgspec.UnsetType = msgspec.UNSET,
        disabled: bool | msgspec.UnsetType = msgspec.UNSET,
        metadata: dict[str, str] | msgspec.UnsetType = msgspec.UNSET,
        roles: dict[str, Sequence[str]] | msgspec.UnsetType = msgspec.UNSET,
        kind: PrincipalKind | msgspec.UnsetType = msgspec.UNSET,
        actor: str,
    ) -> Principal:
        checked: dict[str, tuple[str, ...]] | msgspec.UnsetType = msgspec.UNSET
        if not isinstance(grants, msgspec.UnsetType):
            checked = _check_grants(grants)
        held: dict[str, tuple[str, ...]] | msgspec.UnsetType = msgspec.UNSET
        if not isinstance(roles, msgspec.UnsetType):
            held = await self._check_roles(roles)
        if not isinstance(metadata, msgspec.UnsetType):
            metadata = check_metadata(metadata)
        principal, change = await self.store.update_principal(
            ref,
            PrincipalChanges(grants=checked, roles=held, disabled=disabled, metadata=metadata, kind=kind),
            actor,
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
        pol = await self.policy(project)
        expiry = self._expiry(
            now, expires_at, expires_in, "expires_at" if expires_at is not None else "expires_in", pol
        )
        principal = await self.store.get_principal(owner)
        await self._check_granted(principal, project, narrowed)
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
                record = await self.store.create_key(new, max_active=pol.max_active_keys, actor=actor)
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
        current = await self.store.get_key(key_id)
        pol = await self.policy(current.project)
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
            if pol.max_lifetime is not None and expires_at - current.created_at > pol.max_lifetime + 1:
                raise PolicyError(
                    field, "exceeds the maximum key lifetime: " + _limit_text(self.cfg, pol, "max_lifetime")
                )
        elif expires_at is None and pol.max_lifetime is not None:
            raise PolicyError(
                "expires_at",
                "cannot be cleared: keys must expire (" + _limit_text(self.cfg, pol, "max_lifetime") + ")",
            )
        if not isinstance(scopes, msgspec.UnsetType) and scopes is not None:
            scopes = check_scopes(scopes, "scopes")
            await self._check_granted(
                await self.store.get_principal(current.principal_id), current.project, scopes
            )
        changes = KeyChanges(
            name=name if isinstance(name, msgspec.UnsetType) else _check_name(name),
            expires_at=expires_at,
            scopes=scopes
            if isinstance(scopes, msgspec.UnsetType) or scopes is None
            else check_scopes(scopes, "scopes"),
            metadata=metadata if isinstance(metadata, msgspec.UnsetType) else check_metadata(metadata),
        )
        record, change = await self.store.update_key(
            key_id, changes, actor, max_active=pol.max_active_keys, now=now
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
        now = self.now()
        current = await self.store.get_key(key_id)
        pol = await self.policy(current.project)
        if grace > pol.max_rotation_grace:
            raise PolicyError(
                "grace_seconds",
                f"{format_duration(grace)} is longer than allowed: "
                + _limit_text(self.cfg, pol, "max_rotation_grace"),
            )
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

    # -- roles -----------------------------------------------------------------------------

    async def put_role(
        self, project: str, name: str, *, scopes: Sequence[str], description: str = "", actor: str
    ) -> Role:
        """Create or replace a role; every key of every principal holding it changes at once."""
        project = check_project(project)
        name = check_role_name(name)
        checked = check_scopes(scopes, "scopes")  # the description is free text, like metadata values
        now = self.now()
        try:
            created = (await self.store.get_role(project, name)).created_at
        except NotFound:
            created = now
        role, change = await self.store.put_role(
            Role(
                project=project,
                name=name,
                scopes=checked,
                description=description.strip(),
                created_at=created,
                updated_at=now,
            ),
            actor,
        )
        await self._changed(change)
        return role

    async def delete_role(self, project: str, name: str, *, actor: str) -> None:
        """Delete a role: every grant naming it loses it, every key of its holders changes."""
        await self._changed(await self.store.delete_role(project, name, actor))

    # -- per-project policies --------------------------------------------------------------

    async def set_project_policy(self, project: str, values: ProjectPolicy, *, actor: str) -> EffectivePolicy:
        """Store ``project``'s own policy values (replacing any before); UNSET fields fall back to
        the config. Refused (422, naming the field) when a value, or the result, breaks a rule."""
        project = check_project(project)
        if values.max_active_keys is not msgspec.UNSET and values.max_active_keys < 1:
            raise PolicyError("max_active_keys", "must be at least 1")
        for field in ("default_lifetime", "max_lifetime"):
            value = getattr(values, field)
            if isinstance(value, float | int) and value <= 0:
                raise PolicyError(field, "must be positive (null: no default / no maximum)")
        grace = values.max_rotation_grace
        if grace is not msgspec.UNSET and not 0 <= grace <= MAX_GRACE:
            raise PolicyError("max_rotation_grace", f"must be 0-{MAX_GRACE} seconds")
        result = resolve(self.cfg, project, values)
        default = values.default_lifetime
        longest = result.max_lifetime
        if isinstance(default, float | int) and longest is not None and default > longest:
            raise PolicyError(
                "default_lifetime",
                f"longer than the maximum lifetime that applies ({duration_text(result.max_lifetime)})",
            )
        await self.store.put_project_policy(project, values, actor)
        return result

    async def clear_project_policy(self, project: str, *, actor: str) -> EffectivePolicy:
        """Forget ``project``'s stored values: the config's apply again."""
        await self.store.delete_project_policy(check_project(project), actor)
        return resolve(self.cfg, project, None)
