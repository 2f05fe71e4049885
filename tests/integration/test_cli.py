"""The ``keystile`` command as a user runs it: subprocesses, real sockets, captured output."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import aiohttp

from tests.upstream import RecordingUpstream
from tests.waiting import until

SECRET = "0123456789abcdef" * 4


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}
    e["KEYSTILE_KEY_HASH_SECRET"] = SECRET
    return e


def keystile(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env(), timeout=60, **kw
    )  # type: ignore[call-overload]


def write_config(tmp_path: Path, upstream_url: str, proxy_port: int, admin_port: int) -> Path:
    p = tmp_path / "keystile.toml"
    p.write_text(
        f"""
[proxy]
listen = "127.0.0.1:{proxy_port}"
[admin]
listen = "127.0.0.1:{admin_port}"
[store]
url = "sqlite:///{tmp_path}/ks.db"
[usage]
flush_interval = 0.2
[[routes]]
prefix = "/"
upstream = "{upstream_url}"
"""
    )
    return p


def used(db: Path) -> bool:
    with closing(sqlite3.connect(db)) as conn:
        return bool(conn.execute("SELECT count(*) FROM key_usage WHERE request_count > 0").fetchone()[0])


async def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"port {port} never opened")


async def test_serve_create_key_proxy_list_and_sigterm(tmp_path: Path, upstream: RecordingUpstream) -> None:
    pp, ap = free_port(), free_port()
    cfg = write_config(tmp_path, upstream.url, pp, ap)
    r = keystile("migrate", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    r = keystile(
        "keys",
        "create",
        "--config",
        str(cfg),
        "--owner",
        "alice",
        "--project",
        "p1",
        "--scopes",
        "read",
        "--name",
        "ci key",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    key = created["key"]
    assert created["name"] == "ci key" and created["status"] == "active" and "digest" not in created

    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
        env=env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        await wait_port(pp)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{pp}/x", headers={"X-API-Key": key}) as resp:
                assert resp.status == 200
            async with s.get(f"http://127.0.0.1:{pp}/x", headers={"X-API-Key": key[:-2] + "zz"}) as resp:
                assert resp.status == 401
            async with s.get(f"http://127.0.0.1:{ap}/healthz") as resp:
                assert resp.status == 200
            async with s.get(f"http://127.0.0.1:{ap}/readyz") as resp:
                assert resp.status == 200
        # The periodic flush (every 0.2 s) writes the use while the server runs.
        await until(lambda: used(tmp_path / "ks.db"), what="a usage flush")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    logs = (tmp_path / "serve.log").read_text()
    assert key not in logs and key[:-2] + "zz" not in logs
    assert created["id"] in logs  # the access log names the key by id
    for line in logs.splitlines():
        json.loads(line)  # every line is structured JSON

    r = keystile("keys", "list", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "NAME", "START", "OWNER", "PROJECT"]
    assert created["id"] in lines[1] and key[:12] + "…" in lines[1] and "active" in lines[1]
    assert key not in r.stdout
    listed = json.loads(keystile("keys", "list", "--config", str(cfg), "--json").stdout)["items"]
    assert listed[0]["last_used_at"] is not None and listed[0]["request_count"] == 1


def test_bad_config_stops_startup_with_one_line_per_problem(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text('[proxy]\nlisten = "x"\n[[routes]]\nprefix = "/"\nupstream = "nope"\n')
    r = keystile("serve", "--config", str(p))
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"{p}: proxy.listen: expected host:port, got 'x'",
        f"{p}: routes[0].upstream: expected an http(s)://host[:port][/path] URL",
    ]


def test_missing_secret_and_unmigrated_store_are_one_line(tmp_path: Path) -> None:
    p = tmp_path / "k.toml"
    p.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path}/fresh.db"\n[proxy]\nlisten = "127.0.0.1:{free_port()}"\n[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
    )
    e = {k: v for k, v in env().items() if k != "KEYSTILE_KEY_HASH_SECRET"}
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(p)],
        capture_output=True,
        text=True,
        env=e,
        timeout=30,
    )
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "KEYSTILE_KEY_HASH_SECRET" in r.stderr
    r = keystile("serve", "--config", str(p))
    lines = [line for line in r.stderr.splitlines() if "no admin token" not in line]  # a warning first
    assert r.returncode == 1 and len(lines) == 1 and "keystile migrate" in r.stderr, r.stderr


def test_python_dash_m_and_console_script_agree() -> None:
    r = keystile("secret")
    assert r.returncode == 0 and len(r.stdout.strip()) == 64
