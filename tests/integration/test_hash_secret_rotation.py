"""The hash secret: a wrong one is refused, and a rotation keeps every key working.

Real gateways on real sockets over one real store of each backend (SQLite file, PostgreSQL),
several instances at once with the secrets of each step of a rolling rotation.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from gateway import hash_secrets
from gateway.app import Gateway, create_app
from gateway.config import Secrets
from gateway.keys import generate_key, secret_fingerprint
from gateway.store import Store, open_store
from tests.conftest import make_config
from tests.store.conftest import _open_empty, pg_server, pg_url, store_url  # noqa: F401 - fixtures
from tests.upstream import RecordingUpstream

OLD, NEW, WRONG = (secrets.token_bytes(32) for _ in range(3))


@pytest.fixture
async def empty_store_url(store_url: str) -> str:  # noqa: F811 - the imported fixture
    """``store_url`` emptied (the PostgreSQL database is shared by the session)."""
    store = await _open_empty(store_url)
    await store.close()
    return store_url


Start = Callable[..., Any]


@pytest.fixture
async def instance(empty_store_url: str, upstream: RecordingUpstream) -> AsyncIterator[Start]:
    """``await instance(current, *previous)`` starts a gateway over the shared store."""
    running: list[tuple[Gateway, Store]] = []

    async def start(current: bytes, *previous: bytes) -> Gateway:
        cfg = make_config(
            {
                "store": {"url": empty_store_url},
                "routes": [{"prefix": "/", "upstream": upstream.url}],
            }
        )
        store = await open_store(cfg.store.url, pool_min=1, pool_max=2)
        gw = create_app(cfg, Secrets(current, (), tuple(previous)), store=store)
        try:
            await gw.start()
        except BaseException:
            await gw.stop()
            await store.close()
            raise
        running.append((gw, store))
        return gw

    yield start
    for gw, store in running:
        await gw.stop()
        await store.close()


async def _status(
    session: aiohttp.ClientSession, gw: Gateway, key: str, upstream: RecordingUpstream | None = None
) -> tuple[int, str]:
    """The answer's status and the key id the upstream was told (when it was reached)."""
    seen = len(upstream.received) if upstream is not None else 0
    async with session.get(f"http://127.0.0.1:{gw.proxy_port}/x", headers={"X-API-Key": key}) as r:
        await r.read()
    if upstream is None or len(upstream.received) == seen:
        return r.status, ""
    return r.status, upstream.received[-1].header("X-Keystile-Key-Id")[0]


async def _ready(session: aiohttp.ClientSession, gw: Gateway) -> tuple[int, dict[str, Any]]:
    async with session.get(f"http://127.0.0.1:{gw.admin_port}/readyz") as r:
        return r.status, await r.json()


async def _wait_for(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_an_instance_with_another_secret_refuses_to_start(instance: Start) -> None:
    await instance(OLD)
    with pytest.raises(hash_secrets.SecretMismatch, match="KEYSTILE_KEY_HASH_SECRET"):
        await instance(WRONG)
    # A previous secret that is not the store's does not make a wrong one acceptable.
    with pytest.raises(hash_secrets.SecretMismatch):
        await instance(WRONG, NEW)


async def test_a_rolling_rotation_keeps_every_key_working_on_every_instance(
    instance: Start, upstream: RecordingUpstream
) -> None:
    old_only = await instance(OLD)
    for owner in "ab":
        await old_only.lifecycle.create_principal(owner, grants={"p": ["read"]}, actor="t")
    k1 = await old_only.lifecycle.create_key("a", "p", actor="t")
    k2 = await old_only.lifecycle.create_key("b", "p", actor="t")
    store = old_only.store
    assert store is not None

    async with aiohttp.ClientSession() as s:
        assert (await _status(s, old_only, k1.secret))[0] == 200
        # Step 1 of a rolling rotation: an instance still on the old secret that knows the new one.
        knows_new = await instance(OLD, NEW)
        # Step 2: the first instance on the new secret records it as the newest.
        rotated = await instance(NEW, OLD)
        assert (await store.hash_secrets())[-1] == secret_fingerprint(NEW)

        # The instance that knows only the old secret would fail every re-keyed key: unready,
        # and it could not start again.
        status, body = await _ready(s, old_only)
        assert status == 503 and "restart" in body["checks"]["key_hashing"]
        assert (await _ready(s, knows_new))[0] == 200 and (await _ready(s, rotated))[0] == 200
        with pytest.raises(hash_secrets.SecretMismatch):
            await instance(OLD)

        # A key made with the old secret works on the new instance and is re-keyed to the new one.
        status, key_id = await _status(s, rotated, k1.secret, upstream)
        assert (status, key_id) == (200, k1.record.id)
        assert upstream.received[-1].header("X-Keystile-Owner") == ["a"]

        async def k1_rekeyed() -> bool:
            found = await hash_secrets.status(store, Secrets(NEW, (), (OLD,)), time.time())
            return found.current_keys == 1 and found.previous_keys == 1

        await _wait_for(k1_rekeyed)
        # Both keys still work everywhere that knows the newest secret: k1 now under the new
        # secret (the old-secret instance finds it through its previous one), k2 still under the old.
        for created, owner in ((k1, "a"), (k2, "b")):  # neither is in its cache yet
            assert await _status(s, knows_new, created.secret, upstream) == (200, created.record.id)
            assert upstream.received[-1].header("X-Keystile-Owner") == [owner]

        # The instance still on the old secret re-keyed nothing back to it (it tried: k1 was
        # found through its previous secret; the store refused, the old one is not the newest).
        async def tried() -> bool:
            return not knows_new.rekeyer.busy

        await _wait_for(tried)
        assert await k1_rekeyed()

        assert await _status(s, rotated, k2.secret, upstream) == (200, k2.record.id)

        async def all_rekeyed() -> bool:
            found = await hash_secrets.status(store, Secrets(NEW, (), (OLD,)), time.time())
            return found.current_keys == 2 and found.previous_keys == 0

        await _wait_for(all_rekeyed)
        # Rotation done: an instance with the new secret alone serves every key.
        done = await instance(NEW)
        for created in (k1, k2):
            assert (await _status(s, done, created.secret))[0] == 200

        # A random key costs one store query on an instance with a previous secret (its digest
        # under that secret rides in the same query), and is then held as unknown like any other.
        late = await instance(NEW, OLD)
        for _ in range(5):
            loads = late.loader.store_loads
            stranger = generate_key("ks", "live")
            assert (await _status(s, late, stranger))[0] == 401
            assert late.loader.store_loads == loads + 1
            assert (await _status(s, late, stranger))[0] == 401
            assert late.loader.store_loads == loads + 1
