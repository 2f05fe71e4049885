"""Multi-worker serving: a supervisor that runs N ``keystile serve`` worker processes on one port.

Owns: spawning workers, restarting one that dies, the configuration generation the workers run,
passing SIGTERM/SIGINT on, the status file workers publish in ``/readyz`` and ``/metrics``, and the
shared Prometheus directory. Must not: import the app or handle requests.

Each worker binds the proxy and admin ports with SO_REUSEPORT, so the kernel spreads connections
across them; each has its own in-process cache and usage buffer and shares Redis and the store.
Request metrics are aggregated across workers through prometheus-client's multi-process mode
(the supervisor gives every worker the same ``PROMETHEUS_MULTIPROC_DIR``).

**One configuration for every worker.** Workers never read the operator's file. The supervisor
keeps a private runtime directory (mode 0700) holding ``startup.toml`` (the file as it was at
start: listeners, store and the other settings that need a restart come from it) and
``current.toml`` (the last file it accepted). On SIGHUP the supervisor reads and validates the
operator's file itself; only if it is valid does it replace ``current.toml`` (atomically) and
tell the workers to reload it. A refused file changes nothing, so a worker started later — to
replace one that died — runs exactly what the others run (``gateway.app.in_force``), never a file
that was refused or not yet reloaded.

**Restarts never cost the healthy workers.** A worker that dies is started again; one that exits
before it is ready (it creates its ``ready-<pid>`` file once it serves), or within
``STARTUP_GRACE`` seconds, is retried with an exponential backoff (``RESTART_BACKOFF`` doubling up
to ``MAX_BACKOFF``), however often it fails, while the others keep serving. ``status.json`` says
how many workers are ready and why a slot is not; every worker shows it in ``/readyz`` (``workers:
1 of 2 ...``) and ``/metrics``. The supervisor gives up (exit 1) only when no worker is running at
all and every slot failed ``MAX_QUICK_DEATHS`` times in a row: a configuration that cannot serve.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import msgspec
from prometheus_client.core import Metric

from gateway import config as config_mod
from gateway.observability import counter, gauge

log = logging.getLogger("keystile.supervisor")

STARTUP_GRACE = 5.0  # a worker that exits sooner than this after its start failed to start
MAX_QUICK_DEATHS = 3
RESTART_BACKOFF = 0.5  # the wait before the second try of a failing slot; doubles with each failure
MAX_BACKOFF = 30.0
POLL_INTERVAL = 0.2


# -- the runtime directory: what supervisor and workers share --------------------------------


def startup_config(runtime: Path) -> Path:
    """The configuration file as it was when the supervisor started."""
    return runtime / "startup.toml"


def current_config(runtime: Path) -> Path:
    """The configuration file last accepted (the one SIGHUP makes workers reload)."""
    return runtime / "current.toml"


def config_base(runtime: Path) -> Path | None:
    """The directory of the operator's config file: its relative paths are relative to it, not to
    the copies in ``runtime`` (the current directory when the supervisor read no file)."""
    try:
        text = (runtime / "config-dir").read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return Path(text) if text else None


def status_file(runtime: Path) -> Path:
    return runtime / "status.json"


def ready_file(runtime: Path, pid: int) -> Path:
    """A worker creates this once it serves and handles SIGHUP."""
    return runtime / f"ready-{pid}"


def metrics_dir(runtime: Path) -> Path:
    return runtime / "metrics"


class WorkerStatus(msgspec.Struct, frozen=True, kw_only=True):
    """What the supervisor publishes for the workers' ``/readyz`` and ``/metrics``."""

    configured: int
    ready: int
    restarts: int  # workers started to replace one that exited
    failed_starts: int  # starts that exited before the worker was ready
    generation: int  # configurations accepted: 1 is the file read at start
    failing: list[str] = []  # per slot not serving: why


_status_dec = msgspec.json.Decoder(WorkerStatus)
_status_enc = msgspec.json.Encoder()


def read_status(path: Path) -> WorkerStatus | None:
    try:
        return _status_dec.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return None


def describe(status: WorkerStatus | None) -> str:
    """The ``workers`` line of ``/readyz``: ``2 of 2 ready`` or ``1 of 2 ready; slot 1: ...``."""
    if status is None:
        return "unknown (no word from the supervisor)"
    text = f"{status.ready} of {status.configured} ready"
    return "; ".join([text, *status.failing])


