"""``keystile limits`` and ``keystile credits`` as an operator runs them against a running admin
API: a limit set from the terminal refuses the proxy's next request, and the show prints what is
left."""

from __future__ import annotations

import aiohttp

from gateway.store import KeyFilter
from tests.conftest import GatewayFactory
from tests.integration.test_admin_cli import api_env, cli


async def test_limits_and_credits_from_the_cli(keystile: GatewayFactory) -> None:
    gw = await keystile()
    key = await gw.key("cli-owner")
    kid = (await gw.store.list_keys(KeyFilter(), 0)).items[0].id
    env = api_env(gw)
    r = await cli("limits", kid, "--set", "burst=2/1h", env=env)
    assert r.returncode == 0, r.stderr
    assert "burst 2/1h: 2 left" in r.stdout
    async with aiohttp.ClientSession() as s:
        statuses = []
        for _ in range(3):
            async with s.get(gw.url + "/x", headers={"X-API-Key": key}) as resp:
                statuses.append(resp.status)
    assert statuses == [200, 200, 429]
    r = await cli("limits", kid, env=env)
    assert "burst 2/1h: 0 left, full in 3600s" in r.stdout
    r = await cli(
        "credits", "--principal", "cli-owner", "--remaining", "40", "--refill", "40/monthly:3", env=env
    )
    assert r.returncode == 0, r.stderr
    assert "credits" in r.stdout and "refill 40 monthly on day 3, replace" in r.stdout
    bad = await cli("limits", kid, "--set", "burst=x", env=env)
    assert bad.returncode == 2 and "NAME=LIMIT/WINDOW" in bad.stderr
