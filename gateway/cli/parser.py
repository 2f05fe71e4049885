"""The ``keystile`` argument parser: every command, its flags and its help.

Owns: ``build_parser`` (each subcommand set to the function that runs it, ``fn``). Must not: run
anything or read the environment (defaults that come from it are resolved by the commands).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from gateway import __version__
from gateway import config as config_mod
from gateway.cli import access_commands, flags, gitops_commands
from gateway.cli.admin_commands import (
    ADMIN_MODES,
    cmd_audit,
    cmd_keys_create,
    cmd_keys_delete,
    cmd_keys_list,
    cmd_keys_revoke,
    cmd_keys_rotate,
    cmd_keys_show,
    cmd_keys_update,
    cmd_principals_create,
    cmd_principals_delete,
    cmd_principals_disable,
    cmd_principals_enable,
    cmd_principals_list,
    cmd_principals_show,
    cmd_principals_update,
)
from gateway.cli.limit_commands import add_commands as add_limit_commands
from gateway.cli.server_commands import (
    cmd_config_check,
    cmd_demo,
    cmd_echo,
    cmd_migrate,
    cmd_reload,
    cmd_secret,
    cmd_serve,
)
from gateway.keys import ENVIRONMENTS
from gateway.models import AUDIT_SOURCES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keystile", description="API-key authentication gateway")
    p.add_argument("--version", action="version", version=f"keystile {__version__}")
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
        type=flags.workers,
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
    cc.add_argument("file", help="the TOML config file to check")
    cc.add_argument("--quiet", "-q", action="store_true", help="print nothing; only the exit code tells")
    cc.set_defaults(fn=cmd_config_check)

    with_config(sub.add_parser("migrate", help="apply database migrations")).set_defaults(fn=cmd_migrate)
    rl = sub.add_parser("reload", help="make a running server re-read its config (SIGHUP) and report")
    rl.add_argument("--pid-file", required=True, help="the file given to serve --pid-file")
    rl.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the server's answer (default 30)"
    )
    rl.set_defaults(fn=cmd_reload)
    se = with_config(
        sub.add_parser(
            "secret",
            help="print a new random secret (for KEYSTILE_KEY_HASH_SECRET); 'status': keys per secret",
        )
    )
    se.add_argument(
        "action",
        nargs="?",
        choices=["status"],
        help="status: how many keys still depend on a previous hash secret (during a rotation)",
    )
    se.add_argument("--json", action="store_true", help="print JSON for scripts")
    se.set_defaults(fn=cmd_secret)

    d = sub.add_parser("demo", help="run Keystile in front of a built-in echo upstream")
    d.add_argument("--port", type=int, default=8080, help="the proxy's port (default 8080)")
    d.add_argument("--admin-port", type=int, default=8081, help="the admin API's port (default 8081)")
    d.add_argument("--console-port", type=int, default=8082, help="the console's port (default 8082)")
    d.set_defaults(fn=cmd_demo)
    e = sub.add_parser("echo", help="run a local upstream that answers with what it received (for trials)")
    e.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    e.add_argument("--port", type=int, default=9000, help="port (default 9000, the quickstart config's)")
    e.set_defaults(fn=cmd_echo)

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
    pc.add_argument("name", help="unique name")
    pc.add_argument("--kind", choices=["user", "service"], default="user", help="default: user")
    pc.add_argument("--grant", action="append", metavar="PROJECT=SCOPES", help="repeatable; SCOPES a,b,c")
    pc.add_argument("--metadata", action="append", metavar="NAME=VALUE", help="repeatable free-form pairs")
    pc.add_argument("--role", action="append", metavar="PROJECT=ROLES", help="repeatable; ROLES a,b")
    pl = admin_command(pr, "list", cmd_principals_list, "list principals by name")
    pl.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    pl.add_argument("--cursor", help="continue a listing where the previous page ended")
    admin_command(pr, "show", cmd_principals_show, "show a principal").add_argument(
        "principal", help="id or name"
    )
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
    pu.add_argument(
        "--role", action="append", metavar="PROJECT=ROLES", help="repeatable; replaces every role held"
    )
    pu.add_argument("--no-roles", action="store_true", help="give up every role")
    admin_command(pr, "disable", cmd_principals_disable, "disable: all its keys stop working").add_argument(
        "principal", help="id or name"
    )
    admin_command(pr, "enable", cmd_principals_enable, "enable again: its keys work again").add_argument(
        "principal", help="id or name"
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
    kc.add_argument("--project", required=True, help="the project the key works in")
    kc.add_argument("--name", help="unique per owner and project (default: API Key name <UTC time>)")
    kc.add_argument("--scopes", help="comma-separated; narrows the owner's grant (must be granted)")
    kc.add_argument("--expires-in", help="a duration: seconds, or 30d, 12h, 90m")
    kc.add_argument("--env", choices=ENVIRONMENTS, help="the key's environment (default: keys.default_env)")
    kl = admin_command(k, "list", cmd_keys_list, "list keys, newest first")
    kl.add_argument("--owner", help="principal name or id")
    kl.add_argument("--project", help="only keys of this project")
    kl.add_argument("--status", choices=["active", "expired", "revoked"], help="only keys in this status")
    kl.add_argument("--search", dest="q", metavar="TEXT", help="name contains (case-insensitive)")
    kl.add_argument("--q", dest="q", help=argparse.SUPPRESS)  # the old spelling
    kl.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    kl.add_argument("--cursor", help="continue a listing where the previous page ended")
    admin_command(k, "show", cmd_keys_show, "show a key").add_argument("key_id", help="key id")
    ku = admin_command(k, "update", cmd_keys_update, "change a key's name, expiry, scopes or metadata")
    ku.add_argument("key_id", help="key id")
    ku.add_argument("--name", help="new name")
    ku.add_argument("--expires-in", help="new expiry from now: seconds, or 30d, 12h, 90m")
    ku.add_argument("--expire-now", action="store_true", help="expire it at once (kept, listed as expired)")
    ku.add_argument("--no-expiry", action="store_true", help="remove the expiry")
    ku.add_argument("--scopes", help="comma-separated; narrows the owner's grant")
    ku.add_argument("--all-scopes", action="store_true", help="remove the narrowing")
    ku.add_argument("--metadata", action="append", metavar="NAME=VALUE", help="replaces all metadata")
    admin_command(k, "revoke", cmd_keys_revoke, "revoke a key (kept, listed as revoked)").add_argument(
        "key_id", help="key id"
    )
    kr = admin_command(k, "rotate", cmd_keys_rotate, "new secret, same settings (printed once)")
    kr.add_argument("key_id", help="key id")
    kr.add_argument(
        "--grace",
        help="the old secret keeps working this long: seconds, or 1h (at most policy.max_rotation_grace)",
    )
    kd = admin_command(k, "delete", cmd_keys_delete, "delete a key for good (asks to confirm)")
    kd.add_argument("key_id", help="key id")
    kd.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    add_limit_commands(sub, admin_command)

    au = admin_command(sub, "audit", cmd_audit, "list lifecycle changes, newest first")
    au.add_argument("--key", help="key id")
    au.add_argument("--principal", help="principal id or name")
    au.add_argument("--source", choices=AUDIT_SOURCES, help="where the change came from")
    au.add_argument("--since", help="UNIX seconds, ISO 8601 time, or a duration ago (2h)")
    au.add_argument("--until", help="UNIX seconds, ISO 8601 time, or a duration ago")
    au.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    au.add_argument("--cursor", help="continue a listing where the previous page ended")
    access_commands.add_commands(sub, admin_command, ADMIN_MODES)
    gitops_commands.add_commands(sub, admin_command, ADMIN_MODES)
    _own_usage(p)
    return p


def _own_usage(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command its own parser as ``args.parser``, so that a usage error found after
    parsing is told with that command's usage rather than the top level's."""
    parser.set_defaults(parser=parser)  # a subcommand's defaults are applied after its parent's
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _own_usage(child)
