"""Multi-worker serving: a supervisor that runs N ``keystile serve`` worker processes on one port.

Owns: spawning workers, restarting one that dies, passing SIGTERM/SIGINT/SIGHUP on, and the
shared Prometheus directory. Must not: import the app or handle requests.

Each worker binds the proxy and admin ports with SO_REUSEPORT, so the kernel spreads connections
across them; each has its own in-process cache and usage buffer and shares Redis and the store.
Request metrics are aggregated across workers through prometheus-client's multi-process mode
(the supervisor gives every worker the same ``PROMETHEUS_MULTIPROC_DIR``). A worker that exits
unexpectedly is restarted after a short backoff; one that cannot start at all (it dies within
``STARTUP_GRACE`` seconds three times in a row) makes the supervisor give up with exit code 1.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

log = logging.getLogger("keystile.supervisor")

STARTUP_GRACE = 5.0
MAX_QUICK_DEATHS = 3


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers).

    Workers beyond this share cores. Measured on a 2-core VM with both workers pinned to one core:
    the kernel switches between them every ~3 ms and each switch costs cache refills, so CPU per
    request rose 1.2-1.3x (with 20 ms slices it fell ~15 %, and p99 tripled)."""
    cpus = len(os.sched_getaffinity(0))
    quota = _cgroup_quota()
    return max(1, min(cpus, quota)) if quota is not None else cpus


def _cgroup_quota(
    membership: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """``ceil(quota / period)`` of this process's cgroup (v2 ``cpu.max``, else v1), None if unlimited."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # cgroup v2: "max 100000" or "150000 100000"
                base = root / path.lstrip("/")
                quota_s, period_s = (base / "cpu.max").read_text().split()[:2]
            elif "cpu" in controllers.split(","):  # cgroup v1: -1 when unlimited
                base = root / controllers / path.lstrip("/")
                quota_s = (base / "cpu.cfs_quota_us").read_text().strip()
                period_s = (base / "cpu.cfs_period_us").read_text().strip()
            else:
                continue
            quota, period = int(quota_s), int(period_s)
        except (OSError, ValueError):  # not "id:controllers:path", no such file, or "max"
            continue
        if quota > 0 and period > 0:
            return -(-quota // period)
    return None


class Supervisor:
    def __init__(self, workers: int, worker_args: Sequence[str], shutdown_timeout: float) -> None:
        self.count = workers
        self.args = list(worker_args)
        self.shutdown_timeout = shutdown_timeout
        self.procs: dict[int, tuple[subprocess.Popen[bytes], float]] = {}  # slot -> (process, started)
        self.metrics_dir = tempfile.mkdtemp(prefix="keystile-metrics-")
        self._stopping = False
        self._quick_deaths = 0
        self.restarts = 0

    def _spawn(self, slot: int) -> None:
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        cmd = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            *self.args,
            "--reuse-port",
            "--worker-of",
            str(os.getpid()),
            "--metrics-dir",
            self.metrics_dir,
        ]
        proc = subprocess.Popen(cmd, env=env)  # noqa: S603 - our own interpreter and module
        self.procs[slot] = (proc, time.monotonic())
        log.info("worker started", extra={"fields": {"slot": slot, "pid": proc.pid}})

    def _signal_all(self, sig: int) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        self._signal_all(signal.SIGTERM)

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._signal_all(signal.SIGHUP)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            for slot in range(self.count):
                self._spawn(slot)
            while not self._stopping:
                time.sleep(0.2)
                for slot, (proc, started) in list(self.procs.items()):
                    code = proc.poll()
                    if code is None or self._stopping:
                        continue
                    quick = time.monotonic() - started < STARTUP_GRACE
                    self._quick_deaths = self._quick_deaths + 1 if quick else 0
                    log.error(
                        "worker exited", extra={"fields": {"slot": slot, "pid": proc.pid, "code": code}}
                    )
                    if self._quick_deaths >= MAX_QUICK_DEATHS:
                        log.error("workers keep dying at start-up; giving up")
                        self._stopping = True
                        self._signal_all(signal.SIGTERM)
                        self._wait_all()
                        return 1
                    time.sleep(min(0.5 * self._quick_deaths, 2.0))
                    self.restarts += 1
                    self._spawn(slot)
            return self._wait_all()
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _wait_all(self) -> int:
        deadline = time.monotonic() + self.shutdown_timeout + 10
        worst = 0
        for proc, _ in self.procs.values():
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            worst = worst or (code if code != -signal.SIGTERM else 0)
        return worst
