"""The store's behaviour, run against every backend (see conftest.py).

Each test is something a user of the admin API or the gateway would notice: what a key resolves
to, which changes are refused, what the audit trail shows, and that a refused change leaves no
trace.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from gateway.keys import KeyDigest, digest, display_start, generate_id, generate_key
from gateway.models import Invalidation, KeyRecord, NewKey, Principal, UsageUpdate
from gateway.store import (
    AuditFilter,
    Conflict,
    HasKeys,
    KeyChanges,
    KeyFilter,
    LimitExceeded,
    NameTaken,
    NotFound,
    PrincipalChanges,
    SchemaMismatch,
    Store,
    StoreError,
    StoreUnavailable,
    open_store,
)
from gateway.store.migrations import latest_version, migrations
from tests.store.conftest import execute_sql

SECRET = b"store-test-hash-secret"
T0 = 1_700_000_000.0  # a fixed "now" keeps ordering and expiry deterministic
MANY = 10  # a key limit high enough not to matter


async def make_principal(
    store: Store,
    name: str = "alice",
    grants: dict[str, tuple[str, ...]] | None = None,
    *,
    created_at: float = T0,
    disabled: bool = False,
) -> Principal:
    return await store.create_principal(
        Principal(
            id=generate_id("prn"),
            name=name,
            kind="user",
            disabled=disabled,
            created_at=created_at,
            grants={"proj": ("read", "write")} if grants is None else grants,
            metadata={"team": "core"},
        ),
        actor="tester",
    )


def new_key(
    owner: Principal,
    name: str = "k1",
    *,
    project: str = "proj",
    scopes: tuple[str, ...] | None = None,
    created_at: float = T0,
    expires_at: float | None = None,
) -> tuple[NewKey, str]:
    """A NewKey and the secret it was made from."""
    secret = generate_key("ks", "live")
    return (
        NewKey(
            id=generate_id("key"),
            digest=digest(SECRET, secret),
            name=name,
            start=display_start(secret),
            env="live",
            principal_id=owner.id,
            project=project,
            scopes=scopes,
            created_at=created_at,
            expires_at=expires_at,
            metadata={"purpose": "test"},
        ),
        secret,
    )


async def make_key(
    store: Store, owner: Principal, name: str = "k1", *, max_active: int = MANY, **kw: Any
) -> tuple[KeyRecord, KeyDigest]:
    """Create a key; returns its record and its digest."""
    new, _ = new_key(owner, name, **kw)
    return await store.create_key(new, max_active=max_active, actor="tester"), new.digest


async def audit_count(store: Store) -> int:
    return len((await store.list_audit(AuditFilter(limit=10_000))).items)


async def all_keys(store: Store) -> list[KeyRecord]:
    return (await store.list_keys(KeyFilter(limit=10_000), T0)).items


def new_secret() -> tuple[KeyDigest, str]:
    secret = generate_key("ks", "live")
    return digest(SECRET, secret), display_start(secret)


# -- principals --------------------------------------------------------------------------------


async def test_principal_is_found_by_id_and_by_name(store: Store) -> None:
    p = await make_principal(store, grants={"proj": ("write", "read", "read"), "other": ()})
    assert p.grants == {"other": (), "proj": ("read", "write")}  # sorted, deduplicated
    assert p.metadata == {"team": "core"}
    assert await store.get_principal(p.id) == p
    assert await store.get_principal("alice") == p
    with pytest.raises(NotFound):
        await store.get_principal("nobody")
    [event] = (await store.list_audit(AuditFilter(principal_id=p.id))).items
    assert (event.action, event.actor, event.before) == ("principal.create", "tester", None)
    assert event.after is not None and event.after["name"] == "alice"


async def test_duplicate_principal_name_is_refused(store: Store) -> None:
    first = await make_principal(store)
    with pytest.raises(NameTaken):
        await make_principal(store, grants={"x": ("y",)})
    # A name may not collide with another principal's id either: refs resolve both ways.
    with pytest.raises(NameTaken):
        await make_principal(store, name=first.id)
    principals, _ = await store.list_principals(10, None)
    assert principals == [first]
    assert await audit_count(store) == 1


async def test_principals_are_listed_by_name_in_pages(store: Store) -> None:
    names = ["dave", "alice", "erin", "carol", "bob"]
    for n in names:
        await make_principal(store, n)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = await store.list_principals(2, cursor)
        seen += [p.name for p in page]
        pages += 1
        if cursor is None:
            break
    assert seen == sorted(names)
    assert pages == 3
    # A principal cursor is a position (the last name listed): any text but a NUL.
    assert [p.name for p in (await store.list_principals(10, "p"))[0]] == [n for n in seen if n > "p"]
    with pytest.raises(ValueError):
        await store.list_principals(2, "a\x00")


async def test_updating_grants_changes_what_keys_can_do(store: Store) -> None:
    p = await make_principal(store, grants={"proj": ("read",)})
    _, d = await make_key(store, p)
    identity = await store.find_identity(d, T0)
    assert identity is not None and identity.scopes == ("read",)

    updated, change = await store.update_principal(
        "alice", PrincipalChanges(grants={"proj": ("read", "write"), "new": ("x",)}), "admin"
    )
    assert updated.grants == {"new": ("x",), "proj": ("read", "write")}
    assert change.digests == (d,)  # so the caller can invalidate caches
    assert (await store.get_principal(p.id)).grants == updated.grants
    identity = await store.find_identity(d, T0)
    assert identity is not None and identity.scopes == ("read", "write")

    event = (await store.list_audit(AuditFilter(principal_id=p.id, limit=1))).items[0]
    assert event.action == "principal.update" and event.actor == "admin"
    assert event.before is not None and event.before["grants"] == {"proj": ["read"]}
    assert event.after is not None and event.after["grants"] == {
        "new": ["x"],
        "proj": ["read", "write"],
    }

    # Removing the grant: the key still resolves, but as a non-member with no scopes.
    await store.update_principal(p.id, PrincipalChanges(grants={}), "admin")
    identity = await store.find_identity(d, T0)
    assert identity is not None and (identity.member, identity.scopes) == (False, ())


async def test_disabled_principal_keys_stop_resolving_until_enabled(store: Store) -> None:
    p = await make_principal(store)
    _, d = await make_key(store, p)
    disabled, change = await store.update_principal(p.id, PrincipalChanges(disabled=True), "admin")
    assert disabled.disabled and change.digests == (d,)
    assert await store.find_identity(d, T0) is None
    enabled, _ = await store.update_principal("alice", PrincipalChanges(disabled=False), "admin")
    assert not enabled.disabled
    assert await store.find_identity(d, T0) is not None
    actions = [e.action for e in (await store.list_audit(AuditFilter(principal_id=p.id))).items]
    assert actions[:2] == ["principal.enable", "principal.disable"]


async def test_delete_principal_needs_with_keys_when_it_has_keys(store: Store) -> None:
    p = await make_principal(store)
    k1, d1 = await make_key(store, p, "k1")
    k2, d2 = await make_key(store, p, "k2")
    # A rotation with grace leaves a second digest that must be invalidated too.
    d3, start = new_secret()
    await store.rotate_key(k2.id, digest=d3, start=start, previous_valid_until=T0 + 60, actor="t", now=T0)
    before = await audit_count(store)

    with pytest.raises(HasKeys):
        await store.delete_principal("alice", "admin", with_keys=False)
    assert await audit_count(store) == before
    assert len(await all_keys(store)) == 2

    change = await store.delete_principal("alice", "admin", with_keys=True)
    assert change.digests is not None and sorted(change.digests) == sorted([d1, d2, d3])
    with pytest.raises(NotFound):
        await store.get_principal(p.id)
    for key_id in (k1.id, k2.id):
        with pytest.raises(NotFound):
            await store.get_key(key_id)
    assert await store.find_identities([d1, d2, d3], T0) == {}
    event = (await store.list_audit(AuditFilter(principal_id=p.id, limit=1))).items[0]
    assert event.action == "principal.delete" and event.after is None
    assert event.before is not None and event.before["keys_deleted"] == 2


async def test_delete_principal_without_keys(store: Store) -> None:
    p = await make_principal(store)
    assert await store.delete_principal(p.id, "admin", with_keys=False) == Invalidation(0, ())
    with pytest.raises(NotFound):
        await store.get_principal("alice")
    # The name is free again.
    await make_principal(store)


# -- keys: creation, identity, limits ---------------------------------------------------------


async def test_key_records_never_expose_the_digest(store: Store) -> None:
    p = await make_principal(store)
    new, secret = new_key(p, scopes=("write", "read"), expires_at=T0 + 3600)
    created = await store.create_key(new, max_active=MANY, actor="tester")
    assert "digest" not in KeyRecord.__struct_fields__
    assert created == KeyRecord(
        id=new.id,
        name="k1",
        start=secret[:12],
        env="live",
        principal_id=p.id,
        principal="alice",
        project="proj",
        scopes=("read", "write"),
        created_at=T0,
        expires_at=T0 + 3600,
        revoked_at=None,
        last_used_at=None,
        request_count=0,
        metadata={"purpose": "test"},
    )
    assert await store.get_key(new.id) == created
    assert (await store.list_keys(KeyFilter(), T0)).items == [created]
    [event] = (await store.list_audit(AuditFilter(key_id=new.id))).items
    assert event.action == "key.create" and event.after is not None
    assert "digest" not in event.after
    assert new.digest.hex() not in str(event) and str(new.digest) not in str(event)
    with pytest.raises(NotFound):
        await store.get_key("key_missing")


async def test_identity_scopes_are_grant_narrowed_by_key(store: Store) -> None:
    p = await make_principal(store, grants={"proj": ("admin", "read", "write")})
    narrow, d_narrow = await make_key(store, p, "narrow", scopes=("read", "delete"))
    _, d_all = await make_key(store, p, "all", expires_at=T0 + 100)
    _, d_outside = await make_key(store, p, "outside", project="elsewhere", scopes=("read",))
    unknown, _ = new_secret()

    found = await store.find_identities([d_narrow, d_all, d_outside, unknown], T0)
    assert set(found) == {d_narrow, d_all, d_outside}
    n = found[d_narrow]
    assert (n.key_id, n.digest, n.principal_id, n.principal, n.project, n.env) == (
        narrow.id,
        d_narrow,
        p.id,
        "alice",
        "proj",
        "live",
    )
    assert (n.scopes, n.member, n.expires_at, n.start) == (("read",), True, None, narrow.start)
    assert (found[d_all].scopes, found[d_all].expires_at) == (("admin", "read", "write"), T0 + 100)
    assert (found[d_outside].member, found[d_outside].scopes) == (False, ())
    assert await store.find_identity(d_narrow, T0) == n
    assert await store.find_identity(unknown, T0) is None
    assert await store.find_identities([], T0) == {}


async def test_revoked_key_stops_resolving(store: Store) -> None:
    p = await make_principal(store)
    key, d = await make_key(store, p)
    revoked, change = await store.revoke_key(key.id, "admin", T0 + 5)
    assert change.digests == (d,)
    assert revoked.revoked_at == T0 + 5 and revoked.status(T0 + 6) == "revoked"
    assert await store.find_identity(d, T0 + 6) is None
    assert (await store.get_key(key.id)).revoked_at == T0 + 5
    # Revoking again changes nothing.
    again, _ = await store.revoke_key(key.id, "admin", T0 + 50)
    assert again.revoked_at == T0 + 5


async def test_key_limit_counts_only_active_keys(store: Store) -> None:
    p = await make_principal(store)
    await make_key(store, p, "a", max_active=2)
    expiring, _ = await make_key(store, p, "b", max_active=2, expires_at=T0 + 10)
    before = await audit_count(store)

    with pytest.raises(LimitExceeded) as refused:
        await make_key(store, p, "c", max_active=2, created_at=T0 + 1)
    assert "limit is 2" in str(refused.value) and "rotate" not in str(refused.value)
    assert await audit_count(store) == before and len(await all_keys(store)) == 2

    # Other projects have their own limit.
    await make_key(store, p, "c", max_active=2, project="other")
    # Once "b" has expired it no longer counts.
    await make_key(store, p, "d", max_active=2, created_at=T0 + 20)
    # A revoked key does not count either.
    await store.revoke_key(expiring.id, "admin", T0 + 21)
    with pytest.raises(LimitExceeded):
        await make_key(store, p, "e", max_active=2, created_at=T0 + 22)
    active = (await store.list_keys(KeyFilter(project="proj", status="active"), T0 + 22)).items
    [first] = [k for k in active if k.name == "a"]
    await store.revoke_key(first.id, "admin", T0 + 23)
    await make_key(store, p, "e", max_active=2, created_at=T0 + 24)

    # Extending an expired key back to life is creating an active key: same limit.
    old, _ = await make_key(store, p, "old", max_active=MANY, expires_at=T0 + 1)
    with pytest.raises(LimitExceeded):
        await store.update_key(old.id, KeyChanges(expires_at=None), "admin", max_active=2, now=T0 + 30)
    assert (await store.get_key(old.id)).expires_at == T0 + 1


async def test_limit_of_one_suggests_rotation(store: Store) -> None:
    p = await make_principal(store)
    await make_key(store, p, "only", max_active=1)
    with pytest.raises(LimitExceeded) as refused:
        await make_key(store, p, "second", max_active=1)
    assert "rotate" in str(refused.value)
    assert isinstance(refused.value, Conflict) and refused.value.code == "key_limit_reached"


async def test_key_names_are_unique_per_principal_and_project(store: Store) -> None:
    alice = await make_principal(store)
    bob = await make_principal(store, "bob")
    await make_key(store, alice, "ci")
    before = await audit_count(store)
    with pytest.raises(NameTaken):
        await make_key(store, alice, "ci")
    assert await audit_count(store) == before
    await make_key(store, alice, "ci", project="other")
    await make_key(store, bob, "ci")
    second, _ = await make_key(store, alice, "deploy")
    with pytest.raises(NameTaken):
        await store.update_key(second.id, KeyChanges(name="ci"), "a", max_active=MANY, now=T0)
    assert (await store.get_key(second.id)).name == "deploy"
    # Renaming a key to its own name is not a clash.
    await store.update_key(second.id, KeyChanges(name="deploy"), "a", max_active=MANY, now=T0)


# -- keys: listing -----------------------------------------------------------------------------


async def test_list_keys_filters(store: Store) -> None:
    alice = await make_principal(store, grants={"proj": ("r",), "other": ("r",)})
    bob = await make_principal(store, "bob")
    names = ["Build-Bot", "deploy_prod", "deploy-prod", "50%-off", "500-off"]
    for i, name in enumerate(names):
        await make_key(store, alice, name, created_at=T0 + i)
    await make_key(store, alice, "expired", expires_at=T0 + 10, created_at=T0)
    revoked, _ = await make_key(store, alice, "revoked", project="other")
    await store.revoke_key(revoked.id, "admin", T0)
    await make_key(store, bob, "bobs")
    now = T0 + 20

    async def listed(**kw: Any) -> set[str]:
        return {k.name for k in (await store.list_keys(KeyFilter(**kw), now)).items}

    assert await listed(principal_id=bob.id) == {"bobs"}
    assert await listed(principal_id="bob") == {"bobs"}
    assert await listed(principal_id="alice") == {*names, "expired", "revoked"}
    assert await listed(principal_id="nobody") == set()
    assert await listed(project="other") == {"revoked"}
    assert await listed(status="revoked") == {"revoked"}
    assert await listed(status="expired") == {"expired"}
    assert await listed(status="active") == {*names, "bobs"}
    assert await listed(status="active", principal_id="alice", project="proj") == set(names)
    assert await listed(q="BUILD") == {"Build-Bot"}
    assert await listed(q="deploy") == {"deploy_prod", "deploy-prod"}
    assert await listed(q="_") == {"deploy_prod"}  # a literal underscore, not "any character"
    assert await listed(q="%") == {"50%-off"}  # a literal percent sign
    assert await listed(q="0%-") == {"50%-off"}
    assert await listed(q="nothing") == set()
    assert await listed(status="expired", q="exp", principal_id=alice.id) == {"expired"}


async def test_list_keys_is_newest_first_and_pages_without_gaps(store: Store) -> None:
    p = await make_principal(store)
    created = []
    for i in range(9):
        # Pairs share a timestamp: the cursor must break ties by id.
        rec, _ = await make_key(store, p, f"key{i}", created_at=T0 + i // 2)
        created.append(rec)
    expected = sorted(created, key=lambda k: (k.created_at, k.id), reverse=True)

    seen: list[KeyRecord] = []
    cursor = None
    pages = []
    while True:
        page = await store.list_keys(KeyFilter(limit=2, cursor=cursor), T0)
        pages.append(len(page.items))
        seen += page.items
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == [2, 2, 2, 2, 1]
    assert [k.id for k in seen] == [k.id for k in expected]

    exact = await store.list_keys(KeyFilter(limit=9), T0)
    assert len(exact.items) == 9 and exact.next_cursor is None
    # Filters and the cursor combine.
    first = await store.list_keys(KeyFilter(limit=1, q="key1"), T0)
    assert [k.name for k in first.items] == ["key1"] and first.next_cursor is None
    for bad in ("garbage", "!!!", "WzEsMl0", "1.5~key_\x00", "1.5~key_a\n", "nan~key_a", "1.5"):
        with pytest.raises(ValueError):
            await store.list_keys(KeyFilter(cursor=bad), T0)


# -- keys: update, rotate, delete --------------------------------------------------------------


async def test_update_key_changes_fields_and_audits_before_and_after(store: Store) -> None:
    p = await make_principal(store, grants={"proj": ("read", "write")})
    key, d = await make_key(store, p, "old-name")
    changes = KeyChanges(name="new-name", expires_at=T0 + 500, scopes=("read",), metadata={"owner": "ops"})
    updated, change = await store.update_key(key.id, changes, "admin", max_active=MANY, now=T0)
    assert change.digests == (d,)
    assert (updated.name, updated.expires_at, updated.scopes, updated.metadata) == (
        "new-name",
        T0 + 500,
        ("read",),
        {"owner": "ops"},
    )
    assert await store.get_key(key.id) == updated
    identity = await store.find_identity(d, T0)
    assert identity is not None and (identity.scopes, identity.expires_at) == (("read",), T0 + 500)

    [event] = (await store.list_audit(AuditFilter(key_id=key.id, limit=1))).items
    assert event.action == "key.update" and event.at == T0
    assert event.before is not None and event.after is not None
    assert (event.before["name"], event.after["name"]) == ("old-name", "new-name")
    assert (event.before["scopes"], event.after["scopes"]) == (None, ["read"])

    # None clears expiry and scopes; UNSET leaves the rest alone.
    cleared, _ = await store.update_key(
        key.id, KeyChanges(expires_at=None, scopes=None), "admin", max_active=MANY, now=T0
    )
    assert (cleared.expires_at, cleared.scopes, cleared.name) == (None, None, "new-name")
    identity = await store.find_identity(d, T0)
    assert identity is not None and identity.scopes == ("read", "write")
    with pytest.raises(NotFound):
        await store.update_key("key_missing", changes, "admin", max_active=MANY, now=T0)


async def test_rotate_without_grace_retires_the_old_secret_at_once(store: Store) -> None:
    p = await make_principal(store)
    key, old = await make_key(store, p)
    new, start = new_secret()
    rotated, change = await store.rotate_key(
        key.id, digest=new, start=start, previous_valid_until=None, actor="admin", now=T0 + 1
    )
    assert change.digests == (old,)
    assert rotated.start == start != key.start and rotated.previous_valid_until is None
    assert await store.find_identity(old, T0 + 1) is None
    identity = await store.find_identity(new, T0 + 1)
    assert identity is not None and identity.key_id == key.id
    [event] = (await store.list_audit(AuditFilter(key_id=key.id, limit=1))).items
    assert event.action == "key.rotate"
    assert event.before is not None and event.after is not None
    assert (event.before["start"], event.after["start"]) == (key.start, start)


async def test_rotate_with_grace_keeps_the_old_secret_until_the_grace_ends(store: Store) -> None:
    p = await make_principal(store)
    key, old = await make_key(store, p, expires_at=T0 + 10_000)
    new, start = new_secret()
    grace_end = T0 + 60
    rotated, _ = await store.rotate_key(
        key.id, digest=new, start=start, previous_valid_until=grace_end, actor="admin", now=T0
    )
    assert rotated.previous_valid_until == grace_end

    both = await store.find_identities([old, new], T0 + 1)
    assert set(both) == {old, new}
    assert both[old].expires_at == grace_end and both[old].key_id == key.id
    assert both[new].expires_at == T0 + 10_000

    after = await store.find_identities([old, new], grace_end + 1)
    assert set(after) == {new}

    # Deleting the key hands back both digests for invalidation.
    deleted = (await store.delete_key(key.id, "admin")).digests
    assert deleted is not None and sorted(deleted) == sorted([old, new])


async def test_rotating_an_inactive_key_is_refused(store: Store) -> None:
    p = await make_principal(store)
    key, _ = await make_key(store, p)
    await store.revoke_key(key.id, "admin", T0)
    expiring, _ = await make_key(store, p, "expiring", expires_at=T0 + 5)
    before = await audit_count(store)
    new, start = new_secret()
    for key_id in (key.id, expiring.id):
        with pytest.raises(Conflict, match="only an active key can be rotated"):
            await store.rotate_key(
                key_id, digest=new, start=start, previous_valid_until=None, actor="a", now=T0 + 10
            )
    assert await audit_count(store) == before
    assert (await store.get_key(key.id)).start == key.start
    assert await store.find_identity(new, T0) is None


async def test_delete_key(store: Store) -> None:
    p = await make_principal(store)
    key, d = await make_key(store, p)
    other, d_other = await make_key(store, p, "other")
    assert (await store.delete_key(key.id, "admin")).digests == (d,)
    with pytest.raises(NotFound):
        await store.get_key(key.id)
    assert await store.find_identity(d, T0) is None
    assert [k.id for k in await all_keys(store)] == [other.id]
    assert await store.find_identity(d_other, T0) is not None
    with pytest.raises(NotFound):
        await store.delete_key(key.id, "admin")
    [event] = (await store.list_audit(AuditFilter(key_id=key.id, limit=1))).items
    assert event.action == "key.delete" and event.after is None and event.before is not None


# -- usage and audit ---------------------------------------------------------------------------


async def test_usage_written_before_migration_3_still_counts(store: Store, store_url: str) -> None:
    """Versions before schema 3 wrote usage into the keys table; during a rolling upgrade they may
    still do. A key's values are the later time and the sum over both places."""
    p = await make_principal(store)
    a, b = [(await make_key(store, p, f"k{i}"))[0] for i in range(2)]
    await execute_sql(store_url, f"UPDATE keys SET last_used_at = {T0 + 50}, request_count = 7 WHERE id = '{a.id}'")
    await execute_sql(store_url, f"UPDATE keys SET last_used_at = {T0 + 1}, request_count = 2 WHERE id = '{b.id}'")
    await store.record_usage([UsageUpdate(a.id, T0 + 10, 3), UsageUpdate(b.id, T0 + 20, 1)])
    got = {k.id: (k.last_used_at, k.request_count) for k in await all_keys(store)}
    assert got == {a.id: (T0 + 50, 10), b.id: (T0 + 20, 3)}
    assert (await store.get_key(a.id)).request_count == 10
    # Deleting a key takes its usage row with it.
    await store.delete_key(a.id, "test")
    await store.record_usage([UsageUpdate(a.id, T0 + 60, 1)])  # a late flush for it: ignored
    assert [k.id for k in await all_keys(store)] == [b.id]


