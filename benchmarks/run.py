"""Build every benchmark scenario on this machine, run it, and report.

    python -m benchmarks.run [--quick] [--only NAME,...] [--duration S] [--runs N]
                             [--keys 1000,100000,1000000] [--baseline GIT-REF-OR-DIR]

Peers (nginx ``return 200`` alone, nginx and HAProxy doing the key check, a plain aiohttp proxy,
aiohttp's hello world) and Keystile's scenarios run in the same session on the same pinned cores:
the server under test alone on core 0; wrk, the upstream nginx and a private Redis on core 1. Each
scenario gets a warm-up, then rounds alternate over all scenarios (3 rounds, 1 with --quick) and
the medians are reported with their ratio to the nginx key-auth proxy of the same run. Results: a
markdown table on stdout, and ``benchmarks/results/<timestamp>.{md,json,png}`` plus ``latest.*`` copies.

``--baseline REF`` adds, for every Keystile scenario chosen, a twin ``NAME@base`` served by the code
of another git ref (checked out into a temporary worktree) or directory, measured right after its
twin in every round: a before/after comparison of a change in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import configs, report, seed
from benchmarks.load import KEY_HEADER, LoadError, LoadResult, run_wrk
from benchmarks.procs import Processes, Server, ServerFailed, cores, free_port
from benchmarks.tools import ensure_tools, machine, which

HERE = Path(__file__).parent
RESULTS = HERE / "results"
SERVER_CORE = 0
LOAD_CORE = 1
BASE_KEYS = 1000  # the store behind the fixed-key scenarios, and the keys every peer holds
UNKNOWN_POOL = 200_000
# keys_N warm-up: this many seconds in all, in slices of KEYS_WARM_SLICE s.
KEYS_WARM_SLICE = 2.0
KEYS_WARM = 30.0
KEYS_WARM_QUICK = 8.0
MALFORMED_KEY = "ks_live_this-is-not-a-keystile-key"
REFERENCE = "nginx"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    group: str  # "peer" or "keystile"
    server: str  # id of the server under test (see Bench.server_for)
    what: str
    mode: str  # wrk/keys.lua KS_MODE: fixed, zipf, cycle, missing, malformed
    keys: int | str = BASE_KEYS  # key count whose keys file to send, or "unknown"
    path: str = "/"
    expect: int = 200
    proxied: bool = True  # the request reaches the upstream (identity can be checked)
    many_keys: bool = False  # a key per request over many keys: warm up KEYS_WARM s (caches start cold)


def _count_name(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def scenarios(key_counts: list[int]) -> list[Scenario]:
    base = f"ks:local:{BASE_KEYS}:1"
    out = [
        Scenario("upstream", "peer", "upstream_alone", "nginx `return 200` alone: the floor", "fixed",
                 proxied=False),
        Scenario("nginx", "peer", "nginx", "nginx key-auth proxy (`map`, keep-alive upstream)", "zipf"),
        Scenario("haproxy", "peer", "haproxy", "HAProxy key-auth proxy (map file)", "zipf"),
        Scenario("plain_aiohttp", "peer", "plain_aiohttp",
                 "plain aiohttp proxy (dict, ClientSession, `await resp.read()`)", "zipf"),
        Scenario("hello", "peer", "hello", "aiohttp `web.Server` hello world, no upstream", "fixed",
                 proxied=False),
        Scenario("valid", "keystile", base, "valid key, in-process cache hit", "fixed"),
        Scenario("valid_local", "keystile", f"ks:inproc:{BASE_KEYS}:1",
                 "valid key, in-process hit, no Redis at all, on `/limited`'s twin route without a limit",
                 "fixed", path="/nolimit/"),
        Scenario("limited", "keystile", f"ks:inproc:{BASE_KEYS}:1",
                 "`valid_local` on a route with a never-hit limit, decided in-process", "fixed",
                 path="/limited/"),
        Scenario("valid_rl", "keystile", f"ks:rlimit:{BASE_KEYS}:1",
                 "valid key, in-process hit, Redis configured, on `/limited`'s twin route without a limit",
                 "fixed", path="/nolimit/"),
        Scenario("limited_redis", "keystile", f"ks:rlimit:{BASE_KEYS}:1",
                 "`valid_rl` on a route with a never-hit limit, decided in Redis", "fixed",
                 path="/limited/"),
        # Zipf over many keys, not one: concurrent requests for one key share a lookup, so a
        # single key would measure one Redis (or store) read per event-loop turn, not per request.
        Scenario("redis_only", "keystile", f"ks:redis:{BASE_KEYS}:1",
                 "valid keys, Redis tier only (local_ttl = 0)", "zipf"),
        Scenario("store_only", "keystile", f"ks:store:{BASE_KEYS}:1",
                 "valid keys, store only (local_ttl = 0, no Redis)", "zipf"),
        Scenario("missing", "keystile", base, "no key", "missing", expect=401, proxied=False),
        Scenario("malformed", "keystile", base, "malformed key (fails the format check)",
                 "malformed", expect=401, proxied=False),
        Scenario("unknown", "keystile", base,
                 f"well-formed unknown keys, a new one per request ({UNKNOWN_POOL // 1000}k cycled)",
                 "cycle", keys="unknown", expect=401, proxied=False),
        Scenario("auth_none", "keystile", base, 'route with auth = "none", no key', "missing",
                 path="/open/"),
    ]
    for n in key_counts:
        # A server of its own even for 1k keys: on the shared one, `unknown`'s 200k negative
        # entries pushed keys_1k's identities out of the in-process tier every round.
        server = f"ks:local:{n}:1:keys"
        out.append(Scenario(f"keys_{_count_name(n)}", "keystile", server,
                            f"{n:,} keys in the store, Zipf(1.1) key choice", "zipf", keys=n,
                            many_keys=True))
    big = max(key_counts, default=BASE_KEYS)
    if big > BASE_KEYS:
        # The largest store with keys_1k's traffic (its 1k keys are the store's first 1k): what
        # the store's size costs, apart from what traffic over many distinct keys costs. A server
        # of its own (":hot"), so keys_N's many cached identities are not in its memory.
        out.append(Scenario(f"store_{_count_name(big)}_hot_{_count_name(BASE_KEYS)}", "keystile",
                            f"ks:local:{big}:1:hot",
                            f"{big:,} keys in the store, Zipf(1.1) over the first {BASE_KEYS:,}",
                            "zipf", keys=BASE_KEYS, many_keys=True))
    out.append(Scenario("workers_2", "keystile", f"ks:local:{BASE_KEYS}:2",
                        "valid key, in-process hit, `--workers 2` (both on core 0)", "fixed"))
    return out


@dataclass
class Outcome:
    scenario: Scenario
    status: str = "pending"  # ok, not available, failed
    reason: str = ""
    checks: list[str] = field(default_factory=list)
    identity_seen: str = ""
    runs: list[dict[str, float]] = field(default_factory=list)
    warmup_s: float = 0.0

    def median(self) -> dict[str, float]:
        if not self.runs:
            return {}
        keys = ("rps", "p50_ms", "p99_ms", "cpu_us", "requests")
        out = {k: statistics.median(r[k] for r in self.runs) for k in keys}
        for k in TIER_COUNTS:
            if all(k in r for r in self.runs):
                out[k] = statistics.median(r[k] for r in self.runs)
        return out


# Measuring order within a round: the scenarios a target compares run back to back (the machine's
# state drifts over a minute), and every other round runs in reverse, so neither side of a pair
# is always first. The table keeps the scenario order above.
RUN_ORDER = (
    "nginx", "valid", "valid_local", "limited", "valid_rl", "limited_redis",
    "auth_none", "workers_2", "redis_only", "store_only", "hello", "malformed",
    "missing", "unknown", "store_1m_hot_1k", "keys_1k", "keys_1m", "keys_100k", "upstream", "haproxy",
    "plain_aiohttp",
)


BASE_SUFFIX = "@base"


def measure_order(outcomes: list[Outcome]) -> list[Outcome]:
    rank = {name: i for i, name in enumerate(RUN_ORDER)}

    def key(o: Outcome) -> tuple[int, bool]:
        name = o.scenario.name
        twin = name.endswith(BASE_SUFFIX)
        return rank.get(name.removesuffix(BASE_SUFFIX), len(rank)), twin  # a twin right after

    return sorted(outcomes, key=key)


def baseline_twins(chosen: list[Scenario], label: str) -> list[Scenario]:
    """Every scenario, each Keystile one followed by its twin served by the baseline code."""
    out = []
    for sc in chosen:
        out.append(sc)
        if sc.group == "keystile":
            out.append(replace(sc, name=sc.name + BASE_SUFFIX, server=sc.server + BASE_SUFFIX,
                               what=f"{sc.what} — baseline {label}"))
    return out


@contextlib.contextmanager
def baseline_tree(ref: str, tmp: Path) -> Iterator[Path]:
    """A directory holding the baseline's code: ``ref`` itself when it is one, else a temporary
    git worktree of that ref (removed afterwards)."""
    if Path(ref).is_dir():
        yield Path(ref).resolve()
        return
    dest = tmp / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(dest), ref], cwd=HERE.parent,
                   check=True)
    try:
        yield dest
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(dest)], cwd=HERE.parent,
                       check=False)


def redis_reachable(url: str) -> bool:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, tmp: Path) -> None:
        self.args = args
        self.procs = procs
        self.tmp = tmp
        self.cache = seed.cache_dir(args.cache_dir)
        self.secret = seed.bench_secret(self.cache)
        self.tools = ensure_tools(["wrk", "nginx", "haproxy"], install=not args.no_install)
        self.servers: dict[str, Server | ServerFailed] = {}
        # Admin port of each one-process Keystile server: its /metrics says which tier answered.
        self.admin_ports: dict[str, int] = {}
        self.stores: dict[int, seed.SeededStore] = {}
        self.baseline: Path | None = None  # the baseline's code, for NAME@base scenarios
        self._base_stores: dict[int, Path] = {}
        self.redis_ok = False  # set by start_redis
        self.redis_private = False
        self.upstream_port = 0
        self._seed = 0
        # Fresh Redis keys for this run: in a shared Redis (--redis-url), entries earlier runs left
        # behind (same seeds, same keys) would otherwise warm the Redis tier for it. They expire
        # with cache.redis_ttl. A private Redis (start_redis) starts empty anyway.
        self.redis_namespace = f"ksbench-{int(time.time())}-{os.getpid()}"

    # -- keys ----------------------------------------------------------------------------

    def store(self, count: int) -> seed.SeededStore:
        if count not in self.stores:
            self.stores[count] = seed.seeded_store(self.cache, count, self.secret)
        return self.stores[count]

    def _base_has_limits(self) -> bool:
        """A baseline may predate rate limits (then its servers get no ``/limited`` route)."""
        return self.baseline is not None and (self.baseline / "gateway" / "limits").is_dir()

    def base_store(self, count: int) -> Path:
        """The seeded store for the baseline's servers, built by the baseline's own code (its
        migrations may be older than this checkout's); the same keys as ``store``."""
        if count not in self._base_stores:
            assert self.baseline is not None
            code = ("import sys; from pathlib import Path; from benchmarks import seed; "
                    "print(seed.seeded_store(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]).db)")
            env = {**os.environ, "PYTHONPATH": str(self.baseline)}
            out = subprocess.run([sys.executable, "-c", code, str(self.cache), str(count), self.secret],
                                 cwd=self.baseline, env=env, capture_output=True, text=True,
                                 check=False, timeout=1800)
            if out.returncode != 0:
                raise ServerFailed(f"seeding the baseline's store failed: {out.stderr.strip()[-300:]}")
            self._base_stores[count] = Path(out.stdout.strip().splitlines()[-1])
        return self._base_stores[count]

    def keys_file(self, sc: Scenario) -> Path | None:
        if sc.keys == "unknown":
            return seed.unknown_keys_file(self.cache, UNKNOWN_POOL)
        if sc.mode in ("missing", "malformed"):
            return None
        assert isinstance(sc.keys, int)
        return self.store(sc.keys).keys_file

    def peer_keys(self) -> list[str]:
        return self.store(BASE_KEYS).keys_file.read_text().split()

    # -- servers -------------------------------------------------------------------------

    def _log(self, name: str) -> Path:
        return self.tmp / f"{name.replace(':', '-')}.log"

    def _tool(self, name: str) -> str:
        path = self.tools.get(name)
        if path is None:
            raise ServerFailed(f"{name} is not installed")
        return path

    def start_upstream(self) -> None:
        nginx = self._tool("nginx")
        self.upstream_port = free_port()
        conf = configs.nginx_upstream(self.tmp, "upstream", self.upstream_port)
        self.procs.start("upstream", configs.nginx_argv(nginx, self.tmp, "upstream", conf),
                         port=self.upstream_port, log=self._log("upstream"), core=LOAD_CORE)

    def start_redis(self) -> None:
        """A private redis-server on the load core, like the upstream: a Redis the kernel may run
        on the server's core takes CPU from the server under test, and one shared with other work
        carries state between runs. Without redis-server (or with --redis-url), the given URL."""
        exe = which("redis-server")
        if self.args.redis_url is None and exe is not None:
            port = free_port()
            argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(self.tmp)]
            try:
                self.procs.start("redis", argv, port=port, log=self._log("redis"), core=LOAD_CORE)
                self.args.redis_url = f"redis://127.0.0.1:{port}/0"
                self.redis_private = True
            except ServerFailed as e:
                print(f"private redis-server failed, using {DEFAULT_REDIS}: {e}", file=sys.stderr)
        if self.args.redis_url is None:
            self.args.redis_url = DEFAULT_REDIS
        self.redis_ok = redis_reachable(self.args.redis_url)

    def server_for(self, sid: str) -> Server:
        got = self.servers.get(sid)
        if got is None:
            try:
                got = self._start(sid)
            except ServerFailed as e:
                got = e
            self.servers[sid] = got
        if isinstance(got, ServerFailed):
            raise got
        if not got.alive():
            raise ServerFailed(f"{sid} is no longer running\n{got.log_tail()}")
        return got

    def _start(self, sid: str) -> Server:
        port = free_port()
        log = self._log(sid)
        py = sys.executable
        if sid == "upstream_alone":
            conf = configs.nginx_upstream(self.tmp, sid, port)
            argv = configs.nginx_argv(self._tool("nginx"), self.tmp, sid, conf)
        elif sid == "nginx":
            conf = configs.nginx_keyauth(self.tmp, sid, port, self.upstream_port, self.peer_keys())
            argv = configs.nginx_argv(self._tool("nginx"), self.tmp, sid, conf)
        elif sid == "haproxy":
            conf = configs.haproxy_keyauth(self.tmp, sid, port, self.upstream_port, self.peer_keys())
            argv = configs.haproxy_argv(self._tool("haproxy"), conf)
        elif sid == "plain_aiohttp":
            argv = [py, str(HERE / "peers" / "plain_aiohttp.py"), "--port", str(port),
                    "--upstream", f"http://127.0.0.1:{self.upstream_port}",
                    "--keys", str(self.store(BASE_KEYS).keys_file)]
        elif sid == "hello":
            argv = [py, str(HERE / "peers" / "hello_aiohttp.py"), "--port", str(port)]
        elif sid.startswith("ks:"):
            return self._start_keystile(sid, port, log)
        else:
            raise ServerFailed(f"unknown server {sid!r}")
        return self.procs.start(sid, argv, port=port, log=log, core=SERVER_CORE)

    def _start_keystile(self, sid: str, port: int, log: Path) -> Server:
        base = sid.endswith(BASE_SUFFIX)
        # A 5th part names a separate instance.
        _, tier, count_s, workers_s, *_ = sid.removesuffix(BASE_SUFFIX).split(":")
        count, workers = int(count_s), int(workers_s)
        if tier in ("redis", "rlimit") and not self.redis_ok:
            raise ServerFailed(f"Redis is not reachable at {self.args.redis_url}")
        exe = shutil.which("keystile", path=str(Path(sys.executable).parent)) or shutil.which(
            "keystile"
        )
        if exe is None:
            raise ServerFailed("the `keystile` command is not installed (pip install -e .)")
        name = sid.replace(":", "-").replace("@", "-")
        (self.tmp / name).mkdir(exist_ok=True)
        seeded = self.store(count)
        if base:
            seeded = replace(seeded, db=self.base_store(count))
        db = seed.working_copy(seeded, self.tmp / name)  # each server writes its own
        admin_port = free_port()
        if workers == 1:  # with workers, tier counters are per worker
            self.admin_ports[sid] = admin_port
        conf = configs.keystile_config(
            self.tmp,
            name,
            port=port,
            admin_port=admin_port,
            upstream_port=self.upstream_port,
            store_db=db,
            redis_url=self.args.redis_url if tier not in ("store", "inproc") and self.redis_ok else "",
            local_ttl=0.0 if tier in ("redis", "store") else None,
            redis_namespace=self.redis_namespace,
            limited_route=not base or self._base_has_limits(),
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}
        env["KEYSTILE_KEY_HASH_SECRET"] = self.secret
        env["KEYSTILE_ADMIN_TOKENS"] = secrets.token_hex(16)
        try:
            from gateway.config import ConfigError, load

            load(conf, env=env)
        except ConfigError as e:
            raise ServerFailed("config rejected: " + "; ".join(e.problems)) from None
        except ImportError as e:
            raise ServerFailed(f"gateway.config not importable: {e}") from None
        argv = [exe, "serve", "--config", str(conf)]
        if base:  # the baseline's code, with this venv's packages
            assert self.baseline is not None
            env["PYTHONPATH"] = str(self.baseline)
            argv = [sys.executable, "-m", "gateway", "serve", "--config", str(conf)]
        if workers != 1:
            argv += ["--workers", str(workers)]
        return self.procs.start(sid, argv, port=port, log=log, core=SERVER_CORE, env=env,
                                cwd=self.tmp, ready_timeout=self.args.ready_timeout)

    # -- one scenario --------------------------------------------------------------------

    def _headers(self, sc: Scenario) -> dict[str, str]:
        if sc.mode == "missing":
            return {}
        if sc.mode == "malformed":
            return {KEY_HEADER: MALFORMED_KEY}
        path = self.keys_file(sc)
        assert path is not None
        with path.open() as f:
            return {KEY_HEADER: f.readline().strip()}

    def preflight(self, sc: Scenario, server: Server, out: Outcome) -> None:
        headers = self._headers(sc)
        status, _ = _get(server.port, sc.path, headers)
        if status != sc.expect:
            out.checks.append(f"expected {sc.expect}, got {status}")
        if sc.proxied and sc.expect == 200:
            status, body = _get(server.port, sc.path + "_bench/echo", headers)
            out.identity_seen = body.strip()
            seen = dict(part.partition("=")[::2] for part in body.split())
            if status != 200:
                out.checks.append(f"echo: got {status}")
            elif seen.get("key"):
                out.checks.append("API key forwarded upstream")
            if sc.group == "peer" and seen.get("owner") != configs.OWNER:
                out.checks.append("owner header missing upstream")

    def load(self, sc: Scenario, server: Server, seconds: float) -> LoadResult:
        # A new seed per wrk run: a Zipf run that replayed the one before would find every one of
        # its keys cached, which no real stream of requests does.
        self._seed += 1
        return run_wrk(
            f"http://127.0.0.1:{server.port}{sc.path}",
            mode=sc.mode,
            keys_file=self.keys_file(sc),
            duration=seconds,
            core=LOAD_CORE,
            seed=self._seed,
            wrk=self._tool("wrk"),
        )

    def warm(self, sc: Scenario, server: Server) -> float:
        """Warm up; returns the seconds spent. many_keys scenarios warm for KEYS_WARM seconds (in
        slices, printing req/s): a store of many keys starts with cold caches and the target
        compares steady states. A fixed length, not "until req/s stops rising": on this kind of
        machine req/s wobbles more between slices than it rises, and that rule stopped after one
        slice while the share of first-seen keys was still falling (34 % -> 15 % over 30 s)."""
        spent = float(self.args.warmup)
        self.load(sc, server, spent)
        if not sc.many_keys:
            return spent
        total = KEYS_WARM_QUICK if self.args.quick else KEYS_WARM
        while spent < total:
            res = self.load(sc, server, KEYS_WARM_SLICE)
            spent += KEYS_WARM_SLICE
            print(f"  {sc.name}: {res.rps:,.0f} req/s after {spent:g} s", file=sys.stderr)
        return spent

    def measure(self, sc: Scenario, server: Server) -> dict[str, float]:
        admin = self.admin_ports.get(sc.server)
        tiers_before = lookups(admin) if admin else None
        before = server.cpu_seconds()
        res = self.load(sc, server, self.args.duration)
        after = server.cpu_seconds()
        if not server.alive():
            raise ServerFailed(f"{sc.server} died during the run\n{server.log_tail()}")
        cpu_us = (after - before) / res.requests * 1e6 if res.requests else float("nan")
        out = {**res.as_dict(), "cpu_us": round(cpu_us, 2)}
        tiers_after = lookups(admin) if admin else None
        if tiers_before is not None and tiers_after is not None and res.requests:
            for name in TIER_COUNTS:
                n = tiers_after.get(name, 0.0) - tiers_before.get(name, 0.0)
                out[name] = round(100 * n / res.requests, 2)  # % of requests
        return out


