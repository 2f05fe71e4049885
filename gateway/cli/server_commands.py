"""The commands that run or look after a gateway: serve, demo, config check, migrate, reload, secret.

Owns: starting a gateway (or a supervisor of workers) from the command line with its signals
(SIGTERM/SIGINT stop, SIGHUP reloads), the demo (an embedded store and an echo upstream), and the
small tools around a deployment. Must not: hold request logic or lifecycle rules, or read the
environment itself (``gateway.config`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import secrets as pysecrets
import signal
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from gateway import config as config_mod
from gateway import reload_outcome
from gateway.cli.output import print_json
from gateway.cli.runner import Fail, load, run, with_store
from gateway.config import ConfigError, Secrets
from gateway.lifecycle import Lifecycle
from gateway.store import StoreError, open_store


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import StartupError, create_app
    from gateway.observability import configure_logging

    runtime = Path(args.runtime_dir) if args.runtime_dir else None
    base: Path | None = None
    if runtime is None:
        path = config_mod.config_path(args.config)
        cfg = config_mod.load(path)
    else:
        # A supervisor's worker: the generation the supervisor accepted, never the operator's file.
        from gateway.app import in_force
        from gateway.workers import config_base, current_config, startup_config

        path = str(current_config(runtime))
        base = config_base(runtime)
        cfg = in_force(
            config_mod.load(startup_config(runtime), base_dir=base), config_mod.load(path, base_dir=base)
        )
    secrets = config_mod.load_secrets(cfg)
    configure_logging(cfg.logging.level)
    if not secrets.admin_tokens and args.worker_of is None:
        logging.getLogger("keystile").warning(
            "no admin token is configured (%s or admin.tokens_file): the admin API at %s refuses "
            "every /v1 request; only /healthz and /readyz answer",
            config_mod.ADMIN_TOKENS_ENV,
            cfg.admin.listen,
        )
    if args.worker_of is None:
        from gateway.workers import usable_cpus

        cpus = usable_cpus()
        if args.workers == 0:  # --workers auto
            args.workers = cpus
        elif args.workers > cpus:
            logging.getLogger("keystile").warning(
                "--workers %d exceeds the %d CPU(s) this process may use (affinity or cgroup quota): "
                "workers will share cores, and switching between them costs CPU per request "
                "(use --workers auto for one per CPU)",
                args.workers,
                cpus,
            )
    if args.workers > 1 and args.worker_of is None:
        from gateway.workers import Supervisor

        if cfg.console.listen:
            # Console sessions live in one process's memory; workers would each hold their own.
            raise Fail("console.listen: the console runs in one process: serve it without --workers")
        if not cfg.redis.url and cfg.cache.local_ttl > 0:
            logging.getLogger("keystile").warning(
                "--workers %d without redis.url: a key revoked or changed through one worker is "
                "still served from the other workers' caches until they next read the store "
                "(cache.sync_interval, %g s)",
                args.workers,
                cfg.cache.sync_interval,
            )

        supervisor = Supervisor(args.workers, path, cfg.proxy.shutdown_timeout)
        if args.pid_file:
            Path(args.pid_file).write_text(f"{os.getpid()}\n")
            pid_file = args.pid_file
            supervisor.on_reload = lambda applied, problems: reload_outcome.record(
                pid_file, applied, problems, []
            )
        return supervisor.run()

    async def main() -> int:
        gw = create_app(cfg, secrets, metrics_dir=args.metrics_dir)
        if runtime is not None:
            from gateway.workers import describe, read_status, status_file, status_metrics

            status = status_file(runtime)
            gw.readiness_notes["workers"] = lambda: describe(read_status(status))
            gw.metrics.add_state(status_metrics(status))
        # Before start: a SIGTERM that arrives while starting (a supervisor stopping at once) is a
        # graceful stop right after it, not the default action's abrupt exit.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await gw.start(reuse_port=args.reuse_port)
        except (StoreError, StartupError, OSError) as e:
            await gw.stop()
            raise Fail(f"keystile: cannot start: {e}") from None
        # What startup built (modules, config, pools) lives as long as the process: keep it out of
        # the collector's full passes, whose pauses otherwise show in the p99 as caches grow.
        gc.collect()
        gc.freeze()
        reloading: set[asyncio.Task[None]] = set()

        async def reload() -> None:
            log = logging.getLogger("keystile")
            answer = args.pid_file if args.worker_of is None else None  # a worker's supervisor answers
            try:
                # raises for a certificate it cannot load too
                notes = await gw.reload(config_mod.load(path, base_dir=base))
            except ConfigError as e:
                for problem in e.problems:
                    log.error("reload refused: %s", problem)
                log.error("reload refused; the previous configuration keeps serving")
                if answer:
                    reload_outcome.record(answer, False, e.problems, [])
                return
            except Exception as e:  # a bug: logged with its traceback, the old config keeps serving
                log.exception("reload failed; the previous configuration keeps serving")
                if answer:
                    reload_outcome.record(answer, False, [f"{type(e).__name__}: {e}"], [])
                return
            for note in notes:
                log.warning(note)
            if answer:
                reload_outcome.record(answer, True, [], notes)

        def on_hup() -> None:
            task = loop.create_task(reload())
            reloading.add(task)
            task.add_done_callback(reloading.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        if args.pid_file and args.worker_of is None:
            Path(args.pid_file).write_text(f"{os.getpid()}\n")  # noqa: ASYNC240
        if runtime is not None:
            from gateway.workers import ready_file

            ready_file(runtime, os.getpid()).touch()  # serving, and SIGHUP is handled: tell the supervisor
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
    from gateway.config.toml_text import dumps

    # Valid TOML as a whole: the verdict is a comment, then the effective config, secrets masked.
    print(f"# {args.file}: ok; the effective config (defaults and environment applied, secrets masked):")
    print(dumps(config_mod.to_toml_dict(cfg)), end="")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from gateway import hash_secrets

    cfg, secrets = load(args, need_secret=False)

    async def main() -> list[int]:
        store = await open_store(cfg.store.url, timeout=cfg.store.timeout, pool_min=1, pool_max=2)
        try:
            applied = await store.migrate()
            if secrets.hash_secret:  # else the first instance to start records it
                await hash_secrets.check(store, secrets, time.time())
            return applied
        finally:
            await store.close()

    applied = run(main())
    print(f"applied migrations: {', '.join(map(str, applied))}" if applied else "schema is up to date")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask a running ``keystile serve`` to re-read its config (SIGHUP) and wait for its answer:
    exit 0 when the new config was applied, 1 with the server's reasons when it was refused."""
    before = reload_outcome.read_raw(args.pid_file)
    try:
        pid = int(Path(args.pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as e:
        raise Fail(f"keystile reload: cannot signal the server in {args.pid_file}: {e}") from None
    deadline = time.monotonic() + args.timeout
    while (raw := reload_outcome.read_raw(args.pid_file)) == before or raw is None:
        if time.monotonic() >= deadline:
            raise Fail(
                f"keystile reload: sent SIGHUP to {pid}, but it did not answer within {args.timeout:g}s; "
                "its log says whether the new config was applied"
            )
        time.sleep(0.05)
    outcome = reload_outcome.decode(raw)
    if not outcome.applied:
        for problem in outcome.problems:
            print(f"keystile reload: refused: {problem}", file=sys.stderr)
        raise Fail("keystile reload: the server refused the new config; the previous one keeps serving")
    print(f"reloaded: server {pid} applied the new config")
    for note in outcome.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_secret(args: argparse.Namespace) -> int:
    if args.action == "status":
        return _secret_status(args)
    print(pysecrets.token_hex(32))
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    """A local upstream that answers every request with what it received (``gateway.echo``)."""
    from gateway.echo import start_echo

    async def main() -> int:
        runner, port = await start_echo(args.host, args.port)
        print(f"echo upstream listening on http://{args.host}:{port} (Ctrl-C stops it)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
        return 0

    try:
        return run(main())
    except OSError as e:
        raise Fail(f"keystile echo: cannot listen: {e} (try --port)") from None


def _secret_status(args: argparse.Namespace) -> int:
    """How many usable keys still depend on a previous hash secret (read only)."""
    from gateway import hash_secrets

    cfg, secrets = load(args)
    found = run(with_store(cfg, lambda store: hash_secrets.status(store, secrets, time.time())))
    if args.json:
        print_json(msgspec.to_builtins(found))
        return 0
    role = (
        "the newest recorded"
        if found.newest
        else "recorded, not the newest"
        if (found.fingerprint in found.recorded)
        else "not recorded"
    )
    print(f"current secret: fingerprint {found.fingerprint[:12]} ({role})")
    print(f"keys hashed with the current secret: {found.current_keys}")
    print(f"keys hashed with a previous secret: {found.previous_keys}")
    print(f"keys hashed with another or an unknown secret: {found.other_keys}")
    if found.previous_keys or found.other_keys:
        print(
            f"keep {config_mod.PREVIOUS_HASH_SECRET_ENV} set until these are used (each is re-keyed "
            "at its first use); a key not used by then stops working when it is removed"
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
                # Plain HTTP on this machine only: the session cookie cannot be Secure here.
                "console": {"listen": f"127.0.0.1:{args.console_port}", "cookie_secure": False},
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
        admin_token = pysecrets.token_urlsafe(24)  # for the console's sign-in form
        secrets = Secrets(pysecrets.token_bytes(32), (admin_token.encode(),))
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
        admin = f"http://127.0.0.1:{gw.admin_port}"
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

The key-management console (sign in with the admin token below):
  http://127.0.0.1:{gw.console_port}/
  admin token:       {admin_token}

The admin API (key lifecycle; its description: {admin}/v1/openapi.json):
  admin URL:    {admin}
  admin token:  {admin_token}
  export {config_mod.ADMIN_URL_ENV}={admin} {config_mod.ADMIN_TOKEN_ENV}={admin_token}
  keystile keys list
  keystile keys create --owner demo-user --project demo --scopes read --expires-in 1h
  keystile keys rotate {created.record.id} --grace 60
  curl -s {admin}/v1/keys -H 'Authorization: Bearer {admin_token}'

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