async def test_record_usage_merges_batches_from_many_instances(store: Store) -> None:
    p = await make_principal(store)
    keys = [(await make_key(store, p, f"k{i}"))[0] for i in range(4)]
    a, b, c, idle = keys

    # Instance 1 flushes a batch covering several keys in one call.
    await store.record_usage([UsageUpdate(a.id, T0 + 10, 3), UsageUpdate(b.id, T0 + 20, 1)])
    # Instance 2 saw older requests for a, newer ones for b, and names c twice in its batch.
    await store.record_usage(
        [
            UsageUpdate(a.id, T0 + 5, 2),
            UsageUpdate(b.id, T0 + 30, 4),
            UsageUpdate(c.id, T0 + 7, 1),
            UsageUpdate(c.id, T0 + 6, 2),
            UsageUpdate("key_unknown", T0, 1),  # a key deleted meanwhile is ignored
        ]
    )
    await store.record_usage([])

    got = {k.id: (k.last_used_at, k.request_count) for k in await all_keys(store)}
    assert got[a.id] == (T0 + 10, 5)  # last use never moves backwards
    assert got[b.id] == (T0 + 30, 5)
    assert got[c.id] == (T0 + 7, 3)
    assert got[idle.id] == (None, 0)
    # Usage is not an admin change: no audit rows.
    assert await audit_count(store) == 5


