"""The API Keys page: what a viewer sees of keys, and the dialogs opened over the list.

Owns: reading a listing (principal, project, name search, page) for a viewer, the key rows
(status, badge, last use), the dialog the query string opens (modify, rotate, refresh, revoke,
delete in two steps) and the secret shown once after a create or rotation, the profile panel, and
rendering with the console's template filters. Must not: write anything (``actions`` does, through
``gateway.lifecycle``), or show a key a viewer may not manage (``access.may_manage`` is asked for
every key it names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlencode

import aiohttp_jinja2
from aiohttp import web

from gateway.console.access import Viewer, may_add, may_manage
from gateway.console.sessions import Session, ShownOnce
from gateway.models import KeyRecord, Principal
from gateway.policies import duration_text
from gateway.store import KeyFilter, NotFound

if TYPE_CHECKING:
    from gateway.console.server import Console

VIEWER: Final[web.RequestKey[Viewer]] = web.RequestKey("viewer", Viewer)
SESSION: Final[web.RequestKey[Session]] = web.RequestKey("session", Session)
PAGE_SIZE: Final = 20
DIALOGS: Final = frozenset({"modify", "rotate", "refresh", "revoke", "delete", "delete2"})
GRACE_CHOICES: Final = ((0, "None: the old secret stops working now"), (3600, "1 hour"), (86400, "24 hours"))


def _utc(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _iso(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _local_input(ts: float | None) -> str:
    """The value of a datetime-local input, in UTC (the page's script moves it to local time)."""
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M")


FILTERS: Final[dict[str, Any]] = {"utc": _utc, "iso": _iso, "local_input": _local_input}


def render(
    request: web.Request, template: str, context: dict[str, Any], *, status: int = 200
) -> web.Response:
    session = request[SESSION]
    base = {"viewer": request.get(VIEWER), "csrf": session.csrf}
    return aiohttp_jinja2.render_template(template, request, base | context, status=status)


async def user_principal(console: Console, name: str) -> Principal | None:
    """The principal a proxy-named user acts as: by name only (never an id someone typed), created
    on the first visit when the config says so; None when the user has no access."""
    lifecycle = console.deps.lifecycle
    try:
        p = await lifecycle.store.get_principal(name)
        return p if p.name == name and not p.disabled else None
    except NotFound:
        pass
    if not console.cfg.auto_create_principals:
        return None
    grants: dict[str, Sequence[str]] = {k: list(v) for k, v in console.cfg.new_user_grants.items()}
    try:
        return await lifecycle.create_principal(name, grants=grants, actor=f"console:principal:{name}")
    except Exception:  # a name the rules refuse, or a race with another first visit
        try:
            p = await lifecycle.store.get_principal(name)
            return p if p.name == name else None
        except NotFound:
            return None


@dataclass(frozen=True, slots=True)
class KeyRow:
    key: KeyRecord
    status: str  # active | grace | expired | revoked
    label: str
    last_used: float | None


def key_row(key: KeyRecord, last_seen: float | None, now: float) -> KeyRow:
    status: str = key.status(now)
    if status == "active" and key.previous_valid_until is not None and key.previous_valid_until > now:
        status = "grace"
    label = {"active": "Active", "grace": "In rotation grace", "expired": "Expired", "revoked": "Revoked"}
    last = max((t for t in (key.last_used_at, last_seen) if t is not None), default=None)
    return KeyRow(key, status, label[status], last)


@dataclass(slots=True)
class Listing:
    """What one page of the list is about: whose keys, in which project, filtered how."""

    principal: Principal | None
    project: str | None
    q: str
    cursor: str | None
    principals: list[Principal]
    projects: list[str]

    def query(self, **extra: str | None) -> str:
        """This listing's address with ``extra`` query parameters (None drops one)."""
        params: dict[str, str | None] = {
            "principal": self.principal.name if self.principal is not None else None,
            "project": self.project,
            "q": self.q or None,
        }
        params.update(extra)
        return "/keys?" + urlencode({k: v for k, v in params.items() if v})


async def listing_for(request: web.Request, viewer: Viewer, query: Mapping[str, str]) -> Listing:
    store = _console(request).deps.lifecycle.store
    q = query.get("q", "").strip()[:200]
    cursor = query.get("cursor") or None
    if not viewer.is_operator:
        projects = viewer.projects()
        project = query.get("project") if query.get("project") in projects else None
        project = project or (projects[0] if projects else None)
        return Listing(viewer.principal, project, q, cursor, [], projects)
    principals, _ = await store.list_principals(200, None)
    principal = None
    if query.get("principal"):
        try:
            principal = await store.get_principal(query["principal"])
        except NotFound:
            principal = None
    projects = sorted(principal.grants) if principal is not None else []
    project = query.get("project") or None
    if principal is not None and project is None and projects:
        project = projects[0]
    return Listing(principal, project, q, cursor, principals, projects)


async def keys_page(request: web.Request) -> web.Response:
    return await render_keys(request, request.query)


async def render_keys(
    request: web.Request,
    query: Mapping[str, str],
    *,
    error: str | None = None,
    form: Mapping[str, Any] | None = None,
    status: int = 200,
) -> web.Response:
    """The list, with the dialog ``query`` asks for (``error`` and ``form`` refill a failed one)."""
    console = _console(request)
    viewer = request[VIEWER]
    session = request[SESSION]
    lifecycle = console.deps.lifecycle
    now = lifecycle.now()
    listing = await listing_for(request, viewer, query)
    # The policy of the project on screen (per-project values fall back to [policy]).
    policy = await lifecycle.policy(listing.project) if listing.project is not None else None
    rows: list[KeyRow] = []
    next_cursor = None
    if viewer.is_operator or listing.project is not None:
        if viewer.principal is not None or listing.principal is not None or viewer.is_operator:
            # A user who manages the project sees every principal's keys in it.
            everyone = not viewer.is_operator and listing.project in viewer.manages
            flt = KeyFilter(
                principal_id=listing.principal.id if listing.principal is not None and not everyone else None,
                project=listing.project,
                q=listing.q or None,
                limit=PAGE_SIZE,
                cursor=listing.cursor,
            )
            try:
                page = await lifecycle.store.list_keys(flt, now)
            except ValueError:
                raise web.HTTPBadRequest(text="That page link is not valid any more.") from None
            usage = console.deps.usage
            rows = [key_row(k, usage.last_seen(k.id), now) for k in page.items if may_manage(viewer, k)]
            next_cursor = page.next_cursor

    add_reason = None
    active = 0
    if listing.principal is None or listing.project is None:
        add_reason = "Pick a principal and a project to add a key."
    elif not may_add(viewer, listing.principal, listing.project):
        add_reason = "This principal holds no grant in this project."
    else:
        assert policy is not None  # a project is on screen
        active_page = await lifecycle.store.list_keys(
            KeyFilter(
                principal_id=listing.principal.id,
                project=listing.project,
                status="active",
                limit=policy.max_active_keys,
            ),
            now,
        )
        active = len(active_page.items)
        if active >= policy.max_active_keys:
            add_reason = (
                f"The limit of {policy.max_active_keys} active key"
                f"{'' if policy.max_active_keys == 1 else 's'} in this project is reached: "
                "revoke or delete a key to add another."
            )

    shown: ShownOnce | None = console.sessions.take_secret(session)
    dialog = query.get("dialog") if query.get("dialog") in DIALOGS else None
    target: KeyRecord | None = None
    target_scopes: list[str] = []
    if dialog is not None:
        target = await managed_key(request, query.get("key", ""))
        owner = await lifecycle.store.get_principal(target.principal_id)
        target_scopes = sorted(owner.grants.get(target.project, ()))
    notice, session.notice = session.notice, None
    longest = 0.0 if target is None else (await lifecycle.policy(target.project)).max_rotation_grace
    grace = [(s, label) for s, label in GRACE_CHOICES if s <= longest]
    return render(
        request,
        "keys.html",
        {
            "title": "API Keys",
            "listing": listing,
            "rows": rows,
            "next_url": listing.query(cursor=next_cursor) if next_cursor else None,
            "first_url": listing.query() if listing.cursor else None,
            "add_reason": add_reason,
            "active": active,
            "policy": policy,
            "single_key": policy is not None and policy.max_active_keys == 1,
            "shown": shown,
            "dialog": dialog,
            "target": target,
            "target_scopes": target_scopes,
            "grace_choices": grace,
            "max_lifetime": duration_text(policy.max_lifetime) if policy and policy.max_lifetime else None,
            "notice": notice,
            "error": error,
            "form": form or {},
            "now": now,
            "grant_scopes": sorted(listing.principal.grants.get(listing.project, ()))
            if listing.principal is not None and listing.project is not None
            else [],
        },
        status=status,
    )


async def managed_key(request: web.Request, key_id: str) -> KeyRecord:
    """The key of that id when the viewer may manage it; 404 alike for a key that does not exist
    and one that belongs to someone else (its existence is not revealed)."""
    store = _console(request).deps.lifecycle.store
    try:
        key = await store.get_key(key_id) if key_id else None
    except NotFound:
        key = None
    if key is None or not may_manage(request[VIEWER], key):
        raise web.HTTPNotFound(text="There is no such key among the keys you can manage.")
    return key


def _console(request: web.Request) -> Console:
    from gateway.console.server import CONSOLE

    return request.app[CONSOLE]


def add_routes(app: web.Application) -> None:
    from gateway.console import actions

    app.router.add_get("/keys", keys_page)
    actions.add_routes(app)
