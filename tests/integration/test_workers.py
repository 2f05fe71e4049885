"""``keystile serve --workers N``: one port, N processes, a dead worker replaced, SIGTERM drains all.

A replaced worker runs the configuration the others run (never a refused or not yet reloaded
file), and a worker that cannot start never takes the healthy ones down.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.servers import free_port, wait_tcp
from tests.upstream import RecordingUpstream
from tests.waiting import until


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
        async def both_ready() -> bool:  # the replacement serves (its /readyz line says so)
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin}/readyz") as r:
                return "2 of 2 ready" in await r.text()

        await until(both_ready, timeout=20, what="the replacement worker ready")
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


# -- configuration generations and failing starts ----------------------------------------------


class Supervised:
    """``keystile serve --workers 2`` as a real process tree, with a client for it."""

    def __init__(self, tmp_path: Path, cfg: Path, port: int, admin: int) -> None:
        self.cfg, self.port, self.admin = cfg, port, admin
        self.log_path = tmp_path / "serve.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--workers", "2"],
            env=env(), stdout=self._log, stderr=subprocess.STDOUT,
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in children(self.proc.pid):
            os.kill(pid, signal.SIGKILL)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()

    async def admin_get(self, path: str) -> str:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{self.admin}{path}") as r:
            return await r.text()

    async def until(self, what: str, check, timeout: float = 40.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not await check():
            assert self.proc.poll() is None, f"the supervisor exited while waiting for {what}: {self.log()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.log()[-3000:]}"
            await asyncio.sleep(0.1)

    async def workers_ready(self, pattern: str) -> None:
        """Wait until ``/readyz`` says ``workers: <pattern>`` (a regular expression)."""
        async def check() -> bool:
            try:
                return re.search(f'"workers":"{pattern}', await self.admin_get("/readyz")) is not None
            except aiohttp.ClientError:
                return False

        await self.until(f"workers: {pattern}", check)

    async def statuses(self, path: str, n: int = 40) -> list[int]:
        """``n`` requests on ``n`` new connections (spread over the workers by the kernel)."""
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async def one() -> int:
                async with s.get(f"http://127.0.0.1:{self.port}{path}") as r:
                    await r.read()
                    return r.status
            return list(await asyncio.gather(*(one() for _ in range(n))))

    async def kill_a_worker(self) -> int:
        victim = min(children(self.proc.pid))
        os.kill(victim, signal.SIGKILL)
        return victim


class Load:
    """Requests on new connections from a few clients, until stopped; records (time, status)."""

    def __init__(self, port: int, path: str, clients: int = 4) -> None:
        self.results: list[tuple[float, int | str]] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._client(port, path)) for _ in range(clients)]

    async def _client(self, port: int, path: str) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                        await r.read()
                        self.results.append((started, r.status))
                except aiohttp.ClientError as e:
                    self.results.append((started, type(e).__name__))
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def failures(self, *, around: list[float]) -> list[tuple[float, int | str]]:
        """Answers other than 200, leaving out requests started within 2 s of a worker's death
        (it resets the connections it had accepted; the margin is for a loaded machine)."""
        return [(t, r) for t, r in self.results if r != 200 and not any(abs(t - k) <= 2.0 for k in around)]


def routes_config(tmp_path: Path, upstream: RecordingUpstream, prefix: str) -> tuple[Path, int, int]:
    cfg, port, admin = migrated_config(tmp_path, upstream)
    cfg.write_text(cfg.read_text().replace('prefix = "/"', f'prefix = "{prefix}"'))
    return cfg, port, admin


@pytest.mark.slow
async def test_a_replaced_worker_runs_the_configuration_in_force_not_the_file(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    cfg, port, admin = routes_config(tmp_path, upstream, "/old")
    good = cfg.read_text()
    sup = Supervised(tmp_path, cfg, port, admin)
    try:
        await sup.workers_ready("2 of 2 ready")
        load = Load(port, "/old/x")
        # A refused reload: the file is broken, both workers keep the previous configuration.
        cfg.write_text(good + '[[routes]]\nprefix = "broken"\n')
        sup.proc.send_signal(signal.SIGHUP)
        await sup.until("the refusal", lambda: asyncio.sleep(0, "reload refused; the previous" in sup.log()))
        # A worker dies: its replacement runs what the other runs, not the broken file.
        killed_at = time.monotonic()
        victim = await sup.kill_a_worker()
        await sup.until("the replacement", lambda: asyncio.sleep(0, victim not in children(sup.proc.pid)
                                                              and len(children(sup.proc.pid)) == 2))
        await sup.workers_ready("2 of 2 ready")
        assert await sup.statuses("/old/x") == [200] * 40
        # A valid file that was not reloaded is not in force either: a replacement ignores it.
        cfg.write_text(good.replace('prefix = "/old"', 'prefix = "/new"'))
        killed_again = time.monotonic()
        victim = await sup.kill_a_worker()
        await sup.until("the replacement", lambda: asyncio.sleep(0, victim not in children(sup.proc.pid)
                                                              and len(children(sup.proc.pid)) == 2))
        await sup.workers_ready("2 of 2 ready")
        assert await sup.statuses("/old/x") == [200] * 40
        await load.stop()
        failures = load.failures(around=[killed_at, killed_again])
        assert failures == [] and len(load.results) > 50, failures
        assert "giving up" not in sup.log()

        # Reloaded: every worker, the replaced ones too, switches to the new routes.
        sup.proc.send_signal(signal.SIGHUP)

        async def switched() -> bool:
            return await sup.statuses("/new/x") == [200] * 40

        await sup.until("the new routes on every worker", switched)
        assert set(await sup.statuses("/old/x")) == {404}
        assert "keystile_config_generation 2.0" in await sup.admin_get("/metrics")
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(timeout=30) == 0
    finally:
        sup.close()


@pytest.mark.slow
async def test_a_worker_that_cannot_start_never_takes_the_healthy_one_down(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    cfg, port, admin = migrated_config(tmp_path, upstream)
    sup = Supervised(tmp_path, cfg, port, admin)
    db = sqlite3.connect(tmp_path / "k.db", isolation_level=None)
    try:
        await sup.workers_ready("2 of 2 ready")
        load = Load(port, "/x")
        # A schema from the future: a new worker refuses to start; the running ones keep serving.
        db.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)")
        killed_at = time.monotonic()
        await sup.kill_a_worker()
        await sup.workers_ready(r"1 of 2 ready; slot \d: exited with code 1 before it was ready, ([2-9]|\d\d+) time\(s\)")
        metrics = await sup.admin_get("/metrics")
        assert "keystile_workers_ready 1.0" in metrics and "keystile_workers_configured 2.0" in metrics
        assert await sup.statuses("/x") == [200] * 40
        assert "giving up" not in sup.log() and len(children(sup.proc.pid)) >= 1

        db.execute("DELETE FROM schema_migrations WHERE version = 999")
        await sup.workers_ready("2 of 2 ready")
        assert await sup.statuses("/x") == [200] * 40
        await load.stop()
        assert load.failures(around=[killed_at]) == []
        metrics = await sup.admin_get("/metrics")
        assert "keystile_workers_ready 2.0" in metrics
        failed = float(re.search(r"^keystile_worker_failed_starts_total (\S+)$", metrics, re.M)[1])
        assert failed >= 2
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(timeout=30) == 0
    finally:
        db.close()
        sup.close()


def test_a_failing_slot_backs_off_exponentially_and_recovers_once_a_worker_lasts() -> None:
    from gateway.workers import MAX_BACKOFF, RESTART_BACKOFF, STARTUP_GRACE, Slot

    slot = Slot(1)
    delays = []
    now = 100.0
    for _ in range(10):  # exits before it is ready, again and again
        slot.started = now
        delays.append(slot.exited(1, now + 1))
        now += 60
    assert delays[:4] == [RESTART_BACKOFF, 2 * RESTART_BACKOFF, 4 * RESTART_BACKOFF, 8 * RESTART_BACKOFF]
    assert delays[-1] == MAX_BACKOFF and slot.failures == 10
    assert "exited with code 1 before it was ready, 10 time(s) in a row" in slot.last_failure
    # It starts and serves: no longer failing; once it has lasted the grace, the backoff resets.
    slot.started, slot.ready_at = now, now + 1
    slot.settled(now + 2)
    assert slot.failures == 10 and slot.last_failure == ""
    slot.settled(now + STARTUP_GRACE)
    assert slot.failures == 0
    # A worker that served a while and dies is replaced at once.
    assert slot.exited(-9, now + 3600) == 0.0 and slot.failures == 0


def test_in_force_keeps_what_needs_a_restart_and_takes_everything_else_from_the_new_file() -> None:
    from gateway.app import _restart_only, in_force
    from tests.conftest import make_config

    running = make_config({"store": {"url": "sqlite:///a.db"}, "cache": {"redis_ttl": 300, "local_ttl": 10},
                           "routes": [{"prefix": "/a", "upstream": "http://127.0.0.1:1"}]})
    new = make_config({"proxy": {"listen": "127.0.0.1:9999", "keepalive_timeout": 7},
                       "store": {"url": "sqlite:///b.db"}, "usage": {"flush_interval": 9},
                       "cache": {"redis_ttl": 30, "local_ttl": 3}, "logging": {"level": "debug"},
                       "routes": [{"prefix": "/b", "upstream": "http://127.0.0.1:2"}]})
    cfg = in_force(running, new)
    assert all(old == now for _, old, now in _restart_only(running, cfg))
    assert cfg.routes == new.routes and cfg.cache.local_ttl == 3 and cfg.cache.redis_ttl == 300
    assert cfg.store == running.store and cfg.proxy.listen == running.proxy.listen
    assert in_force(running, running) == running
