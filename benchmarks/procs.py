"""Processes the harness starts: pinning, readiness, CPU accounting from /proc, and cleanup.

Every server runs in its own session (process group) so it and everything it forks can be stopped
by its id; ``Processes`` stops all of them on exit, exception, Ctrl-C or SIGTERM. CPU is read from
``/proc/<pid>/stat`` (utime + stime, plus cutime + cstime for children already reaped) for the
server and every descendant, so multi-process servers (nginx master + worker, ``--workers 2``) are
counted whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
# The cores this process may use when first imported, before the orchestrator pins itself.
_USABLE_CORES = sorted(os.sched_getaffinity(0))


class ServerFailed(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def cores() -> list[int]:
    return list(_USABLE_CORES)


def pin_prefix(core: int | None) -> list[str]:
    """``taskset -c N`` when pinning is possible, else nothing."""
    if core is None or core not in cores() or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(core)]


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime + cutime + cstime in ticks) of one process, None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    return int(fields[1]), int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(root: int) -> float:
    """CPU time used so far by ``root`` and all its descendants (all threads included)."""
    ticks = 0
    for pid in process_tree(root):
        st = _stat(pid)
        if st is not None:
            ticks += st[1]
    return ticks / CLK_TCK


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the harness dies without cleaning up (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    log: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def wait_ready(self, timeout: float) -> None:
        """Until the port accepts connections; ServerFailed if the process exits or time runs out."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                last = tail.splitlines()[-1] if tail else ""
                raise ServerFailed(
                    f"{self.name} exited with status {self.proc.returncode}: {last}\n{tail}"
                )
            if port_open(self.port):
                return
            time.sleep(0.05)
        raise ServerFailed(
            f"{self.name} did not listen on 127.0.0.1:{self.port} within {timeout:.0f}s\n"
            f"{self.log_tail()}"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, grace: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # The group may outlive its leader (workers); SIGKILL whatever is left of it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(2)


class Processes:
    """Owns every server started; ``with Processes() as procs:`` stops them all on the way out."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self._old_term: signal.Handlers | object | None = None

    def __enter__(self) -> Processes:
        self._old_term = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)  # type: ignore[arg-type]

    @staticmethod
    def _on_term(signum: int, frame: types.FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int,
        log: Path,
        core: int | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        ready_timeout: float = 15.0,
    ) -> Server:
        server = Server(name, [*pin_prefix(core), *argv], port, log, env, cwd)
        self.servers.append(server)
        server.start()
        try:
            server.wait_ready(ready_timeout)
        except ServerFailed:
            server.stop()
            raise
        return server

    def stop(self, server: Server) -> None:
        server.stop()
        with contextlib.suppress(ValueError):
            self.servers.remove(server)

    def stop_all(self) -> None:
        while self.servers:
            self.servers.pop().stop()

    def __iter__(self) -> Iterator[Server]:
        return iter(self.servers)
