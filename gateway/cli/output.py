"""What the commands print: tables, field lists, ``--json``, and text made safe for a terminal.

Owns: how principals, keys, pages and refusals look on a terminal (the same views the admin API
answers with, ``gateway.admin.schemas``), escaping what a terminal would act on, and ``--json``
(the API's own JSON). Must not: parse arguments or reach the admin API or the store.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import msgspec

from gateway.admin import schemas

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
V = TypeVar("V", bound=msgspec.Struct)
MAX_CELL = 40  # a table cell longer than this is cut, ending in "…" (show and --json give it whole)
_json = msgspec.json.Encoder()


class Page(Protocol[T_co]):
    """A page of a listing (``schemas.PrincipalPage``, ``KeyPage``, ``AuditPage``)."""

    @property
    def items(self) -> Sequence[T_co]: ...

    @property
    def next_cursor(self) -> str | None: ...


def fmt_time(t: float | None) -> str:
    """A time as tables show it: UTC, which their column headers say (``(UTC)``)."""
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def utc(t: float) -> str:
    """A time on its own (field lists, messages), saying its zone."""
    return fmt_time(t) + " UTC"


def shown(text: str) -> str:
    """Text safe to print on a terminal: each character Python deems unprintable (controls such as
    U+009B, a CSI; bidi overrides; zero-width and unassigned characters) written as an escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _cell(text: str) -> str:
    text = shown(text)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    rows = [[_cell(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def print_json(obj: Any) -> None:
    print(_json.encode(obj).decode())


def print_fields(pairs: Sequence[tuple[str, str]]) -> None:
    pairs = [(shown(k), shown(v)) for k, v in pairs]
    width = max(len(k) for k, _ in pairs) + 1
    for k, v in pairs:
        print(f"{k + ':':<{width}} {v}")


def print_page(page: Page[T], as_json: bool, headers: Sequence[str], row: Callable[[T], list[str]]) -> None:
    """A listing: its JSON, or a table with a note on stderr when there is more."""
    if as_json:
        print_json(page)
        return
    print(table(headers, [row(item) for item in page.items]))
    if page.next_cursor:
        print(f"(more: --cursor {page.next_cursor})", file=sys.stderr)


def grants_text(grants: dict[str, list[str]]) -> str:
    return "; ".join(f"{p}: {','.join(sc) or '(no scopes)'}" for p, sc in grants.items()) or "-"


def principal_row(p: schemas.PrincipalView) -> list[str]:
    return [
        p.name,
        p.id,
        p.kind,
        "disabled" if p.disabled else "enabled",
        fmt_time(p.created_at),
        grants_text(p.grants),
    ]


def key_row(k: schemas.KeyView) -> list[str]:
    return [
        k.id,
        k.name,
        k.start,
        k.principal,
        k.project,
        fmt_time(k.created_at),
        fmt_time(k.expires_at),
        fmt_time(k.last_used_at),
        k.status,
    ]


def audit_row(e: schemas.AuditEventView) -> list[str]:
    return [fmt_time(e.at), e.actor, e.source, e.action, e.target_id]


PRINCIPAL_COLUMNS = ("name", "id", "kind", "status", "created (UTC)", "grants")
KEY_COLUMNS = (
    "id",
    "name",
    "start",
    "owner",
    "project",
    "created (UTC)",
    "expires (UTC)",
    "last used (UTC)",
    "status",
)
AUDIT_COLUMNS = ("time (UTC)", "actor", "source", "action", "target")


def show(view: V, as_json: bool, fields: Callable[[V], list[tuple[str, str]]]) -> None:
    """One record: its JSON, or its ``fields`` one a line."""
    if as_json:
        print_json(view)
    else:
        print_fields(fields(view))


def principal_fields(p: schemas.PrincipalView) -> list[tuple[str, str]]:
    pairs = [
        ("id", p.id),
        ("name", p.name),
        ("kind", p.kind),
        ("status", "disabled" if p.disabled else "enabled"),
        ("created", utc(p.created_at)),
        ("grants", grants_text(p.grants)),
    ]
    if p.roles:
        pairs.append(("roles", "; ".join(f"{proj}: {','.join(r)}" for proj, r in p.roles.items())))
    return pairs + [(f"metadata.{k}", v) for k, v in p.metadata.items()]


def key_fields(k: schemas.KeyView) -> list[tuple[str, str]]:
    pairs = [
        ("id", k.id),
        ("name", k.name),
        ("start", k.start),
        ("status", k.status),
        ("owner", f"{k.principal} ({k.principal_id})"),
        ("project", k.project),
        ("scopes", "(all of the owner's grant)" if k.scopes is None else ",".join(k.scopes) or "(none)"),
        ("env", k.env),
        ("created", utc(k.created_at)),
        ("expires", utc(k.expires_at) if k.expires_at is not None else "never"),
        ("last used", utc(k.last_used_at) if k.last_used_at is not None else "never"),
        ("requests", str(k.request_count)),
    ]
    if k.revoked_at is not None:
        pairs.append(("revoked", utc(k.revoked_at)))
    if k.previous_valid_until is not None and k.previous_valid_until > time.time():
        pairs.append(("previous secret valid until", utc(k.previous_valid_until)))
    return pairs + [(f"metadata.{m}", v) for m, v in k.metadata.items()]


def refusal(field: str | None, message: str, code: str) -> str:
    """An admin refusal as one line: ``keystile: <field>: <message> (<code>)``, made safe."""
    where = f"{field}: " if field else ""
    return shown(f"keystile: {where}{message} ({code})")
