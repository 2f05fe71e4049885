"""Two Keystile processes sharing one Redis and one PostgreSQL: a revocation on one holds on both."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tests.servers import PgCluster, RedisServer, free_port, wait_tcp
from tests.upstream import RecordingUpstream
from tests.waiting import until

TOKEN = "two-instance-admin-token-0123456789"


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}
    e["KEYSTILE_KEY_HASH_SECRET"] = "t" * 64
    e["KEYSTILE_ADMIN_TOKENS"] = TOKEN
    return e


def config(tmp_path: Path, name: str, pg: PgCluster, redis: RedisServer, upstream: str) -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
        f'[store]\nurl = "{pg.url}"\n[redis]\nurl = "{redis.url}"\n'
        # Only an invalidation message can explain a fast rejection: entries live 5 minutes.
        f"[cache]\nlocal_ttl = 300\nredis_ttl = 300\n"
        f'[[routes]]\nprefix = "/"\nupstream = "{upstream}"\n'
    )
    return path, port, admin


async def test_revoke_on_one_instance_is_rejected_by_the_other_within_a_second(
    tmp_path: Path, upstream: RecordingUpstream, pg_cluster: PgCluster, private_redis: RedisServer
) -> None:
    a_cfg, a_port, a_admin = config(tmp_path, "a", pg_cluster, private_redis, upstream.url)
    b_cfg, b_port, b_admin = config(tmp_path, "b", pg_cluster, private_redis, upstream.url)
    subprocess.run([sys.executable, "-m", "gateway", "migrate", "--config", str(a_cfg)], env=env(), check=True, capture_output=True)
    logs = [(tmp_path / f"{n}.log").open("w") for n in ("a", "b")]
    procs = [
        subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(c)], env=env(), stdout=log, stderr=subprocess.STDOUT)
        for c, log in zip((a_cfg, b_cfg), logs, strict=True)
    ]
    try:
        for port in (a_port, b_port, a_admin, b_admin):
            wait_tcp(port, 20)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{a_admin}/v1/principals", json={"name": "svc", "grants": {"p": ["read"]}}, headers=auth) as r:
                assert r.status == 201, await r.text()
            async with s.post(f"http://127.0.0.1:{a_admin}/v1/keys", json={"owner": "svc", "project": "p"}, headers=auth) as r:
                assert r.status == 201, await r.text()
                created = await r.json()
            key, kid = created["key"], created["id"]

            async def status(port: int) -> int:
                async with s.get(f"http://127.0.0.1:{port}/x", headers={"X-API-Key": key}) as resp:
                    await resp.read()
                    return resp.status

            assert await status(a_port) == 200
            assert await status(b_port) == 200  # cached in b's memory now

            async def subscribed() -> bool:  # b hears invalidation messages
                async with s.get(f"http://127.0.0.1:{b_admin}/readyz") as r:
                    return "subscription connected" in (await r.json())["checks"]["redis"]

            await until(subscribed, what="b's subscription")
            async with s.post(f"http://127.0.0.1:{a_admin}/v1/keys/{kid}/revoke", headers=auth) as r:
                assert r.status == 200, await r.text()
            revoked_at = time.monotonic()
            while await status(b_port) != 401:
                assert time.monotonic() - revoked_at < 1.0, "instance b accepted the key for more than 1 s"
                await asyncio.sleep(0.02)
            assert await status(a_port) == 401
        for p in procs:
            p.send_signal(signal.SIGTERM)
        assert [p.wait(timeout=20) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
