"""The admin API on a real admin listener: every route, every policy, every refusal.

Every answer is also checked against the OpenAPI document (``tests.admin_client``). Each refused
request is followed by a look at principals, keys and audit: a refusal writes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import create_app
from gateway.clock import ManualClock
from gateway.config import Secrets
from gateway.keys import generate_key
from gateway.observability import JSONFormatter
from gateway.store import open_store
from tests.admin_client import _NO_BODY, AdminAPI
from tests.conftest import ADMIN_TOKEN, HASH_SECRET, make_config
from tests.store.conftest import PgServer, pg_server  # noqa: F401 - the fixture is used by name
from tests.upstream import RecordingUpstream

ACTOR = "admin:" + hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()[:8]


# -- authentication --------------------------------------------------------------------------


async def test_every_v1_route_needs_a_valid_admin_token(keystile, admin) -> None:
    gw = await keystile()
    good = admin(gw)
    await good.principal()
    before = await good.state()
    for client in (admin(gw, token=None), admin(gw, token="wrong-" + ADMIN_TOKEN), admin(gw, token=" ")):
        for method, path in (
            ("GET", "/v1/keys"),
            ("POST", "/v1/keys"),
            ("GET", "/v1/principals/alice"),
            ("DELETE", "/v1/principals/alice"),
            ("POST", "/v1/keys/verify"),
            ("GET", "/v1/audit"),
        ):
            body = {"owner": "alice", "project": "p1"} if method == "POST" else None
            r = await client.request(method, path, **({"body": body} if body else {}))
            assert r.status == 401 and r.error == "unauthenticated", (method, path, r.json)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert r.json["field"] is None
    # Another scheme, or the token in another header, is not an admin token.
    for headers in ({"Authorization": f"Basic {ADMIN_TOKEN}"}, {"X-API-Key": ADMIN_TOKEN}):
        r = await admin(gw, token=None).get("/v1/keys", headers=headers)
        assert r.status == 401
    assert await good.state() == before
    # Public: health, readiness and the OpenAPI document.
    anonymous = admin(gw, token=None)
    assert (await anonymous.get("/healthz")).json == {"status": "ok"}
    assert (await anonymous.get("/readyz")).json["ready"] is True
    doc = await anonymous.get("/v1/openapi.json")
    assert doc.status == 200 and doc.json["openapi"] == "3.1.0"


async def test_with_no_admin_tokens_configured_every_v1_request_is_refused(tmp_path: Path) -> None:
    cfg = make_config({"store": {"url": f"sqlite:///{tmp_path}/k.db"}})
    store = await open_store(cfg.store.url)
    await store.migrate()
    gw = create_app(cfg, Secrets(HASH_SECRET, ()), store=store)
    await gw.start()
    try:
        async with aiohttp.ClientSession() as session:
            api = AdminAPI(session, f"http://127.0.0.1:{gw.admin_port}", ADMIN_TOKEN)
            r = await api.get("/v1/principals")
            assert r.status == 401 and "no admin tokens are configured" in r.json["message"]
            assert (await api.get("/healthz")).status == 200
    finally:
        await gw.stop()
        await store.close()


async def test_writes_are_audited_with_the_token_hash_never_the_token(keystile, admin) -> None:
    gw = await keystile()
    api = admin(gw)
    await api.principal()
    created = await api.key()
    audit = await api.ok("GET", "/v1/audit")
    assert [e["action"] for e in audit["items"]] == ["key.create", "principal.create"]
    assert {e["actor"] for e in audit["items"]} == {ACTOR}
    text = json.dumps(audit)
    assert ADMIN_TOKEN not in text and created["key"] not in text and "digest" not in text


# -- principals ------------------------------------------------------------------------------


async def test_principal_create_get_list_update_disable_enable_delete(keystile, admin) -> None:
    gw = await keystile()
    api = admin(gw)
    alice = await api.principal("alice", {"billing": ["read", "write", "read"]}, metadata={"team": "x"})
    assert alice["id"].startswith("prn_") and alice["kind"] == "user" and alice["disabled"] is False
    assert alice["grants"] == {"billing": ["read", "write"]} and alice["metadata"] == {"team": "x"}
    svc = await api.principal("svc-etl", {}, kind="service")
    assert svc["kind"] == "service" and svc["grants"] == {}

    assert await api.ok("GET", "/v1/principals/alice") == alice
    assert await api.ok("GET", f"/v1/principals/{alice['id']}") == alice
    await api.principal("bob")
    first = await api.ok("GET", "/v1/principals", params={"limit": "2"})
    assert [p["name"] for p in first["items"]] == ["alice", "bob"] and first["next_cursor"]
    rest = await api.ok("GET", "/v1/principals", params={"limit": "2", "cursor": first["next_cursor"]})
    assert [p["name"] for p in rest["items"]] == ["svc-etl"] and rest["next_cursor"] is None

    updated = await api.ok("PATCH", "/v1/principals/alice", {"grants": {"billing": ["read"], "crm": []}})
    assert updated["grants"] == {"billing": ["read"], "crm": []} and updated["metadata"] == {"team": "x"}
    updated = await api.ok("PATCH", "/v1/principals/alice", {"metadata": {}})
    assert updated["metadata"] == {} and updated["grants"] == {"billing": ["read"], "crm": []}
    audit_before = await api.ok("GET", "/v1/audit")
    assert await api.ok("PATCH", "/v1/principals/alice", {}) == updated  # no change, no audit row
    assert await api.ok("GET", "/v1/audit") == audit_before

    assert (await api.ok("POST", "/v1/principals/alice/disable"))["disabled"] is True
    assert (await api.ok("GET", "/v1/principals/alice"))["disabled"] is True
    assert (await api.ok("POST", "/v1/principals/alice/enable", {}))["disabled"] is False

    assert (await api.delete("/v1/principals/bob")).status == 204
    assert (await api.get("/v1/principals/bob")).error == "not_found"
    actions = [e["action"] for e in (await api.ok("GET", "/v1/audit"))["items"]]
    assert actions[:5] == [
        "principal.delete",
        "principal.enable",
        "principal.disable",
        "principal.update",
        "principal.update",
    ]


async def test_deleting_a_principal_with_keys_is_explicit(keystile, admin) -> None:
    gw = await keystile()
    api = admin(gw)
    alice = await api.principal()
    k1, k2 = await api.key(name="one"), await api.key(name="two")
    await api.ok("POST", f"/v1/keys/{k2['id']}/revoke")  # revoked keys count too
    before = await api.state()
    r = await api.delete("/v1/principals/alice")
    assert r.status == 409 and r.error == "principal_has_keys" and "with_keys=true" in r.json["message"]
    r = await api.delete("/v1/principals/alice", params={"with_keys": "false"})
    assert r.status == 409
    assert await api.state() == before
    assert (await api.delete("/v1/principals/alice", params={"with_keys": "true"})).status == 204
    for k in (k1, k2):
        assert (await api.get(f"/v1/keys/{k['id']}")).status == 404
    assert (await api.ok("GET", "/v1/keys"))["items"] == []
    # Once deleted, a principal's trail is found by its id.
    event = (await api.ok("GET", "/v1/audit", params={"principal": alice["id"]}))["items"][0]
    assert event["action"] == "principal.delete" and event["before"]["keys_deleted"] == 2


async def test_principal_names_are_unique(keystile, admin) -> None:
    gw = await keystile()
    api = admin(gw)
    alice = await api.principal()
    before = await api.state()
    for name in ("alice", alice["id"]):
        r = await api.post("/v1/principals", {"name": name})
        assert r.status == 409 and r.error == "name_taken"
    assert await api.state() == before


# -- keys ------------------------------------------------------------------------------------


async def test_create_key_shows_the_secret_once(keystile, admin) -> None:
    gw = await keystile()
    api = admin(gw)
    await api.principal()
    created = await api.key(scopes=["read"], metadata={"ci": "yes"}, expires_in=3600)
    secret = created.pop("key")
    assert secret.startswith("ks_live_") and created["start"] == secret[:12] + "…"
    assert re.fullmatch(r"API Key name \d{14}", created["name"])
    assert created["status"] == "active" and created["principal"] == "alice"
    assert created["scopes"] == ["read"] and created["metadata"] == {"ci": "yes"}
    assert created["expires_at"] == pytest.approx(time.time() + 3600, abs=5)
    assert created["last_used_at"] is None and created["revoked_at"] is None
    shown = await api.ok("GET", f"/v1/keys/{created['id']}")
    assert shown == created
    listed = await api.get("/v1/keys")
    assert listed.json["items"] == [created]
    for reply in (listed.raw, (await api.get(f"/v1/keys/{created['id']}")).raw):
        assert secret.encode() not in reply and b"digest" not in reply
    test_key = await api.key(name="t", env="test")
    assert test_key["key"].startswith("ks_test_") and test_key["env"] == "test"


async def test_list_keys_filters_searches_orders_and_pages(keystile, admin) -> None:
    clock = ManualClock()  # creation order and expiry, moved by the test
    gw = await keystile(clock=clock)
    api = admin(gw)
    alice = await api.principal("alice", {"p1": ["read"], "p2": ["read"]})
    await api.principal("bob", {"p1": ["read"]})
    made = []
    for owner, project, name in [
        ("alice", "p1", "Billing export"),
        ("alice", "p2", "crm sync"),
        ("bob", "p1", "BILLING backup"),
        ("alice", "p1", "nightly 100%_done"),
        ("bob", "p1", "short"),
    ]:
        made.append(await api.key(owner, project, name=name))
        clock.advance(0.002)
    expiring = await api.key("alice", "p2", name="soon gone", expires_in=0.2)
    await api.ok("POST", f"/v1/keys/{made[4]['id']}/revoke")
    clock.advance(0.3)

    async def ids(**params: str) -> list[str]:
        page = await api.ok("GET", "/v1/keys", params=params)
        return [k["id"] for k in page["items"]]

    newest_first = [k["id"] for k in reversed([*made, expiring])]
    assert await ids() == newest_first
    assert await ids(owner="alice") == await ids(owner=alice["id"])
    assert await ids(owner="alice") == [expiring["id"], made[3]["id"], made[1]["id"], made[0]["id"]]
    assert await ids(owner="alice", project="p1") == [made[3]["id"], made[0]["id"]]
    assert await ids(status="revoked") == [made[4]["id"]]
    assert await ids(status="expired") == [expiring["id"]]
    assert expiring["id"] not in await ids(status="active")
    assert len(await ids(status="active")) == 4
    assert await ids(q="billing") == [made[2]["id"], made[0]["id"]]
    assert await ids(q="100%_") == [made[3]["id"]]  # LIKE wildcards are matched literally
    assert await ids(q="%") == [made[3]["id"]]
    assert await ids(owner="nobody") == []
    statuses = {k["id"]: k["status"] for k in (await api.ok("GET", "/v1/keys"))["items"]}
    assert statuses[expiring["id"]] == "expired" and statuses[made[4]["id"]] == "revoked"

    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = await api.ok("GET", "/v1/keys", params=params)
        seen += [k["id"] for k in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == newest_first


async def test_update_key_fields(keystile, admin) -> None:
    gw = await keystile()
    api = admin(gw)
    await api.principal()
    k = await api.key(name="old", scopes=["read"])
    later = time.time() + 7200
    got = await api.ok(
        "PATCH",
        f"/v1/keys/{k['id']}",
        {"name": "new", "expires_at": later, "scopes": ["write"], "metadata": {"a": "b"}},
    )
    assert (got["name"], got["expires_at"], got["scopes"], got["metadata"]) == (
        "new",
        later,
        ["write"],
        {"a": "b"},
    )
    got = await api.ok("PATCH", f"/v1/keys/{k['id']}", {"expires_at": None, "scopes": None})
    assert got["expires_at"] is None and got["scopes"] is None and got["name"] == "new"
    audit = await api.ok("GET", "/v1/audit", params={"key_id": k["id"]})
    assert await api.ok("PATCH", f"/v1/keys/{k['id']}", {}) == got
    assert await api.ok("GET", "/v1/audit", params={"key_id": k["id"]}) == audit
    event = audit["items"][0]
    assert event["action"] == "key.update" and event["before"]["expires_at"] == later
    assert event["after"]["expires_at"] is None


async def test_revoked_keys_stay_listed_and_cannot_be_rotated(keystile, admin) -> None:
    gw = await keystile()
    api = admin(gw)
    await api.principal()
    k = await api.key()
    revoked = await api.ok("POST", f"/v1/keys/{k['id']}/revoke")
    assert revoked["status"] == "revoked" and revoked["revoked_at"] is not None
    assert (await api.ok("GET", f"/v1/keys/{k['id']}"))["status"] == "revoked"
    assert (await api.ok("POST", "/v1/keys/verify", {"key": k["key"]}))["code"] == "invalid_api_key"
    before = await api.state()
    r = await api.post(f"/v1/keys/{k['id']}/rotate", {"grace_seconds": 60})
    assert r.status == 409 and r.error == "key_not_active" and "revoked" in r.json["message"]
    assert await api.state() == before


async def test_delete_key_removes_it(keystile, admin) -> None:
    gw = await keystile()
    api = admin(gw)
    await api.principal()
    k = await api.key()
    assert (await api.delete(f"/v1/keys/{k['id']}")).status == 204
    assert (await api.get(f"/v1/keys/{k['id']}")).error == "not_found"
    assert (await api.delete(f"/v1/keys/{k['id']}")).status == 404
    assert (await api.ok("POST", "/v1/keys/verify", {"key": k["key"]}))["valid"] is False
    actions = [e["action"] for e in (await api.ok("GET", "/v1/audit", params={"key_id": k["id"]}))["items"]]
    assert actions == ["key.delete", "key.create"]


async def test_rotate_gives_a_new_secret_with_the_same_settings(keystile, admin) -> None:
    gw = await keystile()
    api = admin(gw)
    await api.principal()
    k = await api.key(name="svc", scopes=["read"], metadata={"x": "y"})
    rotated = await api.ok("POST", f"/v1/keys/{k['id']}/rotate")
    assert rotated["key"] != k["key"] and rotated["previous_valid_until"] is None
    assert rotated["start"] == rotated["key"][:12] + "…"
    same = ("id", "name", "scopes", "metadata", "project", "principal", "created_at", "expires_at")
    assert {f: rotated[f] for f in same} == {f: k[f] for f in same}
    assert (await api.ok("POST", "/v1/keys/verify", {"key": k["key"]}))["code"] == "invalid_api_key"
    assert (await api.ok("POST", "/v1/keys/verify", {"key": rotated["key"]}))["valid"] is True

    graced = await api.ok("POST", f"/v1/keys/{k['id']}/rotate", {"grace_seconds": 3600})
    assert graced["previous_valid_until"] == pytest.approx(time.time() + 3600, abs=5)
    assert (await api.ok("GET", f"/v1/keys/{k['id']}"))["previous_valid_until"] == graced[
        "previous_valid_until"
    ]
    for secret in (rotated["key"], graced["key"]):
        assert (await api.ok("POST", "/v1/keys/verify", {"key": secret}))["valid"] is True


# -- verify ----------------------------------------------------------------------------------


async def test_verify_makes_the_proxys_decision(keystile, admin) -> None:
    clock = ManualClock()  # the expiring key's end, moved by the test
    gw = await keystile(clock=clock)
    api = admin(gw)
    await api.principal("alice", {"p1": ["read", "write"]})
    await api.principal("nomad", {"elsewhere": ["read"]})
    k = await api.key(scopes=["read"])
    outsider = await api.key("nomad", "p1")  # no grant in p1
    expiring = await api.key(name="brief", expires_in=0.2)

    async def verify(body: dict[str, Any]) -> Any:
        return await api.ok("POST", "/v1/keys/verify", body)

    async with (
        aiohttp.ClientSession() as s,
        s.get(gw.url + "/_keystile/whoami", headers={"X-API-Key": k["key"]}) as r,
    ):
        whoami = await r.json()
    ok = await verify({"key": k["key"]})
    assert ok["valid"] is True and ok["code"] == "ok"
    assert ok["identity"] == whoami  # the same shape and values as the proxy's whoami
    assert ok["identity"]["scopes"] == ["read"] and ok["identity"]["principal"] == "alice"
    assert (await verify({"key": k["key"], "scopes": ["read"]}))["code"] == "ok"
    assert await verify({"key": k["key"], "scopes": ["write"]}) == {
        "valid": False,
        "code": "insufficient_scope",
        "identity": None,
    }
    assert (await verify({"key": outsider["key"]}))["code"] == "insufficient_scope"
    assert (await verify({}))["code"] == "missing_api_key"
    assert (await verify({"key": None}))["code"] == "missing_api_key"
    typo = k["key"][:-1] + ("y" if k["key"].endswith("x") else "x")  # a different last character
    for bad in ("", "nope", typo, generate_key("ks", "live"), generate_key("zz", "live")):
        assert (await verify({"key": bad}))["code"] == "invalid_api_key"
    clock.advance(0.3)
    assert (await verify({"key": expiring["key"]}))["code"] == "expired_api_key"

    # A valid verification counts as use; the next answer reports it.
    again = await verify({"key": k["key"]})
    assert again["identity"]["last_used_at"] == pytest.approx(clock.time(), abs=5)


async def test_verify_refuses_bad_bodies_without_echoing_the_key(keystile, admin) -> None:
    gw = await keystile()
    api = admin(gw)
    await api.principal()
    k = await api.key()
    for body, fld in (
        ({"key": k["key"], "extra": 1}, "extra"),
        ({"key": k["key"], "scopes": "read"}, "scopes"),
    ):
        r = await api.post("/v1/keys/verify", body)
        assert r.status == 422 and r.json["field"] == fld
        assert k["key"].encode() not in r.raw
    r = await api.post("/v1/keys/verify", raw=b'{"key": "' + k["key"].encode() + b'"')
    assert r.status == 400 and k["key"].encode() not in r.raw


# -- policies --------------------------------------------------------------------------------


async def test_a_limit_of_one_refuses_a_second_key_and_hints_at_rotation(keystile, admin) -> None:
    gw = await keystile(policy={"max_active_keys": 1})
    api = admin(gw)
    await api.principal("alice", {"p1": ["read"], "p2": ["read"]})
    first = await api.key(name="only")
    before = await api.state()
    r = await api.post("/v1/keys", {"owner": "alice", "project": "p1", "name": "second"})
    assert r.status == 409 and r.error == "key_limit_reached" and "rotate" in r.json["message"]
    assert await api.state() == before
    await api.key(project="p2")  # the limit is per project
    await api.ok("POST", f"/v1/keys/{first['id']}/rotate")  # the one-key model: rotate to replace
    await api.ok("POST", f"/v1/keys/{first['id']}/revoke")
    await api.key(name="after revoke")  # only active keys count


async def test_key_lifetimes_default_and_maximum(keystile, admin) -> None:
    gw = await keystile(policy={"default_lifetime": "1h", "max_lifetime": "2h"})
    api = admin(gw)
    await api.principal()
    k = await api.key()
    assert k["expires_at"] == pytest.approx(time.time() + 3600, abs=5)
    assert (await api.key(name="b", expires_in=7000))["expires_at"] == pytest.approx(
        time.time() + 7000, abs=5
    )
    before = await api.state()
    for body, fld in (
        ({"expires_in": 3 * 3600}, "expires_in"),
        ({"expires_at": time.time() + 3 * 3600}, "expires_at"),
    ):
        r = await api.post("/v1/keys", {"owner": "alice", "project": "p1", **body})
        assert (r.status, r.json["field"]) == (422, fld) and "maximum key lifetime" in r.json["message"]
    for body in ({"expires_at": time.time() + 3 * 3600}, {"expires_at": None}):
        r = await api.patch(f"/v1/keys/{k['id']}", body)
        assert (r.status, r.error, r.json["field"]) == (422, "invalid_request", "expires_at")
    assert await api.state() == before


async def test_key_names_are_unique_per_principal_and_project(keystile, admin) -> None:
    gw = await keystile()
    api = admin(gw)
    await api.principal("alice", {"p1": [], "p2": []})
    await api.principal("bob", {"p1": []})
    k = await api.key(name="deploy")
    await api.key("alice", "p2", name="deploy")
    await api.key("bob", "p1", name="deploy")
    other = await api.key(name="x" * 200)
    before = await api.state()
    r = await api.post("/v1/keys", {"owner": "alice", "project": "p1", "name": "deploy"})
    assert r.status == 409 and r.error == "name_taken"
    r = await api.patch(f"/v1/keys/{other['id']}", {"name": "deploy"})
    assert r.status == 409 and r.error == "name_taken"
    assert await api.state() == before
    assert (await api.ok("PATCH", f"/v1/keys/{k['id']}", {"name": "deploy"}))["name"] == "deploy"


async def test_generated_names_stay_unique_within_one_second(keystile, admin) -> None:
    gw = await keystile()
    api = admin(gw)
    await api.principal()
    names = [(await api.key())["name"] for _ in range(3)]
    assert len(set(names)) == 3
    # A name carries the second it was made in (the three may straddle two): the first of a second
    # is the bare stamp, the ones after it in that second add a counter.
    stamps = [n[:27] for n in names]
    for i, (name, stamp) in enumerate(zip(names, stamps, strict=True)):
        assert re.fullmatch(r"API Key name \d{14}", stamp)
        first = stamps.index(stamp) == i
        assert name == stamp if first else re.fullmatch(re.escape(stamp) + r" \(\d\)", name)


# -- refusals write nothing ------------------------------------------------------------------

PAST = 1_000_000_000.0
NAME_201 = "n" * 201

# (method, path, keyword arguments for the request, status, error, field); {key} is a real key id.
BAD: list[tuple[str, str, dict[str, Any], int, str, str | None]] = [
    ("POST", "/v1/keys", {"raw": b'{"owner": "alice",'}, 400, "malformed_json", None),
    ("POST", "/v1/keys", {"raw": b"\xff\xfe"}, 400, "malformed_json", None),
    ("POST", "/v1/keys", {"body": []}, 422, "invalid_request", None),
    ("POST", "/v1/keys", {"body": {}}, 422, "invalid_request", "owner"),
    ("POST", "/v1/keys", {"body": {"owner": "alice"}}, 422, "invalid_request", "project"),
    ("POST", "/v1/keys", {"body": {"owner": 5, "project": "p1"}}, 422, "invalid_request", "owner"),
    (
        "POST",
        "/v1/keys",
        {"body": {"owner": "alice", "project": "p1", "colour": "red"}},
        422,
        "invalid_request",
        "colour",
    ),
    (
        "POST",
        "/v1/keys",
        {"body": {"owner": "alice", "project": "p1", "name": NAME_201}},
        422,
        "invalid_request",
        "name",
    ),
    (
        "POST",
        "/v1/keys",
        {"body": {"owner": "alice", "project": "p1", "name": ""}},
        422,
        "invalid_request",
        "name",
    ),
    (
        "POST",
        "/v1/keys",
        {"body": {"owner": "alice", "project": "p1", "name": "a\nb"}},
        422,
        "invalid_request",
        "name",
    ),
    (
        "POST",
        "/v1/keys",
        {"body": {"owner": "alice", "project": "p1", "expires_at": PAST}},
        422,
        "invalid_request",
        "expires_at",
    ),
    (
        "POST",
        "/v1/keys",
        {"body": {"owner": "alice", "project": "p1", "expires_at": "tomorrow"}},
        422,
        "invalid_request",
        "expires_at",
    ),
    (
        "POST",
        "/v1/keys",
        {"body": {"owner": "alice", "project": "p1", "expires_in": 0}},
        422,
        "invalid_request",
        "expires_in",
    ),
    (
        "POST",
        "/v1/keys",
        {"body": {"owner": "alice", "project": "p1", "expires_in": 60, "expires_at": 2e9}},
        422,
        "invalid_request",
        "expires_at",
    ),
    ("POST", "/v1/keys", {"body": {"owner": "nobody", "project": "p1"}}, 422, "invalid_request", "owner"),
    ("POST", "/v1/keys", {"body": {"owner": "alice", "project": "p 1"}}, 422, "invalid_request", "project"),
    (
        "POST",
        "/v1/keys",
        {"body": {"owner": "alice", "project": "p1", "scopes": ["a b"]}},
        422,
        "invalid_request",
        "scopes",
    ),
    (
        "POST",
        "/v1/keys",
        {"body": {"owner": "alice", "project": "p1", "scopes": [1]}},
        422,
        "invalid_request",
        "scopes[0]",
    ),
    (
        "POST",
        "/v1/keys",
        {"body": {"owner": "alice", "project": "p1", "env": "prod"}},
        422,
        "invalid_request",
        "env",
    ),
    (
        "POST",
        "/v1/keys",
        {"body": {"owner": "alice", "project": "p1", "metadata": {"a": 1}}},
        422,
        "invalid_request",
        "metadata",
    ),
    (
        "POST",
        "/v1/keys",
        {"body": {"owner": "alice", "project": "p1", "name": "taken"}},
        409,
        "name_taken",
        None,
    ),
    ("POST", "/v1/principals", {"body": {"name": ""}}, 422, "invalid_request", "name"),
    ("POST", "/v1/principals", {"body": {"name": NAME_201}}, 422, "invalid_request", "name"),
    ("POST", "/v1/principals", {"body": {"name": "carol", "kind": "robot"}}, 422, "invalid_request", "kind"),
    (
        "POST",
        "/v1/principals",
        {"body": {"name": "carol", "grants": {"p1": "read"}}},
        422,
        "invalid_request",
        "grants",
    ),
    (
        "POST",
        "/v1/principals",
        {"body": {"name": "carol", "grants": {"p 1": ["read"]}}},
        422,
        "invalid_request",
        "grants.p 1",
    ),
    (
        "POST",
        "/v1/principals",
        {"body": {"name": "carol", "disabled": True}},
        422,
        "invalid_request",
        "disabled",
    ),
    ("POST", "/v1/principals", {"body": {"name": "alice"}}, 409, "name_taken", None),
    (
        "PATCH",
        "/v1/principals/alice",
        {"body": {"grants": {"p1": ["a,b"]}}},
        422,
        "invalid_request",
        "grants.p1",
    ),
    ("PATCH", "/v1/principals/alice", {"body": {"disabled": True}}, 422, "invalid_request", "disabled"),
    ("PATCH", "/v1/principals/alice", {"body": {"name": "alicia"}}, 422, "invalid_request", "name"),
    ("PATCH", "/v1/principals/nobody", {"body": {"grants": {}}}, 404, "not_found", None),
    ("POST", "/v1/principals/nobody/disable", {}, 404, "not_found", None),
    ("POST", "/v1/principals/alice/disable", {"body": {"why": "x"}}, 422, "invalid_request", None),
    (
        "DELETE",
        "/v1/principals/alice",
        {"params": {"with_keys": "maybe"}},
        422,
        "invalid_request",
        "with_keys",
    ),
    ("DELETE", "/v1/principals/alice", {"params": {"force": "true"}}, 422, "invalid_request", "force"),
    ("DELETE", "/v1/principals/nobody", {}, 404, "not_found", None),
    ("GET", "/v1/principals/nobody", {}, 404, "not_found", None),
    # A principal cursor is the last name listed: any text, but never a NUL (no name holds one).
    ("GET", "/v1/principals", {"params": {"cursor": "a\x00b"}}, 422, "invalid_request", "cursor"),
    ("GET", "/v1/principals", {"params": {"limit": "0"}}, 422, "invalid_request", "limit"),
    ("PATCH", "/v1/keys/{key}", {"body": {"name": 7}}, 422, "invalid_request", "name"),
    ("PATCH", "/v1/keys/{key}", {"body": {"name": NAME_201}}, 422, "invalid_request", "name"),
    ("PATCH", "/v1/keys/{key}", {"body": {"expires_at": PAST}}, 422, "invalid_request", "expires_at"),
    ("PATCH", "/v1/keys/{key}", {"body": {"expires_in": -1}}, 422, "invalid_request", "expires_in"),
    ("PATCH", "/v1/keys/{key}", {"body": {"expires_in": "soon"}}, 422, "invalid_request", "expires_in"),
    (
        "PATCH",
        "/v1/keys/{key}",
        {"body": {"expires_in": 60, "expires_at": 2e9}},
        422,
        "invalid_request",
        "expires_in",
    ),
    ("PATCH", "/v1/keys/{key}", {"body": {"project": "p2"}}, 422, "invalid_request", "project"),
    ("PATCH", "/v1/keys/{key}", {"body": {"scopes": ["ok", ""]}}, 422, "invalid_request", "scopes[1]"),
    ("PATCH", "/v1/keys/{key}", {"body": {"name": "taken"}}, 409, "name_taken", None),
    ("PATCH", "/v1/keys/key_nope", {"body": {"name": "x"}}, 404, "not_found", None),
    (
        "POST",
        "/v1/keys/{key}/rotate",
        {"body": {"grace_seconds": 86401}},
        422,
        "invalid_request",
        "grace_seconds",
    ),
    (
        "POST",
        "/v1/keys/{key}/rotate",
        {"body": {"grace_seconds": -1}},
        422,
        "invalid_request",
        "grace_seconds",
    ),
    (
        "POST",
        "/v1/keys/{key}/rotate",
        {"body": {"grace_seconds": "1h"}},
        422,
        "invalid_request",
        "grace_seconds",
    ),
    ("POST", "/v1/keys/key_nope/rotate", {}, 404, "not_found", None),
    ("POST", "/v1/keys/key_nope/revoke", {}, 404, "not_found", None),
    ("POST", "/v1/keys/{key}/revoke", {"body": {"reason": "x"}}, 422, "invalid_request", None),
    ("DELETE", "/v1/keys/key_nope", {}, 404, "not_found", None),
    ("GET", "/v1/keys/key_nope", {}, 404, "not_found", None),
    ("GET", "/v1/keys", {"params": {"limit": "0"}}, 422, "invalid_request", "limit"),
    ("GET", "/v1/keys", {"params": {"limit": "501"}}, 422, "invalid_request", "limit"),
    ("GET", "/v1/keys", {"params": {"limit": "ten"}}, 422, "invalid_request", "limit"),
    ("GET", "/v1/keys", {"params": {"status": "lost"}}, 422, "invalid_request", "status"),
    ("GET", "/v1/keys", {"params": {"cursor": "garbage"}}, 422, "invalid_request", "cursor"),
    ("GET", "/v1/keys", {"params": {"cursor": "W10"}}, 422, "invalid_request", "cursor"),
    ("GET", "/v1/keys", {"params": {"cursor": "1.5~key_\x00"}}, 422, "invalid_request", "cursor"),
    ("GET", "/v1/keys", {"params": {"cursor": "1.5~key_a\n"}}, 422, "invalid_request", "cursor"),
    ("GET", "/v1/keys", {"params": {"owner_id": "alice"}}, 422, "invalid_request", "owner_id"),
    ("GET", "/v1/keys?owner=a&owner=b", {}, 422, "invalid_request", "owner"),
    ("GET", "/v1/audit", {"params": {"cursor": "garbage"}}, 422, "invalid_request", "cursor"),
    ("GET", "/v1/audit", {"params": {"since": "yesterday"}}, 422, "invalid_request", "since"),
]


@pytest.mark.parametrize(
    ("method", "path", "kw", "status", "error", "field"),
    BAD,
    ids=[f"{m} {p} {status} {fld or error}" for m, p, _, status, error, fld in BAD],
)
async def test_bad_input_is_refused_and_writes_nothing(
    keystile, admin, method: str, path: str, kw: dict[str, Any], status: int, error: str, field: str | None
) -> None:
    gw = await keystile()
    api = admin(gw)
    await api.principal()
    k = await api.key(name="mine")
    await api.key(name="taken")
    before = await api.state()
    r = await api.request(method, path.replace("{key}", k["id"]), **kw)
    assert (r.status, r.error, r.json["field"]) == (status, error, field), r.json
    assert r.json["message"]
    assert await api.state() == before


async def test_cursors_of_one_list_are_refused_by_another(keystile, admin) -> None:
    gw = await keystile()
    api = admin(gw)
    await api.principal()
    for i in range(3):
        await api.key(name=f"k{i}")
    key_cursor = (await api.ok("GET", "/v1/keys", params={"limit": "1"}))["next_cursor"]
    r = await api.get("/v1/audit", params={"cursor": key_cursor})
    assert (r.status, r.json["field"]) == (422, "cursor")


async def test_unknown_routes_and_methods_answer_json(keystile) -> None:
    gw = await keystile()
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as s:
        for method, path, status, code in (
            ("GET", "/v1/nothing", 404, "not_found"),
            ("PUT", "/v1/keys", 405, "method_not_allowed"),
            ("GET", "/nothing", 404, "not_found"),
        ):
            async with s.request(method, gw.admin_url + path, headers=headers) as r:
                assert r.status == status and (await r.json())["error"] == code
        # 405 names the methods of that very path (RFC 9110 15.5.6): /v1/keys/verify is not
        # /v1/keys/{key_id} with the id "verify".
        for method, path, allow in (
            ("PUT", "/v1/keys", "GET,POST"),
            ("TRACE", "/healthz", "GET"),
            ("GET", "/v1/keys/verify", "POST"),
            ("OPTIONS", "/v1/keys/verify", "POST"),
            ("PUT", "/v1/keys/key_x", "DELETE,GET,PATCH"),
            ("GET", "/v1/principals/alice/disable", "POST"),
        ):
            async with s.request(method, gw.admin_url + path, headers=headers) as r:
                assert (r.status, r.headers.get("Allow")) == (405, allow), (method, path)
                assert (await r.json())["error"] == "method_not_allowed"
        # Unauthenticated requests learn nothing about which /v1 routes exist.
        async with s.get(gw.admin_url + "/v1/nothing") as r:
            assert r.status == 401
        async with s.post(
            gw.admin_url + "/v1/principals", data=io.BytesIO(b"x" * (2 << 20)), headers=headers
        ) as r:
            assert r.status == 413 and (await r.json())["error"] == "payload_too_large"


# -- the store and the key checks unavailable ------------------------------------------------


@pytest.fixture
async def fragile(tmp_path: Path) -> AsyncIterator[tuple[Any, str, str]]:
    """A gateway whose SQLite store gives up after 0.3 s; yields (gateway, admin url, db path)."""
    cfg = make_config({"store": {"url": f"sqlite:///{tmp_path}/f.db", "timeout": 0.3}})
    store = await open_store(cfg.store.url, timeout=0.3)
    await store.migrate()
    gw = create_app(cfg, Secrets(HASH_SECRET, (ADMIN_TOKEN.encode(),)), store=store)
    await gw.start()
    try:
        yield gw, f"http://127.0.0.1:{gw.admin_port}", str(tmp_path / "f.db")
    finally:
        await gw.stop()
        await store.close()


@pytest.fixture
def sqlite_lock() -> Iterator[Any]:
    holders: list[sqlite3.Connection] = []

    def lock(path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        holders.append(db)
        return db

    yield lock
    for db in holders:
        db.close()


async def test_a_locked_store_is_503_with_retry_after(fragile, sqlite_lock) -> None:
    gw, url, path = fragile
    async with aiohttp.ClientSession() as session:
        api = AdminAPI(session, url, ADMIN_TOKEN)
        await api.principal()
        db = sqlite_lock(path)
        r = await api.post("/v1/keys", {"owner": "alice", "project": "p1"})
        assert r.status == 503 and r.error == "store_unavailable" and r.headers["Retry-After"] == "1"
        db.execute("ROLLBACK")
        await api.key()
        assert len((await api.ok("GET", "/v1/keys"))["items"]) == 1


async def test_verify_is_503_only_when_keys_cannot_be_checked(fragile) -> None:
    gw, url, _ = fragile
    async with aiohttp.ClientSession() as session:
        api = AdminAPI(session, url, ADMIN_TOKEN)
        await api.principal()
        k = await api.key()
        assert (await api.ok("POST", "/v1/keys/verify", {"key": k["key"]}))["valid"] is True
        await gw.store.close()  # nothing can be loaded any more
        unknown = generate_key("ks", "live")
        r = await api.post("/v1/keys/verify", {"key": unknown})
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert r.json == {"valid": False, "code": "auth_unavailable", "identity": None}
        # A malformed key needs no lookup: still a plain answer.
        assert (await api.ok("POST", "/v1/keys/verify", {"key": "nope"}))["code"] == "invalid_api_key"


# -- PostgreSQL: the key limit holds under concurrent creates --------------------------------


@pytest.fixture
def pg_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (the store suite's server fixture)."""
    server: PgServer = request.getfixturevalue("pg_server")
    name = server.create_database()
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_concurrent_creates_through_the_api_never_exceed_the_limit(
    keystile, admin, request: pytest.FixtureRequest, backend: str
) -> None:
    sections: dict[str, Any] = {"policy": {"max_active_keys": 3}}
    if backend == "postgresql":
        sections["store"] = {"url": request.getfixturevalue("pg_database")}
    gw = await keystile(**sections)
    assert gw.store.backend == backend
    api = admin(gw)
    await api.principal()
    replies = await asyncio.gather(
        *(api.post("/v1/keys", {"owner": "alice", "project": "p1", "name": f"k{i}"}) for i in range(20))
    )
    statuses = sorted(r.status for r in replies)
    assert statuses == [201] * 3 + [409] * 17, statuses
    assert {r.error for r in replies if r.status == 409} == {"key_limit_reached"}
    assert len((await api.ok("GET", "/v1/keys", params={"status": "active"}))["items"]) == 3
    creates = [e for e in (await api.ok("GET", "/v1/audit"))["items"] if e["action"] == "key.create"]
    assert len(creates) == 3


