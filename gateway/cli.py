"""The ``keystile`` command line: serve, check config, migrate, principals, keys, audit, demo.

Owns: argument parsing, human tables and ``--json`` output, exit codes. It is the one place that
installs uvloop. Must not: hold lifecycle rules (``gateway.lifecycle`` does) or read the environment
itself (``gateway.config`` does).

The ``principals``, ``keys`` and ``audit`` commands mirror the admin API (``gateway.admin``): over
HTTP to a running server, or straight on the store for bootstrap (see ``ADMIN_MODES``); both ways
build the API's own request Structs and print its own views.

Exit codes: 0 success, 1 operation failed (store, network, policy), 2 bad config or usage.
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
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from gateway import config as config_mod
from gateway.admin import operations as ops
from gateway.admin import schemas
from gateway.config import Config, ConfigError, Secrets
from gateway.keys import ENVIRONMENTS
from gateway.lifecycle import Lifecycle, PolicyError
from gateway.models import Invalidation
from gateway.store import Store, StoreError, open_store

if TYPE_CHECKING:
    from gateway.admin.client import Admin, AdminError

T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)
_json = msgspec.json.Encoder()

ADMIN_MODES = f"""These commands use a running admin API (--admin-url and --token, or
{config_mod.ADMIN_URL_ENV} and {config_mod.ADMIN_TOKEN_ENV}) or, to bootstrap, the store itself:
--config FILE always means the store; without it, an admin URL means the API, else the store of
{config_mod.CONFIG_ENV} (or the defaults). Prefer the API while a gateway runs: it drops changed keys
from its cache at once; store-mode changes reach running gateways at once through Redis when one
is configured, else when they next read the store's invalidation outbox (cache.sync_interval)."""


