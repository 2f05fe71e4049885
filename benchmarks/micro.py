"""Micro-benchmarks: nanoseconds per operation of the pieces of Keystile's hot path.

    python -m benchmarks.micro [--quick] [--json] [--redis-url URL]

Synchronous pieces (format check, digest, dict hit, msgpack decode of an ``IdentityRecord``) are
timed with ``timeit`` (best of several repeats). Per-tier floors are timed one awaited call at a
time under uvloop: a SQLite store lookup (``Store.find_identity``) and a Redis ``GET`` + decode.
The verify function itself (``gateway.auth``) is timed per tier through ``verify_cases`` below,
once it exists; until then its rows say why they are empty.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import timeit
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from benchmarks import seed
from gateway.cache import LocalTier
from gateway.keys import KeyFormat, digest
from gateway.models import IdentityRecord

Sync = Callable[[], object]
Async = Callable[[], Awaitable[object]]


@dataclass
class Row:
    name: str
    ns_per_op: float | None
    note: str = ""


@dataclass
class MicroContext:
    """What a case may need: the benchmark secret, a seeded 1k-key store, keys and Redis."""

    secret: bytes
    keys: list[str]
    store_db: Path
    redis_url: str
    quick: bool
    notes: list[str] = field(default_factory=list)


def time_sync(fn: Sync, *, quick: bool) -> float:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()  # enough calls for >= 0.2 s
    if quick:
        number = max(1, number // 4)
    best = min(timer.repeat(repeat=3 if quick else 5, number=number))
    return best / number * 1e9


async def time_async(fn: Async, *, quick: bool) -> float:
    for _ in range(50):  # warm caches, connections, thread pools
        await fn()
    n = 500 if quick else 2000
    best = float("inf")
    for _ in range(3 if quick else 5):
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e9


def sync_cases(ctx: MicroContext) -> list[tuple[str, Sync, str]]:
    fmt = KeyFormat(seed.PREFIX)
    key = ctx.keys[0]
    bad = key[:-1] + ("A" if key[-1] != "A" else "B")  # right shape, wrong checksum
    d = digest(ctx.secret, key)
    record = IdentityRecord(
        key_id="key_bench00000000001",
        digest=d,
        start=key[:12],
        principal_id=seed.PRINCIPAL_ID,
        principal=seed.PRINCIPAL_NAME,
        project=seed.PROJECT,
        scopes=("read",),
        expires_at=None,
        env="live",
    )
    table = {digest(ctx.secret, k): record for k in ctx.keys}
    packed = msgspec.msgpack.encode(record)
    decoder = msgspec.msgpack.Decoder(IdentityRecord)
    secret = ctx.secret
    # The in-process tier at its default capacity (100k), full: a hit, and a put that evicts.
    tier = LocalTier(ttl=60.0, negative_ttl=2.0, max_entries=100_000)
    now = time.monotonic()
    for i in range(100_000):
        tier.put(i.to_bytes(32, "big"), record, now)
    fresh = [100_000]

    def put_evicting() -> None:
        fresh[0] += 1
        tier.put(fresh[0].to_bytes(32, "big"), record, now)

    hot = (99_999).to_bytes(32, "big")
    return [
        ("KeyFormat.well_formed (valid key)", lambda: fmt.well_formed(key), "length, split, charset, CRC"),
        ("KeyFormat.well_formed (bad checksum)", lambda: fmt.well_formed(bad), "rejected by the CRC"),
        ("KeyFormat.well_formed (wrong length)", lambda: fmt.well_formed("ks_live_x"), "rejected first"),
        ("keys.digest (HMAC-SHA256)", lambda: digest(secret, key), ""),
        ("dict hit (1k digests)", lambda: table.get(d), "the in-process tier's lookup"),
        ("msgpack decode IdentityRecord", lambda: decoder.decode(packed), f"{len(packed)} bytes"),
        ("LocalTier.get hit (100k entries)", lambda: tier.get(hot, now), "moves it to the LRU end"),
        ("LocalTier.put into a full tier", put_evicting, "evicts the LRU entry; incl. building the digest"),
    ]


async def tier_floor_cases(ctx: MicroContext) -> tuple[list[tuple[str, Async, str]], list[Any]]:
    """Store and Redis lookups as Keystile's tiers would do them, one awaited call at a time."""
    from gateway.store import open_store

    cases: list[tuple[str, Async, str]] = []
    closers: list[Any] = []
    d = digest(ctx.secret, ctx.keys[0])
    store = await open_store(f"sqlite:///{ctx.store_db}")
    closers.append(store.close)
    now = time.time()

    async def store_lookup() -> object:
        return await store.find_identity(d, now)

    if await store_lookup() is None:
        ctx.notes.append("store lookup found no record: seeded store and secret disagree")
    cases.append(("store tier floor: SQLite find_identity", store_lookup, "1k keys, thread hop + query"))
    try:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(ctx.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        rec = await store_lookup()
        rkey = f"keystile-bench:micro:{d.hex()}"
        await client.set(rkey, msgspec.msgpack.encode(rec), ex=120)
        decoder = msgspec.msgpack.Decoder(IdentityRecord)

        from gateway.cache.resp import LeanRedis

        lean = LeanRedis(ctx.redis_url, timeout=0.5, connect_timeout=0.5)

        async def redis_lookup() -> object:
            raw = await client.get(rkey)
            return decoder.decode(raw) if isinstance(raw, bytes) else None

        async def lean_lookup() -> object:
            (raw,) = await lean.mget([rkey])
            return decoder.decode(raw) if isinstance(raw, bytes) else None

        async def close_redis() -> None:
            await client.delete(rkey)
            await client.aclose()
            await lean.aclose()

        closers.append(close_redis)
        cases.append(("Redis floor, redis-py: GET + msgpack decode", redis_lookup, "one GET awaited alone"))
        cases.append(("Redis tier floor: lean MGET + msgpack decode", lean_lookup,
                      "what the lookup path uses (gateway.cache.resp)"))
    except Exception as e:  # Redis is optional here: report, do not fail
        ctx.notes.append(f"Redis tier floor skipped: {type(e).__name__}: {e}")
    return cases, closers


# ==============================================================================================
# VERIFY HOOK: the per-tier cost of Keystile's verify function, ``Authenticator.identify``.
#
# Each tier is a real ``gateway.app.Gateway`` (built by ``create_app`` from a Config, started on
# free loopback ports, so the cache, Redis tier and store loader are wired exactly as in
# production); its ``authenticator.identify(key)`` is what gets timed. If that entry point moves,
# adapt ``_gateway`` / the lambdas below: until then the row says why it is empty and every other
# row still runs.
# ==============================================================================================
async def _gateway(ctx: MicroContext, *, local_ttl: float | None, redis: bool) -> Any:
    from benchmarks.procs import free_port
    from gateway.app import create_app
    from gateway.config import Secrets, decode

    data: dict[str, Any] = {
        "proxy": {"listen": f"127.0.0.1:{free_port()}"},
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "store": {"url": f"sqlite:///{ctx.store_db}"},
        "redis": {"url": ctx.redis_url if redis else ""},
        "logging": {"level": "warning", "access_log": False},
    }
    if local_ttl is not None:
        data["cache"] = {"local_ttl": local_ttl}
    gw = create_app(decode(data, "micro"), Secrets(ctx.secret, ()))
    try:
        await gw.start()
    except BaseException:
        await gw.stop()
        raise
    return gw


async def verify_cases(ctx: MicroContext) -> tuple[list[tuple[str, Async, str]], list[Any], str]:
    try:
        from gateway.auth import OK
    except ImportError as e:
        return [], [], f"gateway.auth not importable yet ({e})"
    closers: list[Any] = []
    cases: list[tuple[str, Async, str]] = []
    key, unknown = ctx.keys[0], seed.make_keys(1, seed=seed.UNKNOWN_SEED)[0]
    redis_ok = await _redis_reachable(ctx.redis_url)
    tiers = [
        ("in-process hit", None, redis_ok, "format + digest + local tier"),
        ("Redis tier only (local_ttl = 0)", 0.0, True, "+ Redis round trip"),
        ("store only (local_ttl = 0, no Redis)", 0.0, False, "+ store load"),
    ]
    try:
        for label, ttl, redis, note in tiers:
            if redis and not redis_ok:
                ctx.notes.append(f"verify: {label}: Redis not reachable at {ctx.redis_url}")
                continue
            gw = await _gateway(ctx, local_ttl=ttl, redis=redis)
            closers.append(gw.stop)
            auth = gw.authenticator
            outcome, _ = await auth.identify(key)
            if outcome != OK:
                ctx.notes.append(f"verify ({label}) of a seeded key returned {outcome!r}")
            cases.append((f"verify: {label}", _verify(auth, key), note))
            if ttl is None:
                cases += [
                    ("verify: in-process hit, key repeated on its connection", _repeated(auth, key),
                     "no format check, no hashing"),
                    ("verify: missing key", _verify(auth, None), ""),
                    ("verify: malformed key", _verify(auth, "ks_live_x"), "format only"),
                    ("verify: unknown key, repeated", _verify(auth, unknown),
                     "negative entry after the first"),
                ]
    except Exception as e:  # the wiring is Keystile's and may move: report, do not fail
        for close in reversed(closers):
            await close()
        return [], [], f"verify wiring failed ({type(e).__name__}: {e}): adapt verify_cases()"
    return cases, closers, ""


def _repeated(auth: Any, key: str) -> Async:
    """The decision for a key its keep-alive connection presented before (``Authenticator.check``
    with the connection's memory), as every request after a client's first takes it."""
    from gateway.auth import KeyMemory

    conn = KeyMemory()
    auth.check(key, frozenset(), conn)

    async def call() -> object:
        return auth.check(key, frozenset(), conn)

    return call


def _verify(auth: Any, key: str | None) -> Async:
    async def call() -> object:
        return await auth.identify(key)

    return call


async def _redis_reachable(url: str) -> bool:
    try:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()
    except Exception:
        return False


async def _async_rows(ctx: MicroContext) -> list[Row]:
    rows: list[Row] = []
    closers: list[Any] = []
    try:
        floors, c1 = await tier_floor_cases(ctx)
        closers += c1
        verify, c2, why = await verify_cases(ctx)
        closers += c2
        for name, fn, note in [*floors, *verify]:
            rows.append(Row(name, round(await time_async(fn, quick=ctx.quick), 1), note))
        if not verify:
            rows.append(Row("verify (per tier)", None, why))
    finally:
        for close in reversed(closers):
            await close()
    return rows


def run(quick: bool, redis_url: str) -> dict[str, Any]:
    cache = seed.cache_dir()
    secret = seed.bench_secret(cache)
    seeded = seed.seeded_store(cache, 1000, secret)
    keys = seeded.keys_file.read_text().split()
    tmp = Path(tempfile.mkdtemp(prefix="keystile-micro-"))
    try:
        ctx = MicroContext(
            secret=seed.secret_bytes(secret),
            keys=keys,
            store_db=seed.working_copy(seeded, tmp),
            redis_url=redis_url,
            quick=quick,
        )
        rows = [Row(n, round(time_sync(fn, quick=quick), 1), note) for n, fn, note in sync_cases(ctx)]
        try:
            import uvloop

            rows += uvloop.run(_async_rows(ctx))
        except ImportError:
            rows += asyncio.run(_async_rows(ctx))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "results": [r.__dict__ for r in rows],
        "notes": ctx.notes,
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.micro", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    a = p.parse_args(argv)
    data = run(a.quick, a.redis_url)
    if a.json:
        print(json.dumps(data))
        return 0
    width = max(len(r["name"]) for r in data["results"])
    for r in data["results"]:
        ns = f"{r['ns_per_op']:>10,.1f} ns" if r["ns_per_op"] is not None else f"{'—':>13}"
        print(f"{r['name']:<{width}}  {ns}  {r['note']}")
    for note in data["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
