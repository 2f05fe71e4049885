"""The ``principals``, ``keys`` and ``audit`` commands: the admin operations from a terminal.

Owns: each command's flags turned into the admin API's own request Structs (``build``: checked as
the API checks a body), where they go (``ADMIN_MODES``: a running admin API, or the store itself
for bootstrap) and what is printed of the answer (``output``). Both ways run the same operations
through one client interface (``gateway.admin.client.Admin``) and refuse alike. Must not: hold
lifecycle rules (``gateway.lifecycle`` does) or read the environment itself (``gateway.config``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiohttp
import msgspec

from gateway import config as config_mod
from gateway import hash_secrets
from gateway.admin import operations as ops
from gateway.admin import schemas
from gateway.admin.client import Admin, AdminClient, AdminError, Operation, StoreAdmin
from gateway.cli import flags
from gateway.cli.output import (
    AUDIT_COLUMNS,
    KEY_COLUMNS,
    PRINCIPAL_COLUMNS,
    Page,
    audit_row,
    fmt_time,
    key_fields,
    key_row,
    principal_fields,
    principal_row,
    print_json,
    print_page,
    refusal,
    show,
    shown,
)
from gateway.cli.runner import Fail, load, run, with_store
from gateway.config import Config
from gateway.lifecycle import Lifecycle
from gateway.models import Actor, Invalidation
from gateway.store import Store

T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)

ADMIN_MODES = f"""These commands use a running admin API (--admin-url and --token, or
{config_mod.ADMIN_URL_ENV} and {config_mod.ADMIN_TOKEN_ENV}) or, to bootstrap, the store itself:
--config FILE always means the store; without it, an admin URL means the API, else the store of
{config_mod.CONFIG_ENV} (or the defaults). Prefer the API while a gateway runs: it drops changed keys
from its cache at once; store-mode changes reach running gateways at once through Redis when one
is configured, else when they next read the store's invalidation outbox (cache.sync_interval)."""


# -- reaching the operations ---------------------------------------------------------------


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


# An API field -> the flag an operator gave it with: refusals name what was typed.
FLAG_OF = {
    "grace_seconds": "--grace",
    "expires_in": "--expires-in",
    "expires_at": "--expires-in",
    "scopes": "--scopes",
    "grants": "--grant",
    "metadata": "--metadata",
    "owner": "--owner",
    "project": "--project",
    "env": "--env",
    "q": "--search",
    "key_id": "--key",
    "with_keys": "--with-keys",
    "since": "--since",
    "until": "--until",
    "limit": "--limit",
    "cursor": "--cursor",
}
_API_WORDS = {"with_keys=true": "--with-keys", "expires_at or expires_in": "--expires-in or --no-expiry"}


def _flag(field: str | None) -> str | None:
    """``grace_seconds`` -> ``--grace``; ``grants.billing`` -> ``--grant billing``."""
    if field is None:
        return None
    head, dot, rest = field.partition(".")
    flag = FLAG_OF.get(head)
    if flag is None:
        return field
    return f"{flag} {rest}" if dot else flag


def _refusal(e: AdminError) -> str:
    message = str(e)
    for api, cli in _API_WORDS.items():
        message = message.replace(api, cli)
    return refusal(_flag(e.field), message, e.error)


def with_admin(
    args: argparse.Namespace, fn: Callable[[Admin], Awaitable[T]], *, need_secret: bool = False
) -> T:
    """Run ``fn`` against the admin API or, for bootstrap, straight against the store.

    Both ways refuse alike (``AdminError``); store mode writes with the actor ``cli`` and tells
    running gateways through Redis when one is configured (see ``ADMIN_MODES``).
    """
    target = _admin_target(args)
    loaded = None if target is not None else load(args, need_secret=need_secret)

    async def main() -> T:
        if target is not None:
            async with AdminClient(*target, source="cli") as client:
                return await fn(client)
        assert loaded is not None
        cfg, secrets = loaded

        async def publish(change: Invalidation) -> None:
            await _publish(cfg, change)

        async def on_store(store: Store) -> T:
            if need_secret:  # keys are hashed here: with the store's secret only
                await hash_secrets.check(store, secrets, time.time())
            lifecycle = Lifecycle(
                cfg, secrets.hash_secret, store, invalidate=publish if cfg.redis.url else None
            )
            return await fn(StoreAdmin(ops.Context(lifecycle, Actor("cli", "cli"))))

        return await with_store(cfg, on_store)

    try:
        return run(main())
    except AdminError as e:
        raise Fail(_refusal(e)) from None
    except (aiohttp.ClientError, TimeoutError) as e:
        if target is None:
            raise
        raise Fail(f"keystile: cannot reach the admin API at {target[0]}: {e or type(e).__name__}") from None


