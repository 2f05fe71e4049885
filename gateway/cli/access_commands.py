"""The ``roles`` and ``policy`` commands: a project's roles and its own key policy from a terminal.

Owns: those commands' flags turned into the admin API's request Structs and what is printed of
the answers. Must not: hold policy (``gateway.lifecycle``) or reach the API or the store other
than through ``admin_commands.call`` (the same two ways, the same refusals).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from gateway.admin import access_operations as acc
from gateway.admin import access_schemas as a
from gateway.cli import flags
from gateway.cli.admin_commands import _confirm, build, call
from gateway.cli.output import print_json, print_page, show, shown
from gateway.cli.runner import Fail
from gateway.policies import duration_text

ROLE_COLUMNS = ("name", "scopes", "description")


def role_fields(r: a.RoleView) -> list[tuple[str, str]]:
    return [
        ("project", r.project),
        ("name", r.name),
        ("scopes", ",".join(r.scopes) or "(none)"),
        ("description", r.description or "-"),
    ]


def policy_fields(p: a.PolicyView) -> list[tuple[str, str]]:
    def src(field: str) -> str:
        return {
            "project": "set for the project",
            "config.project": "[policy.projects]",
            "config": "[policy]",
        }[p.sources[field]]

    return [
        ("project", p.project),
        ("max_active_keys", f"{p.max_active_keys}  ({src('max_active_keys')})"),
        ("default_lifetime", f"{duration_text(p.default_lifetime)}  ({src('default_lifetime')})"),
        ("max_lifetime", f"{duration_text(p.max_lifetime)}  ({src('max_lifetime')})"),
        ("max_rotation_grace", f"{duration_text(p.max_rotation_grace)}  ({src('max_rotation_grace')})"),
    ]


# -- roles -------------------------------------------------------------------------------------


def cmd_roles_list(args: argparse.Namespace) -> int:
    roles = call(args, acc.list_roles, project=args.project)
    print_page(
        _Listing(roles.items),
        args.json,
        ROLE_COLUMNS,
        lambda r: [r.name, ",".join(r.scopes), r.description],
    )
    return 0


class _Listing(msgspec.Struct):
    items: list[a.RoleView]
    next_cursor: str | None = None


def cmd_roles_show(args: argparse.Namespace) -> int:
    show(call(args, acc.get_role, project=args.project, role=args.role), args.json, role_fields)
    return 0


def cmd_roles_set(args: argparse.Namespace) -> int:
    body = build(a.RolePut, scopes=flags.csv_list(args.scopes) or [], description=args.description or "")
    show(call(args, acc.put_role, body=body, project=args.project, role=args.role), args.json, role_fields)
    return 0


def cmd_roles_delete(args: argparse.Namespace) -> int:
    _confirm(args, args.role, shown(f"role {args.role} of project {args.project} (its holders lose it)"))
    call(args, acc.delete_role, project=args.project, role=args.role)
    print(f"deleted role {shown(args.role)} of {shown(args.project)}", file=sys.stderr)
    return 0


# -- per-project policies ----------------------------------------------------------------------


def _lifetime(text: str | None, flag: str) -> Any:
    """A duration flag: ``none`` is null (no default / no maximum), absent leaves it to the config."""
    if text is None:
        return msgspec.UNSET
    if text.lower() == "none":
        return None
    return flags.duration(text, flag)


def cmd_policy_show(args: argparse.Namespace) -> int:
    show(call(args, acc.get_project_policy, project=args.project), args.json, policy_fields)
    return 0


def cmd_policy_set(args: argparse.Namespace) -> int:
    grace = flags.duration(args.max_rotation_grace, "--max-rotation-grace")
    values = {
        "max_active_keys": msgspec.UNSET if args.max_active_keys is None else args.max_active_keys,
        "default_lifetime": _lifetime(args.default_lifetime, "--default-lifetime"),
        "max_lifetime": _lifetime(args.max_lifetime, "--max-lifetime"),
        "max_rotation_grace": msgspec.UNSET if grace is None else grace,
    }
    if all(v is msgspec.UNSET for v in values.values()):
        raise Fail(
            "keystile: nothing to set: give --max-active-keys, --default-lifetime, --max-lifetime "
            "or --max-rotation-grace (policy clear forgets the project's values)",
            2,
        )
    body = build(a.ProjectPolicyPut, **values)
    result = call(args, acc.set_project_policy, body=body, project=args.project)
    show(result, args.json, policy_fields)
    return 0


def cmd_policy_clear(args: argparse.Namespace) -> int:
    result = call(args, acc.clear_project_policy, project=args.project)
    if args.json:
        print_json(result)
    else:
        print(f"project {shown(args.project)} follows the config again:", file=sys.stderr)
        show(result, False, policy_fields)
    return 0


def add_commands(sub: Any, admin_command: Any, admin_modes: str) -> None:
    """The ``roles`` and ``policy`` command groups, with ``parser.build_parser``'s helpers."""
    ro = sub.add_parser(
        "roles", help="a project's roles: named sets of scopes", description=admin_modes
    ).add_subparsers(dest="sub", required=True)
    admin_command(ro, "list", cmd_roles_list, "list a project's roles").add_argument(
        "project", help="the project"
    )
    rs = admin_command(ro, "show", cmd_roles_show, "show a role")
    rs.add_argument("project", help="the project")
    rs.add_argument("role", help="the role's name")
    rt = admin_command(
        ro, "set", cmd_roles_set, "create a role or replace its scopes (holders' keys at once)"
    )
    rt.add_argument("project", help="the project")
    rt.add_argument("role", help="the role's name")
    rt.add_argument("--scopes", required=True, help="comma-separated")
    rt.add_argument("--description", help="what the role is for")
    rd = admin_command(ro, "delete", cmd_roles_delete, "delete a role (asks to confirm)")
    rd.add_argument("project", help="the project")
    rd.add_argument("role", help="the role's name")
    rd.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    po = sub.add_parser(
        "policy", help="a project's own key policy (limits, lifetimes, grace)", description=admin_modes
    ).add_subparsers(dest="sub", required=True)
    admin_command(po, "show", cmd_policy_show, "the policy that applies in a project").add_argument(
        "project", help="the project"
    )
    ps = admin_command(po, "set", cmd_policy_set, "set a project's own values (replacing those set before)")
    ps.add_argument("project", help="the project")
    ps.add_argument("--max-active-keys", type=int, help="active keys per principal in the project")
    ps.add_argument("--default-lifetime", help="e.g. 30d, or none")
    ps.add_argument("--max-lifetime", help="e.g. 90d, or none")
    ps.add_argument("--max-rotation-grace", help="e.g. 1h, 0s for none (at most 24h)")
    admin_command(po, "clear", cmd_policy_clear, "forget a project's own values").add_argument(
        "project", help="the project"
    )
