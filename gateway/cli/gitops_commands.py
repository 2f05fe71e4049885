"""The ``export`` and ``apply`` commands: identities as a file kept in git, the way decK keeps Kong's.

Owns: reading a store's whole state through the admin operations (``current_state``), writing it
as the file (``export``), and applying a file: its problems told first, the whole plan computed
before the first write, each step run as an admin operation and printed as it is done (``apply``,
``--dry-run`` prints and changes nothing). Must not: hold the file's shape (``desired_state``) or
the plan's rules (``state_plan``), or reach the API or the store other than through
``admin_commands.with_admin`` (the same two ways, the same refusals, audited as any admin write).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import msgspec

from gateway.admin import access_operations as acc
from gateway.admin import access_schemas as a
from gateway.admin import operations as ops
from gateway.admin import schemas
from gateway.admin.client import Admin
from gateway.admin.desired_state import State, StateError, read, state_of, to_data, write
from gateway.admin.state_plan import Plan, Refused, plan
from gateway.cli.admin_commands import with_admin
from gateway.cli.output import print_json, shown
from gateway.cli.runner import Fail
from gateway.clock import SYSTEM

PAGE = 500


async def current_state(admin: Admin) -> State:
    """Everything the file describes, as the store holds it now (listings read page by page)."""
    principals: list[schemas.PrincipalView] = []
    cursor: str | None = None
    while True:
        page = await admin.call(ops.list_principals, query=schemas.PrincipalQuery(limit=PAGE, cursor=cursor))
        principals += page.items
        if (cursor := page.next_cursor) is None:
            break
    keys: list[schemas.KeyView] = []
    cursor = None
    while True:
        kpage = await admin.call(ops.list_keys, query=schemas.KeyQuery(limit=PAGE, cursor=cursor))
        keys += kpage.items
        if (cursor := kpage.next_cursor) is None:
            break
    roles: list[a.RoleView] = []
    policies: list[tuple[a.PolicyView, bool]] = []
    for project in (await admin.call(acc.list_projects)).items:
        roles += (await admin.call(acc.list_roles, project=project.project)).items
        if project.policy:
            policies.append((await admin.call(acc.get_project_policy, project=project.project), True))
    return state_of(principals, roles, policies, keys)


def cmd_export(args: argparse.Namespace) -> int:
    state = with_admin(args, current_state)
    text = (
        msgspec.json.format(msgspec.json.encode(to_data(state))).decode() + "\n"
        if args.json
        else write(state)
    )
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        counts = f"{len(state.principals)} principal(s), {len(state.keys)} key(s)"
        print(f"wrote {counts} to {shown(args.output)}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _desired(path: str) -> State:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise Fail(f"{path}: cannot read: {e.strerror}", 2) from None
    try:
        return read(text, path)
    except StateError as e:
        raise Fail("\n".join(shown(p) for p in e.problems), 2) from None


def cmd_apply(args: argparse.Namespace) -> int:
    desired = _desired(args.file)
    done: list[str] = []

    async def main(admin: Admin) -> Plan:
        state = await current_state(admin)
        todo = plan(state, desired, SYSTEM.time(), missing_keys_ok=args.skip_missing_keys)  # before any write
        if args.dry_run:
            return todo
        for step in todo.steps:
            await admin.call(step.operation, body=step.body, query=step.query, **step.params)
            for line in step.lines:
                done.append(line)
                if not args.json:
                    print(shown(line), flush=True)
        return todo

    try:
        todo = with_admin(args, main)
    except Refused as e:
        raise Fail(
            "\n".join(f"{args.file}: {shown(p)}" for p in e.problems) + "\nnothing was changed"
        ) from None
    except Fail as e:  # a step the store refused: what was applied before it stays applied
        if done:
            raise Fail(f"{e}\n(applied before it: {len(done)} change(s), listed above)", e.code) from None
        raise
    if args.json:
        print_json(
            _Outcome(
                changes=todo.lines, applied=not args.dry_run, untouched=todo.untouched, missing=todo.missing
            )
        )
        return 0
    if args.dry_run:
        for line in todo.lines:
            print(shown(line))
    if not todo.steps:
        print("no changes")
    for note in todo.untouched:
        print(f"note: {shown(note)}", file=sys.stderr)
    for note in todo.missing:
        print(f"note: {args.file}: {shown(note)}: skipped", file=sys.stderr)
    if args.dry_run and todo.steps:
        print("dry run: nothing was changed", file=sys.stderr)
    return 0


class _Outcome(msgspec.Struct):
    changes: list[str]
    applied: bool
    untouched: list[str]
    missing: list[str]


def add_commands(sub: Any, admin_command: Any, admin_modes: str) -> None:
    """``export`` and ``apply``, with ``parser.build_parser``'s helpers."""
    ex = admin_command(
        sub,
        "export",
        cmd_export,
        "write principals, roles, project policies and key metadata as TOML (never secrets)",
    )
    ex.description = admin_modes
    ex.add_argument("--output", "-o", metavar="FILE", help="write to FILE (default: standard output)")
    ap = admin_command(
        sub,
        "apply",
        cmd_apply,
        "make principals, roles and project policies match a file (keys: metadata only)",
    )
    ap.description = admin_modes
    ap.add_argument("file", help="a file written by keystile export (TOML)")
    ap.add_argument("--dry-run", action="store_true", help="print the changes and make none")
    ap.add_argument(
        "--skip-missing-keys",
        action="store_true",
        help="report keys of the file the store lacks instead of refusing (e.g. another store's export)",
    )
