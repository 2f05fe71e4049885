"""SIGTERM under load: in-flight requests finish, then the last usage batch reaches the store."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from gateway.store import open_store
from tests.integration.test_verification_path import redis_url
from tests.servers import PgCluster, free_port, wait_tcp
from tests.upstream import RecordingUpstream
from tests.waiting import until

__all__ = ["redis_url"]  # the fixture: the machine's Redis, database 9, emptied

SECRET = "fedcba9876543210" * 4



def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}
    e["KEYSTILE_KEY_HASH_SECRET"] = SECRET
    return e


def cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


async def test_sigterm_under_load_flushes_last_used_after_in_flight_requests(
    tmp_path: Path, upstream: RecordingUpstream, pg_cluster: PgCluster
) -> None:
    port, admin = free_port(), free_port()
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        f"""
[proxy]
listen = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:{admin}"
[store]
url = "{pg_cluster.url}"
[usage]
flush_interval = 300   # only the shutdown flush can write anything
[logging]
access_log = false
[[routes]]
prefix = "/"
upstream = "{upstream.url}"
"""
    )
    cli("migrate", "--config", str(cfg))
    keys = {}
    for i in range(4):
        created = json.loads(cli("keys", "create", "--config", str(cfg), "--owner", f"u{i}", "--project", "p", "--json"))
        keys[created["id"]] = created["key"]

    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg)], env=env(),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_tcp(port)
        ok: dict[str, int] = dict.fromkeys(keys, 0)
        last_ok_sent: dict[str, float] = dict.fromkeys(keys, 0.0)
        stop_at = time.monotonic() + 15  # a bound only: the load ends when the gateway has exited

        async def worker(n: int) -> None:
            ids = list(keys)
            i = n
            async with aiohttp.ClientSession() as s:
                while time.monotonic() < stop_at and proc.poll() is None:
                    kid = ids[i % len(ids)]
                    i += 1
                    sent = time.time()
                    try:
                        async with s.get(f"http://127.0.0.1:{port}/public/slow?s=0.05", headers={"X-API-Key": keys[kid]}) as r:
                            await r.read()
                            if r.status == 200:
                                ok[kid] += 1
                                last_ok_sent[kid] = max(last_ok_sent[kid], sent)
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.01)  # the gateway is going away

        async def terminate() -> None:
            # Under load: every key has been used a few times and requests are in flight.
            await until(lambda: min(ok.values()) >= 3, timeout=10, what="load on every key")
            proc.send_signal(signal.SIGTERM)

        await asyncio.gather(*(worker(n) for n in range(8)), terminate())
        assert proc.wait(timeout=30) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert all(ok.values()), ok

    store = await open_store(pg_cluster.url)
    try:
        for kid in keys:
            rec = await store.get_key(kid)
            assert rec.last_used_at is not None and rec.last_used_at >= last_ok_sent[kid] - 0.001, kid
            assert rec.request_count >= ok[kid]
    finally:
        await store.close()


async def test_a_stuck_shutdown_step_is_abandoned_and_the_others_still_run(keystile, redis_url: str) -> None:
    gw = await keystile(redis={"url": redis_url}, usage={"flush_interval": 300})
    await gw.lifecycle.create_principal("bob", grants={"p1": ["read"]}, actor="test")
    created = await gw.lifecycle.create_key("bob", "p1", actor="test")
    used_at = time.time()
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/x", headers={"X-API-Key": created.secret}) as r:
        assert r.status == 200
    never = asyncio.Event()

    async def stuck() -> None:
        await never.wait()

    gw.gateway.cache.aclose = stuck  # a step that never finishes (say, a task that ignores cancel)
    gw.gateway.stop_step_timeout = 0.3
    started = time.monotonic()
    await asyncio.wait_for(gw.gateway.stop(), 10)
    assert time.monotonic() - started < 3
    assert gw.gateway.stop_stalls == ["cache loads"]
    # The step before it wrote the last usage; the steps after it ran (the subscriber is closed).
    assert (await gw.store.get_key(created.record.id)).last_used_at >= used_at - 1
    assert gw.gateway.subscriber is not None and gw.gateway.subscriber._task is not None
    assert gw.gateway.subscriber._task.done()
    never.set()
