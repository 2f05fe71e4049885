"""Bodies stream both ways with bounded memory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from tests.upstream import RecordingUpstream

SIZE = 400 * 1024 * 1024  # several hundred MB each way
CHUNK = 256 * 1024


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def test_large_upload_and_download_stream_with_bounded_memory(
    keystile, upstream: RecordingUpstream
) -> None:
    gw = await keystile()
    key = await gw.key()
    before = rss_mb()
    peak = before

    async def body() -> AsyncIterator[bytes]:
        nonlocal peak
        block = b"u" * CHUNK
        for i in range(SIZE // CHUNK):
            if i % 256 == 0:
                peak = max(peak, rss_mb())
            yield block

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.post(gw.url + "/sink", data=body(), headers={"X-API-Key": key}) as r:
            assert r.status == 200
            assert (await r.json())["body_bytes"] == SIZE
        received = 0
        async with s.get(gw.url + f"/bytes?n={SIZE}", headers={"X-API-Key": key}) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == str(SIZE)
            async for chunk in r.content.iter_chunked(CHUNK):
                received += len(chunk)
                if received % (64 * CHUNK) == 0:
                    peak = max(peak, rss_mb())
        assert received == SIZE
    # Client, gateway and upstream share this process: all three together stay far below one body.
    assert peak - before < 100, f"RSS grew by {peak - before:.0f} MB while moving {SIZE >> 20} MB each way"
