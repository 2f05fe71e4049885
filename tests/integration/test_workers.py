"""``keystile serve --workers N``: one port, N processes, a dead worker replaced, SIGTERM drains all."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tests.servers import free_port, wait_tcp
from tests.upstream import RecordingUpstream


def children(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}
    e["KEYSTILE_KEY_HASH_SECRET"] = "w" * 64
    return e


async def test_two_workers_share_a_port_and_survive_a_killed_worker(tmp_path: Path, upstream: RecordingUpstream) -> None:
    port, admin = free_port(), free_port()
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path}/k.db"\n'
        f'[[routes]]\nprefix = "/"\nupstream = "{upstream.url}"\nauth = "none"\n'
    )
    subprocess.run([sys.executable, "-m", "gateway", "migrate", "--config", str(cfg)], env=env(), check=True, capture_output=True)
    log = (tmp_path / "serve.log").open("w")
    sup = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--workers", "2"],
                           env=env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_tcp(port, 20)
        deadline = time.monotonic() + 20
        while len(children(sup.pid)) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        workers = children(sup.pid)

        async def burst(n: int) -> list[int]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async def one() -> int:
                    async with s.get(f"http://127.0.0.1:{port}/x") as r:
                        await r.read()
                        return r.status
                return await asyncio.gather(*(one() for _ in range(n)))

        assert await burst(40) == [200] * 40
        # Request metrics are summed across workers (each syncs its tallies every second).
        deadline = time.monotonic() + 5
        while True:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin}/metrics") as r:
                text = await r.text()
            if 'keystile_requests_total{route="/",status_class="2xx"} 40.0' in text:
                break
            assert time.monotonic() < deadline, "request metrics were not summed across workers"
            await asyncio.sleep(0.2)

        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not (len(children(sup.pid)) == 2 and victim not in children(sup.pid)):
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the replacement binds its port
        assert await burst(40) == [200] * 40

        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=30) == 0
        assert not children(sup.pid)
    finally:
        if sup.poll() is None:
            sup.kill()
        log.close()
