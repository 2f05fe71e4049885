"""How far a flood of random well-formed keys from one address reaches, and what it does to a valid key.

Starts Keystile in-process on a fresh SQLite store in front of the built-in echo upstream, then,
from 127.0.0.1 over ``--connections`` keep-alive connections, sends ``--keys`` distinct random keys
with valid checksums (anyone can mint them: the checksum is public). Before and after the flood a
valid key is sent once and the in-process tier's hit counter says whether it was answered there.
Prints store queries (lookup batches that reached the store), the digests they carried, and the
answers by status.

    .venv/bin/python -m benchmarks.key_flood --keys 10000 --local-max-entries 50

Runs on any Keystile version with the same config sections (it sets only ``cache.*``); settings
of newer versions keep their defaults unless given with ``--set section.field=value``.
The valid key is sent from 127.0.0.2, another address than the flood's.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import aiohttp

from gateway import config as config_mod
from gateway.app import create_app
from gateway.config import Secrets
from gateway.echo import start_echo
from gateway.keys import BASE62, KeyDigest, with_checksum
from gateway.models import IdentityRecord
from gateway.store import open_store


def random_key(prefix: str = "ks") -> str:
    return with_checksum(f"{prefix}_live_" + "".join(secrets.choice(BASE62) for _ in range(30)))


def _value(raw: str) -> Any:
    try:
        return config_mod._env_value(raw)
    except Exception:
        return raw


async def run(keys: int, connections: int, local_max: int, settings: list[str]) -> dict[str, Any]:
    echo, echo_port = await start_echo()
    tmp = tempfile.TemporaryDirectory()
    data: dict[str, Any] = {
        "proxy": {"listen": "127.0.0.1:0"},
        "admin": {"listen": "127.0.0.1:0"},
        "store": {"url": f"sqlite:///{tmp.name}/flood.db"},
        "cache": {"local_max_entries": local_max},
        "logging": {"access_log": False},
        "routes": [{"prefix": "/", "upstream": f"http://127.0.0.1:{echo_port}"}],
    }
    for item in settings:
        name, _, raw = item.partition("=")
        section, _, field = name.partition(".")
        data.setdefault(section, {})[field] = _value(raw)
    cfg = config_mod.decode(data, "(key_flood)")
    store = await open_store(cfg.store.url)
    await store.migrate()
    gw = create_app(cfg, Secrets(secrets.token_bytes(32), ()), store=store)
    await gw.start()
    digests_to_store = 0
    loader_store = gw.loader._store_load

    async def counted(batch: Sequence[KeyDigest]) -> dict[KeyDigest, IdentityRecord]:
        nonlocal digests_to_store
        digests_to_store += len(batch)
        return await loader_store(batch)

    gw.loader._store_load = counted
    try:
        await gw.lifecycle.create_principal("flood", grants={"p": ["read"]}, actor="bench")
        valid = (await gw.lifecycle.create_key("flood", "p", actor="bench")).secret
        url = f"http://127.0.0.1:{gw.proxy_port}/x"
        conn = aiohttp.TCPConnector(limit=connections)
        # The valid key's owner calls from another address (127.0.0.2): the flooding address may
        # be blocked, which says nothing about where its key is cached.
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with (
            aiohttp.ClientSession(connector=conn) as session,
            aiohttp.ClientSession(connector=other) as owner,
        ):

            async def valid_tier() -> str:
                before = gw.cache.local.hits
                async with owner.get(url, headers={"X-API-Key": valid}) as r:
                    await r.read()
                    assert r.status == 200, r.status
                return "in-process hit" if gw.cache.local.hits > before else "past the in-process tier"

            await valid_tier()  # first use fills the tier
            tier_before = await valid_tier()
            loads0, digests0 = gw.loader.store_loads, digests_to_store
            statuses: Counter[int] = Counter()
            queue = [random_key() for _ in range(keys)]

            async def client() -> None:
                while queue:
                    key = queue.pop()
                    async with session.get(url, headers={"X-API-Key": key}) as r:
                        await r.read()
                        statuses[r.status] += 1

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(connections)))
            elapsed = time.perf_counter() - started
            tier_after = await valid_tier()
            async with session.get(url, headers={"X-API-Key": valid}) as r:
                from_flooder = r.status
        return {
            "random keys": keys,
            "connections": connections,
            "cache.local_max_entries": local_max,
            "store queries": gw.loader.store_loads - loads0,
            "digests sent to the store": digests_to_store - digests0,
            "answers": dict(sorted(statuses.items())),
            "seconds": round(elapsed, 2),
            "valid key before the flood": tier_before,
            "valid key after the flood": tier_after,
            "valid key from the flooding address": from_flooder,
        }
    finally:
        await gw.stop()
        await store.close()
        await echo.cleanup()
        tmp.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--connections", type=int, default=20)
    p.add_argument("--local-max-entries", type=int, default=50)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = p.parse_args(argv)
    result = asyncio.run(run(args.keys, args.connections, args.local_max_entries, args.set))
    for k, v in result.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
