"""The ``keystile`` command line: serve, check config, migrate, manage keys, demo.

Owns: argument parsing, human tables and ``--json`` output, exit codes. It is the one place that
installs uvloop. Must not: hold lifecycle rules (``gateway.lifecycle`` does) or read the environment
itself (``gateway.config`` does).

Exit codes: 0 success, 1 operation failed (store, network, policy), 2 bad config or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets as pysecrets
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from gateway import config as config_mod
from gateway.config import Config, ConfigError, Secrets
from gateway.keys import ENVIRONMENTS
from gateway.lifecycle import Lifecycle, PolicyError
from gateway.models import KeyRecord
from gateway.store import KeyFilter, NotFound, Store, StoreError, open_store

T = TypeVar("T")
_json = msgspec.json.Encoder()


class Fail(Exception):
    """A one-line failure for the operator, with an exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def run(coro: Coroutine[Any, Any, T]) -> T:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _load(args: argparse.Namespace, *, need_secret: bool = True) -> tuple[Config, Secrets]:
    path = config_mod.config_path(getattr(args, "config", None))
    cfg = config_mod.load(path)
    return cfg, config_mod.load_secrets(cfg, require_hash_secret=need_secret)


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def key_view(rec: KeyRecord, now: float) -> dict[str, Any]:
    """The public view of a key, as lists and --json show it."""
    data: dict[str, Any] = msgspec.to_builtins(rec)
    data["start"] = rec.start + "…"
    data["status"] = rec.status(now)
    return data


def parse_expiry(text: str | None) -> float | None:
    """``30d``/``12h`` -> seconds from now."""
    if text is None:
        return None
    try:
        return config_mod.parse_duration(text)
    except ValueError as e:
        raise Fail(f"--expires-in: {e}", 2) from None


async def _with_store(cfg: Config, fn: Callable[[Store], Awaitable[T]]) -> T:
    store = await open_store(cfg.store.url, timeout=cfg.store.timeout, pool_min=1, pool_max=2)
    try:
        await store.check_schema()
        return await fn(store)
    finally:
        await store.close()


