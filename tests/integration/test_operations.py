"""Operating Keystile: metrics, readiness, logs without secrets, reload without dropping requests."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from gateway.keys import generate_key
from gateway.observability import JSONFormatter
from tests.servers import RedisServer, free_port, wait_tcp
from tests.upstream import RecordingUpstream
from tests.waiting import until


async def test_metrics_count_requests_outcomes_and_tiers(keystile) -> None:
    gw = await keystile()
    key = await gw.key(grant=("read",))
    async with aiohttp.ClientSession() as s:
        for headers in ({"X-API-Key": key}, {"X-API-Key": key}, {}, {"X-API-Key": "bad"}):
            async with s.get(gw.url + "/x", headers=headers) as r:
                await r.read()
        async with s.get(gw.url + "/admin/x", headers={"X-API-Key": key}) as r:
            assert r.status == 403
        async with s.get(gw.admin_url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
    assert 'keystile_requests_total{route="/",status_class="2xx"} 2.0' in text
    assert 'keystile_requests_total{route="/",status_class="4xx"} 2.0' in text
    assert 'keystile_auth_total{outcome="ok"} 2.0' in text
    assert 'keystile_auth_total{outcome="missing"} 1.0' in text
    assert 'keystile_auth_total{outcome="invalid"} 1.0' in text
    assert 'keystile_auth_total{outcome="insufficient_scope"} 1.0' in text
    assert 'keystile_cache_lookups_total{result="hit",tier="local"}' in text
    assert "keystile_upstream_duration_seconds_bucket" in text
    assert 'keystile_request_duration_seconds_count{route="/"} 4.0' in text
    assert 'keystile_request_duration_seconds_count{route="/admin"} 1.0' in text
    assert 'keystile_upstream_duration_seconds_count{route="/"} 2.0' in text  # only forwarded ones
    # Every request falls in the +Inf bucket and in some finite one at most 10 s.
    assert 'keystile_request_duration_seconds_bucket{le="+Inf",route="/"} 4.0' in text
    assert 'keystile_request_duration_seconds_bucket{le="10.0",route="/"} 4.0' in text
    assert "keystile_usage_pending_keys" in text
    assert key not in text and key[:12] not in text


async def test_readiness_needs_the_store_not_redis(keystile, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        gw = await keystile(redis={"url": redis.url, "socket_timeout": 0.2, "connect_timeout": 0.2})
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.admin_url + "/readyz") as r:
                body = await r.json()
                assert r.status == 200 and body["checks"]["store"] == "ok"
            redis.kill()

            async def noticed() -> tuple[int, dict[str, Any]] | None:
                async with s.get(gw.admin_url + "/readyz") as r:
                    body = await r.json()
                    return (r.status, body) if "down" in body["checks"].get("redis", "") else None

            status, body = await until(noticed, what="/readyz reporting the subscription down")
            assert status == 200, body  # degraded, still serving safely
            assert "redis" in body["checks"]
            await gw.store.close()  # the store goes away
            async with s.get(gw.admin_url + "/readyz") as r:
                assert r.status == 503
                # The kind of failure, never the store's own text (public: it may name hosts).
                assert (await r.json())["checks"]["store"] == "unavailable: StoreUnavailable"
            async with s.get(gw.admin_url + "/healthz") as r:
                assert r.status == 200
    finally:
        redis.stop()


async def test_logs_never_contain_keys(keystile, capsys) -> None:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        gw = await keystile()
        key = await gw.key()
        unknown = generate_key("ks", "live")
        async with aiohttp.ClientSession() as s:
            for k in (key, unknown, key[:-1] + "x", "garbage-key"):
                for header in ("X-API-Key", "Authorization"):
                    value = k if header == "X-API-Key" else f"Bearer {k}"
                    async with s.get(gw.url + "/x?q=1", headers={header: value}) as r:
                        await r.read()
        await gw.gateway.stop()  # flushes the access log
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    logs = buf.getvalue() + capsys.readouterr().err
    assert '"key_id":"key_' in logs  # the access log names keys by id
    for secret in (key, unknown, key[:-1] + "x", "garbage-key", key[12:], unknown[12:]):
        assert secret not in logs
    for line in logs.splitlines():
        json.loads(line)


def _env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}
    e["KEYSTILE_KEY_HASH_SECRET"] = "r" * 64
    return e


async def test_reload_changes_routes_without_dropping_requests(tmp_path: Path, upstream: RecordingUpstream) -> None:
    other = RecordingUpstream()
    await other.start()
    port, admin = free_port(), free_port()
    cfg = tmp_path / "k.toml"

    def write(upstream_url: str, extra: str = "") -> None:
        cfg.write_text(
            f'[proxy]\nlisten = "127.0.0.1:{port}"\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
            f'[store]\nurl = "sqlite:///{tmp_path}/k.db"\n{extra}'
            f'[[routes]]\nprefix = "/"\nupstream = "{upstream_url}"\nauth = "none"\n'
        )

    write(upstream.url)
    subprocess.run([sys.executable, "-m", "gateway", "migrate", "--config", str(cfg)], env=_env(), check=True, capture_output=True)
    pid_file = tmp_path / "pid"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--pid-file", str(pid_file)],
        env=_env(), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_tcp(port)
        async with aiohttp.ClientSession() as s:
            slow = asyncio.create_task(s.get(f"http://127.0.0.1:{port}/slow?s=1"))
            await until(lambda: upstream.received, what="the slow request in flight")
            write(other.url)
            r = subprocess.run([sys.executable, "-m", "gateway", "reload", "--pid-file", str(pid_file)], env=_env(), capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            for _ in range(50):
                async with s.get(f"http://127.0.0.1:{port}/after") as resp:
                    await resp.read()
                if other.received:
                    break
                await asyncio.sleep(0.05)
            assert other.received and other.received[-1].raw_path == "/after"
            resp = await slow  # started before the reload: finishes on the old route
            assert resp.status == 200
            resp.release()
            assert upstream.received[0].raw_path == "/slow?s=1"

            # An invalid config is refused; the running one keeps serving.
            cfg.write_text(cfg.read_text() + '\n[proxy]\nbogus = 1\n')
            os.kill(int(pid_file.read_text()), signal.SIGHUP)
            await until(
                lambda: "reload refused; the previous" in (tmp_path / "serve.log").read_text(),
                what="the reload refused",
            )
            async with s.get(f"http://127.0.0.1:{port}/still") as resp:
                assert resp.status == 200
            assert other.received[-1].raw_path == "/still"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        await other.stop()
    logs = (tmp_path / "serve.log").read_text()
    assert "configuration reloaded" in logs
    assert "reload refused" in logs


async def test_readiness_follows_the_schema(keystile, tmp_path: Path) -> None:
    import sqlite3

    gw = await keystile()
    db = gw.cfg.store.url.removeprefix("sqlite:///")
    async with aiohttp.ClientSession() as s:
        with sqlite3.connect(db) as c:
            c.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)")
        async with s.get(gw.admin_url + "/readyz") as r:
            # Migrated ahead of this instance during a rolling upgrade: keep serving.
            assert r.status == 200 and "newer" in (await r.json())["checks"]["schema"]
        with sqlite3.connect(db) as c:
            c.execute("DELETE FROM schema_migrations")
        async with s.get(gw.admin_url + "/readyz") as r:
            assert r.status == 503 and "keystile migrate" in (await r.json())["checks"]["schema"]