class Fail(Exception):
    """A one-line failure for the operator, with an exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def run(coro: Coroutine[Any, Any, T]) -> T:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _workers(value: str) -> int:
    """``--workers``: a positive count, or ``auto`` (0 here: one per usable CPU, resolved at start)."""
    if value == "auto":
        return 0
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _load(args: argparse.Namespace, *, need_secret: bool = True) -> tuple[Config, Secrets]:
    path = config_mod.config_path(getattr(args, "config", None))
    cfg = config_mod.load(path)
    return cfg, config_mod.load_secrets(cfg, require_hash_secret=need_secret)


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


MAX_CELL = 40  # a table cell longer than this is cut, ending in "…" (show and --json give it whole)


def shown(text: str) -> str:
    """Text safe to print on a terminal: each character Python deems unprintable (controls such as
    U+009B, a CSI; bidi overrides; zero-width and unassigned characters) written as an escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _cell(text: str) -> str:
    text = shown(text)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    rows = [[_cell(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


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

    runtime = Path(args.runtime_dir) if args.runtime_dir else None
    if runtime is None:
        path = config_mod.config_path(args.config)
        cfg = config_mod.load(path)
    else:
        # A supervisor's worker: the generation the supervisor accepted, never the operator's file.
        from gateway.app import in_force
        from gateway.workers import current_config, startup_config

        path = str(current_config(runtime))
        cfg = in_force(config_mod.load(startup_config(runtime)), config_mod.load(path))
    secrets = config_mod.load_secrets(cfg)
    configure_logging(cfg.logging.level)
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

        if not cfg.redis.url and cfg.cache.local_ttl > 0:
            logging.getLogger("keystile").warning(
                "--workers %d without redis.url: a key revoked or changed through one worker is "
                "still served from the other workers' caches until they next read the store "
                "(cache.sync_interval, %g s)",
                args.workers,
                cfg.cache.sync_interval,
            )

        if args.pid_file:
            Path(args.pid_file).write_text(f"{os.getpid()}\n")
        return Supervisor(args.workers, path, cfg.proxy.shutdown_timeout).run()

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


# -- admin commands: the /v1 operations over HTTP (--admin-url) or on the store (--config) ---------


def _admin_target(args: argparse.Namespace) -> tuple[str, str] | None:
    """(url, token) of a running admin API, or None to work on the store of ``--config``."""
    if args.config and args.admin_url:
        raise Fail("keystile: give --config (the store) or --admin-url (a running server), not both", 2)
    url, token = config_mod.admin_endpoint(args.admin_url, args.token)
    if args.config or url is None:
        return None
    if token is None:
        raise Fail(f"keystile: {url} needs an admin token: --token or {config_mod.ADMIN_TOKEN_ENV}", 2)
    return url, token


def _refusal(e: AdminError) -> str:
    where = f"{e.field}: " if e.field else ""
    return shown(f"keystile: {where}{e} ({e.error})")


def _admin(args: argparse.Namespace, fn: Callable[[Admin], Awaitable[T]], *, need_secret: bool = False) -> T:
    """Run ``fn`` against the admin API or, for bootstrap, straight against the store.

    Both ways refuse alike (``AdminError``); store mode writes with the actor ``cli`` and tells
    running gateways through Redis when one is configured (see ``ADMIN_MODES``).
    """
    import aiohttp

    from gateway.admin.client import AdminClient, AdminError, StoreAdmin
    from gateway.admin.operations import Context

    target = _admin_target(args)
    loaded = None if target is not None else _load(args, need_secret=need_secret)

    async def main() -> T:
        if target is not None:
            async with AdminClient(*target) as client:
                return await fn(client)
        assert loaded is not None
        cfg, secrets = loaded

        async def publish(change: Invalidation) -> None:
            await _publish(cfg, change)

        async def on_store(store: Store) -> T:
            lifecycle = Lifecycle(
                cfg, secrets.hash_secret, store, invalidate=publish if cfg.redis.url else None
            )
            return await fn(StoreAdmin(Context(lifecycle, "cli")))

        return await _with_store(cfg, on_store)

    try:
        return run(main())
    except AdminError as e:
        raise Fail(_refusal(e)) from None
    except (aiohttp.ClientError, TimeoutError) as e:
        if target is None:
            raise
        raise Fail(f"keystile: cannot reach the admin API at {target[0]}: {e or type(e).__name__}") from None


async def _publish(cfg: Config, change: Invalidation) -> None:
    """Tell running gateways at once (through Redis, with the gateway's own publisher) which keys a
    store-mode write changed. The write already recorded the change in the store's outbox, which
    every gateway reads each cache.sync_interval: Redis only makes it immediate."""
    from gateway.cache.invalidation import publish_invalidation

    try:
        delivered = await publish_invalidation(cfg.redis, cfg.cache, cfg.store.timeout, change)
    except Exception as e:
        delivered = False
        print(f"keystile: redis: {type(e).__name__}: {e}", file=sys.stderr)
    if not delivered:
        print(
            "note: the change is stored, but Redis could not be told: running gateways apply it "
            f"when they next read the store, within {2 * cfg.cache.sync_interval:g}s",
            file=sys.stderr,
        )


def _build(typ: type[S], **fields: Any) -> S:
    """A request Struct from flag values, checked exactly as the API checks a body."""
    try:
        return msgspec.convert({k: v for k, v in fields.items() if v is not msgspec.UNSET}, typ)
    except msgspec.ValidationError as e:  # a flag value the API's own types refuse: usage
        from gateway.admin.client import AdminError

        err = AdminError.from_exception(e)
        assert err is not None
        raise Fail(_refusal(err), 2) from None


def _print_json(obj: Any) -> None:
    print(_json.encode(obj).decode())


def _print_fields(pairs: Sequence[tuple[str, str]]) -> None:
    pairs = [(shown(k), shown(v)) for k, v in pairs]
    width = max(len(k) for k, _ in pairs) + 1
    for k, v in pairs:
        print(f"{k + ':':<{width}} {v}")


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [p for p in text.split(",") if p]


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, str] | None:
    """``["a=1", "b=2"]`` -> ``{"a": "1", "b": "2"}``."""
    if items is None:
        return None
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise Fail(f"keystile: {flag}: expected NAME=VALUE, got {item!r}", 2)
        out[k] = v
    return out


def _grants(items: Sequence[str] | None) -> dict[str, list[str]] | None:
    pairs = _pairs(items, "--grant")
    return None if pairs is None else {p: _csv(scopes) or [] for p, scopes in pairs.items()}


def _duration(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    try:
        return config_mod.parse_duration(text)
    except ValueError as e:
        raise Fail(f"keystile: {flag}: {e}", 2) from None


def parse_expiry(text: str | None) -> float | None:
    """``30d``/``12h`` -> seconds from now."""
    return _duration(text, "--expires-in")


def _when(text: str | None, flag: str) -> float | None:
    """UNIX seconds, an ISO 8601 time (UTC unless it says otherwise), or a duration ago (``2h``)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return time.time() - config_mod.parse_duration(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise Fail(f"keystile: {flag}: expected UNIX seconds, an ISO 8601 time or a duration", 2) from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def _confirm(args: argparse.Namespace, expected: str, what: str) -> None:
    if args.yes:
        return
    print(f"This deletes {what} for good. Type {expected} to confirm: ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip() != expected:
        raise Fail("keystile: not confirmed; nothing was deleted")


def _more(next_cursor: str | None) -> None:
    if next_cursor:
        print(f"(more: --cursor {next_cursor})", file=sys.stderr)


def _grants_text(grants: dict[str, list[str]]) -> str:
    return "; ".join(f"{p}: {','.join(sc) or '(no scopes)'}" for p, sc in grants.items()) or "-"


def _show_principal(args: argparse.Namespace, p: schemas.PrincipalView) -> None:
    if args.json:
        _print_json(p)
        return
    pairs = [
        ("id", p.id),
        ("name", p.name),
        ("kind", p.kind),
        ("status", "disabled" if p.disabled else "enabled"),
        ("created", _fmt_time(p.created_at)),
        ("grants", _grants_text(p.grants)),
    ]
    pairs += [(f"metadata.{k}", v) for k, v in p.metadata.items()]
    _print_fields(pairs)


def _show_key(args: argparse.Namespace, k: schemas.KeyView) -> None:
    if args.json:
        _print_json(k)
        return
    pairs = [
        ("id", k.id),
        ("name", k.name),
        ("start", k.start),
        ("status", k.status),
        ("owner", f"{k.principal} ({k.principal_id})"),
        ("project", k.project),
        ("scopes", "(all of the owner's grant)" if k.scopes is None else ",".join(k.scopes) or "(none)"),
        ("env", k.env),
        ("created", _fmt_time(k.created_at)),
        ("expires", _fmt_time(k.expires_at) if k.expires_at is not None else "never"),
        ("last used", _fmt_time(k.last_used_at) if k.last_used_at is not None else "never"),
        ("requests", str(k.request_count)),
    ]
    if k.revoked_at is not None:
        pairs.append(("revoked", _fmt_time(k.revoked_at)))
    if k.previous_valid_until is not None and k.previous_valid_until > time.time():
        pairs.append(("previous secret valid until", _fmt_time(k.previous_valid_until)))
    pairs += [(f"metadata.{m}", v) for m, v in k.metadata.items()]
    _print_fields(pairs)


def cmd_principals_create(args: argparse.Namespace) -> int:
    body = _build(
        schemas.PrincipalCreate,
        name=args.name,
        kind=args.kind,
        grants=_grants(args.grant) or {},
        metadata=_pairs(args.metadata, "--metadata") or {},
    )
    _show_principal(args, _admin(args, lambda admin: admin.call(ops.create_principal, body=body)))
    return 0


def cmd_principals_list(args: argparse.Namespace) -> int:
    query = _build(schemas.PrincipalQuery, limit=args.limit, cursor=args.cursor)
    page = _admin(args, lambda admin: admin.call(ops.list_principals, query=query))
    if args.json:
        _print_json(page)
        return 0
    rows = [
        [
            p.name,
            p.id,
            p.kind,
            "disabled" if p.disabled else "enabled",
            _fmt_time(p.created_at),
            _grants_text(p.grants),
        ]
        for p in page.items
    ]
    print(_table(["name", "id", "kind", "status", "created", "grants"], rows))
    _more(page.next_cursor)
    return 0


def cmd_principals_show(args: argparse.Namespace) -> int:
    _show_principal(args, _admin(args, lambda admin: admin.call(ops.get_principal, principal=args.principal)))
    return 0


def cmd_principals_update(args: argparse.Namespace) -> int:
    grants: Any = {} if args.no_grants else _grants(args.grant)
    metadata = _pairs(args.metadata, "--metadata")
    if grants is None and metadata is None:
        raise Fail("keystile: nothing to change: give --grant, --no-grants or --metadata", 2)
    body = _build(
        schemas.PrincipalUpdate,
        grants=msgspec.UNSET if grants is None else grants,
        metadata=msgspec.UNSET if metadata is None else metadata,
    )
    _show_principal(
        args,
        _admin(args, lambda admin: admin.call(ops.update_principal, body=body, principal=args.principal)),
    )
    return 0


def cmd_principals_disable(args: argparse.Namespace) -> int:
    _show_principal(
        args, _admin(args, lambda admin: admin.call(ops.disable_principal, principal=args.principal))
    )
    return 0


def cmd_principals_enable(args: argparse.Namespace) -> int:
    _show_principal(
        args, _admin(args, lambda admin: admin.call(ops.enable_principal, principal=args.principal))
    )
    return 0


def cmd_principals_delete(args: argparse.Namespace) -> int:
    query = _build(schemas.PrincipalDeleteQuery, with_keys=args.with_keys)
    if not args.yes:
        p = _admin(args, lambda admin: admin.call(ops.get_principal, principal=args.principal))
        what = f"principal {shown(p.name)} ({p.id})" + (" and all of its keys" if args.with_keys else "")
        _confirm(args, p.name, what)
    _admin(args, lambda admin: admin.call(ops.delete_principal, query=query, principal=args.principal))
    print(f"deleted principal {args.principal}", file=sys.stderr)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    scopes = _csv(args.scopes)

    async def main(admin: Admin) -> tuple[schemas.IssuedKey, list[str]]:
        from gateway.admin.client import AdminError

        notes = []
        try:
            principal = await admin.call(ops.get_principal, principal=args.owner)
        except AdminError as e:
            if e.status != 404:
                raise
            grant = _build(schemas.PrincipalCreate, name=args.owner, grants={args.project: scopes or []})
            principal = await admin.call(ops.create_principal, body=grant)
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
        body = _build(
            schemas.KeyCreate,
            owner=principal.id,
            project=args.project,
            name=args.name,
            scopes=scopes,
            expires_in=parse_expiry(args.expires_in),
            env=args.env,
        )
        return await admin.call(ops.create_key, body=body), notes

    created, notes = _admin(args, main, need_secret=True)
    for n in notes:
        print(shown(n), file=sys.stderr)
    if args.json:
        _print_json(created)
    else:
        print(f"key:  {created.key}")
        print(f"id:   {created.id}")
        print(f"name: {shown(created.name)}")
        print("Store the key now: it is shown only once.", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    query = _build(
        schemas.KeyQuery,
        owner=args.owner,
        project=args.project,
        status=args.status,
        q=args.q,
        limit=args.limit,
        cursor=args.cursor,
    )
    page = _admin(args, lambda admin: admin.call(ops.list_keys, query=query))
    if args.json:
        _print_json(page)
        return 0
    rows = [
        [
            k.id,
            k.name,
            k.start,
            k.principal,
            k.project,
            _fmt_time(k.created_at),
            _fmt_time(k.expires_at),
            _fmt_time(k.last_used_at),
            k.status,
        ]
        for k in page.items
    ]
    print(
        _table(["id", "name", "start", "owner", "project", "created", "expires", "last used", "status"], rows)
    )
    _more(page.next_cursor)
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    _show_key(args, _admin(args, lambda admin: admin.call(ops.get_key, key_id=args.key_id)))
    return 0


def cmd_keys_update(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {}
    if args.name is not None:
        changes["name"] = args.name
    if args.no_expiry:
        changes["expires_at"] = None
    elif args.expires_in is not None:
        changes["expires_at"] = time.time() + (_duration(args.expires_in, "--expires-in") or 0)
    if args.all_scopes:
        changes["scopes"] = None
    elif args.scopes is not None:
        changes["scopes"] = _csv(args.scopes)
    if args.metadata is not None:
        changes["metadata"] = _pairs(args.metadata, "--metadata")
    if not changes:
        raise Fail("keystile: nothing to change: give --name, --expires-in, --no-expiry, --scopes, ...", 2)
    body = _build(schemas.KeyUpdate, **changes)
    _show_key(args, _admin(args, lambda admin: admin.call(ops.update_key, body=body, key_id=args.key_id)))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    key = _admin(args, lambda admin: admin.call(ops.revoke_key, key_id=args.key_id))
    if args.json:
        _print_json(key)
    else:
        print(f"revoked {key.id} ({shown(key.name)}); it stays listed as revoked")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    body = _build(schemas.KeyRotate, grace_seconds=_duration(args.grace, "--grace") or 0)
    created = _admin(
        args, lambda admin: admin.call(ops.rotate_key, body=body, key_id=args.key_id), need_secret=True
    )
    if args.json:
        _print_json(created)
        return 0
    print(f"key:  {created.key}")
    print(f"id:   {created.id}")
    until = created.previous_valid_until
    print(
        "the previous secret stopped working"
        if until is None
        else f"the previous secret works until {_fmt_time(until)} UTC",
        file=sys.stderr,
    )
    print("Store the key now: it is shown only once.", file=sys.stderr)
    return 0


def cmd_keys_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        k = _admin(args, lambda admin: admin.call(ops.get_key, key_id=args.key_id))
        _confirm(args, k.id, shown(f"key {k.id} ({k.name}, {k.principal}/{k.project})"))
    _admin(args, lambda admin: admin.call(ops.delete_key, key_id=args.key_id))
    print(f"deleted key {args.key_id}", file=sys.stderr)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    query = _build(
        schemas.AuditQuery,
        key_id=args.key,
        principal=args.principal,
        since=_when(args.since, "--since"),
        until=_when(args.until, "--until"),
        limit=args.limit,
        cursor=args.cursor,
    )
    page = _admin(args, lambda admin: admin.call(ops.list_audit, query=query))
    if args.json:
        _print_json(page)
        return 0
    rows = [[_fmt_time(e.at), e.actor, e.action, e.target_id] for e in page.items]
    print(_table(["time", "actor", "action", "target"], rows))
    _more(page.next_cursor)
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
    s.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="worker processes sharing the ports (SO_REUSEPORT); 'auto': one per usable CPU",
    )
    s.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)
    s.add_argument("--metrics-dir", help=argparse.SUPPRESS)
    s.add_argument("--runtime-dir", help=argparse.SUPPRESS)  # a worker: the supervisor's directory
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

    def admin_command(
        parent: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = with_config(parent.add_parser(name, help=help))
        sp.add_argument(
            "--admin-url",
            help=f"a running admin API, e.g. http://127.0.0.1:8081 (${config_mod.ADMIN_URL_ENV})",
        )
        sp.add_argument("--token", help=f"admin token for --admin-url (${config_mod.ADMIN_TOKEN_ENV})")
        sp.add_argument("--json", action="store_true", help="print JSON for scripts")
        sp.set_defaults(fn=fn)
        return sp

    pr = sub.add_parser(
        "principals",
        help="manage principals (users, service accounts) and their grants",
        description=ADMIN_MODES,
    ).add_subparsers(dest="sub", required=True)
    pc = admin_command(pr, "create", cmd_principals_create, "create a principal")
    pc.add_argument("name")
    pc.add_argument("--kind", choices=["user", "service"], default="user")
    pc.add_argument("--grant", action="append", metavar="PROJECT=SCOPES", help="repeatable; SCOPES a,b,c")
    pc.add_argument("--metadata", action="append", metavar="NAME=VALUE")
    pl = admin_command(pr, "list", cmd_principals_list, "list principals by name")
    pl.add_argument("--limit", type=int, default=100)
    pl.add_argument("--cursor")
    admin_command(pr, "show", cmd_principals_show, "show a principal").add_argument("principal")
    pu = admin_command(pr, "update", cmd_principals_update, "replace a principal's grants or metadata")
    pu.add_argument("principal", help="id or name")
    pu.add_argument(
        "--grant",
        action="append",
        metavar="PROJECT=SCOPES",
        help="repeatable; the grants given replace all others, for every key at once",
    )
    pu.add_argument("--no-grants", action="store_true", help="remove every grant")
    pu.add_argument("--metadata", action="append", metavar="NAME=VALUE", help="replaces all metadata")
    admin_command(pr, "disable", cmd_principals_disable, "disable: all its keys stop working").add_argument(
        "principal"
    )
    admin_command(pr, "enable", cmd_principals_enable, "enable again: its keys work again").add_argument(
        "principal"
    )
    pd = admin_command(pr, "delete", cmd_principals_delete, "delete a principal (asks to confirm)")
    pd.add_argument("principal", help="id or name")
    pd.add_argument("--with-keys", action="store_true", help="also delete its keys (else refused if any)")
    pd.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    k = sub.add_parser("keys", help="manage API keys", description=ADMIN_MODES).add_subparsers(
        dest="sub", required=True
    )
    kc = admin_command(k, "create", cmd_keys_create, "create a key (printed once)")
    kc.add_argument("--owner", required=True, help="principal name or id (created if missing)")
    kc.add_argument("--project", required=True)
    kc.add_argument("--name")
    kc.add_argument("--scopes", help="comma-separated; narrows the owner's grant")
    kc.add_argument("--expires-in", help="e.g. 30d, 12h")
    kc.add_argument("--env", choices=ENVIRONMENTS)
    kl = admin_command(k, "list", cmd_keys_list, "list keys, newest first")
    kl.add_argument("--owner")
    kl.add_argument("--project")
    kl.add_argument("--status", choices=["active", "expired", "revoked"])
    kl.add_argument("--q", help="name contains (case-insensitive)")
    kl.add_argument("--limit", type=int, default=100)
    kl.add_argument("--cursor")
    admin_command(k, "show", cmd_keys_show, "show a key").add_argument("key_id")
    ku = admin_command(k, "update", cmd_keys_update, "change a key's name, expiry, scopes or metadata")
    ku.add_argument("key_id")
    ku.add_argument("--name")
    ku.add_argument("--expires-in", help="new expiry from now, e.g. 30d")
    ku.add_argument("--no-expiry", action="store_true", help="remove the expiry")
    ku.add_argument("--scopes", help="comma-separated; narrows the owner's grant")
    ku.add_argument("--all-scopes", action="store_true", help="remove the narrowing")
    ku.add_argument("--metadata", action="append", metavar="NAME=VALUE", help="replaces all metadata")
    admin_command(k, "revoke", cmd_keys_revoke, "revoke a key (kept, listed as revoked)").add_argument(
        "key_id"
    )
    kr = admin_command(k, "rotate", cmd_keys_rotate, "new secret, same settings (printed once)")
    kr.add_argument("key_id")
    kr.add_argument("--grace", help="the old secret keeps working this long, e.g. 1h (at most 24h)")
    kd = admin_command(k, "delete", cmd_keys_delete, "delete a key for good (asks to confirm)")
    kd.add_argument("key_id")
    kd.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    au = admin_command(sub, "audit", cmd_audit, "list lifecycle changes, newest first")
    au.add_argument("--key", help="key id")
    au.add_argument("--principal", help="principal id or name")
    au.add_argument("--since", help="UNIX seconds, ISO 8601 time, or a duration ago (2h)")
    au.add_argument("--until", help="UNIX seconds, ISO 8601 time, or a duration ago")
    au.add_argument("--limit", type=int, default=100)
    au.add_argument("--cursor")
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
