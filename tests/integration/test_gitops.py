"""``keystile export`` and ``keystile apply`` as an operator runs them: the real CLI in subprocesses,
against a running admin API (SQLite) and straight against a second store (PostgreSQL)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import aiohttp

from tests.integration.test_admin_cli import SECRET, api_env, cli
from tests.store.conftest import PgServer, pg_server

__all__ = ["pg_server"]  # the fixture: the machine's PostgreSQL


async def _seed(gw) -> str:
    """alice (a role, a grant, metadata, one key), a service account, a project policy; the key id."""
    env = api_env(gw)
    for args in (
        ("roles", "set", "shop", "viewer", "--scopes", "orders:read", "--description", "reads orders"),
        (
            "principals",
            "create",
            "alice",
            "--grant",
            "shop=orders:write",
            "--role",
            "shop=viewer",
            "--metadata",
            "team=web",
        ),
        ("principals", "create", "etl", "--kind", "service"),
        ("policy", "set", "shop", "--max-active-keys", "5", "--max-lifetime", "90d"),
    ):
        r = await cli(*args, env=env)
        assert r.returncode == 0, r.stderr
    r = await cli(
        "keys",
        "create",
        "--owner",
        "alice",
        "--project",
        "shop",
        "--name",
        "ci",
        "--scopes",
        "orders:read",
        "--expires-in",
        "30d",
        "--json",
        env=env | {"KEYSTILE_KEY_HASH_SECRET": SECRET},
    )
    assert r.returncode == 0, r.stderr
    key_id: str = json.loads(r.stdout)["id"]
    return key_id


async def _export(gw) -> str:
    r = await cli("export", env=api_env(gw))
    assert r.returncode == 0, r.stderr
    return r.stdout


async def _audit_count(gw) -> int:
    r = await cli("audit", "--json", "--limit", "500", env=api_env(gw))
    assert r.returncode == 0, r.stderr
    return r.stdout.count('"action"')


async def test_export_writes_the_identities_and_no_secret(keystile) -> None:
    gw = await keystile()
    key_id = await _seed(gw)
    text = await _export(gw)
    data = tomllib.loads(text)
    assert data["principals"]["alice"] == {
        "kind": "user",
        "disabled": False,
        "grants": {"shop": ["orders:write"]},
        "roles": {"shop": ["viewer"]},
        "metadata": {"team": "web"},
    }
    assert data["principals"]["etl"]["kind"] == "service"
    assert data["roles"]["shop"]["viewer"] == {"scopes": ["orders:read"], "description": "reads orders"}
    assert data["policies"]["shop"] == {"max_active_keys": 5, "max_lifetime": "90d"}
    key = data["keys"][key_id]
    assert {k: key[k] for k in ("owner", "project", "name", "scopes", "status")} == {
        "owner": "alice",
        "project": "shop",
        "name": "ci",
        "scopes": ["orders:read"],
        "status": "active",
    }
    assert "digest" not in text and "sk_" not in text and "key =" not in text


async def test_dry_run_changes_nothing_and_apply_round_trips(keystile, tmp_path: Path) -> None:
    gw = await keystile()
    key_id = await _seed(gw)
    env = api_env(gw)
    exported = await _export(gw)
    f = tmp_path / "identities.toml"
    f.write_text(exported)
    same = await cli("apply", str(f), env=env)
    assert same.returncode == 0 and same.stdout == "no changes\n", same.stderr

    edited = (
        exported.replace('name = "ci"', 'name = "ci-2"')
        .replace("max_active_keys = 5", "max_active_keys = 7")
        .replace('kind = "user"', 'kind = "service"')
        .replace('[principals.etl]\nkind = "service"', '[principals.bob]\nkind = "service"')
    )
    edited += '\n[roles.shop.editor]\nscopes = ["orders:write"]\n'
    f.write_text(edited)
    before, audited = await _export(gw), await _audit_count(gw)
    dry = await cli("apply", str(f), "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    plan = dry.stdout.splitlines()
    assert plan == [
        "~ policy shop: max_active_keys 5 -> 7",
        "+ role shop/editor",
        '~ principal alice: kind "user" -> "service"',
        "+ principal bob",
        f'~ key {key_id}: name "ci" -> "ci-2"',
        "- principal etl",
    ]
    assert "nothing was changed" in dry.stderr
    assert await _export(gw) == before and await _audit_count(gw) == audited

    done = await cli("apply", str(f), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == plan  # the same lines, as it applies them
    assert await _audit_count(gw) == audited + len(plan)  # each change audited like any admin write
    after = await _export(gw)
    assert tomllib.loads(after) == tomllib.loads(edited)
    f.write_text(after)
    again = await cli("apply", str(f), env=env)
    assert again.stdout == "no changes\n"
    assert await _export(gw) == after  # export after apply equals the file


async def test_refusals_change_nothing(keystile, tmp_path: Path) -> None:
    gw = await keystile()
    key_id = await _seed(gw)
    env = api_env(gw)
    exported = await _export(gw)
    f = tmp_path / "identities.toml"
    cases = {
        "key missing": (
            exported.replace(f"[keys.{key_id}]", "[keys.key_nothere]"),
            "keys.key_nothere: no such key in the store",
            1,
        ),
        "principal with keys removed": (
            exported.replace("[principals.alice]", "[principals.alicia]")
            .replace("[principals.alice.", "[principals.alicia.")
            .replace('owner = "alice"', 'owner = "alicia"'),
            "principals.alice: not in the file, but it has 1 key(s)",
            1,
        ),
        "owner change": (
            exported.replace('owner = "alice"', 'owner = "etl"').replace(
                'scopes = ["orders:read"]\nexpires_at', "expires_at"
            ),
            f'keys.{key_id}.owner: "alice" -> "etl": a key\'s owner cannot change',
            1,
        ),
        "bad field": (
            exported.replace('kind = "service"', 'kind = "robot"\ncolour = "red"').replace(
                "max_active_keys = 5", "max_active_keys = 0"
            ),
            None,
            2,
        ),
    }
    before, audited = await _export(gw), await _audit_count(gw)
    for name, (text, message, code) in cases.items():
        # a change that would apply, so a refusal must hold it back too
        f.write_text(text.replace('name = "ci"', 'name = "renamed"'))
        r = await cli("apply", str(f), env=env)
        assert r.returncode == code, (name, r.stdout, r.stderr)
        assert r.stdout == "", name
        if message is not None:
            assert f"{f}: {message}" in r.stderr, (name, r.stderr)
            assert "nothing was changed" in r.stderr
        assert await _export(gw) == before and await _audit_count(gw) == audited, name
    lines = r.stderr.splitlines()  # the bad file: one line per problem, naming file and field
    assert f"{f}: principals.etl.kind: invalid enum value 'robot'" in lines
    assert f"{f}: principals.etl.colour: unknown field" in lines
    assert f"{f}: policies.shop.max_active_keys: must be 1-1000000" in lines


async def test_export_applied_to_an_empty_postgres_store(
    keystile, tmp_path: Path, pg_server: PgServer
) -> None:
    gw = await keystile()
    key_id = await _seed(gw)
    exported = await _export(gw)
    f = tmp_path / "identities.toml"
    f.write_text(exported)
    name = pg_server.create_database()
    try:
        cfg = tmp_path / "second.toml"
        cfg.write_text(f'[store]\nurl = "{pg_server.url(name)}"\n')
        assert (await cli("migrate", "--config", str(cfg))).returncode == 0
        refused = await cli("apply", str(f), "--config", str(cfg))
        assert refused.returncode == 1 and f"keys.{key_id}: no such key in the store" in refused.stderr
        empty = await cli("export", "--config", str(cfg))
        assert tomllib.loads(empty.stdout) == {"principals": {}, "roles": {}, "policies": {}, "keys": {}}

        r = await cli("apply", str(f), "--skip-missing-keys", "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert f"keys.{key_id}: no such key in the store (apply never creates keys): skipped" in r.stderr
        assert "+ principal alice" in r.stdout.splitlines()
        second = tomllib.loads((await cli("export", "--config", str(cfg))).stdout)
        first = tomllib.loads(exported)
        assert second["keys"] == {}
        for section in ("principals", "roles", "policies"):
            assert second[section] == first[section], section
        audit = await cli("audit", "--json", "--config", str(cfg))
        assert '"source":"cli"' in audit.stdout.replace(" ", "")  # store-mode writes are audited too
    finally:
        pg_server.drop_database(name)


async def test_a_grant_change_by_apply_reaches_a_cached_key_at_once(
    keystile, upstream, tmp_path: Path
) -> None:
    gw = await keystile(
        routes=[{"prefix": "/", "upstream": upstream.url, "scopes": ["orders:write"]}],
        cache={"local_ttl": 300},
    )
    await gw.lifecycle.create_principal("carol", grants={"shop": ["orders:read"]}, actor="test")
    secret = (await gw.lifecycle.create_key("carol", "shop", actor="test")).secret

    async def status() -> int:
        async with aiohttp.ClientSession() as s, s.get(gw.url + "/x", headers={"X-API-Key": secret}) as r:
            return r.status

    assert await status() == 403  # and the identity is now cached for 300 s
    assert await status() == 403
    exported = await _export(gw)
    f = tmp_path / "identities.toml"
    f.write_text(exported.replace('shop = ["orders:read"]', 'shop = ["orders:read", "orders:write"]'))
    r = await cli("apply", str(f), env=api_env(gw))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("~ principal carol: grants")
    assert await status() == 200  # at once: the apply's write dropped the cached identity
