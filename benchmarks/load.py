"""Load generators: wrk with ``wrk/keys.lua`` (the real runs), and a small asyncio client (smoke).

Both report a ``LoadResult``; both are bounded in time (wrk by ``-d`` plus a subprocess timeout,
the asyncio client by a deadline).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

from benchmarks.procs import pin_prefix

LUA = Path(__file__).with_name("wrk") / "keys.lua"
KEY_HEADER = "X-API-Key"


class LoadError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors and timeouts
    non_2xx: int  # responses outside 2xx/3xx (expected for the 401 scenarios)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "rps": round(self.rps, 1)}


def find_wrk() -> str | None:
    return shutil.which("wrk")


def run_wrk(
    url: str,
    *,
    mode: str,
    keys_file: Path | None,
    duration: float,
    connections: int = 50,
    core: int | None = 1,
    zipf_s: float = 1.1,
    seed: int = 1,
    wrk: str = "wrk",
) -> LoadResult:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KS_")}
    env.update(KS_MODE=mode, KS_ZIPF_S=str(zipf_s), KS_HEADER=KEY_HEADER, KS_SEED=str(seed))
    if keys_file is not None:
        env["KS_KEYS"] = str(keys_file)
    argv = [
        *pin_prefix(core),
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA),
        url,
    ]
    try:
        out = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=duration + 60, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise LoadError(f"wrk did not finish within {duration + 60:.0f}s") from e
    for line in out.stdout.splitlines():
        if line.startswith("KS_BENCH "):
            d = json.loads(line.removeprefix("KS_BENCH "))
            return LoadResult(
                requests=int(d["requests"]),
                seconds=d["duration_us"] / 1e6,
                p50_ms=d["p50_us"] / 1e3,
                p99_ms=d["p99_us"] / 1e3,
                errors=int(
                    d["connect_errors"] + d["read_errors"] + d["write_errors"] + d["timeouts"]
                ),
                non_2xx=int(d["non_2xx_3xx"]),
            )
    raise LoadError(f"wrk printed no result (exit {out.returncode}): {out.stderr.strip()[-500:]}")


# -- a small asyncio HTTP/1.1 keep-alive client, for machines without wrk ---------------------


class _Conn(asyncio.Protocol):
    def __init__(self, request: bytes, owner: _Client) -> None:
        self.request = request
        self.owner = owner
        self.buf = bytearray()
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._send()

    def _send(self) -> None:
        if not self.owner.take():
            if self.transport is not None:
                self.transport.close()
            return
        self.sent_at = time.perf_counter()
        assert self.transport is not None
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            total = end + 4 + length
            if len(self.buf) < total:
                return
            del self.buf[:total]
            status = int(head[0].split(" ", 2)[1])
            self.owner.record(status, time.perf_counter() - self.sent_at)
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.owner.remaining > 0 and exc is not None:
            self.owner.errors += 1
        if not self.done.done():
            self.done.set_result(None)


class _Client:
    def __init__(self, total: int) -> None:
        self.remaining = total
        self.latencies: list[float] = []
        self.non_2xx = 0
        self.errors = 0

    def take(self) -> bool:
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True

    def record(self, status: int, seconds: float) -> None:
        self.latencies.append(seconds)
        if not 200 <= status < 400:
            self.non_2xx += 1


async def _pyload(
    host: str, port: int, path: str, headers: dict[str, str], total: int, connections: int, limit: float
) -> LoadResult:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    client = _Client(total)
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    conns: list[_Conn] = []
    for _ in range(connections):
        try:
            _, proto = await loop.create_connection(lambda: _Conn(request, client), host, port)
        except OSError:
            client.errors += 1
            continue
        conns.append(proto)
    try:
        await asyncio.wait_for(asyncio.gather(*(c.done for c in conns)), limit)
    except TimeoutError:
        for c in conns:
            if c.transport is not None:
                c.transport.abort()
        client.errors += 1
    seconds = time.perf_counter() - t0
    lat = sorted(client.latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else 0.0

    return LoadResult(len(lat), seconds, pct(0.50), pct(0.99), client.errors, client.non_2xx)


def run_pyload(
    host: str,
    port: int,
    *,
    path: str = "/",
    headers: dict[str, str] | None = None,
    requests: int = 3000,
    connections: int = 20,
    time_limit: float = 15.0,
) -> LoadResult:
    """A fixed number of GETs over ``connections`` keep-alive connections, within ``time_limit``.

    Runs in this process: pin the caller (``os.sched_setaffinity``) to keep it off the server's core.
    """
    return asyncio.run(
        _pyload(host, port, path, headers or {}, requests, connections, time_limit)
    )
