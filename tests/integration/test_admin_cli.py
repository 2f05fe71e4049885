"""``keystile principals|keys|audit`` as an operator runs them: subprocesses against a running admin
API (flags or environment), and straight against the store for bootstrap."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import ADMIN_TOKEN
from tests.upstream import RecordingUpstream

SECRET = "0123456789abcdef" * 4
ACTOR = "admin:" + hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()[:8]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}
    e.update(extra or {})
    return e


async def cli(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run the CLI without blocking the event loop the gateway under test is served from."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        env=_env(env),
        input=stdin,
        timeout=60,
    )


def api_env(gw: Any) -> dict[str, str]:
    return {"KEYSTILE_ADMIN_URL": gw.admin_url, "KEYSTILE_ADMIN_TOKEN": ADMIN_TOKEN}


async def proxy_status(gw: Any, key: str, path: str = "/x") -> int:
    async with aiohttp.ClientSession() as s, s.get(gw.url + path, headers={"X-API-Key": key}) as r:
        return r.status


async def test_principals_and_keys_over_the_admin_api(keystile, admin, upstream: RecordingUpstream) -> None:
    gw = await keystile(routes=[{"prefix": "/", "upstream": upstream.url, "scopes": ["read"]}])
    env = api_env(gw)
    outputs: list[str] = []

    async def ok(*args: str, stdin: str = "") -> str:
        r = await cli(*args, env=env, stdin=stdin)
        outputs.extend((r.stdout, r.stderr))
        assert r.returncode == 0, r.stderr
        return r.stdout

    made = json.loads(
        await ok(
            "principals", "create", "alice", "--grant", "p1=read,write", "--metadata", "team=x", "--json"
        )
    )
    assert made["grants"] == {"p1": ["read", "write"]} and made["metadata"] == {"team": "x"}
    await ok("principals", "create", "etl", "--kind", "service")
    table = (await ok("principals", "list")).splitlines()
    assert table[0].split() == ["NAME", "ID", "KIND", "STATUS", "CREATED", "(UTC)", "GRANTS"]
    assert table[1].startswith("alice") and "p1: read,write" in table[1] and table[2].startswith("etl")
    shown = await ok("principals", "show", made["id"])
    assert "name:" in shown and "alice" in shown and "enabled" in shown

    created = json.loads(
        await ok("keys", "create", "--owner", "alice", "--project", "p1", "--name", "ci", "--json")
    )
    key, key_id = created["key"], created["id"]
    assert await proxy_status(gw, key) == 200
    human = await cli("keys", "create", "--owner", "alice", "--project", "p1", env=env)
    assert (
        human.returncode == 0
        and human.stdout.startswith("key:  ks_live_")
        and "shown only once" in human.stderr
    )
    outputs.extend((human.stdout, human.stderr))

    listing = (await ok("keys", "list", "--owner", "alice")).splitlines()
    assert listing[0].split()[:5] == ["ID", "NAME", "START", "OWNER", "PROJECT"]
    assert any(key_id in line and key[:12] + "…" in line and "active" in line for line in listing)
    as_json = json.loads(await ok("keys", "list", "--json", "--q", "ci"))
    api_list = await admin(gw).ok("GET", "/v1/keys", params={"q": "ci"})
    assert as_json == api_list  # the same view, one definition

    updated = json.loads(
        await ok(
            "keys", "update", key_id, "--name", "ci-2", "--scopes", "read", "--expires-in", "1d", "--json"
        )
    )
    assert updated["name"] == "ci-2" and updated["scopes"] == ["read"] and updated["expires_at"] is not None
    assert "ci-2" in await ok("keys", "show", key_id)

    # Narrow the principal: its key loses the scope at once; then give it back.
    await ok("principals", "update", "alice", "--grant", "p1=write")
    assert await proxy_status(gw, key) == 403
    await ok("principals", "update", "alice", "--grant", "p1=read,write")
    assert await proxy_status(gw, key) == 200

    rotated = json.loads(await ok("keys", "rotate", key_id, "--grace", "1h", "--json"))
    assert rotated["previous_valid_until"] is not None
    assert await proxy_status(gw, key) == 200 and await proxy_status(gw, rotated["key"]) == 200

    await ok("principals", "disable", "alice")
    assert await proxy_status(gw, rotated["key"]) == 401
    await ok("principals", "enable", "alice")
    assert await proxy_status(gw, rotated["key"]) == 200

    assert "revoked" in await ok("keys", "revoke", key_id)
    assert await proxy_status(gw, rotated["key"]) == 401
    assert '"revoked"' in await ok("keys", "show", key_id, "--json")

    # delete asks for the key id; anything else deletes nothing.
    r = await cli("keys", "delete", key_id, env=env, stdin="yes\n")
    assert r.returncode == 1 and "nothing was deleted" in r.stderr
    await ok("keys", "show", key_id)
    await ok("keys", "delete", key_id, stdin=key_id + "\n")
    r = await cli("keys", "show", key_id, env=env)
    assert r.returncode == 1 and "(not_found)" in r.stderr

    # A principal with keys is refused unless --with-keys; the confirmation is its name.
    r = await cli("principals", "delete", "alice", "--yes", env=env)
    assert r.returncode == 1 and "principal_has_keys" in r.stderr
    r = await cli("principals", "delete", made["id"], "--with-keys", env=env, stdin=made["id"] + "\n")
    assert r.returncode == 1 and "nothing was deleted" in r.stderr
    await ok("principals", "delete", made["id"], "--with-keys", stdin="alice\n")

    trail = json.loads(await ok("audit", "--principal", made["id"], "--json", "--limit", "500"))
    actions = [e["action"] for e in trail["items"]]
    assert actions[0] == "principal.delete" and actions[-1] == "principal.create"
    assert "key.rotate" in actions and "principal.disable" in actions
    assert {e["actor"] for e in trail["items"]} == {ACTOR}
    assert {e["source"] for e in trail["items"]} == {"cli"}  # the CLI said so over the API
    audit_table = (await ok("audit", "--key", key_id, "--since", "1h")).splitlines()
    assert audit_table[0].split() == ["TIME", "(UTC)", "ACTOR", "SOURCE", "ACTION", "TARGET"]
    assert [line.split()[4] for line in audit_table[1:]] == [
        "key.delete",
        "key.revoke",
        "key.rotate",
        "key.update",
        "key.create",
    ]

    for text in outputs:
        assert ADMIN_TOKEN not in text


async def test_flags_win_over_the_environment_and_failures_are_one_line(keystile, tmp_path: Path) -> None:
    gw = await keystile(policy={"max_active_keys": 1})
    flags = ["--admin-url", gw.admin_url, "--token", ADMIN_TOKEN]
    wrong_env = {"KEYSTILE_ADMIN_URL": "http://127.0.0.1:1", "KEYSTILE_ADMIN_TOKEN": "not-the-token-at-all"}
    r = await cli("principals", "create", "alice", "--grant", "p1=read", *flags, env=wrong_env)
    assert r.returncode == 0, r.stderr

    async def fails(*args: str, code: int, env: dict[str, str] | None = None) -> str:
        r = await cli(*args, env=env)
        assert r.returncode == code, (r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert ADMIN_TOKEN not in r.stderr + r.stdout
        return r.stderr

    assert "(unauthenticated)" in await fails(
        "keys", "list", env=api_env(gw) | {"KEYSTILE_ADMIN_TOKEN": "x" * 20}, code=1
    )
    assert "cannot reach the admin API" in await fails("keys", "list", env=wrong_env, code=1)
    assert "needs an admin token" in await fails("keys", "list", "--admin-url", gw.admin_url, code=2)
    assert "not both" in await fails("keys", "list", "--config", str(tmp_path / "x.toml"), *flags, code=2)
    err = await fails(
        "keys", "create", "--owner", "alice", "--project", "p1", "--name", "n" * 201, *flags, code=2
    )
    assert "name:" in err and "200" in err
    err = await fails("keys", "rotate", "key_x", "--grace", "soon", *flags, code=2)
    assert "--grace" in err
    r = await cli("keys", "create", "--owner", "alice", "--project", "p1", "--json", *flags)
    assert r.returncode == 0, r.stderr
    key_id = json.loads(r.stdout)["id"]
    err = await fails("keys", "create", "--owner", "alice", "--project", "p1", *flags, code=1)
    assert "key_limit_reached" in err and "rotate" in err
    # A refusal names the flag and the policy (of the key's project) with its value, not the API's field.
    err = await fails("keys", "rotate", key_id, "--grace", "25h", *flags, code=1)
    assert "--grace: 25h is longer than allowed: policy.max_rotation_grace is 24h" in err, err
    assert "grace_seconds" not in err
    assert "nothing to change" in await fails("keys", "update", "key_x", *flags, code=2)


async def test_store_mode_bootstraps_without_a_running_server(tmp_path: Path) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/ks.db"\n')
    env = {"KEYSTILE_KEY_HASH_SECRET": SECRET}
    r = await cli("migrate", "--config", str(cfg), env=env)
    assert r.returncode == 0, r.stderr

    async def ok(*args: str) -> str:
        r = await cli(*args, "--config", str(cfg), env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout

    await ok("principals", "create", "root", "--grant", "ops=admin")
    created = json.loads(await ok("keys", "create", "--owner", "root", "--project", "ops", "--json"))
    assert created["key"].startswith("ks_live_") and created["principal"] == "root"
    rotated = json.loads(await ok("keys", "rotate", created["id"], "--json"))
    assert rotated["key"] != created["key"] and rotated["previous_valid_until"] is None
    assert json.loads(await ok("principals", "list", "--json"))["items"][0]["name"] == "root"
    trail = json.loads(await ok("audit", "--json"))["items"]
    assert [e["action"] for e in trail] == ["key.rotate", "key.create", "principal.create"]
    assert {e["actor"] for e in trail} == {"cli"}
    # Refusals read exactly as the API's.
    r = await cli("keys", "show", "key_nope", "--config", str(cfg), env=env)
    assert r.returncode == 1 and "(not_found)" in r.stderr
    r = await cli("principals", "create", "root", "--config", str(cfg), env=env)
    assert r.returncode == 1 and "(name_taken)" in r.stderr
    # Reading needs no hash secret; minting a key does.
    r = await cli("keys", "list", "--config", str(cfg))
    assert r.returncode == 0 and created["id"] in r.stdout
    r = await cli("keys", "rotate", created["id"], "--config", str(cfg))
    assert r.returncode == 2 and "KEYSTILE_KEY_HASH_SECRET" in r.stderr


async def test_tables_escape_what_a_terminal_would_obey_and_cut_long_names(tmp_path: Path) -> None:
    """Names stored before control and format characters were refused must not reach a terminal
    raw (U+009B is a CSI: it starts an escape sequence), and long names must not stretch tables."""
    from gateway.keys import generate_id
    from gateway.models import Principal
    from gateway.store import open_store

    cfg = tmp_path / "k.toml"
    cfg.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/ks.db"\n')
    store = await open_store(f"sqlite:///{tmp_path}/ks.db")
    await store.migrate()
    hostile = "evil\x9b31m\u202etxt.exe\u2028x"
    long_name = "n" * 120
    for name in (hostile, long_name):  # written as an old version might have: straight to the store
        await store.create_principal(
            Principal(id=generate_id("prn"), name=name, kind="user", disabled=False, created_at=0.0,
                      grants={"p\u200b1": ("read",)}, metadata={"k\x1b": "v\x9b"}),
            "test",
        )
    await store.close()

    async def out(*args: str) -> str:
        r = await cli(*args, "--config", str(cfg), env={"KEYSTILE_KEY_HASH_SECRET": SECRET})
        assert r.returncode == 0, r.stderr
        return r.stdout

    table = await out("principals", "list")
    show = await out("principals", "show", hostile)
    for text in (table, show):
        assert not any(c in text for c in "\x9b\u202e\u2028\u200b\x1b"), repr(text)
    assert "evil\\x9b31m\\u202etxt.exe\\u2028x" in table and "p\\u200b1: read" in show
    assert "metadata.k\\x1b: v\\x9b" in show
    assert long_name not in table and "n" * 39 + "…" in table
    assert long_name in await out("principals", "show", long_name)  # shown whole where asked for
    # --json is for programs: the data as it is.
    names = {p["name"] for p in json.loads(await out("principals", "list", "--json"))["items"]}
    assert names == {hostile, long_name}