async def test_audit_is_listed_by_key_principal_and_time(store: Store) -> None:
    alice = await make_principal(store, created_at=T0)
    bob = await make_principal(store, "bob", created_at=T0 + 1)
    key, _ = await make_key(store, alice, created_at=T0 + 10)
    await store.update_key(key.id, KeyChanges(name="renamed"), "ops", max_active=MANY, now=T0 + 20)
    await store.revoke_key(key.id, "ops", T0 + 30)
    bobs_key, _ = await make_key(store, bob, created_at=T0 + 40)

    by_key = (await store.list_audit(AuditFilter(key_id=key.id))).items
    assert [e.action for e in by_key] == ["key.revoke", "key.update", "key.create"]
    assert all(e.target_id == key.id and e.target_type == "key" for e in by_key)

    by_alice = (await store.list_audit(AuditFilter(principal_id=alice.id))).items
    assert [e.action for e in by_alice] == [
        "key.revoke",
        "key.update",
        "key.create",
        "principal.create",
    ]
    by_bob = (await store.list_audit(AuditFilter(principal_id=bob.id))).items
    assert [(e.action, e.target_id) for e in by_bob] == [
        ("key.create", bobs_key.id),
        ("principal.create", bob.id),
    ]

    window = (await store.list_audit(AuditFilter(since=T0 + 10, until=T0 + 30))).items
    assert [(e.action, e.at) for e in window] == [("key.update", T0 + 20), ("key.create", T0 + 10)]
    assert [e.at for e in (await store.list_audit(AuditFilter(since=T0 + 30))).items] == [
        T0 + 40,
        T0 + 30,
    ]

    everything = (await store.list_audit(AuditFilter())).items
    assert len(everything) == 6
    assert [e.id for e in everything] == sorted((e.id for e in everything), reverse=True)
    paged = []
    cursor = None
    while True:
        page = await store.list_audit(AuditFilter(limit=4, cursor=cursor))
        paged += page.items
        cursor = page.next_cursor
        if cursor is None:
            break
    assert paged == everything
    paged_alice = await store.list_audit(AuditFilter(principal_id=alice.id, limit=3))
    rest = await store.list_audit(AuditFilter(principal_id=alice.id, limit=3, cursor=paged_alice.next_cursor))
    assert paged_alice.items + rest.items == by_alice and rest.next_cursor is None
    with pytest.raises(ValueError):
        await store.list_audit(AuditFilter(cursor="nope"))


