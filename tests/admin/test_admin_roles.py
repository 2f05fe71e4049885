"""Admin token roles: a token's role bounds what it may do (verify < read < write < admin), a
refusal is a documented 403 that changes nothing, and the audit log names the token's label."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.admin.openapi import document
from gateway.app import Gateway, create_app
from gateway.config import ConfigError, Secrets, load_secrets
from gateway.store import open_store
from tests.admin_client import AdminAPI
from tests.conftest import HASH_SECRET, make_config

TOKENS = {role: f"{role}-token-{secrets.token_hex(8)}" for role in ("verify", "read", "write")}
ADMIN = f"root-token-{secrets.token_hex(8)}"  # a bare entry: role admin, no label
ENTRIES = (*(f"svc-{role}:{role}:{token}".encode() for role, token in TOKENS.items()), ADMIN.encode())


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    cfg = make_config({"store": {"url": f"sqlite:///{tmp_path}/roles.db"}})
    store = await open_store(cfg.store.url)
    await store.migrate()
    gw = create_app(cfg, Secrets(HASH_SECRET, ENTRIES), store=store)
    await gw.start()
    yield gw
    await gw.stop()
    await store.close()


async def test_each_role_allows_what_the_ones_below_it_allow(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        api = {
            role: AdminAPI(session, f"http://127.0.0.1:{gateway.admin_port}", tok)
            for role, tok in {**TOKENS, "admin": ADMIN}.items()
        }
        # Principals and grants are the admin role's.
        r = await api["write"].post("/v1/principals", {"name": "alice", "grants": {"p1": ["read"]}})
        assert r.status == 403 and r.error == "forbidden"
        assert "role is write" in r.json["message"] and "needs admin" in r.json["message"]
        assert (
            await api["admin"].post("/v1/principals", {"name": "alice", "grants": {"p1": ["read"]}})
        ).status == 201
        # Keys are write's; a refused create leaves nothing behind.
        r = await api["read"].post("/v1/keys", {"owner": "alice", "project": "p1", "name": "k"})
        assert r.status == 403
        assert (await api["read"].get("/v1/keys", params={"owner": "alice"})).json["items"] == []
        created = await api["write"].post("/v1/keys", {"owner": "alice", "project": "p1", "name": "k"})
        assert created.status == 201
        key = created.json["key"]
        # verify may only check keys.
        assert (await api["verify"].get("/v1/keys", params={"owner": "alice"})).status == 403
        checked = await api["verify"].post("/v1/keys/verify", {"key": key})
        assert checked.status == 200 and checked.json["valid"] is True
        for role in ("read", "write", "admin"):
            assert (await api[role].post("/v1/keys/verify", {"key": key})).status == 200
        assert (await api["read"].get("/v1/audit")).status == 200
        assert (await api["read"].post(f"/v1/keys/{created.json['id']}/revoke", {})).status == 403
        assert (await api["verify"].get("/v1/audit")).status == 403

        audit = (await api["read"].get("/v1/audit")).json["items"]
        assert [(e["action"], e["actor"]) for e in audit] == [
            ("key.create", "svc-write"),
            ("principal.create", "admin:" + hashlib.sha256(ADMIN.encode()).hexdigest()[:8]),
        ]
        text = json.dumps(audit)
        assert all(tok not in text for tok in (*TOKENS.values(), ADMIN))


def test_the_document_names_each_operations_role() -> None:
    doc = json.loads(document())
    roles = {}
    for item in doc["paths"].values():
        for op in item.values():
            if op.get("security") == []:
                assert "x-keystile-role" not in op
                continue
            assert "403" in op["responses"], op["operationId"]
            roles[op["operationId"]] = op["x-keystile-role"]
    assert roles["verifyKey"] == "verify"
    assert roles["listKeys"] == "read" and roles["listAudit"] == "read"
    assert roles["createKey"] == "write"
    assert roles["createPrincipal"] == "admin"


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("ci:boss:" + "x" * 20, "admin token: ci: unknown role 'boss' (use verify, read, write, admin)"),
        ("bad label:read:" + "x" * 20, "admin token: label must be 1-64 letters"),
        ("ci:read:short", "admin token: ci: shorter than 16 characters"),
        ("short", "admin token: shorter than 16 characters"),
        ("ci:read:" + "x" * 20 + ",ci:write:" + "y" * 20, "admin token: ci: label used twice"),
    ],
)
def test_a_bad_token_entry_stops_startup_naming_it_but_never_the_token(entry: str, problem: str) -> None:
    env = {"KEYSTILE_KEY_HASH_SECRET": "s" * 32, "KEYSTILE_ADMIN_TOKENS": entry}
    with pytest.raises(ConfigError) as e:
        load_secrets(make_config({}), env)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(problem)
    assert "x" * 20 not in e.value.problems[0]
