"""A start that fails half-way (the admin port is taken) gives back everything it took: ``stop``
closes exactly what was opened, in reverse, and may be called again."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.app import create_app
from gateway.config import Secrets
from gateway.store import open_store
from tests.conftest import ADMIN_TOKEN, HASH_SECRET, make_config
from tests.integration.test_upstream_pool import eventually
from tests.servers import RedisServer
from tests.upstream import RecordingUpstream


async def test_a_start_that_fails_half_way_gives_back_what_it_took(
    tmp_path: Path, upstream: RecordingUpstream, private_redis: RedisServer
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cfg = make_config(
        {
            "store": {"url": f"sqlite:///{tmp_path}/ks.db"},
            "redis": {"url": private_redis.url},
            "admin": {"listen": f"127.0.0.1:{taken.getsockname()[1]}"},
            "routes": [{"prefix": "/", "upstream": upstream.url}],
        }
    )
    store = await open_store(cfg.store.url)
    await store.migrate()
    await store.close()
    gw = create_app(cfg, Secrets(HASH_SECRET, (ADMIN_TOKEN.encode(),)))  # opens its own store
    r = aioredis.Redis.from_url(private_redis.url)
    try:
        with pytest.raises(OSError):
            await gw.start()
        # Everything before the admin listener ran: the proxy listens, the subscriber is in.
        assert gw.proxy_port
        assert gw.subscriber is not None and gw.redis is not None
        sub, channel = gw.subscriber, gw.redis.channel
        await eventually(lambda: sub.connected)
        assert (await r.pubsub_numsub(channel))[0][1] == 1

        await asyncio.wait_for(gw.stop(), 10)
        assert gw.stop_stalls == []
        with pytest.raises(OSError):  # the proxy port is closed
            await asyncio.open_connection("127.0.0.1", gw.proxy_port)
        assert (await r.pubsub_numsub(channel))[0][1] == 0  # the subscriber left Redis
        await asyncio.wait_for(gw.stop(), 10)  # a second stop finds nothing left to close
        assert gw.stop_stalls == []
    finally:
        taken.close()
        await r.aclose()