async def test_refused_changes_leave_no_trace(store: Store) -> None:
    p = await make_principal(store)
    key, d = await make_key(store, p, "k", max_active=2)
    await make_key(store, p, "k2", max_active=2)
    audit_before = await store.list_audit(AuditFilter(limit=1000))
    keys_before = await all_keys(store)
    principal_before = await store.get_principal(p.id)
    new, start = new_secret()

    gone = msgspec.structs.replace(p, id="prn_gone")
    rename = KeyChanges(name="k2")
    refused: list[tuple[type[StoreError], Callable[[], Awaitable[object]]]] = [
        (NameTaken, lambda: make_principal(store)),
        (LimitExceeded, lambda: make_key(store, p, "k3", max_active=2)),
        (NameTaken, lambda: make_key(store, p, "k", max_active=MANY)),
        (NotFound, lambda: make_key(store, gone, "k9")),
        (NameTaken, lambda: store.update_key(key.id, rename, "a", max_active=9, now=T0)),
        (NotFound, lambda: store.update_key("key_gone", rename, "a", max_active=9, now=T0)),
        (NotFound, lambda: store.revoke_key("key_gone", "a", T0)),
        (NotFound, lambda: store.delete_key("key_gone", "a")),
        (
            NotFound,
            lambda: store.rotate_key(
                "key_gone", digest=new, start=start, previous_valid_until=None, actor="a", now=T0
            ),
        ),
        (NotFound, lambda: store.update_principal("nobody", PrincipalChanges(disabled=True), "a")),
        (NotFound, lambda: store.delete_principal("nobody", "a", with_keys=True)),
        (HasKeys, lambda: store.delete_principal(p.id, "a", with_keys=False)),
    ]
    for error, attempt in refused:
        with pytest.raises(error):
            await attempt()

    assert await store.list_audit(AuditFilter(limit=1000)) == audit_before
    assert await all_keys(store) == keys_before
    assert await store.get_principal(p.id) == principal_before
    assert await store.find_identity(d, T0) is not None
    assert await store.find_identity(new, T0) is None


