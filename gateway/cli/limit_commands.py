"""The ``limits`` and ``credits`` commands: a key's or principal's rate limits and credits.

Owns: turning ``name=limit/window`` and ``amount/daily`` flags into the admin API's request Structs
and printing what is left. Must not: hold rules (the admin operations check every value, as for
the API) or read the environment.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from gateway.admin import limit_operations as lops
from gateway.admin import limit_schemas as ls
from gateway.cli.admin_commands import build, call
from gateway.cli.output import fmt_time, show
from gateway.cli.runner import Fail
from gateway.limits.policy import window_text


def _spec(text: str) -> dict[str, Any]:
    """``burst=100/1s`` -> a limit."""
    name, _, rest = text.partition("=")
    limit, _, window = rest.partition("/")
    if not name or not limit.isdigit() or not window:
        raise Fail(f"keystile: --set {text!r}: expected NAME=LIMIT/WINDOW, e.g. burst=100/1s", 2)
    return {"name": name, "limit": int(limit), "window": window}


def _refill(text: str) -> dict[str, Any]:
    """``1000/daily``, ``1000/monthly:15``, with ``/add`` to top up instead of replace."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not parts[0].isdigit():
        raise Fail(f"keystile: --refill {text!r}: expected AMOUNT/daily or AMOUNT/monthly[:DAY][/add]", 2)
    every, _, day = parts[1].partition(":")
    out: dict[str, Any] = {"amount": int(parts[0]), "every": every}
    if day:
        if not day.isdigit():
            raise Fail(f"keystile: --refill {text!r}: the day must be a number (1-28)", 2)
        out["day"] = int(day)
    if len(parts) == 3:
        out["mode"] = parts[2]
    return out


def _target(args: argparse.Namespace) -> str | None:
    """The principal named, or None for the key named."""
    if args.principal:
        return str(args.principal)
    if not args.key_id:
        raise Fail("keystile: name a key id, or --principal", 2)
    return None


def limits_fields(v: ls.LimitsView) -> list[tuple[str, str]]:
    out = [("owner", v.owner)]
    for label, items in (("limit", v.limits), ("pool limit", v.pool_limits)):
        for lim in items:
            left = "" if lim.remaining is None else f": {lim.remaining} left"
            if lim.reset:
                left += f", full in {math.ceil(lim.reset)}s"
            out.append((label, f"{lim.name} {lim.limit}/{window_text(lim.window)}{left}"))
    for label, c in (("credits", v.credits), ("pool credits", v.pool_credits)):
        if c is None:
            continue
        text = str(c.remaining)
        if c.refill is not None:
            r = c.refill
            when = r.every if r.every == "daily" else f"monthly on day {r.day}"
            text += f" (refill {int(r.amount)} {when}, {r.mode}; next {fmt_time(c.next_refill_at)})"
        out.append((label, text))
    return out


def cmd_limits(args: argparse.Namespace) -> int:
    principal = _target(args)
    view: ls.LimitsView
    if args.set or args.clear:
        body = build(ls.LimitsBody, limits=[_spec(t) for t in args.set or ()])
        if principal is not None:
            view = call(args, lops.set_principal_limits, body=body, principal=principal)
        else:
            view = call(args, lops.set_key_limits, body=body, key_id=args.key_id)
    elif principal is not None:
        view = call(args, lops.get_principal_limits, principal=principal)
    else:
        view = call(args, lops.get_key_limits, key_id=args.key_id)
    show(view, args.json, limits_fields)
    return 0


def cmd_credits(args: argparse.Namespace) -> int:
    principal = _target(args)
    fields: dict[str, Any] = {"remove": args.remove}
    if args.remaining is not None:
        fields["remaining"] = args.remaining
    if args.add is not None:
        fields["add"] = args.add
    if args.refill:
        fields["refill"] = _refill(args.refill)
    elif args.no_refill:
        fields["refill"] = None
    body = build(ls.CreditsBody, **fields)
    if principal is not None:
        view = call(args, lops.set_principal_credits, body=body, principal=principal)
    else:
        view = call(args, lops.set_key_credits, body=body, key_id=args.key_id)
    show(view, args.json, limits_fields)
    return 0


def add_commands(sub: Any, admin_command: Any) -> None:
    """``keystile limits`` and ``keystile credits``."""
    li = admin_command(sub, "limits", cmd_limits, "show or replace a key's or principal's rate limits")
    li.add_argument("key_id", nargs="?", help="a key id (or give --principal)")
    li.add_argument("--principal", help="a principal (id or name): its pool, shared by its keys")
    li.add_argument("--set", action="append", metavar="NAME=LIMIT/WINDOW", help="e.g. burst=100/1s; repeat")
    li.add_argument("--clear", action="store_true", help="remove every limit")
    cr = admin_command(sub, "credits", cmd_credits, "set, top up or remove credits, or their refill")
    cr.add_argument("key_id", nargs="?", help="a key id (or give --principal)")
    cr.add_argument("--principal", help="a principal (id or name): credits shared by its keys")
    cr.add_argument("--remaining", type=int, help="set the balance")
    cr.add_argument("--add", type=int, help="top the balance up")
    cr.add_argument("--refill", metavar="AMOUNT/daily|AMOUNT/monthly:DAY[/add]", help="UTC calendar refill")
    cr.add_argument("--no-refill", action="store_true", help="remove the refill")
    cr.add_argument("--remove", action="store_true", help="remove the credits (no longer limited by them)")
