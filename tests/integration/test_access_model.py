"""Roles, per-project policies, the manage-keys check and the audit source, as users meet them:
through the proxy (identity headers, whoami), the admin API and the CLI, on real stores."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.admin import access_operations as acc
from gateway.admin.operations import Context
from gateway.models import Actor
from tests.integration.test_admin_cli import api_env, cli
from tests.upstream import RecordingUpstream

SECRET = "0123456789abcdef" * 4


async def get(gw: Any, key: str, path: str = "/x", headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as s, s.get(gw.url + path, headers={"X-API-Key": key, **(headers or {})}) as r:
        await r.read()
        return r


async def status(gw: Any, key: str, path: str = "/x") -> int:
    return (await get(gw, key, path)).status


async def test_roles_reach_the_upstream_and_whoami_and_cannot_be_forged(
    keystile, admin, upstream: RecordingUpstream
) -> None:
    gw = await keystile(
        routes=[
            {"prefix": "/write", "upstream": upstream.url, "scopes": ["reports:write"]},
            {"prefix": "/", "upstream": upstream.url},
        ]
    )
    api = admin(gw)
    await api.ok("PUT", "/v1/projects/p1/roles/data_entry", {"scopes": ["reports:read", "reports:write"]})
    made = await api.ok("POST", "/v1/principals", {"name": "ann", "grants": {"p1": ["misc"]}, "roles": {"p1": ["data_entry"]}}, status=201)
    assert made["grants"] == {"p1": ["misc"]} and made["roles"] == {"p1": ["data_entry"]}
    key = (await api.ok("POST", "/v1/keys", {"owner": "ann", "project": "p1"}, status=201))["key"]

    forged = {"X-Keystile-Roles": "project_admin", "x_keystile_roles": "owner", "X-Keystile-Scopes": "keystile:keys:manage"}
    assert (await get(gw, key, "/write", forged)).status == 200
    seen = upstream.received[-1]
    assert seen.header("X-Keystile-Roles") == ["data_entry"]
    assert seen.header("X-Keystile-Scopes") == ["misc,reports:read,reports:write"]
    assert not seen.header("x_keystile_roles")

    async with aiohttp.ClientSession() as s, s.get(gw.url + "/_keystile/whoami", headers={"X-API-Key": key}) as r:
        me = await r.json()
    assert me["roles"] == ["data_entry"] and "reports:write" in me["scopes"]

    # A principal without roles: the header is there, empty, and still not the client's.
    await api.ok("POST", "/v1/principals", {"name": "bo", "grants": {"p1": ["reports:write"]}}, status=201)
    plain = (await api.ok("POST", "/v1/keys", {"owner": "bo", "project": "p1"}, status=201))["key"]
    assert (await get(gw, plain, "/write", forged)).status == 200
    assert upstream.received[-1].header("X-Keystile-Roles") == [""]


async def test_a_role_change_reaches_cached_keys_at_once(keystile, admin, upstream: RecordingUpstream) -> None:
    # Entries live 5 minutes: only the role write's invalidation can explain a changed answer.
    gw = await keystile(
        routes=[{"prefix": "/", "upstream": upstream.url, "scopes": ["reports:write"]}],
        cache={"local_ttl": 300, "local_ttl_synced": 300},
    )
    api = admin(gw)
    await api.ok("PUT", "/v1/projects/p1/roles/data_entry", {"scopes": ["reports:read", "reports:write"]})
    await api.ok("POST", "/v1/principals", {"name": "ann", "roles": {"p1": ["data_entry"]}}, status=201)
    key = (await api.ok("POST", "/v1/keys", {"owner": "ann", "project": "p1"}, status=201))["key"]
    assert await status(gw, key) == 200  # cached now

    await api.ok("PUT", "/v1/projects/p1/roles/data_entry", {"scopes": ["reports:read"]})
    assert await status(gw, key) == 403  # the next request, no waiting
    await api.ok("PUT", "/v1/projects/p1/roles/data_entry", {"scopes": ["reports:read", "reports:write"]})
    assert await status(gw, key) == 200
    await api.ok("DELETE", "/v1/projects/p1/roles/data_entry", status=204)
    assert await status(gw, key) == 403
    assert (await api.ok("GET", "/v1/principals/ann"))["roles"] == {}  # the grant lost it too
    refused = await api.request("PATCH", "/v1/principals/ann", {"roles": {"p1": ["data_entry"]}})
    assert refused.status == 422 and refused.json["field"] == "roles.p1"


async def test_per_project_policy_config_then_store_then_policy(keystile, admin) -> None:
    gw = await keystile(
        policy={
            "max_active_keys": 3,
            "max_lifetime": "30d",
            "projects": {"single": {"max_active_keys": 1}, "short": {"max_lifetime": "1d"}},
        }
    )
    api = admin(gw)
    await api.ok("POST", "/v1/principals", {"name": "ann", "grants": {"single": [], "short": [], "other": []}}, status=201)

    shown = await api.ok("GET", "/v1/projects/single/policy")
    assert shown["max_active_keys"] == 1 and shown["max_lifetime"] == 30 * 86400
    assert shown["sources"] == {
        "max_active_keys": "config.project",
        "default_lifetime": "config",
        "max_lifetime": "config",
        "max_rotation_grace": "config",
    }
    await api.ok("POST", "/v1/keys", {"owner": "ann", "project": "single"}, status=201)
    r = await api.request("POST", "/v1/keys", {"owner": "ann", "project": "single"})
    assert r.status == 409 and r.json["error"] == "key_limit_reached"
    for _ in range(3):  # other projects keep [policy]'s limit
        await api.ok("POST", "/v1/keys", {"owner": "ann", "project": "other"}, status=201)

    r = await api.request("POST", "/v1/keys", {"owner": "ann", "project": "short", "expires_in": 2 * 86400})
    assert r.status == 422 and r.json["field"] == "expires_in" and "1d" in r.json["message"]
    # A value stored for the project wins over the config's.
    stored = await api.ok("PUT", "/v1/projects/short/policy", {"max_lifetime": 3 * 86400, "max_rotation_grace": 0})
    assert stored["max_lifetime"] == 3 * 86400 and stored["sources"]["max_lifetime"] == "project"
    k = await api.ok("POST", "/v1/keys", {"owner": "ann", "project": "short", "expires_in": 2 * 86400}, status=201)
    r = await api.request("POST", f"/v1/keys/{k['id']}/rotate", {"grace_seconds": 60})
    assert r.status == 422 and r.json["field"] == "grace_seconds"
    r = await api.request("PATCH", f"/v1/keys/{k['id']}", {"expires_at": None})
    assert r.status == 422 and r.json["field"] == "expires_at"
    r = await api.request("PUT", "/v1/projects/short/policy", {"default_lifetime": 5 * 86400})
    assert r.status == 422 and r.json["field"] == "default_lifetime"
    assert (await api.ok("GET", "/v1/projects/short/policy"))["max_lifetime"] == 3 * 86400  # nothing written

    cleared = await api.ok("DELETE", "/v1/projects/short/policy")
    assert cleared["max_lifetime"] == 86400 and cleared["sources"]["max_lifetime"] == "config.project"
    assert (await api.request("DELETE", "/v1/projects/short/policy")).status == 404
    # The one answer the console asks for is the one the API enforces.
    effective = await gw.lifecycle.policy("single")
    assert (effective.max_active_keys, effective.sources["max_active_keys"]) == (1, "config.project")


async def test_the_cli_sets_and_meets_the_same_project_policy(keystile, admin, tmp_path: Path) -> None:
    gw = await keystile(policy={"max_active_keys": 5})
    env = api_env(gw)

    async def run(*args: str, code: int = 0) -> str:
        r = await cli(*args, env=env)
        assert r.returncode == code, r.stderr
        return r.stdout + r.stderr

    await run("principals", "create", "ann", "--grant", "solo=read")
    out = json.loads(await run("policy", "set", "solo", "--max-active-keys", "1", "--max-lifetime", "7d", "--json"))
    assert out["max_active_keys"] == 1 and out["sources"]["max_active_keys"] == "project"
    assert "set for the project" in await run("policy", "show", "solo")
    await run("keys", "create", "--owner", "ann", "--project", "solo")
    refused = await run("keys", "create", "--owner", "ann", "--project", "solo", code=1)
    assert "key_limit_reached" in refused and "the limit is 1" in refused
    # The API answers the same for what the CLI set.
    r = await admin(gw).request("POST", "/v1/keys", {"owner": "ann", "project": "solo", "name": "second"})
    assert r.status == 409
    too_long = await run("keys", "create", "--owner", "ann", "--project", "other", "--expires-in", "8d")
    assert "created" in too_long or "key:" in too_long  # another project: [policy] has no maximum

    await run("roles", "set", "solo", "viewer", "--scopes", "read,list", "--description", "reads")
    assert "list,read" in await run("roles", "list", "solo")  # scopes sorted
    await run("principals", "update", "ann", "--role", "solo=viewer")
    shown = json.loads(await run("principals", "show", "ann", "--json"))
    assert shown["roles"] == {"solo": ["viewer"]}
    await run("roles", "delete", "solo", "viewer", "--yes")
    await run("policy", "clear", "solo")
    assert json.loads(await run("policy", "show", "solo", "--json"))["max_active_keys"] == 5

    trail = json.loads(await run("audit", "--source", "cli", "--json", "--limit", "500"))
    actions = {e["action"] for e in trail["items"]}
    assert {"project.policy.update", "project.policy.delete", "role.create", "role.delete"} <= actions
    assert {e["source"] for e in trail["items"]} == {"cli"}


async def test_store_mode_cli_records_cli_and_policy(tmp_path: Path) -> None:
    cfg = tmp_path / "ks.toml"
    cfg.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path}/ks.db"\n[policy.projects.solo]\nmax_active_keys = 1\n'
    )
    env = {"KEYSTILE_KEY_HASH_SECRET": SECRET}

    async def run(*args: str, code: int = 0) -> str:
        r = await cli(*args, "--config", str(cfg), env=env)
        assert r.returncode == code, r.stderr
        return r.stdout + r.stderr

    await run("migrate")
    await run("principals", "create", "ann", "--grant", "solo=read")
    await run("keys", "create", "--owner", "ann", "--project", "solo")
    assert "key_limit_reached" in await run("keys", "create", "--owner", "ann", "--project", "solo", code=1)
    trail = json.loads(await run("audit", "--json"))
    assert {(e["actor"], e["source"]) for e in trail["items"]} == {("cli", "cli")}


async def test_bad_project_policies_in_the_config_are_reported_each_on_its_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        "[policy]\nmax_lifetime = \"10d\"\n"
        "[policy.projects.a]\ndefault_lifetime = \"20d\"\n"
        "[policy.projects.b]\nmax_rotation_grace = \"2d\"\n"
        "[policy.projects.c]\nmax_lifetime = \"soon\"\n"
        "[policy.projects.d]\nmax_active_keys = 0\n"
    )
    r = await cli("config", "check", str(cfg), env={})
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert any("policy.projects.d.max_active_keys" in line for line in lines), lines
    cfg.write_text(
        "[policy]\nmax_lifetime = \"10d\"\n"
        "[policy.projects.a]\ndefault_lifetime = \"20d\"\n"
        "[policy.projects.b]\nmax_rotation_grace = \"2d\"\n"
        "[policy.projects.c]\nmax_lifetime = \"soon\"\n"
    )
    r = await cli("config", "check", str(cfg), env={})
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0
    for where in ("policy.projects.a.default_lifetime", "policy.projects.b.max_rotation_grace", "policy.projects.c.max_lifetime"):
        assert sum(where in line and str(cfg) in line for line in lines) == 1, (where, lines)


async def test_may_manage_other_principals_keys_only_with_the_permission(keystile) -> None:
    gw = await keystile()
    lc = gw.lifecycle
    await lc.put_role("p1", "project_admin", scopes=["keystile:keys:manage", "read"], actor="test")
    await lc.create_principal("lead", roles={"p1": ["project_admin"]}, actor="test")
    await lc.create_principal("direct", grants={"p1": ["keystile:keys:manage"]}, actor="test")
    await lc.create_principal("ann", grants={"p1": ["read"], "p2": ["read"]}, actor="test")
    await lc.create_principal("bob", grants={"p1": ["read"]}, actor="test")
    ctx = Context(lc, Actor("lead", "console"))

    assert await acc.may_manage(ctx, "lead", "ann", "p1")  # through the role
    assert await acc.may_manage(ctx, "direct", "ann", "p1")  # granted directly
    assert not await acc.may_manage(ctx, "lead", "ann", "p2")  # only in its project
    assert await acc.may_manage(ctx, "ann", "ann", "p1")  # its own keys
    assert not await acc.may_manage(ctx, "ann", "ann", "p3")  # ...where it holds a grant
    assert not await acc.may_manage(ctx, "ann", "bob", "p1")
    assert not await acc.may_manage(ctx, "nobody", "ann", "p1")
    await lc.update_principal("lead", disabled=True, actor="test")
    assert not await acc.may_manage(ctx, "lead", "ann", "p1")
    await lc.update_principal("lead", disabled=False, actor="test")
    await lc.put_role("p1", "project_admin", scopes=["read"], actor="test")  # the permission goes
    assert not await acc.may_manage(ctx, "lead", "ann", "p1")

    # A console action is audited with its actor and source, and the filter finds it.
    created = await lc.create_key("ann", "p1", actor=Actor("lead", "console"))
    from gateway.store import AuditFilter

    page = await gw.store.list_audit(AuditFilter(source="console"))
    assert [(e.actor, e.source, e.target_id) for e in page.items] == [("lead", "console", created.record.id)]
    assert all(e.source == "api" for e in (await gw.store.list_audit(AuditFilter(source="api"))).items)


async def test_a_role_change_on_one_instance_holds_on_the_other_within_a_second(
    tmp_path: Path, upstream: RecordingUpstream, pg_cluster: Any, private_redis: Any
) -> None:
    import signal
    import subprocess
    import sys

    from tests.integration.test_two_instances import TOKEN, config, env
    from tests.servers import wait_tcp

    a_cfg, a_port, a_admin = config(tmp_path, "a", pg_cluster, private_redis, upstream.url)
    b_cfg, b_port, _ = config(tmp_path, "b", pg_cluster, private_redis, upstream.url)
    for c in (a_cfg, b_cfg):  # the route needs a scope only the role gives
        c.write_text(c.read_text().replace('prefix = "/"\n', 'prefix = "/"\nscopes = ["reports:write"]\n'))
    subprocess.run([sys.executable, "-m", "gateway", "migrate", "--config", str(a_cfg)], env=env(), check=True, capture_output=True)
    logs = [(tmp_path / f"{n}.log").open("w") for n in ("a", "b")]
    procs = [
        subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(c)], env=env(), stdout=log, stderr=subprocess.STDOUT)
        for c, log in zip((a_cfg, b_cfg), logs, strict=True)
    ]
    try:
        for port in (a_port, b_port, a_admin):
            wait_tcp(port, 20)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        base = f"http://127.0.0.1:{a_admin}/v1"
        async with aiohttp.ClientSession() as s:

            async def call(method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
                async with s.request(method, base + path, json=body, headers=auth) as r:
                    assert r.status in (200, 201), await r.text()
                    out: dict[str, Any] = await r.json()
                    return out

            await call("PUT", "/projects/p/roles/data_entry", {"scopes": ["reports:read", "reports:write"]})
            await call("POST", "/principals", {"name": "svc", "roles": {"p": ["data_entry"]}})
            key = (await call("POST", "/keys", {"owner": "svc", "project": "p"}))["key"]

            async def status_on(port: int) -> int:
                async with s.get(f"http://127.0.0.1:{port}/x", headers={"X-API-Key": key}) as resp:
                    await resp.read()
                    return resp.status

            async def until(port: int, want: int) -> None:
                started = time.monotonic()
                while (got := await status_on(port)) != want:
                    assert time.monotonic() - started < 1.0, f"still {got} after 1 s"
                    await asyncio.sleep(0.02)

            assert await status_on(a_port) == 200
            assert await status_on(b_port) == 200  # cached in b's memory now (for 5 minutes)
            await asyncio.sleep(0.3)  # b's subscription is up (it subscribed at start)
            await call("PUT", "/projects/p/roles/data_entry", {"scopes": ["reports:read"]})
            await until(b_port, 403)
            assert await status_on(a_port) == 403
            await call("PUT", "/projects/p/roles/data_entry", {"scopes": ["reports:write"]})
            await until(b_port, 200)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        assert [p.wait(timeout=20) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