# -- schema ------------------------------------------------------------------------------------


async def test_migrations_apply_once_and_refuse_a_newer_database(fresh_url: str) -> None:
    store = await open_store(fresh_url, pool_min=1, pool_max=2)
    try:
        assert await store.schema_version() == 0
        with pytest.raises(SchemaMismatch, match="keystile migrate"):
            await store.check_schema()
        versions = [v for v, _ in migrations(store.backend)]  # every file, in order, once
        assert versions[:4] == [1, 2, 3, 4] and 6 in versions
        assert await store.migrate() == versions
        assert await store.schema_version() == versions[-1]
        await store.check_schema()
        assert await store.migrate() == []
        await store.ping()

        await execute_sql(fresh_url, "INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)")
        assert await store.schema_version() == 999
        with pytest.raises(SchemaMismatch, match="newer"):
            await store.check_schema()
        with pytest.raises(SchemaMismatch):
            await store.migrate()
        assert await store.schema_version() == 999
    finally:
        await store.close()


# -- PostgreSQL only ---------------------------------------------------------------------------


async def test_concurrent_creates_never_exceed_the_key_limit(pg_store: Store) -> None:
    p = await make_principal(pg_store)
    results = await asyncio.gather(
        *(make_key(pg_store, p, f"k{i}", max_active=3) for i in range(20)),
        return_exceptions=True,
    )
    created = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(created) == 3
    assert len(refused) == 17 and all(isinstance(e, LimitExceeded) for e in refused)
    assert len(await all_keys(pg_store)) == 3
    assert await audit_count(pg_store) == 1 + 3


