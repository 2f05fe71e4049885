"""A change made by the CLI straight on the store reaches running gateways like an admin API
change: at once through Redis (the gateway's own publisher), else from the store's outbox."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp

from tests.integration.test_admin_cli import cli
from tests.integration.test_verification_path import key_id, redis_url, status_of
from tests.servers import free_port

__all__ = ["redis_url"]  # the fixture: the machine's Redis, database 9, emptied


async def test_a_store_mode_revocation_is_published_at_once(keystile, redis_url: str, tmp_path: Path) -> None:
    # The outbox is read once at start, then only after 30 s: a quick refusal is the message's.
    gw = await keystile(redis={"url": redis_url}, cache={"local_ttl": 300, "sync_interval": 30})
    await gw.gateway.subscriber.ready.wait()
    key = await gw.key()
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'[store]\nurl = "{gw.cfg.store.url}"\n[redis]\nurl = "{redis_url}"\n')
    async with aiohttp.ClientSession() as s:
        assert await status_of(s, gw.url + "/x", key) == 200
        r = await cli("keys", "revoke", await key_id(gw), "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert "Redis could not be told" not in r.stderr
        deadline = time.monotonic() + 1
        while await status_of(s, gw.url + "/x", key) == 200:
            assert time.monotonic() < deadline, "the CLI's message never arrived"
    assert gw.gateway.subscriber.received >= 1 and gw.gateway.poller.delivered == 0
    assert gw.gateway.ledger.committed == await gw.store.latest_invalidation()  # the seq came along


async def test_a_store_mode_revocation_without_redis_comes_from_the_outbox(keystile, tmp_path: Path) -> None:
    gw = await keystile(cache={"local_ttl": 300, "sync_interval": 0.2})
    key = await gw.key()
    cfg = tmp_path / "cli.toml"
    dead = f"redis://127.0.0.1:{free_port()}/0"  # configured, but nothing listens
    cfg.write_text(f'[store]\nurl = "{gw.cfg.store.url}"\n[redis]\nurl = "{dead}"\n')
    async with aiohttp.ClientSession() as s:
        assert await status_of(s, gw.url + "/x", key) == 200
        r = await cli("keys", "revoke", await key_id(gw), "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert "apply it when they next read the store" in r.stderr
        deadline = time.monotonic() + 2
        while await status_of(s, gw.url + "/x", key) == 200:
            assert time.monotonic() < deadline, "the outbox never delivered the CLI's revocation"
    assert gw.gateway.poller.delivered == 1
