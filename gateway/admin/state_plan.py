"""What ``keystile apply`` changes: the plan from a store's state to a file's, computed whole first.

Owns: ``plan`` (two ``desired_state.State``s -> ``Plan``: ordered ``Step``s, each one admin
operation with the lines it prints, and the keys left alone) and ``Refused`` (every reason the
file cannot be applied, found before anything is written). Must not: do I/O or run the steps
(the CLI runs each through ``gateway.admin.client.Admin``, so every write is audited and
invalidates caches like any admin write).

Rules: principals, roles and per-project policies are created, changed and removed to match; a
principal that still has keys is never removed (refused, by name). Keys are never created or
deleted: a key of the file must exist, with the same owner and project; its name, scopes,
expiry and metadata follow the file; keys the file does not name are left alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from msgspec import UNSET

from gateway.admin import access_operations as acc
from gateway.admin import access_schemas as a
from gateway.admin import operations as ops
from gateway.admin import schemas as s
from gateway.admin.desired_state import POLICY_FIELDS, Key, Policy, Principal, Role, State, duration

# Two expiry times closer than this are the same (an ISO time in a file against stored seconds).
SAME_TIME = 0.001


class Refused(Exception):
    """The file cannot be applied; ``problems`` are ready-to-print lines, one per reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Step:
    """One admin operation (``operation(**params, body=, query=)``) and the plan lines it does."""

    lines: tuple[str, ...]
    operation: Callable[..., Awaitable[Any]]
    params: dict[str, str] = field(default_factory=dict)
    body: msgspec.Struct | None = None
    query: msgspec.Struct | None = None


@dataclass(frozen=True)
class Plan:
    steps: list[Step]
    untouched: list[str]  # keys of the store the file does not name: left alone
    missing: list[str] = field(default_factory=list)  # keys of the file the store lacks (when allowed)

    @property
    def lines(self) -> list[str]:
        return [line for step in self.steps for line in step.lines]


