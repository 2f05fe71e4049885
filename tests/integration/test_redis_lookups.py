"""The lean Redis client of the lookup path (``gateway.cache.resp``) against real Redis servers:
replies reach the call that asked, failures end at the deadline, the URL's settings are honoured."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from gateway.cache.resp import LeanRedis, RespError, set_nx
from tests.integration.test_verification_path import redis_url
from tests.servers import RedisServer, require_server

__all__ = ["redis_url"]  # the fixture: the machine's Redis, database 9, emptied


async def test_concurrent_calls_each_get_their_own_replies(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    r.mset({f"k{i}": f"v{i}" for i in range(300)})
    r.close()
    client = LeanRedis(redis_url, timeout=2, connect_timeout=2)
    rng = random.Random(7)

    async def lookup() -> None:
        names = [f"k{rng.randrange(400)}" for _ in range(rng.randrange(1, 8))]  # k300+ do not exist
        got = await client.mget(names)
        want = [f"v{n[1:]}".encode() if int(n[1:]) < 300 else None for n in names]
        assert got == want

    async def fill(i: int) -> None:
        await client.send([set_nx(f"new{i}", b"x", 10_000), set_nx(f"k{i % 300}", b"overwritten?", 10_000)])

    try:
        await asyncio.gather(*(lookup() if i % 5 else fill(i) for i in range(400)))
        assert client.connects == 1  # all of it pipelined on one connection
        assert await client.mget(["k1", "new5"]) == [b"v1", b"x"]  # NX left k1 alone
    finally:
        await client.aclose()


async def test_error_replies_fail_only_their_call(redis_url: str) -> None:
    client = LeanRedis(redis_url, timeout=2, connect_timeout=2)
    try:
        results = await asyncio.gather(
            client.mget(["a"]),
            client.send([set_nx("b", b"1", 0)]),  # PX 0: Redis answers -ERR invalid expire time
            client.mget(["a", "b"]),
            return_exceptions=True,
        )
        assert results[0] == [None] and results[2] == [None, None]
        assert isinstance(results[1], RespError) and "expire" in str(results[1])
        assert client.connects == 1
    finally:
        await client.aclose()


async def test_commands_sent_ahead_of_an_mget_share_its_write_and_fail_nothing(redis_url: str) -> None:
    client = LeanRedis(redis_url, timeout=2, connect_timeout=2)
    try:
        ahead = [set_nx("a", b"1", 60_000), set_nx("b", b"2", 0)]  # PX 0: -ERR invalid expire time
        assert await client.mget(["a", "b"], ahead) == [b"1", None]  # written before it was read
        assert client.calls == 1
    finally:
        await client.aclose()


async def test_a_frozen_redis_fails_calls_at_the_deadline_then_a_new_connection_serves(
    private_redis: RedisServer,
) -> None:
    redis.Redis(port=private_redis.port).mset({"a": "1", "b": "2"})
    client = LeanRedis(private_redis.url, timeout=0.2, connect_timeout=0.2)
    try:
        assert await client.mget(["a"]) == [b"1"]
        private_redis.freeze()
        started = time.monotonic()
        results = await asyncio.gather(*(client.mget(["a"]) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(e, RespError) and "timed out" in str(e) for e in results), results
        assert time.monotonic() - started < 0.6
        private_redis.thaw()
        # The answers the frozen server owed the old connection must not reach these calls.
        assert await client.mget(["b", "a"]) == [b"2", b"1"]
        assert client.connects == 2
    finally:
        private_redis.thaw()
        await client.aclose()


async def test_a_killed_redis_fails_fast_and_is_reconnected_once_back(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    client = LeanRedis(server.url, timeout=0.5, connect_timeout=0.5)
    try:
        await client.send([set_nx("a", b"1", 60_000)])
        server.kill()
        with pytest.raises(RespError):
            await client.mget(["a"])
        with pytest.raises(RespError, match="connect"):
            await client.mget(["a"])
        server.start()  # same port, nothing kept
        assert await client.mget(["a"]) == [None]
    finally:
        server.stop()
        await client.aclose()


async def test_password_database_and_unix_socket_come_from_the_url(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    server = RedisServer(tmp_path, ("--requirepass", "s3cret", "--unixsocket", str(sock)))
    server.start()
    try:
        for url in (f"redis://:s3cret@127.0.0.1:{server.port}/3", f"unix://:s3cret@{sock}?db=3"):
            client = LeanRedis(url, timeout=1, connect_timeout=1)
            try:
                await client.send([set_nx(url, b"here", 60_000)])
                assert await client.mget([url]) == [b"here"]
            finally:
                await client.aclose()
        admin = redis.Redis(port=server.port, password="s3cret", db=3)
        assert admin.dbsize() == 2 and redis.Redis(port=server.port, password="s3cret").dbsize() == 0
        admin.close()
        wrong = LeanRedis(f"redis://:nope@127.0.0.1:{server.port}/0", timeout=1, connect_timeout=1)
        with pytest.raises(RespError, match="refused the connection setup"):
            await wrong.mget(["a"])
        await wrong.aclose()
    finally:
        server.stop()


async def test_tls_settings_from_the_url_match_redis_py(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        require_server("openssl", "needed to make the test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = RedisServer(tmp_path)
    server.extra_args = ("--port", "0", "--tls-port", str(server.port), "--tls-cert-file", str(cert),
                         "--tls-key-file", str(key), "--tls-auth-clients", "no")  # fmt: skip
    server.start()
    base = f"rediss://localhost:{server.port}/0"
    try:
        for url, works in (
            (f"{base}?ssl_ca_certs={cert}", True),
            (base, False),  # the self-signed certificate is not trusted by default
            (f"{base}?ssl_cert_reqs=none", True),
        ):
            client = LeanRedis(url, timeout=1, connect_timeout=1)
            reference = redis.Redis.from_url(url, socket_timeout=1)
            try:
                if works:
                    await client.send([set_nx("tls", b"yes", 60_000)])
                    assert await client.mget(["tls"]) == [b"yes"]
                    assert reference.get("tls") == b"yes"
                else:
                    with pytest.raises(RespError, match="certificate verify failed"):
                        await client.mget(["tls"])
                    with pytest.raises(redis.ConnectionError):
                        reference.ping()
            finally:
                reference.close()
                await client.aclose()
    finally:
        server.stop()