def status_metrics(path: Path) -> Callable[[], list[Metric]]:
    """Scrape-time metrics from the supervisor's status file (for ``Metrics.add_state``)."""

    def collect() -> list[Metric]:
        status = read_status(path)
        if status is None:
            return []
        return [
            gauge("keystile_workers_configured", "Worker processes the supervisor runs.", status.configured),
            gauge("keystile_workers_ready", "Worker processes serving now.", status.ready),
            counter(
                "keystile_worker_restarts",
                "Workers started to replace one that exited.",
                [({}, status.restarts)],
            ),
            counter(
                "keystile_worker_failed_starts",
                "Worker starts that exited before the worker was ready.",
                [({}, status.failed_starts)],
            ),
            gauge(
                "keystile_config_generation",
                "Configurations accepted by the supervisor (1: the file read at start).",
                status.generation,
            ),
        ]

    return collect


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# -- CPUs ------------------------------------------------------------------------------------


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers).

    Workers beyond this share cores: the kernel switches between them every few milliseconds and
    each switch costs cache refills, so each request costs more CPU than with one worker per core."""
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


# -- restart policy --------------------------------------------------------------------------


@dataclass
class Slot:
    """One worker position: its process, and how its recent starts went.

    ``failures`` counts consecutive quick exits (before ready, or within ``STARTUP_GRACE``); it
    sets the backoff and is cleared once a worker of this slot has served ``STARTUP_GRACE`` s.
    """

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ready_at: float | None = None
    generation: int = 0  # the generation current when this process was spawned
    failures: int = 0
    failed_starts: int = 0  # consecutive exits before ready
    next_start: float = 0.0
    last_failure: str = ""

    def exited(self, code: int, now: float) -> float:
        """Record the exit of this slot's process; returns the delay before the next start."""
        quick = self.ready_at is None or now - self.started < STARTUP_GRACE
        if quick:
            self.failures += 1
            delay = min(RESTART_BACKOFF * 2.0 ** (self.failures - 1), MAX_BACKOFF)
        else:
            self.failures = 0
            delay = 0.0
        if self.ready_at is None:
            self.failed_starts += 1
            self.last_failure = (
                f"slot {self.index}: exited with code {code} before it was ready, "
                f"{self.failed_starts} time(s) in a row; retrying with backoff"
            )
        else:
            self.failed_starts, self.last_failure = 0, ""
        self.proc, self.ready_at = None, None
        self.next_start = now + delay
        return delay

    def settled(self, now: float) -> None:
        """Called while the process serves: forget past failures once it has lasted."""
        if self.ready_at is not None:
            self.failed_starts, self.last_failure = 0, ""
            if now - self.started >= STARTUP_GRACE:
                self.failures = 0


# -- the supervisor --------------------------------------------------------------------------