async def test_concurrent_principal_creates_with_one_name(pg_store: Store) -> None:
    # Both may pass the name check; the unique index decides and surfaces as NameTaken.
    results = await asyncio.gather(
        *(make_principal(pg_store, "same") for _ in range(10)), return_exceptions=True
    )
    assert sum(isinstance(r, Principal) for r in results) == 1
    assert all(isinstance(r, NameTaken) for r in results if not isinstance(r, Principal))
    assert await audit_count(pg_store) == 1


async def test_concurrent_migrations_apply_once(fresh_pg_url: str) -> None:
    stores = [await open_store(fresh_pg_url, pool_min=1, pool_max=1) for _ in range(4)]
    try:
        applied = await asyncio.gather(*(s.migrate() for s in stores))
        assert sorted(applied) == [[], [], [], [v for v, _ in migrations("postgresql")]]
        assert await stores[0].schema_version() == latest_version("postgresql")
    finally:
        for s in stores:
            await s.close()


async def test_unreachable_server_is_unavailable_quickly() -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await open_store("postgresql://postgres@127.0.0.1:1/postgres", timeout=2.0)
    assert time.monotonic() - started < 2.0


async def test_closed_store_is_unavailable(pg_url: str) -> None:
    store = await open_store(pg_url, pool_min=1, pool_max=1)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.get_key("key_x")
    with pytest.raises(StoreUnavailable):
        await store.record_usage([UsageUpdate("key_x", T0, 1)])


async def test_store_recovers_when_the_server_drops_its_connections(pg_store: Store, pg_url: str) -> None:
    p = await make_principal(pg_store)
    await execute_sql(
        pg_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'keystile' AND datname = current_database() "
        "AND pid <> pg_backend_pid()",
    )
    # The first call may find its pooled connection dead: that is StoreUnavailable, nothing else.
    try:
        await pg_store.get_principal(p.id)
    except StoreUnavailable:
        pass
    assert await pg_store.get_principal(p.id) == p
