"""TLS on both listeners over real sockets: keys travel encrypted, old protocols and weak suites
are refused, plain HTTP never reaches the upstream, and SIGHUP's reload swaps the certificate for
new connections while a bad file refuses the reload and changes nothing."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import warnings
from pathlib import Path

import aiohttp
import msgspec
import pytest

from gateway.app import StartupError, create_app
from gateway.config import ConfigError, Secrets
from gateway.store import open_store
from tests.conftest import HASH_SECRET, make_config
from tests.upstream import RecordingUpstream


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (EC P-256) and its key."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def client_context(*trusted: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for cert in trusted:
        ctx.load_verify_locations(cafile=str(cert))
    return ctx


async def peer_cn(port: int, ctx: ssl.SSLContext) -> str:
    """The common name of the certificate a new connection to ``port`` is offered."""
    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5)
    try:
        cert = writer.get_extra_info("peercert")
        return dict(x[0] for x in cert["subject"])["commonName"]
    finally:
        writer.close()


async def refused(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5)
    except (ssl.SSLError, ConnectionError):
        return True
    writer.close()
    return False


def tls_section(cert: Path, key: Path) -> dict[str, str]:
    return {
        "proxy_cert_file": str(cert),
        "proxy_key_file": str(key),
        "admin_cert_file": str(cert),
        "admin_key_file": str(key),
    }


async def test_both_listeners_speak_tls_and_only_modern_tls(
    keystile, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    cert, key = make_cert(tmp_path, "one")
    gw = await keystile(tls=tls_section(cert, key))
    api_key = await gw.key()
    https = gw.url.replace("http://", "https://")
    trusted = client_context(cert)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusted)) as s:
        async with s.get(https + "/x", headers={"X-API-Key": api_key}) as r:
            assert r.status == 200
        async with s.get(https + "/x") as r:
            assert r.status == 401
        async with s.get(gw.admin_url.replace("http://", "https://") + "/healthz") as r:
            assert r.status == 200
    assert len(upstream.received) == 1
    assert upstream.received[0].header("X-Keystile-Owner") == ["alice"]

    # Plain HTTP on the TLS port: no answer, and nothing reaches the upstream.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(f"GET /x HTTP/1.1\r\nHost: a\r\nX-API-Key: {api_key}\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert b"HTTP/1.1" not in data and len(upstream.received) == 1

    old = client_context(cert)
    with warnings.catch_warnings():  # Python deprecates TLS 1.1: exactly what this client offers
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    assert await refused(gw.port, old)
    weak = client_context(cert)
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")  # CBC suites: no AEAD
    assert await refused(gw.port, weak)
    tls12 = client_context(cert)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert not await refused(gw.port, tls12)


async def test_reload_swaps_the_certificate_and_a_bad_file_changes_nothing(keystile, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "first")
    gw = await keystile(tls=tls_section(cert, key))
    ctx = client_context(cert)
    assert await peer_cn(gw.port, ctx) == "first"
    # A connection opened before the reload keeps working on what it negotiated.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx)

    cert2, key2 = make_cert(tmp_path, "second")
    bad = tmp_path / "bad.crt"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"tls\.proxy_cert_file: cannot load"):
        await gw.gateway.reload(make_config({**_sections(gw.cfg), "tls": tls_section(bad, key2)}))
    assert await peer_cn(gw.port, ctx) == "first"

    notes = await gw.gateway.reload(make_config({**_sections(gw.cfg), "tls": tls_section(cert2, key2)}))
    assert notes == []  # new files for a listener already on TLS need no restart
    both = client_context(cert, cert2)
    assert await peer_cn(gw.port, both) == "second"
    assert await peer_cn(gw.gateway.admin_port, both) == "second"
    writer.write(b"GET /_keystile/whoami HTTP/1.1\r\nHost: a\r\n\r\n")
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 401")
    writer.close()

    # Turning TLS off is a restart: the listener keeps its certificate and says so.
    notes = await gw.gateway.reload(make_config({**_sections(gw.cfg), "tls": {}}))
    assert any(n.startswith("tls.proxy_cert_file: changed; takes effect after a restart") for n in notes)
    assert await peer_cn(gw.port, both) == "second"


def _sections(cfg: object) -> dict[str, object]:
    data: dict[str, object] = msgspec.to_builtins(cfg)
    data.pop("tls", None)
    data["routes"] = list(data["routes"])  # type: ignore[call-overload]
    return data


async def test_a_certificate_that_cannot_be_loaded_stops_startup(tmp_path: Path) -> None:
    cfg = make_config(
        {
            "store": {"url": f"sqlite:///{tmp_path}/tls.db"},
            "tls": {"proxy_cert_file": str(tmp_path / "missing.crt"), "proxy_key_file": str(tmp_path / "k")},
        }
    )
    store = await open_store(cfg.store.url)
    await store.migrate()
    gw = create_app(cfg, Secrets(HASH_SECRET, ()), store=store)
    try:
        with pytest.raises(StartupError, match=r"^tls\.proxy_cert_file: cannot load .*missing\.crt"):
            await gw.start()
    finally:
        await gw.stop()
        await store.close()


def test_a_certificate_without_its_key_is_a_config_problem() -> None:
    with pytest.raises(ConfigError) as e:
        make_config({"tls": {"admin_cert_file": "/etc/keystile/admin.crt"}})
    assert e.value.problems == ["(test): tls.admin_key_file: needed with tls.admin_cert_file"]
