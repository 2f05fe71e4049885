"""Roles, grants naming them, project policies and audit sources in every store backend."""

from __future__ import annotations

import msgspec
import pytest

from gateway.keys import generate_id
from gateway.models import Actor, Principal, ProjectPolicy, Role
from gateway.store import AuditFilter, NotFound, PrincipalChanges, Store, UnknownRole
from tests.store.test_store import T0, make_key, make_principal


def role(name: str, *scopes: str, project: str = "proj") -> Role:
    return Role(project=project, name=name, scopes=scopes, created_at=T0, updated_at=T0)


async def test_a_grant_gets_its_roles_scopes_and_a_role_change_names_every_holders_key(store: Store) -> None:
    await store.put_role(role("data_entry", "reports:read", "reports:write"), "tester")
    await store.put_role(role("other", "x", project="elsewhere"), "tester")
    ann = await store.create_principal(
        Principal(
            id=generate_id("prn"),
            name="ann",
            kind="user",
            disabled=False,
            created_at=T0,
            grants={"proj": ("misc",)},
            roles={"proj": ("data_entry",)},
        ),
        Actor("lead", "console"),
    )
    assert ann.roles == {"proj": ("data_entry",)} and ann.grants == {"proj": ("misc",)}
    bob = await make_principal(store, "bob", {"proj": ("read",)})
    _, d_ann = await make_key(store, ann)
    narrowed, d_narrow = await make_key(store, ann, "k2", scopes=("reports:read", "nope"))
    _, d_bob = await make_key(store, bob)

    found = await store.find_identities([d_ann, d_narrow, d_bob], T0)
    assert found[d_ann].scopes == ("misc", "reports:read", "reports:write")
    assert found[d_ann].roles == ("data_entry",)
    assert found[d_narrow].scopes == ("reports:read",)  # the key's own narrowing still applies
    assert found[d_bob].roles == () and found[d_bob].scopes == ("read",)

    _, change = await store.put_role(role("data_entry", "reports:read"), "tester")
    assert change.seq and set(change.digests or ()) == {d_ann, d_narrow}  # bob holds no such role
    assert (await store.find_identity(d_ann, T0)).scopes == ("misc", "reports:read")  # type: ignore[union-attr]

    change = await store.delete_role("proj", "data_entry", "tester")
    assert set(change.digests or ()) == {d_ann, d_narrow}
    after = await store.find_identity(d_ann, T0)
    assert after is not None and after.scopes == ("misc",) and after.roles == ()
    assert (await store.get_principal("ann")).roles == {}
    with pytest.raises(NotFound):
        await store.get_role("proj", "data_entry")
    assert [r.name for r in await store.list_roles("elsewhere")] == ["other"]


async def test_a_grant_cannot_name_a_missing_role_and_roles_alone_make_a_member(store: Store) -> None:
    ann = await make_principal(store, "ann", {})
    with pytest.raises(UnknownRole):
        await store.update_principal(ann.id, PrincipalChanges(roles={"proj": ("ghost",)}), "tester")
    assert (await store.get_principal(ann.id)).grants == {}  # nothing half-written
    await store.put_role(role("viewer", "read"), "tester")
    updated, _ = await store.update_principal(ann.id, PrincipalChanges(roles={"proj": ("viewer",)}), "tester")
    assert updated.grants == {"proj": ()} and updated.roles == {"proj": ("viewer",)}
    _, digest = await make_key(store, updated)
    ident = await store.find_identity(digest, T0)
    assert ident is not None and ident.member and ident.scopes == ("read",)
    # Replacing the scopes keeps the roles, and the other way round.
    updated, _ = await store.update_principal(ann.id, PrincipalChanges(grants={"proj": ("w",)}), "tester")
    assert updated.grants == {"proj": ("w",)} and updated.roles == {"proj": ("viewer",)}


async def test_project_policies_and_audit_sources_are_kept(store: Store) -> None:
    assert await store.get_project_policy("proj") is None
    values = ProjectPolicy(max_active_keys=1, max_lifetime=None, max_rotation_grace=0.0)
    await store.put_project_policy("proj", values, Actor("lead", "console"))
    stored = await store.get_project_policy("proj")
    assert stored == values and stored is not None and stored.default_lifetime is msgspec.UNSET
    await store.delete_project_policy("proj", Actor("cli", "cli"))
    assert await store.get_project_policy("proj") is None
    with pytest.raises(NotFound):
        await store.delete_project_policy("proj", "tester")

    sources = {(e.action, e.source) for e in (await store.list_audit(AuditFilter())).items}
    assert sources == {("project.policy.update", "console"), ("project.policy.delete", "cli")}
    console = (await store.list_audit(AuditFilter(source="console"))).items
    assert [e.actor for e in console] == ["lead"]