# Tier counters reported per scenario, as % of requests: (tier, result) of keystile_cache_lookups.
TIER_COUNTS = ("local_miss", "redis_hit", "redis_miss", "store_load")
_LOOKUP_LINE = re.compile(r'^keystile_cache_lookups_total\{result="(\w+)",tier="(\w+)"\} (\S+)$', re.M)


def lookups(admin_port: int) -> dict[str, float] | None:
    """Keystile's cumulative lookup counters by "tier_result" (store loads count batches)."""
    status, text = _get(admin_port, "/metrics", {})
    if status != 200:
        return None
    return {f"{m[2]}_{m[1]}": float(m[3]) for m in _LOOKUP_LINE.finditer(text)}


def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except OSError as e:
        return 0, str(e)
    finally:
        conn.close()


def _unexpected(sc: Scenario, run: dict[str, float]) -> str:
    total = run["requests"] or 1
    bad = run["non_2xx"] if sc.expect < 400 else total - run["non_2xx"]
    parts = []
    if bad:
        parts.append(f"{100 * bad / total:.1f}% unexpected status")
    if run["errors"]:
        parts.append(f"{int(run['errors'])} socket errors")
    return ", ".join(parts)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    load_before = loadavg()
    if len(cores()) < 2:
        print("warning: fewer than 2 usable cores: no pinning, numbers are not comparable",
              file=sys.stderr)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {LOAD_CORE})  # keep the orchestrator off the server's core
    all_sc = scenarios(args.keys)
    chosen = all_sc
    if args.only:
        wanted = set(args.only)
        names = {s.name for s in all_sc}
        unknown = wanted - names - {"peers", "keystile"}
        if unknown:
            print(f"unknown scenario(s): {', '.join(sorted(unknown))}; "
                  f"choose from {', '.join(s.name for s in all_sc)}, peers, keystile",
                  file=sys.stderr)
            return 2
        groups = {"peers": "peer", "keystile": "keystile"}
        chosen = [s for s in all_sc if s.name in wanted or any(
            groups[g] == s.group for g in wanted & groups.keys())]
        if REFERENCE not in {s.name for s in chosen}:
            print(f"adding {REFERENCE!r}: every ratio is against it", file=sys.stderr)
            chosen.insert(0, next(s for s in all_sc if s.name == REFERENCE))

    tmp = Path(tempfile.mkdtemp(prefix="keystile-bench-"))
    tmp.chmod(0o755)  # nginx workers run as an unprivileged user when started by root
    if args.baseline:
        chosen = baseline_twins(chosen, args.baseline)
    outcomes = [Outcome(s) for s in chosen]
    try:
        with Processes() as procs, contextlib.ExitStack() as stack:
            bench = Bench(args, procs, tmp)
            if args.baseline:
                bench.baseline = stack.enter_context(baseline_tree(args.baseline, tmp))
            if bench.tools.get("wrk") is None or bench.tools.get("nginx") is None:
                print("wrk and nginx are required (the load generator and the upstream)",
                      file=sys.stderr)
                return 2
            mach = machine(bench.tools)
            bench.start_upstream()
            bench.start_redis()
            # Start, check and warm every scenario once, then alternate measured rounds.
            for o in outcomes:
                sc = o.scenario
                print(f"[warm-up] {sc.name} ...", file=sys.stderr)
                try:
                    server = bench.server_for(sc.server)
                    bench.preflight(sc, server, o)
                    o.warmup_s = bench.warm(sc, server)
                    o.status = "ok"
                except ServerFailed as e:
                    o.status, o.reason = "not available", str(e)
                except LoadError as e:
                    o.status, o.reason = "failed", str(e)
                if o.status != "ok":
                    print(f"  {o.status}: {o.reason.splitlines()[0] if o.reason else ''}",
                          file=sys.stderr)
            order = measure_order(outcomes)
            for r in range(args.runs):
                for o in order if r % 2 == 0 else reversed(order):
                    if o.status != "ok":
                        continue
                    try:
                        server = bench.server_for(o.scenario.server)
                        o.runs.append(bench.measure(o.scenario, server))
                    except (ServerFailed, LoadError) as e:
                        o.status, o.reason = "failed", str(e)
                        continue
                    m = o.runs[-1]
                    print(f"[run {r + 1}/{args.runs}] {o.scenario.name}: {m['rps']:,.0f} req/s, "
                          f"CPU {m['cpu_us']:.1f} µs/req", file=sys.stderr)
            for o in outcomes:
                for run_ in o.runs:
                    problem = _unexpected(o.scenario, run_)
                    if problem and problem not in o.checks:
                        o.checks.append(problem)
            micro = run_micro(args) if not args.no_micro else None
            elapsed = time.monotonic() - started
            result = report.build(
                outcomes=[_outcome_dict(o) for o in outcomes],
                reference=REFERENCE,
                machine=mach,
                settings={
                    "quick": args.quick,
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "runs": args.runs,
                    "connections": 50,
                    "wrk_threads": 1,
                    "server_core": SERVER_CORE,
                    "load_core": LOAD_CORE,
                    "zipf_s": 1.1,
                    "peer_keys": BASE_KEYS,
                    "key_counts": args.keys,
                    "redis_url": args.redis_url if bench.redis_ok else "unreachable",
                    "redis_private": bench.redis_private,
                    "elapsed_s": round(elapsed, 1),
                    "loadavg_before": load_before,
                    "loadavg_after": loadavg(),
                },
                micro=micro,
            )
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    md = report.markdown(result)
    print(md)
    paths = report.write(result, md, Path(args.results))
    print(f"wrote {', '.join(str(p) for p in paths)} in {result['settings']['elapsed_s']}s",
          file=sys.stderr)
    return 0


