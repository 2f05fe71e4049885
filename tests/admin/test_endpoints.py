"""The route table is the one description of the admin API.

Each entry agrees with the operation it names; the operations and the table know nothing of HTTP
and nothing of the app; the admin listener runs on any object that offers its few dependencies;
and the CLI's two clients (over HTTP, straight on the store), both driven by the table, give the
same answers and the same refusals.
"""

from __future__ import annotations

import ast
import inspect
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

import gateway.admin
from gateway.admin import create_admin_app
from gateway.admin import operations as ops
from gateway.admin import schemas as s
from gateway.admin.client import Admin, AdminClient, AdminError, StoreAdmin
from gateway.admin.openapi import ALL_ENDPOINTS
from gateway.admin.operations import Context
from gateway.config import Secrets
from gateway.lifecycle import Lifecycle
from gateway.store import open_store
from tests.conftest import ADMIN_TOKEN, HASH_SECRET, make_config

ADMIN = Path(gateway.admin.__file__).parent


@pytest.mark.parametrize("ep", ALL_ENDPOINTS, ids=lambda ep: ep.operation_id)
def test_each_entry_agrees_with_the_operation_it_names(ep: Any) -> None:
    hints = typing.get_type_hints(ep.operation)
    expected = ["ctx", *ep.params]
    expected += ["body"] if ep.body is not None else []
    expected += ["query"] if ep.query is not None else []
    assert list(inspect.signature(ep.operation).parameters) == expected
    assert hints["ctx"] is Context
    assert all(hints[name] is str for name in ep.params)
    if ep.body is not None:
        assert hints["body"] is ep.body
    if ep.query is not None:
        assert hints["query"] is ep.query
    if isinstance(ep.response, type):
        assert hints["return"] is ep.response
    elif ep.response is None:
        assert hints["return"] is type(None)
    else:  # the OpenAPI document: its bytes as built
        assert hints["return"] is msgspec.Raw
    # Another status is only ever chosen for a documented answer, of the same type.
    assert (ep.status_of is not None) == bool(ep.extra)
    assert all(t is ep.response for t in ep.extra.values())


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("module", ["operations", "api", "problems", "openapi", "schemas"])
def test_the_operations_and_the_table_know_no_http(module: str) -> None:
    imports = _imports(ADMIN / f"{module}.py")
    assert not {m for m in imports if m == "aiohttp" or m.startswith("aiohttp.")}, module


def test_the_admin_package_never_imports_the_app() -> None:
    for path in ADMIN.glob("*.py"):
        assert "gateway.app" not in _imports(path), path.name


@dataclass
class Deps:
    """Just what the admin listener needs for these routes; no Gateway."""

    lifecycle: Lifecycle
    secrets: Secrets

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        return False, {"store": "migrating"}


async def test_the_admin_listener_runs_on_its_dependencies_alone(tmp_path: Path) -> None:
    cfg = make_config({"store": {"url": f"sqlite:///{tmp_path}/deps.db"}})
    store = await open_store(cfg.store.url)
    await store.migrate()
    deps = Deps(Lifecycle(cfg, HASH_SECRET, store), Secrets(HASH_SECRET, (ADMIN_TOKEN.encode(),)))
    client = TestClient(TestServer(create_admin_app(deps)))
    await client.start_server()
    try:
        r = await client.get("/readyz")
        assert r.status == 503 and await r.json() == {"ready": False, "checks": {"store": "migrating"}}
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        r = await client.post("/v1/principals", json={"name": "alice"}, headers=auth)
        assert r.status == 201
        assert (await store.get_principal("alice")).id == (await r.json())["id"]
        r = await client.post("/v1/principals", json={"name": "bob"})
        assert r.status == 401
    finally:
        await client.close()
        await store.close()


def _normalised(result: Any, name: str) -> str:
    text = msgspec.json.encode(result).decode().replace(name, "NAME")
    text = re.sub(r"(prn|key)_[0-9A-Za-z]+", r"\1_ID", text)
    text = re.sub(r'"(key|start|actor)":"[^"]*"', r'"\1":"X"', text)
    text = re.sub(r'"id":\d+', '"id":N', text)  # audit events
    return re.sub(r"\d{9,}\.\d+|\d{14}", "T", text)


async def _scenario(admin: Admin, name: str) -> list[str]:
    """Every lifecycle operation the CLI uses, on success and on refusal."""
    seen: list[str] = []

    async def attempt(operation: Any, **kw: Any) -> Any:
        try:
            result = await admin.call(operation, **kw)
        except AdminError as e:
            seen.append(f"{operation.__name__}: {e.status} {e.error} {e.field} {_normalised(str(e), name)}")
            return None
        seen.append(f"{operation.__name__}: {_normalised(result, name)}")
        return result

    await attempt(ops.create_principal, body=s.PrincipalCreate(name=name, grants={"p1": ["read"]}))
    await attempt(ops.create_principal, body=s.PrincipalCreate(name=name))
    await attempt(ops.create_principal)  # no body: the API reads an empty one
    await attempt(ops.get_principal, principal=name)
    await attempt(ops.get_principal, principal=name + "-nobody")
    await attempt(ops.update_principal, principal=name, body=s.PrincipalUpdate())
    await attempt(ops.update_principal, principal=name, body=s.PrincipalUpdate(metadata={"a": "b"}))
    await attempt(ops.disable_principal, principal=name)
    await attempt(ops.enable_principal, principal=name)
    await attempt(ops.list_principals, query=s.PrincipalQuery(limit=1))
    await attempt(ops.list_keys, query=s.KeyQuery(cursor="nonsense"))
    key = await attempt(ops.create_key, body=s.KeyCreate(owner=name, project="p1", name="k"))
    await attempt(ops.create_key, body=s.KeyCreate(owner=name, project="p1", name="k"))
    await attempt(ops.create_key, body=s.KeyCreate(owner=name + "-nobody", project="p1"))
    await attempt(ops.create_key, body=s.KeyCreate(owner=name, project="p1", expires_at=1.0))
    await attempt(ops.list_keys, query=s.KeyQuery(owner=name))
    await attempt(ops.get_key, key_id=key.id)
    await attempt(ops.update_key, key_id=key.id, body=s.KeyUpdate(name="renamed", scopes=["read"]))
    await attempt(ops.rotate_key, key_id=key.id, body=s.KeyRotate(grace_seconds=5))
    await attempt(ops.revoke_key, key_id=key.id)
    await attempt(ops.rotate_key, key_id=key.id)
    await attempt(ops.list_audit, query=s.AuditQuery(principal=name))
    await attempt(ops.delete_principal, principal=name)
    await attempt(ops.delete_key, key_id=key.id)
    await attempt(ops.delete_key, key_id=key.id)
    await attempt(ops.delete_principal, principal=name, query=s.PrincipalDeleteQuery(with_keys=True))
    await attempt(ops.get_principal, principal=name)
    return seen


async def test_both_clients_answer_and_refuse_alike(keystile) -> None:
    gw = await keystile()
    async with AdminClient(gw.admin_url, ADMIN_TOKEN) as client:
        over_http = await _scenario(client, "over-http")
    on_store = await _scenario(StoreAdmin(Context(gw.lifecycle, "cli")), "on-store")
    assert over_http == on_store
    refusals = [line for line in on_store if re.search(r": \d{3} ", line)]
    assert len(refusals) == 11  # the scenario's refusals all happened, on both ways