class Supervisor:
    def __init__(
        self,
        workers: int,
        config_path: str | None,
        shutdown_timeout: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.count = workers
        self.config_path = config_path
        self.shutdown_timeout = shutdown_timeout
        self.clock = clock
        self.slots = [Slot(i) for i in range(workers)]
        self.runtime = Path(tempfile.mkdtemp(prefix="keystile-run-"))  # 0700: only this user
        self.metrics_dir = str(metrics_dir(self.runtime))
        os.mkdir(self.metrics_dir, 0o700)
        self.generation = 0
        self.restarts = 0
        self.failed_starts = 0
        self._stopping = False
        self._hup = False
        self._published: WorkerStatus | None = None
        # Told each reload's outcome (applied, problems): ``keystile reload`` waits for it.
        self.on_reload: Callable[[bool, list[str]], None] | None = None

    # configuration generations

    def _read_config(self) -> bytes:
        """The operator's file, validated as the workers will read it; raises ConfigError."""
        if self.config_path is None:
            text = ""  # no file: defaults plus environment, as an empty file gives
        else:
            try:
                text = Path(self.config_path).read_text(encoding="utf-8")
            except OSError as e:
                raise config_mod.ConfigError([f"{self.config_path}: cannot read: {e.strerror}"]) from None
        config_mod.loads(text, self.config_path or "(defaults)")
        return text.encode("utf-8")

    def _accept(self, data: bytes) -> None:
        if self.generation == 0:
            # Without a file, relative paths (from the environment) follow the current directory.
            base = str(Path(self.config_path).parent.absolute() if self.config_path else Path.cwd())
            _write_atomically(self.runtime / "config-dir", base.encode("utf-8"))
            _write_atomically(startup_config(self.runtime), data)
        _write_atomically(current_config(self.runtime), data)
        self.generation += 1

    def _reload(self) -> None:
        """SIGHUP: validate the operator's file here; only an accepted one reaches the workers."""
        try:
            data = self._read_config()
        except config_mod.ConfigError as e:
            for problem in e.problems:
                log.error("reload refused: %s", problem)
            log.error("reload refused; the previous configuration keeps serving")
            if self.on_reload is not None:
                self.on_reload(False, e.problems)
            return
        self._accept(data)
        if self.on_reload is not None:
            self.on_reload(True, [])
        fields = {"generation": self.generation}
        log.info("configuration accepted; workers reload it", extra={"fields": fields})
        for slot in self.slots:
            if slot.proc is not None and slot.ready_at is not None:
                self._send(slot, signal.SIGHUP)
            # A worker not ready yet may have read the previous file; it is told once it is ready.

    # processes

    def _spawn(self, slot: Slot) -> None:
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        cmd = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--runtime-dir",
            str(self.runtime),
            "--reuse-port",
            "--worker-of",
            str(os.getpid()),
            "--metrics-dir",
            self.metrics_dir,
        ]
        slot.proc = subprocess.Popen(cmd, env=env)  # noqa: S603 - our own interpreter and module
        slot.started, slot.ready_at, slot.generation = self.clock(), None, self.generation
        log.info("worker started", extra={"fields": {"slot": slot.index, "pid": slot.proc.pid}})

    def _send(self, slot: Slot, sig: int) -> None:
        if slot.proc is not None and slot.proc.poll() is None:
            slot.proc.send_signal(sig)

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            self._send(slot, sig)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        self._signal_all(signal.SIGTERM)

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._hup = True  # handled by the main loop, not inside the signal handler

    def _check(self, slot: Slot) -> None:
        """One look at a slot: ready yet, exited, or due to be started again."""
        now = self.clock()
        proc = slot.proc
        if proc is None:
            if now >= slot.next_start:
                self.restarts += 1
                self._spawn(slot)
            return
        code = proc.poll()
        if code is None:
            if slot.ready_at is None and ready_file(self.runtime, proc.pid).exists():
                slot.ready_at = now
                log.info("worker ready", extra={"fields": {"slot": slot.index, "pid": proc.pid}})
                if slot.generation < self.generation:  # it may have read an older file
                    self._send(slot, signal.SIGHUP)
            slot.settled(now)
            return
        ready_file(self.runtime, proc.pid).unlink(missing_ok=True)
        if slot.ready_at is None:
            self.failed_starts += 1
        delay = slot.exited(code, now)
        log.error(
            "worker exited",
            extra={"fields": {"slot": slot.index, "pid": proc.pid, "code": code, "restart_in": delay}},
        )

    def _gave_up(self) -> bool:
        """No worker running and every slot failing at start-up: nothing serves, nothing will."""
        return all(s.proc is None and s.failures >= MAX_QUICK_DEATHS for s in self.slots)

    def _publish(self) -> None:
        status = WorkerStatus(
            configured=self.count,
            ready=sum(1 for s in self.slots if s.ready_at is not None),
            restarts=self.restarts,
            failed_starts=self.failed_starts,
            generation=self.generation,
            failing=[s.last_failure for s in self.slots if s.ready_at is None and s.last_failure],
        )
        if status != self._published:
            _write_atomically(status_file(self.runtime), _status_enc.encode(status))
            self._published = status

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            try:
                self._accept(self._read_config())
            except config_mod.ConfigError as e:
                for problem in e.problems:
                    log.error("%s", problem)
                return 2
            for slot in self.slots:
                self._spawn(slot)
            while not self._stopping:
                if self._hup:
                    self._hup = False
                    self._reload()
                for slot in self.slots:
                    if not self._stopping:
                        self._check(slot)
                self._publish()
                if self._gave_up():
                    log.error("no worker can start; giving up")
                    return 1
                time.sleep(POLL_INTERVAL)
            return self._wait_all()
        finally:
            shutil.rmtree(self.runtime, ignore_errors=True)

    def _wait_all(self) -> int:
        deadline = time.monotonic() + self.shutdown_timeout + 10
        worst = 0
        for slot in self.slots:
            proc = slot.proc
            if proc is None:
                continue
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            worst = worst or (code if code != -signal.SIGTERM else 0)
        return worst
