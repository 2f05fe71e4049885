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


def migrated_config(tmp_path: Path, upstream: RecordingUpstream) -> tuple[Path, int, int]:
    """A config on free ports with an open route to ``upstream``, its SQLite store migrated."""
    port, admin = free_port(), free_port()
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path}/k.db"\n'
        f'[[routes]]\nprefix = "/"\nupstream = "{upstream.url}"\nauth = "none"\n'
    )
    subprocess.run([sys.executable, "-m", "gateway", "migrate", "--config", str(cfg)], env=env(), check=True, capture_output=True)
    return cfg, port, admin


async def test_two_workers_share_a_port_and_survive_a_killed_worker(tmp_path: Path, upstream: RecordingUpstream) -> None:
    cfg, port, admin = migrated_config(tmp_path, upstream)
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
        # No Redis here: the operator is told how long another worker may serve a revoked key.
        assert "--workers 2 without redis.url" in (tmp_path / "serve.log").read_text()
    finally:
        if sup.poll() is None:
            sup.kill()
        log.close()


def test_cgroup_cpu_quota_is_read_from_v2_and_v1_files(tmp_path: Path) -> None:
    from gateway.workers import _cgroup_quota

    def quota(membership: str, files: dict[str, str]) -> int | None:
        (tmp_path / "cgroup").write_text(membership)
        for rel, text in files.items():
            (tmp_path / "fs" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "fs" / rel).write_text(text)
        return _cgroup_quota(tmp_path / "cgroup", tmp_path / "fs")

    assert quota("0::/app.slice/ks\n", {"app.slice/ks/cpu.max": "150000 100000\n"}) == 2
    assert quota("0::/a\n", {"a/cpu.max": "max 100000\n"}) is None
    assert quota("0::/b\n", {}) is None  # no cpu controller delegated there
    assert quota("garbage\n0::/app.slice/ks\n", {}) == 2  # an unreadable line is skipped
    v1 = {"cpu,cpuacct/k/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/k/cpu.cfs_period_us": "100000\n"}
    assert quota("4:memory:/k\n3:cpu,cpuacct:/k\n0::/\n", v1) == 1
    assert quota("3:cpu,cpuacct:/u\n", {"cpu,cpuacct/u/cpu.cfs_quota_us": "-1\n",
                                         "cpu,cpuacct/u/cpu.cfs_period_us": "100000\n"}) is None


async def test_workers_beyond_the_usable_cpus_are_warned_about_and_auto_fits(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    one_cpu = min(os.sched_getaffinity(0))
    cfg, port, _ = migrated_config(tmp_path, upstream)
    for workers, expect_children, warned in (("2", 2, True), ("auto", 0, False)):
        log_path = tmp_path / f"serve-{workers}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--workers", workers],
                env=env(), stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}),
            )
            try:
                wait_tcp(port, 20)
                deadline = time.monotonic() + 20
                while len(children(proc.pid)) < expect_children:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
                async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/x") as r:
                    assert r.status == 200
                assert len(children(proc.pid)) == expect_children  # auto: one CPU, one process
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=30) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
        text = log_path.read_text()
        assert ("--workers 2 exceeds the 1 CPU(s)" in text) is warned, text
    bad = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--workers", "0"],
                         env=env(), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "must be at least 1" in bad.stderr