# -- nothing secret in the logs --------------------------------------------------------------


async def test_logs_never_contain_the_admin_token_or_a_key_secret(keystile, admin, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await keystile()
    api = admin(gw)
    await api.principal()
    secrets = []
    k = await api.key()
    secrets.append(k["key"])
    rotated = await api.ok("POST", f"/v1/keys/{k['id']}/rotate", {"grace_seconds": 60})
    secrets.append(rotated["key"])
    async with aiohttp.ClientSession() as s:
        for secret in secrets:
            async with s.get(gw.url + "/x", headers={"X-API-Key": secret}) as r:
                assert r.status == 200
    await api.ok("POST", "/v1/keys/verify", {"key": k["key"]})
    await api.post("/v1/keys/verify", raw=b'{"key": "' + k["key"].encode() + b'", "oops"')
    await api.post("/v1/keys/verify", {"key": k["key"], "unexpected": True})
    await api.post("/v1/keys", {"owner": "alice", "project": "p1", "name": k["key"] + "x" * 200})
    await admin(gw, token=ADMIN_TOKEN + "x").get("/v1/keys")
    await api.ok("POST", f"/v1/keys/{k['id']}/revoke")
    await api.ok("DELETE", "/v1/principals/alice", status=204, params={"with_keys": "true"})

    formatter = JSONFormatter()
    lines = [formatter.format(r) for r in caplog.records]
    assert any('"admin request"' in line for line in lines)  # the admin listener does log
    text = "\n".join(lines) + caplog.text
    for secret in (ADMIN_TOKEN, *secrets):
        assert secret not in text


async def test_admin_token_with_raw_non_ascii_bytes_is_401(keystile) -> None:
    from tests.upstream import raw_request

    gw = await keystile()
    req = b"GET /v1/keys HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer \xff\xfe-not-a-token\r\nConnection: close\r\n\r\n"
    status, _, body = await raw_request(gw.gateway.admin_port, req)
    assert status == 401, body


# -- input that cannot exist, and store errors, on both backends -----------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_nul_in_ids_filters_cursors_or_names_is_a_clean_404_or_422(
    keystile, admin, request: pytest.FixtureRequest, backend: str
) -> None:
    """PostgreSQL cannot hold or compare a NUL: such input never reaches it, and nothing of its
    error text ever reaches a body."""
    sections: dict[str, Any] = {}
    if backend == "postgresql":
        sections["store"] = {"url": request.getfixturevalue("pg_database")}
    gw = await keystile(**sections)
    api = admin(gw)
    await api.principal()
    k = await api.key(name="mine")
    before = await api.state()
    replies = []
    for method, path in (
        ("GET", "/v1/keys/key_x%00"),
        ("PATCH", "/v1/keys/key_x%00"),
        ("POST", "/v1/keys/key_x%00/revoke"),
        ("POST", "/v1/keys/key_x%00/rotate"),
        ("DELETE", "/v1/keys/key_x%00"),
        ("GET", "/v1/principals/alice%00"),
        ("PATCH", "/v1/principals/alice%00"),
        ("POST", "/v1/principals/alice%00/disable"),
        ("DELETE", "/v1/principals/alice%00"),
    ):
        r = await api.request(method, path, {} if method in ("PATCH", "POST") else _NO_BODY)
        assert (r.status, r.error) == (404, "not_found"), (method, path, r.json)
        replies.append(r)
    # A forged cursor: the old opaque shape carrying a NUL, and the documented shapes with one.
    forged = base64.urlsafe_b64encode(b'[1.0,"key_\\u0000"]').decode().rstrip("=")
    for path, params, fld in (
        ("/v1/keys", {"cursor": forged}, "cursor"),
        ("/v1/keys", {"cursor": "1.5~key_\x00"}, "cursor"),
        ("/v1/principals", {"cursor": "alice\x00"}, "cursor"),
        ("/v1/audit", {"cursor": "1\x00"}, "cursor"),
        ("/v1/keys", {"owner": "alice\x00"}, "owner"),
        ("/v1/keys", {"project": "p1\x00"}, "project"),
        ("/v1/keys", {"q": "mi\x00"}, "q"),
        ("/v1/audit", {"principal": "alice\x00"}, "principal"),
        ("/v1/audit", {"key_id": k["id"] + "\x00"}, "key_id"),
    ):
        r = await api.get(path, params=params)
        assert (r.status, r.error, r.json["field"]) == (422, "invalid_request", fld), (path, params, r.json)
        replies.append(r)
    for path, body, fld in (
        ("/v1/keys", {"owner": "alice\x00", "project": "p1"}, "owner"),
        ("/v1/keys", {"owner": "alice", "project": "p1\x00"}, "project"),
        ("/v1/keys", {"owner": "alice", "project": "p1", "name": "a\x00"}, "name"),
        ("/v1/keys", {"owner": "alice", "project": "p1", "scopes": ["read\x00"]}, "scopes"),
        ("/v1/principals", {"name": "bob\x00"}, "name"),
        ("/v1/principals", {"name": "bob", "metadata": {"k\x00": "v"}}, "metadata"),
    ):
        r = await api.post(path, body)
        assert (r.status, r.json["field"]) == (422, fld), (body, r.json)
        replies.append(r)
    for r in replies:
        assert b"postgres" not in r.raw.lower() and b"sqlite" not in r.raw.lower(), r.raw
    assert await api.state() == before
    # A NUL in a metadata value is only text: stored and given back as it was.
    bob = await api.principal("bob", metadata={"note": "a\x00b"})
    assert (await api.ok("GET", f"/v1/principals/{bob['id']}"))["metadata"] == {"note": "a\x00b"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_store_error_is_a_generic_500_with_the_detail_only_in_the_log(
    keystile, request: pytest.FixtureRequest, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    sections: dict[str, Any] = {}
    if backend == "postgresql":
        sections["store"] = {"url": request.getfixturevalue("pg_database")}
    gw = await keystile(**sections)
    from tests.store.conftest import execute_sql

    await execute_sql(gw.cfg.store.url, "DROP TABLE audit")  # every write now fails in the store
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with caplog.at_level(logging.WARNING, logger="keystile.admin"):
        async with aiohttp.ClientSession() as s, s.post(
            gw.admin_url + "/v1/principals", json={"name": "carol"}, headers=headers
        ) as r:
            assert r.status == 500
            assert await r.json() == {
                "error": "store_error",
                "message": "the key store failed; see the server log",
                "field": None,
            }
    assert "audit" in caplog.text  # the detail, for the operator


# -- names: no control, format (bidi, zero-width) or unassigned characters --------------------

# C1 (U+009B is a terminal's CSI), line and paragraph separators, a bidi override, a bidi isolate,
# a zero-width space, a BOM, the soft hyphen, an unassigned code point, plus C0 and DEL.
HOSTILE = ["\x9b", "\u2028", "\u2029", "\u202e", "\u2066", "\u200b", "\ufeff", "\u00ad", "\u0378", "\x1b", "\x7f"]


@pytest.mark.parametrize("char", HOSTILE, ids=[f"U+{ord(c):04X}" for c in HOSTILE])
async def test_names_projects_scopes_and_metadata_keys_refuse_invisible_and_control_characters(
    keystile, admin, char: str
) -> None:
    gw = await keystile()
    api = admin(gw)
    await api.principal()
    k = await api.key(name="mine")
    before = await api.state()
    bad = f"ev{char}il"
    for method, path, body, fld in (
        ("POST", "/v1/principals", {"name": bad}, "name"),
        ("POST", "/v1/principals", {"name": "bob", "grants": {bad: ["read"]}}, "grants"),
        ("POST", "/v1/principals", {"name": "bob", "grants": {"p1": [bad]}}, "grants.p1"),
        ("POST", "/v1/principals", {"name": "bob", "metadata": {bad: "v"}}, "metadata"),
        ("PATCH", "/v1/principals/alice", {"grants": {bad: []}}, "grants"),
        ("PATCH", "/v1/principals/alice", {"metadata": {bad: "v"}}, "metadata"),
        ("POST", "/v1/keys", {"owner": "alice", "project": "p1", "name": bad}, "name"),
        ("POST", "/v1/keys", {"owner": "alice", "project": bad}, "project"),
        ("POST", "/v1/keys", {"owner": "alice", "project": "p1", "scopes": [bad]}, "scopes"),
        ("POST", "/v1/keys", {"owner": "alice", "project": "p1", "metadata": {bad: "v"}}, "metadata"),
        ("PATCH", f"/v1/keys/{k['id']}", {"name": bad}, "name"),
        ("PATCH", f"/v1/keys/{k['id']}", {"scopes": [bad]}, "scopes"),
        ("PATCH", f"/v1/keys/{k['id']}", {"metadata": {bad: "v"}}, "metadata"),
        ("POST", "/v1/keys/verify", {"key": "nope", "scopes": [bad]}, "scopes"),
    ):
        r = await api.request(method, path, body)
        assert (r.status, r.error, r.json["field"]) == (422, "invalid_request", fld), (body, r.json)
        assert char not in r.json["message"]  # the message names it as U+..., never prints it
    assert await api.state() == before


async def test_names_in_any_script_and_with_spaces_are_welcome(keystile, admin, upstream: RecordingUpstream) -> None:
    gw = await keystile(routes=[{"prefix": "/", "upstream": upstream.url}])
    api = admin(gw)
    for name in ("José Müller", "张伟", "Ωmega team", "🔑 deploy-bot", "  padded  "):
        p = await api.principal(name, {"prój-ü": ["lire:écrire"]}, metadata={"équipe": "é"})
        assert p["name"] == name.strip()
        k = await api.key(p["id"], "prój-ü", name=f"clé {name}")
        async with aiohttp.ClientSession() as s, s.get(gw.url + "/x", headers={"X-API-Key": k["key"]}) as r:
            assert r.status == 200
        assert upstream.received[-1].header("X-Keystile-Owner") == [name.strip()]
    r = await api.post("/v1/principals", {"name": "   "})
    assert (r.status, r.json["field"]) == (422, "name")


async def test_query_strings_are_read_as_documented_and_cursors_are_positions(keystile, admin) -> None:
    """A query parameter is a string, or a JSON number or boolean where the document says so:
    never null, never ``1e1`` for an integer; a cursor of the documented shape is a position."""
    gw = await keystile()
    api = admin(gw)
    await api.principal()
    for i in range(3):
        await api.key(name=f"k{i}")
    for path, params, fld in (
        ("/v1/keys", {"status": "null"}, "status"),
        ("/v1/keys", {"limit": "1e1"}, "limit"),
        ("/v1/keys", {"limit": "null"}, "limit"),
        ("/v1/audit", {"until": "null"}, "until"),
        ("/v1/audit", {"since": "nan"}, "since"),
        ("/v1/audit", {"since": "1e999"}, "since"),
        ("/v1/audit", {"cursor": "99999999999999999999"}, "cursor"),  # beyond any id: not a cursor
        ("/v1/principals", {"limit": " 5"}, "limit"),
    ):
        r = await api.get(path, params=params)
        assert (r.status, r.json["field"]) == (422, fld), (path, params, r.json)
    r = await api.delete("/v1/principals/alice", params={"with_keys": "1"})
    assert (r.status, r.json["field"]) == (422, "with_keys")
    assert (await api.ok("GET", "/v1/keys", params={"q": "null"}))["items"] == []  # a name, "null"
    # Pages follow each other, and any position of the documented shape is a valid cursor.
    first = await api.ok("GET", "/v1/keys", params={"limit": "2"})
    rest = await api.ok("GET", "/v1/keys", params={"cursor": first["next_cursor"]})
    assert [k["name"] for k in first["items"] + rest["items"]] == ["k2", "k1", "k0"]
    after_all = await api.ok("GET", "/v1/keys", params={"cursor": "0.5~key_0"})
    assert after_all == {"items": [], "next_cursor": None}
    assert len((await api.ok("GET", "/v1/keys", params={"cursor": "1e30~key_0"}))["items"]) == 3
    assert (await api.ok("GET", "/v1/audit", params={"cursor": "2"}))["items"][0]["id"] == 1
    principals = await api.ok("GET", "/v1/principals", params={"cursor": "a"})
    assert [p["name"] for p in principals["items"]] == ["alice"]