def call(
    args: argparse.Namespace,
    operation: Operation[T],
    *,
    body: msgspec.Struct | None = None,
    query: msgspec.Struct | None = None,
    need_secret: bool = False,
    **params: str,
) -> T:
    """One admin operation (``with_admin`` for one call)."""
    return with_admin(
        args, lambda admin: admin.call(operation, body=body, query=query, **params), need_secret=need_secret
    )


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


def build(typ: type[S], **fields: Any) -> S:
    """A request Struct from flag values, checked exactly as the API checks a body."""
    try:
        return msgspec.convert({k: v for k, v in fields.items() if v is not msgspec.UNSET}, typ)
    except msgspec.ValidationError as e:  # a flag value the API's own types refuse: usage
        err = AdminError.from_exception(e)
        assert err is not None
        raise Fail(_refusal(err), 2) from None


def from_flags(typ: type[S], args: argparse.Namespace, **values: Any) -> S:
    """A request Struct from the flags named as its fields, and ``values`` for the others."""
    named = {f: values[f] if f in values else getattr(args, f, msgspec.UNSET) for f in typ.__struct_fields__}
    return build(typ, **named)  # a field with neither stays at its default


def _confirm(args: argparse.Namespace, expected: str, what: str) -> None:
    if args.yes:
        return
    print(f"This deletes {what} for good. Type {expected} to confirm: ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip() != expected:
        raise Fail("keystile: not confirmed; nothing was deleted")


def _print_issued(created: schemas.IssuedKey) -> None:
    print(f"key:  {created.key}")
    print(f"id:   {created.id}")


# -- commands that are one operation --------------------------------------------------------

Command = Callable[[argparse.Namespace], int]


def showing(operation: Operation[S], param: str, fields: Callable[[S], list[tuple[str, str]]]) -> Command:
    """A command running ``operation`` on the record its argument ``param`` names; prints it."""

    def command(args: argparse.Namespace) -> int:
        show(call(args, operation, **{param: getattr(args, param)}), args.json, fields)
        return 0

    return command


def listing(
    operation: Operation[Page[S]],
    query: type[msgspec.Struct],
    columns: Sequence[str],
    row: Callable[[S], list[str]],
) -> Command:
    """A command listing a page of ``operation``, its query taken from the flags of its names."""

    def command(args: argparse.Namespace) -> int:
        print_page(call(args, operation, query=from_flags(query, args)), args.json, columns, row)
        return 0

    return command


cmd_principals_show = showing(ops.get_principal, "principal", principal_fields)
cmd_principals_disable = showing(ops.disable_principal, "principal", principal_fields)
cmd_principals_enable = showing(ops.enable_principal, "principal", principal_fields)
cmd_principals_list = listing(ops.list_principals, schemas.PrincipalQuery, PRINCIPAL_COLUMNS, principal_row)
cmd_keys_show = showing(ops.get_key, "key_id", key_fields)
cmd_keys_list = listing(ops.list_keys, schemas.KeyQuery, KEY_COLUMNS, key_row)


# -- principals ------------------------------------------------------------------------------


def cmd_principals_create(args: argparse.Namespace) -> int:
    body = build(
        schemas.PrincipalCreate,
        name=args.name,
        kind=args.kind,
        grants=flags.grants(args.grant) or {},
        metadata=flags.pairs(args.metadata, "--metadata") or {},
        roles=flags.grants(args.role, "--role") or {},
    )
    show(call(args, ops.create_principal, body=body), args.json, principal_fields)
    return 0


def cmd_principals_update(args: argparse.Namespace) -> int:
    grants: Any = {} if args.no_grants else flags.grants(args.grant)
    metadata = flags.pairs(args.metadata, "--metadata")
    roles: Any = {} if args.no_roles else flags.grants(args.role, "--role")
    if grants is None and metadata is None and roles is None:
        raise Fail(
            "keystile: nothing to change: give --grant, --no-grants, --role, --no-roles or --metadata", 2
        )
    body = build(
        schemas.PrincipalUpdate,
        grants=msgspec.UNSET if grants is None else grants,
        metadata=msgspec.UNSET if metadata is None else metadata,
        roles=msgspec.UNSET if roles is None else roles,
    )
    show(call(args, ops.update_principal, body=body, principal=args.principal), args.json, principal_fields)
    return 0


def cmd_principals_delete(args: argparse.Namespace) -> int:
    query = build(schemas.PrincipalDeleteQuery, with_keys=args.with_keys)
    if not args.yes:
        p = call(args, ops.get_principal, principal=args.principal)
        what = f"principal {shown(p.name)} ({p.id})" + (" and all of its keys" if args.with_keys else "")
        _confirm(args, p.name, what)
    call(args, ops.delete_principal, query=query, principal=args.principal)
    print(f"deleted principal {args.principal}", file=sys.stderr)
    return 0


# -- keys ------------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    scopes = flags.csv_list(args.scopes)

    async def main(admin: Admin) -> tuple[schemas.IssuedKey, list[str]]:
        notes = []
        try:
            principal = await admin.call(ops.get_principal, principal=args.owner)
        except AdminError as e:
            if e.status != 404:
                raise
            grant = build(schemas.PrincipalCreate, name=args.owner, grants={args.project: scopes or []})
            principal = await admin.call(ops.create_principal, body=grant)
            granted_text = ",".join(scopes or []) or "(no scopes)"
            notes.append(f"created principal {principal.name} with grant {args.project}: {granted_text}")
        if args.project not in principal.grants and scopes is None:
            notes.append(
                f"warning: {principal.name} has no grant in project {args.project}; "
                "the key will get 403 on routes that require one"
            )
        body = build(
            schemas.KeyCreate,
            owner=principal.id,
            project=args.project,
            name=args.name,
            scopes=scopes,
            expires_in=flags.parse_expiry(args.expires_in),
            env=args.env,
        )
        return await admin.call(ops.create_key, body=body), notes

    created, notes = with_admin(args, main, need_secret=True)
    for n in notes:
        print(shown(n), file=sys.stderr)
    if args.json:
        print_json(created)
    else:
        _print_issued(created)
        print(f"name: {shown(created.name)}")
        print("Store the key now: it is shown only once.", file=sys.stderr)
    return 0


def cmd_keys_update(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {}
    if args.name is not None:
        changes["name"] = args.name
    given = [
        f
        for f, on in (
            ("--no-expiry", args.no_expiry),
            ("--expire-now", args.expire_now),
            ("--expires-in", args.expires_in is not None),
        )
        if on
    ]
    if len(given) > 1:
        raise Fail(f"keystile: give one of {', '.join(given)}", 2)
    if args.no_expiry:
        changes["expires_at"] = None
    elif args.expire_now:
        changes["expires_in"] = 0
    elif args.expires_in is not None:
        changes["expires_in"] = flags.duration(args.expires_in, "--expires-in")
    if args.all_scopes:
        changes["scopes"] = None
    elif args.scopes is not None:
        changes["scopes"] = flags.csv_list(args.scopes)
    if args.metadata is not None:
        changes["metadata"] = flags.pairs(args.metadata, "--metadata")
    if not changes:
        raise Fail(
            "keystile: nothing to change: give --name, --expires-in, --expire-now, --no-expiry, --scopes, "
            "--all-scopes or --metadata",
            2,
        )
    body = build(schemas.KeyUpdate, **changes)
    show(call(args, ops.update_key, body=body, key_id=args.key_id), args.json, key_fields)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    key = call(args, ops.revoke_key, key_id=args.key_id)
    if args.json:
        print_json(key)
    else:
        print(f"revoked {key.id} ({shown(key.name)}); it stays listed as revoked")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    body = build(schemas.KeyRotate, grace_seconds=flags.duration(args.grace, "--grace") or 0)
    created = call(args, ops.rotate_key, body=body, need_secret=True, key_id=args.key_id)
    if args.json:
        print_json(created)
        return 0
    _print_issued(created)
    until = created.previous_valid_until
    print(
        "the previous secret stopped working"
        if until is None
        else f"the previous secret works until {fmt_time(until)} UTC",
        file=sys.stderr,
    )
    print("Store the key now: it is shown only once.", file=sys.stderr)
    return 0


def cmd_keys_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        k = call(args, ops.get_key, key_id=args.key_id)
        _confirm(args, k.id, shown(f"key {k.id} ({k.name}, {k.principal}/{k.project})"))
    call(args, ops.delete_key, key_id=args.key_id)
    print(f"deleted key {args.key_id}", file=sys.stderr)
    return 0


# -- audit -----------------------------------------------------------------------------------


def cmd_audit(args: argparse.Namespace) -> int:
    since, until = flags.when(args.since, "--since"), flags.when(args.until, "--until")
    query = from_flags(schemas.AuditQuery, args, key_id=args.key, since=since, until=until)
    print_page(call(args, ops.list_audit, query=query), args.json, AUDIT_COLUMNS, audit_row)
    return 0