def _text(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _policy_value(field_name: str, value: Any) -> str:
    if value is UNSET:
        return "(config)"
    return str(value) if field_name == "max_active_keys" else str(duration(value))


def _principal_steps(name: str, was: Principal | None, want: Principal) -> list[Step]:
    if was is None:
        body = msgspec.convert(
            {
                "name": name,
                "kind": want.kind,
                "grants": want.grants,
                "roles": want.roles,
                "metadata": want.metadata,
            },
            s.PrincipalCreate,
        )
        steps = [Step((f"+ principal {name}",), ops.create_principal, body=body)]
        if want.disabled:
            steps.append(Step((), ops.disable_principal, {"principal": name}))
        return steps
    changed = {
        f: getattr(want, f)
        for f in ("kind", "grants", "roles", "metadata")
        if getattr(want, f) != getattr(was, f)
    }
    steps = []
    if changed:
        lines = tuple(
            f"~ principal {name}: {f} {_text(getattr(was, f))} -> {_text(v)}" for f, v in changed.items()
        )
        update = msgspec.convert(changed, s.PrincipalUpdate)
        steps.append(Step(lines, ops.update_principal, {"principal": name}, body=update))
    if want.disabled != was.disabled:
        line = f"~ principal {name}: disabled {_text(was.disabled)} -> {_text(want.disabled)}"
        op = ops.disable_principal if want.disabled else ops.enable_principal
        steps.append(Step((line,), op, {"principal": name}))
    return steps


def _role_step(project: str, name: str, was: Role | None, want: Role) -> Step | None:
    body = msgspec.convert(msgspec.to_builtins(want), a.RolePut)
    params = {"project": project, "role": name}
    if was is None:
        return Step((f"+ role {project}/{name}",), acc.put_role, params, body=body)
    lines = tuple(
        f"~ role {project}/{name}: {f} {_text(getattr(was, f))} -> {_text(getattr(want, f))}"
        for f in ("scopes", "description")
        if getattr(was, f) != getattr(want, f)
    )
    return Step(lines, acc.put_role, params, body=body) if lines else None


def _policy_step(project: str, was: Policy | None, want: Policy) -> Step | None:
    values = {f: getattr(want, f) for f in POLICY_FIELDS if getattr(want, f) is not UNSET}
    body = msgspec.convert(values, a.ProjectPolicyPut)
    params = {"project": project}
    if was is None:
        return Step((f"+ policy {project}",), acc.set_project_policy, params, body=body)
    lines = tuple(
        f"~ policy {project}: {f} {_policy_value(f, getattr(was, f))} -> {_policy_value(f, getattr(want, f))}"
        for f in POLICY_FIELDS
        if getattr(was, f) != getattr(want, f)
    )
    return Step(lines, acc.set_project_policy, params, body=body) if lines else None


def _same_time(x: float | None, y: float | None) -> bool:
    return x == y or (x is not None and y is not None and abs(x - y) < SAME_TIME)


def _key_step(key_id: str, was: Key, want: Key, now: float, problems: list[str]) -> Step | None:
    for f in ("owner", "project"):
        if getattr(was, f) != getattr(want, f):
            problems.append(
                f"keys.{key_id}.{f}: {_text(getattr(was, f))} -> {_text(getattr(want, f))}: a key's "
                f"{f} cannot change (issue a new key instead)"
            )
    changes: dict[str, Any] = {
        f: getattr(want, f) for f in ("name", "scopes", "metadata") if getattr(was, f) != getattr(want, f)
    }
    if not _same_time(was.expires_at, want.expires_at):
        if want.expires_at is not None and want.expires_at <= now:
            problems.append(f"keys.{key_id}.expires_at: {want.expires_at} is in the past")
        changes["expires_at"] = want.expires_at
    if not changes:
        return None
    lines = tuple(f"~ key {key_id}: {f} {_text(getattr(was, f))} -> {_text(v)}" for f, v in changes.items())
    return Step(lines, ops.update_key, {"key_id": key_id}, body=msgspec.convert(changes, s.KeyUpdate))


def plan(current: State, desired: State, now: float, *, missing_keys_ok: bool = False) -> Plan:
    """The steps that make ``current`` (the store's) into ``desired`` (the file's), in an order
    that each step's requirements are met by the steps before it: policies, roles created or
    changed, principals created or changed, keys, then roles and principals removed. Raises
    ``Refused`` with every reason the file cannot be applied; with ``missing_keys_ok`` a key the
    store lacks is only reported (``Plan.missing``), e.g. applying one store's export to another."""
    problems: list[str] = []
    steps: list[Step] = []
    missing: list[str] = []
    for project in sorted(current.policies.keys() | desired.policies.keys()):
        want = desired.policies.get(project)
        if want is None:
            steps.append(Step((f"- policy {project}",), acc.clear_project_policy, {"project": project}))
        elif (step := _policy_step(project, current.policies.get(project), want)) is not None:
            steps.append(step)
    removed_roles = []
    for project in sorted(current.roles.keys() | desired.roles.keys()):
        have, wanted = current.roles.get(project, {}), desired.roles.get(project, {})
        for name in sorted(have.keys() | wanted.keys()):
            if name not in wanted:
                removed_roles.append(
                    Step((f"- role {project}/{name}",), acc.delete_role, {"project": project, "role": name})
                )
            elif (step := _role_step(project, name, have.get(name), wanted[name])) is not None:
                steps.append(step)
    for name, want_p in sorted(desired.principals.items()):
        steps += _principal_steps(name, current.principals.get(name), want_p)
    for key_id, want_k in sorted(desired.keys.items()):
        was = current.keys.get(key_id)
        if was is None:
            text = f"keys.{key_id}: no such key in the store (apply never creates keys)"
            (missing if missing_keys_ok else problems).append(text)
        elif (step := _key_step(key_id, was, want_k, now, problems)) is not None:
            steps.append(step)
    steps += removed_roles
    owners: dict[str, int] = {}
    for k in current.keys.values():
        owners[k.owner] = owners.get(k.owner, 0) + 1
    for name in sorted(current.principals.keys() - desired.principals.keys()):
        if owners.get(name):
            problems.append(
                f"principals.{name}: not in the file, but it has {owners[name]} key(s) in the store: "
                "apply never deletes keys (add the principal back, or delete its keys first)"
            )
            continue
        query = s.PrincipalDeleteQuery(with_keys=False)
        steps.append(Step((f"- principal {name}",), ops.delete_principal, {"principal": name}, query=query))
    if problems:
        raise Refused(problems)
    untouched = [
        f"key {key_id} ({k.owner}/{k.project}, {k.name!r}) is not in the file: left alone"
        for key_id, k in sorted(current.keys.items())
        if key_id not in desired.keys
    ]
    return Plan(steps=steps, untouched=untouched, missing=missing)