def _outcome_dict(o: Outcome) -> dict[str, Any]:
    sc = o.scenario
    return {
        "name": sc.name,
        "group": sc.group,
        "what": sc.what,
        "server": sc.server,
        "mode": sc.mode,
        "keys": sc.keys,
        "path": sc.path,
        "expect": sc.expect,
        "status": o.status,
        "reason": o.reason,
        "checks": o.checks,
        "identity_seen": o.identity_seen,
        "warmup_s": o.warmup_s,
        "median": o.median(),
        "runs": o.runs,
    }


def run_micro(args: argparse.Namespace) -> dict[str, Any] | None:
    """benchmarks.micro in a child pinned to the server core; None (with a note) if it fails."""
    argv = [sys.executable, "-m", "benchmarks.micro", "--json", "--redis-url", args.redis_url]
    if args.quick:
        argv.append("--quick")
    if shutil.which("taskset") and SERVER_CORE in cores():
        argv = ["taskset", "-c", str(SERVER_CORE), *argv]
    print("[micro] per-op costs ...", file=sys.stderr)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                             cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        print("  micro-benchmarks timed out", file=sys.stderr)
        return None
    try:
        data: dict[str, Any] = json.loads(out.stdout)
        return data
    except json.JSONDecodeError:
        print(f"  micro-benchmarks failed: {out.stderr.strip()[-300:]}", file=sys.stderr)
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="1 round of 3 s after a 1 s warm-up (finishes in under 3 minutes)")
    p.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help="comma-separated scenario names, or 'peers' / 'keystile'")
    p.add_argument("--duration", type=float, help="seconds per measured run (8; 3 with --quick)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per scenario (2; 1 with --quick)")
    p.add_argument("--runs", type=int, help="alternating rounds, medians reported (3; 1 with --quick)")
    p.add_argument("--keys", type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                   default=[1000, 100_000, 1_000_000],
                   help="key counts for the keys_N scenarios (default 1000,100000,1000000)")
    p.add_argument("--redis-url", help="use this Redis instead of a private redis-server on the "
                   f"load core (the default; {DEFAULT_REDIS} when redis-server is not installed)")
    p.add_argument("--ready-timeout", type=float, default=30.0,
                   help="seconds a Keystile server may take to listen")
    p.add_argument("--results", default=str(RESULTS), help="output directory")
    p.add_argument("--cache-dir", help="where seeded stores are cached (~/.cache/keystile-bench)")
    p.add_argument("--no-install", action="store_true", help="never run apt-get")
    p.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs for inspection")
    p.add_argument("--baseline", metavar="REF",
                   help="also run each chosen Keystile scenario on the code of this git ref or "
                   "directory (NAME@base, measured right after NAME): before/after in one run")
    a = p.parse_args(argv)
    a.duration = a.duration or (3.0 if a.quick else 8.0)
    a.warmup = a.warmup if a.warmup is not None else (1.0 if a.quick else 2.0)
    a.runs = a.runs or (1 if a.quick else 3)
    return a


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
