"""Benchmark keys and the SQLite stores that hold them, cached between runs.

Keys are real Keystile keys (``{prefix}_live_{30 random}{6 checksum}``, checked with
``gateway.keys.KeyFormat``) drawn from a seeded RNG, so the first N keys are the same in every run
and every key count: ``keys-1000`` is a prefix of ``keys-1000000``. Digests use
``gateway.keys.digest`` with the benchmark's own hash secret (kept in the cache directory), so a
cached store stays valid until the secret, the schema (migration files) or this module changes.
Nothing here is a secret worth protecting: these keys exist only on loopback during a benchmark.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import secrets
import shutil
import sqlite3
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gateway.keys import BASE62, RANDOM_CHARS, KeyFormat, digest, display_start, with_checksum
from gateway.models import Principal

PREFIX = "ks"
PRINCIPAL_ID = "prn_bench0000000000"
PRINCIPAL_NAME = "bench"
PROJECT = "bench"
KEY_SEED = 20_240_601
UNKNOWN_SEED = 7_777_777
SEED_VERSION = "2"  # bump when the rows written below change


@dataclass(frozen=True, slots=True)
class SeededStore:
    count: int
    db: Path  # cached master copy; serve from a copy (see ``working_copy``)
    keys_file: Path  # the same keys, one per line, in generation order


def cache_dir(override: str | None = None) -> Path:
    base = override or os.environ.get("KEYSTILE_BENCH_CACHE")
    if base:
        path = Path(base)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(xdg) / "keystile-bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def bench_secret(cache: Path) -> str:
    """The value of KEYSTILE_KEY_HASH_SECRET for every benchmark server: 64 hex characters."""
    path = cache / "hash-secret.txt"
    if path.exists():
        value = path.read_text().strip()
        if len(value) == 64:
            return value
    value = secrets.token_hex(32)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    tmp.replace(path)
    return value


def secret_bytes(secret: str) -> bytes:
    """Exactly what Keystile hashes with: the environment string, UTF-8 encoded."""
    return secret.encode("utf-8")


_BYTE_TO_B62 = bytes(ord(BASE62[b % 62]) for b in range(256))


def make_keys(count: int, seed: int = KEY_SEED, env: str = "live") -> list[str]:
    """``count`` well-formed keys, deterministic for a seed.

    Same construction as ``gateway.keys.generate_key`` (30 base62 characters, then the base62 CRC32
    of everything before them) but from a seeded RNG mapped onto base62 with a byte table (slightly
    biased, which a benchmark does not mind): 1M keys take seconds, not the half minute
    ``secrets.choice`` needs. A sample of every run is checked with ``KeyFormat.well_formed``.
    """
    rng = random.Random(seed)
    head0 = f"{PREFIX}_{env}_"
    raw = rng.randbytes(count * RANDOM_CHARS).translate(_BYTE_TO_B62).decode("ascii")
    out = [with_checksum(head0 + raw[i * RANDOM_CHARS : (i + 1) * RANDOM_CHARS]) for i in range(count)]
    fmt = KeyFormat(PREFIX)
    step = max(1, count // 10_000)
    bad = [k for k in out[::step] if not fmt.well_formed(k)]
    if bad:
        raise RuntimeError(f"generated malformed keys, e.g. {bad[0]!r}: did the key format change?")
    return out


def _fingerprint(secret: str) -> str:
    h = hashlib.sha256(SEED_VERSION.encode())
    h.update(secret.encode())
    root = resources.files("gateway.store") / "migrations" / "sqlite"
    for item in sorted(root.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".sql"):
            h.update(item.name.encode())
            h.update(item.read_bytes())
    return h.hexdigest()[:12]


def write_keys_file(path: Path, keys: list[str]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n".join(keys) + "\n")
    tmp.replace(path)


async def _create_schema(path: Path) -> None:
    from gateway.store import open_store

    store = await open_store(f"sqlite:///{path}")
    try:
        await store.migrate()
        await store.create_principal(
            Principal(
                id=PRINCIPAL_ID,
                name=PRINCIPAL_NAME,
                kind="service",
                disabled=False,
                created_at=time.time(),
                grants={PROJECT: ("read",)},
            ),
            actor="benchmark",
        )
    finally:
        await store.close()


def _bulk_insert(path: Path, keys: list[str], secret: bytes) -> None:
    """Insert in digest order with ids numbered in that order: every index is appended to."""
    now = time.time()
    rows = sorted(((digest(secret, k), k) for k in keys), key=lambda r: r[0])
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-1000000")
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO keys (id, digest, name, start, env, principal_id, project, scopes, "
            "metadata, created_at) VALUES (?, ?, ?, ?, 'live', ?, ?, NULL, '{}', ?)",
            (
                (f"key_bench{i:011d}", d, f"bench-{i:07d}", display_start(k), PRINCIPAL_ID, PROJECT, now)
                for i, (d, k) in enumerate(rows)
            ),
        )
        db.execute("COMMIT")
        # No ANALYZE: a fresh deployment has no sqlite_stat1, and the statistics change plans
        # (with every previous_digest NULL, ANALYZE makes the OR lookup a full table scan).
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()


def seeded_store(cache: Path, count: int, secret: str, *, log: bool = True) -> SeededStore:
    """The cached store holding the first ``count`` benchmark keys; built on first use."""
    fp = _fingerprint(secret)
    db = cache / f"store-{count}-{fp}.db"
    keys_file = cache / f"keys-{count}.txt"
    if db.exists() and keys_file.exists():
        return SeededStore(count, db, keys_file)
    t0 = time.perf_counter()
    if log:
        print(f"seeding a SQLite store with {count:,} keys (cached in {cache}) ...", file=sys.stderr)
    keys = make_keys(count)
    tmp = cache / f".building-{count}-{os.getpid()}.db"
    for p in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        p.unlink(missing_ok=True)
    asyncio.run(_create_schema(tmp))
    _bulk_insert(tmp, keys, secret_bytes(secret))
    tmp.replace(db)
    write_keys_file(keys_file, keys)
    if log:
        print(f"  seeded {count:,} keys in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return SeededStore(count, db, keys_file)


def unknown_keys_file(cache: Path, count: int) -> Path:
    """Well-formed keys (valid checksum) that no store holds: each one a store miss."""
    path = cache / f"unknown-{count}.txt"
    if not path.exists():
        write_keys_file(path, make_keys(count, seed=UNKNOWN_SEED))
    return path


def working_copy(seeded: SeededStore, dest_dir: Path) -> Path:
    """A private copy for one run: the servers write usage counters into it."""
    dest = dest_dir / f"store-{seeded.count}.db"
    if not dest.exists():
        shutil.copyfile(seeded.db, dest)
    return dest
