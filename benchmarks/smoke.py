"""CI-safe smoke benchmark: Keystile's CPU per request against the plain aiohttp proxy, same run.

    python -m benchmarks.smoke [--json] [--threshold 1.5]

Seconds, not minutes, and no installs: wrk and nginx are used when present, else a small asyncio
load generator (a fixed number of keep-alive requests, bounded in time) and a tiny Python upstream.
Both proxies hold the same keys, get the same requests (a valid key, in-process cache hit for
Keystile) and are measured alternately. Only a ratio measured within this one run is judged,
never an absolute time: the check fails when Keystile's CPU per request exceeds ``threshold``
times the plain proxy's (i.e. Keystile is grossly slower than the few lines it replaces).

Exit status: 0 pass, 1 gross regression, 2 Keystile (or the harness) could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import configs, seed
from benchmarks.load import KEY_HEADER, LoadResult, find_wrk, run_pyload, run_wrk
from benchmarks.procs import Processes, Server, ServerFailed, cores, free_port
from benchmarks.tools import which

HERE = Path(__file__).parent
THRESHOLD = 1.5
KEYS = 100


def _measure(server: Server, port: int, key: str, wrk: str | None, load_core: int | None,
             requests: int) -> dict[str, float]:
    before = server.cpu_seconds()
    res: LoadResult
    if wrk is not None:
        keys_file = server.log.with_suffix(".key")
        keys_file.write_text(key + "\n")
        res = run_wrk(f"http://127.0.0.1:{port}/", mode="fixed", keys_file=keys_file, duration=2,
                      core=load_core, wrk=wrk)
    else:
        res = run_pyload("127.0.0.1", port, headers={KEY_HEADER: key}, requests=requests,
                         connections=20, time_limit=10)
    cpu = server.cpu_seconds() - before
    if not res.requests:
        raise ServerFailed(f"{server.name}: no request completed")
    return {
        "requests": res.requests,
        "rps": round(res.rps, 1),
        "cpu_us": round(cpu / res.requests * 1e6, 2),
        "non_2xx": res.non_2xx,
        "errors": res.errors,
    }


def run(threshold: float, requests: int, force_python: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    usable = cores()
    server_core, load_core = (usable[0], usable[1]) if len(usable) >= 2 else (None, None)
    if load_core is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {load_core})  # the Python load generator runs in-process
    wrk = None if force_python else find_wrk()
    nginx = None if force_python else which("nginx")
    result: dict[str, Any] = {
        "threshold": threshold,
        "load": "wrk" if wrk else "python",
        "upstream": "nginx" if nginx else "python",
        "pinned": load_core is not None,
    }
    tmp = Path(tempfile.mkdtemp(prefix="keystile-smoke-"))
    tmp.chmod(0o755)
    try:
        with Processes() as procs:
            secret = secrets.token_hex(32)
            store = seed.seeded_store(tmp, KEYS, secret, log=False)
            key = store.keys_file.read_text().split()[0]
            up = free_port()
            if nginx:
                conf = configs.nginx_upstream(tmp, "upstream", up)
                argv = configs.nginx_argv(nginx, tmp, "upstream", conf)
            else:
                argv = [sys.executable, str(HERE / "peers" / "tiny_upstream.py"), "--port", str(up)]
            procs.start("upstream", argv, port=up, log=tmp / "upstream.log", core=load_core)

            plain_port = free_port()
            plain = procs.start(
                "plain_aiohttp",
                [sys.executable, str(HERE / "peers" / "plain_aiohttp.py"), "--port", str(plain_port),
                 "--upstream", f"http://127.0.0.1:{up}", "--keys", str(store.keys_file)],
                port=plain_port, log=tmp / "plain.log", core=server_core,
            )
            ks_port = free_port()
            conf = configs.keystile_config(
                tmp, "keystile", port=ks_port, admin_port=free_port(), upstream_port=up,
                store_db=seed.working_copy(store, tmp), redis_url="", local_ttl=None,
            )
            exe = shutil.which("keystile", path=str(Path(sys.executable).parent)) or "keystile"
            env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}
            env["KEYSTILE_KEY_HASH_SECRET"] = secret
            env["KEYSTILE_ADMIN_TOKENS"] = secrets.token_hex(16)
            try:
                ks = procs.start("keystile", [exe, "serve", "--config", str(conf)], port=ks_port,
                                 log=tmp / "keystile.log", core=server_core, env=env, cwd=tmp,
                                 ready_timeout=15)
            except (ServerFailed, OSError) as e:
                result.update(status="keystile_unavailable", reason=str(e))
                return result
            servers = {"plain_aiohttp": (plain, plain_port), "keystile": (ks, ks_port)}
            for name, (_, port) in servers.items():  # preflight + warm-up
                warm = run_pyload("127.0.0.1", port, headers={KEY_HEADER: key}, requests=500,
                                  connections=10, time_limit=10)
                if warm.non_2xx or warm.errors or warm.requests < 500:
                    result.update(status="error", reason=f"{name}: valid key not accepted during "
                                  f"warm-up ({warm.non_2xx} non-2xx, {warm.errors} errors)")
                    return result
            runs: dict[str, list[dict[str, float]]] = {n: [] for n in servers}
            for _ in range(2 if wrk else 3):
                for name, (server, port) in servers.items():
                    runs[name].append(_measure(server, port, key, wrk, load_core, requests))
    except ServerFailed as e:
        result.update(status="error", reason=str(e))
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {n: min(r["cpu_us"] for r in rs) for n, rs in runs.items()}
    ratio = best["keystile"] / best["plain_aiohttp"]
    result.update(
        status="pass" if ratio <= threshold else "regression",
        cpu_us=best,
        ratio=round(ratio, 3),
        runs=runs,
        seconds=round(time.monotonic() - t0, 1),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.smoke", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="fail when Keystile CPU/request > this × the plain proxy's (1.5)")
    p.add_argument("--requests", type=int, default=3000,
                   help="requests per run with the Python load generator")
    p.add_argument("--python-only", action="store_true",
                   help="use the Python load generator and upstream even if wrk and nginx exist")
    a = p.parse_args(argv)
    result = run(a.threshold, a.requests, a.python_only)
    if a.json:
        print(json.dumps(result))
    elif result["status"] in ("pass", "regression"):
        cpu = result["cpu_us"]
        print(f"{result['status']}: Keystile {cpu['keystile']:.1f} µs/request, plain aiohttp proxy "
              f"{cpu['plain_aiohttp']:.1f} µs/request: ratio {result['ratio']:.2f} "
              f"(threshold {a.threshold}; load {result['load']}, {result['seconds']} s)")
    else:
        print(f"{result['status']}: {result.get('reason', '')}")
    return {"pass": 0, "regression": 1}.get(result["status"], 2)


if __name__ == "__main__":
    sys.exit(main())
