"""The identities file of ``keystile export`` and ``keystile apply``: its shape, reading and writing.

Owns: ``State`` (principals by name, roles by project and name, stored per-project policies, key
metadata by key id: never a secret or a digest), ``read`` (TOML text -> ``State``, every problem
as one line naming the file and the field path, as config errors do), ``write`` (``State`` -> TOML
text that ``read`` turns back into the same ``State``) and ``state_of`` (the admin API's views ->
``State``). Must not: do I/O, reach the admin API or the store, or decide what changes (``state_plan``).

The file::

    [principals.alice]            # a principal, by name
    kind = "user"                 # or "service"
    disabled = false
    [principals.alice.grants]     # project -> scopes granted directly
    shop = ["orders:read"]
    [principals.alice.roles]      # project -> roles held
    shop = ["viewer"]
    [principals.alice.metadata]   # free-form strings

    [roles.shop.viewer]           # a role of project shop
    scopes = ["orders:read"]
    description = "reads orders"

    [policies.shop]               # project shop's own policy values; a field left out: the config's
    max_active_keys = 5
    default_lifetime = "30d"      # a duration, or "none"
    max_lifetime = "none"
    max_rotation_grace = "1h"

    [keys.key_123]                # an existing key, by id (apply never creates one)
    owner = "alice"
    project = "shop"
    name = "ci"
    scopes = ["orders:read"]      # left out: the owner's whole grant in the project
    expires_at = 1767225600.0     # UNIX seconds or an ISO 8601 time; left out: never expires
    status = "active"             # for information; apply ignores it
    [keys.key_123.metadata]
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from gateway.admin import access_schemas as a
from gateway.admin import schemas as s
from gateway.config import parse_duration
from gateway.lifecycle import (
    PolicyError,
    _check_name,
    check_metadata,
    check_project,
    check_role_name,
    check_scopes,
)
from gateway.models import KeyStatus, PrincipalKind

SECTIONS = ("principals", "roles", "policies", "keys")
POLICY_FIELDS = ("max_active_keys", "default_lifetime", "max_lifetime", "max_rotation_grace")
MAX_GRACE_SECONDS = a.MAX_GRACE_SECONDS


class StateError(Exception):
    """The file cannot be used; ``problems`` are ready-to-print lines, one per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# -- the state: what the file says and what the store holds, in one shape ---------------------


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    kind: PrincipalKind = "user"
    disabled: bool = False
    grants: dict[str, list[str]] = {}
    roles: dict[str, list[str]] = {}
    metadata: dict[str, str] = {}


class Role(msgspec.Struct, frozen=True, kw_only=True):
    scopes: list[str] = []
    description: str = ""


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """A project's stored values; UNSET: the config's; a lifetime of None: no default / maximum."""

    max_active_keys: int | UnsetType = UNSET
    default_lifetime: float | UnsetType | None = UNSET
    max_lifetime: float | UnsetType | None = UNSET
    max_rotation_grace: float | UnsetType = UNSET


class Key(msgspec.Struct, frozen=True, kw_only=True):
    owner: str
    project: str
    name: str
    scopes: list[str] | None = None
    expires_at: float | None = None
    metadata: dict[str, str] = {}
    status: KeyStatus | None = None  # information only


class State(msgspec.Struct, frozen=True, kw_only=True):
    principals: dict[str, Principal] = {}
    roles: dict[str, dict[str, Role]] = {}  # project -> name -> role
    policies: dict[str, Policy] = {}
    keys: dict[str, Key] = {}


# -- the file's own types: what a table may hold ----------------------------------------------


class _Entry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class _PrincipalEntry(_Entry, frozen=True, kw_only=True, forbid_unknown_fields=True):
    kind: PrincipalKind = "user"
    disabled: bool = False
    grants: s.Grants = {}
    roles: s.Roles = {}
    metadata: s.Metadata = {}


class _RoleEntry(_Entry, frozen=True, kw_only=True, forbid_unknown_fields=True):
    scopes: s.Scopes = []
    description: str = ""


Lifetime = float | str  # seconds, or a duration ("30d"), or "none"


