"""The documented Python client against a running Keystile: the README's example works, async and
blocking, a refusal is an AdminError naming the field, and listing follows every page."""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from gateway.client import AdminError, Keystile, SyncKeystile, ops, s
from tests.conftest import ADMIN_TOKEN
from tests.upstream import RecordingUpstream


async def test_the_async_client_runs_the_key_lifecycle(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    async with Keystile(gw.admin_url, ADMIN_TOKEN) as ks:
        await ks.create_principal("alice", grants={"billing": ["invoices:read", "invoices:write"]})
        issued = await ks.create_key("alice", "billing", name="ci", scopes=["invoices:read"])
        answer = await ks.verify(issued.key, scopes=["invoices:read"])
        assert answer.valid and answer.identity is not None and answer.identity.key_id == issued.id
        assert (await ks.verify(issued.key, scopes=["invoices:write"])).code == "insufficient_scope"
        assert (await ks.verify("ks_live_" + "A" * 32)).valid is False
        # The key it issued works through the proxy.
        async with (
            aiohttp.ClientSession() as http,
            http.get(gw.url + "/x", headers={"X-API-Key": issued.key}) as r,
        ):
            assert r.status == 200

        for i in range(4):
            await ks.create_key("alice", "billing", name=f"k{i}")
        names = [k.name async for k in ks.keys(owner="alice", limit=2)]  # three pages
        assert names == ["k3", "k2", "k1", "k0", "ci"]

        rotated = await ks.rotate_key(issued.id)
        assert (await ks.verify(issued.key)).valid is False and (await ks.verify(rotated.key)).valid
        assert (await ks.revoke_key(rotated.id)).status == "revoked"
        renamed = await ks.call(ops.update_key, key_id=rotated.id, body=s.KeyUpdate(name="renamed"))
        assert renamed.name == "renamed"
        await ks.delete_key(rotated.id)
        with pytest.raises(AdminError) as e:
            await ks.get_key(rotated.id)
        assert e.value.status == 404 and e.value.error == "not_found"
        with pytest.raises(AdminError) as e:
            await ks.create_key("alice", "billing", name="x" * 300)
        assert e.value.status == 422 and e.value.field == "name"


async def test_the_blocking_client_does_the_same_from_plain_code(keystile) -> None:
    gw = await keystile()

    def script() -> tuple[bool, list[str], str]:
        with SyncKeystile(gw.admin_url, ADMIN_TOKEN) as ks:
            ks.create_principal("bob", grants={"p1": ["read"]})
            issued = ks.create_key("bob", "p1", name="one")
            ks.create_key("bob", "p1", name="two")
            names = [k.name for k in ks.keys(owner="bob", limit=1)]
            valid = ks.verify(issued.key).valid
        with SyncKeystile(gw.admin_url, "not-the-token-at-all") as wrong:
            try:
                wrong.verify(issued.key)
            except AdminError as e:
                refused = e.error
            return valid, names, refused

    valid, names, refused = await asyncio.to_thread(script)
    assert valid and names == ["two", "one"] and refused == "unauthenticated"


def test_the_readme_example_uses_only_what_the_client_has() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks
    used = set()
    for block in blocks:
        tree = ast.parse(
            block.replace("async with", "with").replace("async for", "for").replace("await ", "")
        )
        used |= {
            n.attr
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "ks"
        }
    assert used and all(hasattr(Keystile, m) and hasattr(SyncKeystile, m) for m in used), used