# -- commands ------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import StartupError, create_app
    from gateway.observability import configure_logging

    cfg, secrets = _load(args)
    configure_logging(cfg.logging.level)
    path = config_mod.config_path(args.config)
    if args.workers > 1 and args.worker_of is None:
        from gateway.workers import Supervisor

        if args.pid_file:
            Path(args.pid_file).write_text(f"{os.getpid()}\n")
        return Supervisor(args.workers, ["--config", path] if path else [], cfg.proxy.shutdown_timeout).run()

    async def main() -> int:
        gw = create_app(cfg, secrets, metrics_dir=args.metrics_dir)
        try:
            await gw.start(reuse_port=args.reuse_port)
        except (StoreError, StartupError, OSError) as e:
            await gw.stop()
            raise Fail(f"keystile: cannot start: {e}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reloading: set[asyncio.Task[None]] = set()

        async def reload() -> None:
            log = logging.getLogger("keystile")
            try:
                new = config_mod.load(path)
            except ConfigError as e:
                for problem in e.problems:
                    log.error("reload refused: %s", problem)
                log.error("reload refused; the previous configuration keeps serving")
                return
            for note in await gw.reload(new):
                log.warning(note)

        def on_hup() -> None:
            task = loop.create_task(reload())
            reloading.add(task)
            task.add_done_callback(reloading.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        if args.pid_file and args.worker_of is None:
            Path(args.pid_file).write_text(f"{os.getpid()}\n")  # noqa: ASYNC240
        if args.worker_of is not None:
            # A worker outlives no supervisor: stop when the parent is gone.
            async def watch_parent() -> None:
                while os.getppid() == args.worker_of:  # noqa: ASYNC110 - nothing to wait on but time
                    await asyncio.sleep(1.0)
                stop.set()

            watcher = loop.create_task(watch_parent())
            reloading.add(watcher)
        await stop.wait()
        await gw.stop()
        return 0

    return run(main())


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.file)
    if args.quiet:
        return 0
    print(f"{args.file}: ok")
    print(_json.encode(config_mod.to_toml_dict(cfg)).decode())
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    cfg, _ = _load(args, need_secret=False)

    async def main() -> list[int]:
        store = await open_store(cfg.store.url, timeout=cfg.store.timeout, pool_min=1, pool_max=2)
        try:
            return await store.migrate()
        finally:
            await store.close()

    applied = run(main())
    print(f"applied migrations: {', '.join(map(str, applied))}" if applied else "schema is up to date")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask a running ``keystile serve`` to re-read its config (the same as SIGHUP)."""
    try:
        pid = int(Path(args.pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as e:
        raise Fail(f"keystile reload: cannot signal the server in {args.pid_file}: {e}") from None
    print(f"sent SIGHUP to {pid}; the server logs whether the new config was applied")
    return 0


def cmd_secret(args: argparse.Namespace) -> int:
    print(pysecrets.token_hex(32))
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    cfg, secrets = _load(args)
    scopes = None if args.scopes is None else [s for s in args.scopes.split(",") if s]

    async def main(store: Store) -> tuple[Any, list[str]]:
        lc = Lifecycle(cfg, secrets.hash_secret, store)
        notes = []
        try:
            principal = await store.get_principal(args.owner)
        except NotFound:
            principal = await lc.create_principal(
                args.owner, grants={args.project: scopes or []}, actor="cli"
            )
            shown = ",".join(scopes or []) or "(no scopes)"
            notes.append(f"created principal {principal.name} with grant {args.project}: {shown}")
        granted = principal.grants.get(args.project)
        if granted is None:
            notes.append(
                f"warning: {principal.name} has no grant in project {args.project}; "
                "the key will get 403 on routes that require one"
            )
        elif scopes:
            missing = sorted(set(scopes) - set(granted))
            if missing:
                notes.append(
                    f"warning: scopes not granted to {principal.name} in {args.project} "
                    f"have no effect: {','.join(missing)}"
                )
        created = await lc.create_key(
            principal.id,
            args.project,
            name=args.name,
            scopes=scopes,
            expires_in=parse_expiry(args.expires_in),
            env=args.env,
            actor="cli",
        )
        return created, notes

    created, notes = run(_with_store(cfg, main))
    for n in notes:
        print(n, file=sys.stderr)
    if args.json:
        view = key_view(created.record, time.time())
        view["key"] = created.secret
        print(_json.encode(view).decode())
    else:
        print(f"key:  {created.secret}")
        print(f"id:   {created.record.id}")
        print(f"name: {created.record.name}")
        print("Store the key now: it is shown only once.", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    cfg, _ = _load(args, need_secret=False)
    flt = KeyFilter(
        principal_id=args.owner, project=args.project, status=args.status, q=args.q, limit=args.limit
    )
    now = time.time()
    page = run(_with_store(cfg, lambda store: store.list_keys(flt, now)))
    views = [key_view(k, now) for k in page.items]
    if args.json:
        print(_json.encode({"items": views, "next_cursor": page.next_cursor}).decode())
        return 0
    rows = [
        [
            v["id"],
            v["name"],
            v["start"],
            v["principal"],
            v["project"],
            _fmt_time(v["created_at"]),
            _fmt_time(v["expires_at"]),
            _fmt_time(v["last_used_at"]),
            v["status"],
        ]
        for v in views
    ]
    print(
        _table(["id", "name", "start", "owner", "project", "created", "expires", "last used", "status"], rows)
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.app import create_app
    from gateway.config import RouteConfig
    from gateway.echo import start_echo
    from gateway.observability import configure_logging

    configure_logging("warning")

    async def main() -> int:
        echo_runner, echo_port = await start_echo()
        tmp = tempfile.TemporaryDirectory(prefix="keystile-demo-")
        cfg = config_mod.decode(
            {
                "proxy": {"listen": f"127.0.0.1:{args.port}"},
                "admin": {"listen": f"127.0.0.1:{args.admin_port}"},
                "store": {"url": f"sqlite:///{tmp.name}/demo.db"},
            },
            "(demo)",
        )
        cfg = msgspec.structs.replace(
            cfg,
            routes=(
                RouteConfig(prefix="/public", upstream=f"http://127.0.0.1:{echo_port}", auth="none"),
                RouteConfig(prefix="/", upstream=f"http://127.0.0.1:{echo_port}", scopes=("read",)),
            ),
        )
        secrets = Secrets(pysecrets.token_bytes(32), ())
        store = await open_store(cfg.store.url)
        await store.migrate()
        lc = Lifecycle(cfg, secrets.hash_secret, store)
        await lc.create_principal("demo-user", grants={"demo": ["read"]}, actor="demo")
        created = await lc.create_key("demo-user", "demo", name="demo key", actor="demo")
        gw = create_app(cfg, secrets, store=store)
        try:
            await gw.start()
        except OSError as e:
            raise Fail(f"keystile demo: cannot listen: {e} (try --port)") from None
        base = f"http://127.0.0.1:{gw.proxy_port}"
        print(
            f"""Keystile demo is running (embedded store, built-in echo upstream).

  key (shown once):  {created.secret}
  key id:            {created.record.id}

Through the gateway, with the key:
  curl -s {base}/hello -H 'X-API-Key: {created.secret}'
Who am I:
  curl -s {base}/_keystile/whoami -H 'Authorization: Bearer {created.secret}'
Without a key (401), and a public route (no key needed):
  curl -si {base}/hello
  curl -s {base}/public/hello

Ctrl-C stops the demo and deletes its data.""",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await gw.stop()
        await store.close()
        await echo_runner.cleanup()
        tmp.cleanup()
        return 0

    return run(main())


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keystile", description="API-key authentication gateway")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--config", "-c", help="TOML config file (default: $KEYSTILE_CONFIG, else built-in defaults)"
        )
        return sp

    s = with_config(sub.add_parser("serve", help="run the gateway"))
    s.add_argument("--pid-file", help="write the process id here (the supervisor's with --workers)")
    s.add_argument("--workers", type=int, default=1, help="worker processes sharing the ports (SO_REUSEPORT)")
    s.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)
    s.add_argument("--metrics-dir", help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("config", help="configuration tools").add_subparsers(dest="sub", required=True)
    cc = c.add_parser("check", help="validate a config file and print the effective config")
    cc.add_argument("file")
    cc.add_argument("--quiet", "-q", action="store_true")
    cc.set_defaults(fn=cmd_config_check)

    with_config(sub.add_parser("migrate", help="apply database migrations")).set_defaults(fn=cmd_migrate)
    rl = sub.add_parser("reload", help="make a running server re-read its config (SIGHUP)")
    rl.add_argument("--pid-file", required=True, help="the file given to serve --pid-file")
    rl.set_defaults(fn=cmd_reload)
    sub.add_parser("secret", help="print a new random secret (for KEYSTILE_KEY_HASH_SECRET)").set_defaults(
        fn=cmd_secret
    )

    d = sub.add_parser("demo", help="run Keystile in front of a built-in echo upstream")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--admin-port", type=int, default=8081)
    d.set_defaults(fn=cmd_demo)

    k = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="sub", required=True)
    kc = with_config(k.add_parser("create", help="create a key (printed once)"))
    kc.add_argument("--owner", required=True, help="principal name or id")
    kc.add_argument("--project", required=True)
    kc.add_argument("--name")
    kc.add_argument("--scopes", help="comma-separated; narrows the owner's grant")
    kc.add_argument("--expires-in", help="e.g. 30d, 12h")
    kc.add_argument("--env", choices=ENVIRONMENTS)
    kc.add_argument("--json", action="store_true")
    kc.set_defaults(fn=cmd_keys_create)
    kl = with_config(k.add_parser("list", help="list keys, newest first"))
    kl.add_argument("--owner")
    kl.add_argument("--project")
    kl.add_argument("--status", choices=["active", "expired", "revoked"])
    kl.add_argument("--q", help="name contains (case-insensitive)")
    kl.add_argument("--limit", type=int, default=100)
    kl.add_argument("--json", action="store_true")
    kl.set_defaults(fn=cmd_keys_list)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.fn(args)
        return code
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 2
    except PolicyError as e:
        print(f"keystile: {e.field}: {e}", file=sys.stderr)
        return 1
    except StoreError as e:
        print(f"keystile: {e}", file=sys.stderr)
        return 1
    except Fail as e:
        print(str(e), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