class _PolicyEntry(_Entry, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_active_keys: int | UnsetType = UNSET
    default_lifetime: Lifetime | UnsetType = UNSET
    max_lifetime: Lifetime | UnsetType = UNSET
    max_rotation_grace: float | str | UnsetType = UNSET


class _KeyEntry(_Entry, frozen=True, kw_only=True, forbid_unknown_fields=True):
    owner: str
    project: str
    name: str
    scopes: s.Scopes | UnsetType = UNSET
    expires_at: float | str | UnsetType = UNSET
    metadata: s.Metadata = {}
    status: KeyStatus | UnsetType = UNSET


_REQUIRED: dict[type[_Entry], dict[str, str]] = {_KeyEntry: {"owner": "x", "project": "x", "name": "x"}}


def _field_problems(value: Any, typ: type[_Entry], where: str) -> list[str]:
    """Every problem of one table, field by field (msgspec stops at the first)."""
    if not isinstance(value, dict):
        return [f"{where}: expected a table"]
    placeholders = _REQUIRED.get(typ, {})
    out = [f"{where}.{f}: required field is missing" for f in placeholders if f not in value]
    for field, item in value.items():
        if field not in typ.__struct_fields__:
            out.append(f"{where}.{field}: unknown field")
            continue
        try:
            msgspec.convert({**placeholders, field: item}, typ)
        except msgspec.ValidationError as e:
            message, _, path = str(e).partition(" - at `$")
            path = path.rstrip("`").removeprefix("." + field).removeprefix(field)
            out.append(f"{where}.{field}{path}: {message[0].lower()}{message[1:]}")
    return out


def _entry(value: Any, typ: type[_Entry], where: str, problems: list[str]) -> Any:
    try:
        return msgspec.convert(value, typ)
    except msgspec.ValidationError:
        problems.extend(_field_problems(value, typ, where) or [f"{where}: invalid"])
        return None


def _check(problems: list[str], where: str, fn: Any, *args: Any) -> Any:
    """Run one of the lifecycle's rules; a refusal becomes a problem at ``where``."""
    try:
        return fn(*args)
    except PolicyError as e:
        problems.append(f"{where}: {e}")
        return None


def _seconds(value: float | str, where: str, problems: list[str], *, none: bool) -> float | None:
    if isinstance(value, str):
        if none and value.strip().lower() == "none":
            return None
        try:
            return parse_duration(value)
        except ValueError as e:
            problems.append(f"{where}: {e}" + (' (or "none")' if none else ""))
            return None
    return float(value)


def _time(value: float | str, where: str, problems: list[str]) -> float | None:
    if not isinstance(value, str):
        return float(value)
    try:
        t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        problems.append(f"{where}: expected UNIX seconds or an ISO 8601 time, got {value!r}")
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def _tables(data: dict[str, Any], section: str, problems: list[str]) -> dict[str, Any]:
    value = data.get(section, {})
    if not isinstance(value, dict):
        problems.append(f"{section}: expected a table of tables ([{section}.<name>])")
        return {}
    return value


def _grants(
    given: Mapping[str, list[str]], where: str, problems: list[str], role: bool = False
) -> dict[str, list[str]]:
    """Project -> scopes (or role names), each checked by the lifecycle's rule."""
    out = {}
    for project, names in given.items():
        here = f"{where}.{project}"
        if _check(problems, here, check_project, project, here) is None:
            continue
        if role:
            out[project] = sorted({n for n in names if _check(problems, here, check_role_name, n, here)})
        else:
            out[project] = list(_check(problems, here, check_scopes, names, here) or ())
    return out


def _principal(name: str, raw: Any, where: str, problems: list[str]) -> Principal | None:
    _check(problems, where, _check_name, name, where)
    e: _PrincipalEntry | None = _entry(raw, _PrincipalEntry, where, problems)
    if e is None:
        return None
    _check(problems, f"{where}.metadata", check_metadata, e.metadata, f"{where}.metadata")
    grants = _grants(e.grants, f"{where}.grants", problems)
    roles = _grants(e.roles, f"{where}.roles", problems, role=True)
    # A project whose roles are held is one the principal belongs to (as the store keeps it).
    grants = {**{project: [] for project in roles}, **grants}
    return Principal(
        kind=e.kind,
        disabled=e.disabled,
        grants=grants,
        roles={p: r for p, r in roles.items() if r},
        metadata=dict(e.metadata),
    )


def _policy(raw: Any, where: str, problems: list[str]) -> Policy | None:
    e: _PolicyEntry | None = _entry(raw, _PolicyEntry, where, problems)
    if e is None:
        return None
    values: dict[str, Any] = {}
    if not isinstance(e.max_active_keys, UnsetType):
        if not 1 <= e.max_active_keys <= 1_000_000:
            problems.append(f"{where}.max_active_keys: must be 1-1000000")
        values["max_active_keys"] = e.max_active_keys
    for field in ("default_lifetime", "max_lifetime"):
        given = getattr(e, field)
        if isinstance(given, UnsetType):
            continue
        seconds = _seconds(given, f"{where}.{field}", problems, none=True)
        if seconds is not None and seconds <= 0:
            problems.append(f'{where}.{field}: must be positive ("none": no default / no maximum)')
        values[field] = seconds
    if not isinstance(e.max_rotation_grace, UnsetType):
        grace = _seconds(e.max_rotation_grace, f"{where}.max_rotation_grace", problems, none=False)
        if grace is not None and not 0 <= grace <= MAX_GRACE_SECONDS:
            problems.append(f"{where}.max_rotation_grace: must be 0s-24h")
        values["max_rotation_grace"] = grace or 0.0
    default, longest = values.get("default_lifetime"), values.get("max_lifetime")
    if default is not None and longest is not None and default > longest:
        problems.append(f"{where}.default_lifetime: longer than max_lifetime")
    return Policy(**values)


def _key(raw: Any, where: str, problems: list[str]) -> Key | None:
    e: _KeyEntry | None = _entry(raw, _KeyEntry, where, problems)
    if e is None:
        return None
    name = _check(problems, f"{where}.name", _check_name, e.name, f"{where}.name")
    _check(problems, f"{where}.project", check_project, e.project, f"{where}.project")
    _check(problems, f"{where}.metadata", check_metadata, e.metadata, f"{where}.metadata")
    scopes = None
    if not isinstance(e.scopes, UnsetType):
        checked = _check(problems, f"{where}.scopes", check_scopes, e.scopes, f"{where}.scopes")
        scopes = list(checked or ())
    expires_at = None
    if not isinstance(e.expires_at, UnsetType):
        expires_at = _time(e.expires_at, f"{where}.expires_at", problems)
    return Key(
        owner=e.owner,
        project=e.project,
        name=name or e.name,
        scopes=scopes,
        expires_at=expires_at,
        metadata=dict(e.metadata),
        status=None if isinstance(e.status, UnsetType) else e.status,
    )


def read(text: str, source: str) -> State:
    """The state ``text`` (the file ``source``) describes; ``StateError`` with every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise StateError([f"{source}: invalid TOML: {e}"]) from None
    problems: list[str] = [f"{name}: unknown section" for name in data if name not in SECTIONS]
    principals = {}
    for name, raw in _tables(data, "principals", problems).items():
        p = _principal(name, raw, f"principals.{_path_key(name)}", problems)
        if p is not None:
            principals[name.strip()] = p
    roles: dict[str, dict[str, Role]] = {}
    for project, table in _tables(data, "roles", problems).items():
        where = f"roles.{_path_key(project)}"
        _check(problems, where, check_project, project, where)
        if not isinstance(table, dict):
            problems.append(f"{where}: expected a table of roles ([roles.<project>.<role>])")
            continue
        for name, raw in table.items():
            here = f"{where}.{_path_key(name)}"
            _check(problems, here, check_role_name, name, here)
            r: _RoleEntry | None = _entry(raw, _RoleEntry, here, problems)
            if r is None:
                continue
            scopes = _check(problems, f"{here}.scopes", check_scopes, r.scopes, f"{here}.scopes")
            if len(r.description) > 500:
                problems.append(f"{here}.description: must be at most 500 characters")
            roles.setdefault(project, {})[name] = Role(
                scopes=list(scopes or ()), description=r.description.strip()
            )
    policies = {}
    for project, raw in _tables(data, "policies", problems).items():
        where = f"policies.{_path_key(project)}"
        _check(problems, where, check_project, project, where)
        pol = _policy(raw, where, problems)
        if pol is not None:
            policies[project] = pol
    keys = {}
    for key_id, raw in _tables(data, "keys", problems).items():
        k = _key(raw, f"keys.{_path_key(key_id)}", problems)
        if k is not None:
            keys[key_id] = k
    state = State(principals=principals, roles=roles, policies=policies, keys=keys)
    problems += _references(state)
    if problems:
        raise StateError([f"{source}: {p}" for p in problems])
    return state


def _references(state: State) -> list[str]:
    """What the file's parts say about each other: roles held are roles the file defines, a
    key's scopes are within what the file grants its owner."""
    out = []
    for name, p in state.principals.items():
        for project, held in p.roles.items():
            defined = state.roles.get(project, {})
            for r in held:
                if r not in defined:
                    out.append(
                        f"principals.{_path_key(name)}.roles.{project}: project {project!r} has no role "
                        f"{r!r} in this file ([roles.{project}.{r}])"
                    )
    for key_id, k in state.keys.items():
        owner = state.principals.get(k.owner)
        if owner is None:
            out.append(f"keys.{_path_key(key_id)}.owner: no principal {k.owner!r} in this file")
            continue
        if k.scopes is None:
            continue
        allowed = set(owner.grants.get(k.project, ()))
        for r in owner.roles.get(k.project, ()):
            allowed.update(state.roles.get(k.project, {}).get(r, Role()).scopes)
        missing = sorted(set(k.scopes) - allowed)
        if missing:
            out.append(
                f"keys.{_path_key(key_id)}.scopes: not granted to {k.owner} in project {k.project} "
                f"by this file: {', '.join(missing)}"
            )
    return out


def _path_key(name: str) -> str:
    """A name as a part of a field path: quoted when it is not a bare TOML key."""
    return name if name and all(c.isalnum() or c in "_-" for c in name) and name.isascii() else f'"{name}"'


# -- writing ----------------------------------------------------------------------------------


def duration(seconds: float | None) -> str | float:
    """``"30d"`` where a whole unit says it exactly, else the seconds themselves."""
    if seconds is None:
        return "none"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return seconds


def to_data(state: State) -> dict[str, Any]:
    """``state`` as plain TOML data (durations as text, nothing null)."""
    data: dict[str, Any] = {}
    data["principals"] = {
        n: {f: v for f, v in msgspec.to_builtins(p).items() if v != {}}  # empty tables left out
        for n, p in sorted(state.principals.items())
    }
    data["roles"] = {
        project: {
            n: {"scopes": r.scopes, **({"description": r.description} if r.description else {})}
            for n, r in sorted(roles.items())
        }
        for project, roles in sorted(state.roles.items())
    }
    policies: dict[str, Any] = {}
    for project, pol in sorted(state.policies.items()):
        table: dict[str, Any] = {}
        for field in POLICY_FIELDS:
            value = getattr(pol, field)
            if value is UNSET:
                continue
            table[field] = value if field == "max_active_keys" else duration(value)
        policies[project] = table
    data["policies"] = policies
    keys: dict[str, Any] = {}
    for key_id, k in sorted(state.keys.items()):
        entry: dict[str, Any] = {"owner": k.owner, "project": k.project, "name": k.name}
        if k.scopes is not None:
            entry["scopes"] = k.scopes
        if k.expires_at is not None:
            entry["expires_at"] = k.expires_at
        if k.status is not None:
            entry["status"] = k.status
        if k.metadata:
            entry["metadata"] = k.metadata
        keys[key_id] = entry
    data["keys"] = keys
    return data


def write(state: State) -> str:
    """``state`` as the file's TOML text."""
    from gateway.config.toml_text import dumps

    return dumps(to_data(state))


# -- the store's state, from the admin API's views ---------------------------------------------


def state_of(
    principals: Iterable[s.PrincipalView],
    roles: Iterable[a.RoleView],
    policies: Iterable[tuple[a.PolicyView, bool]],
    keys: Iterable[s.KeyView],
) -> State:
    """The state of a store as the admin API shows it; ``policies`` are (effective policy, whether
    the project holds one of its own): only the values stored for the project are part of it."""
    by_role: dict[str, dict[str, Role]] = {}
    for r in roles:
        by_role.setdefault(r.project, {})[r.name] = Role(scopes=sorted(r.scopes), description=r.description)
    stored: dict[str, Policy] = {}
    for view, own in policies:
        if not own:
            continue
        values = {f: getattr(view, f) for f in POLICY_FIELDS if view.sources.get(f) == "project"}
        stored[view.project] = msgspec.convert(values, Policy)
    return State(
        principals={
            p.name: Principal(
                kind=p.kind,
                disabled=p.disabled,
                grants={g: sorted(sc) for g, sc in p.grants.items()},
                roles={g: sorted(r) for g, r in p.roles.items() if r},
                metadata=dict(p.metadata),
            )
            for p in principals
        },
        roles=by_role,
        policies=stored,
        keys={
            k.id: Key(
                owner=k.principal,
                project=k.project,
                name=k.name,
                scopes=None if k.scopes is None else sorted(k.scopes),
                expires_at=k.expires_at,
                metadata=dict(k.metadata),
                status=k.status,
            )
            for k in keys
        },
    )
