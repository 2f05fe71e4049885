"""The console's writes: add, modify, rotate, refresh, revoke and delete a key.

Owns: reading each action's form, asking ``pages.managed_key`` (and so ``access.may_manage``)
about the key it names, calling ``gateway.lifecycle`` with the viewer's audit actor, and turning
the lifecycle's refusals into messages on the page. Must not: apply a key rule itself (limits,
lifetimes, grace, names: the lifecycle decides, as for the admin API), or put a secret anywhere
but the session's show-once slot (never a URL, a log line or a later page).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import msgspec
from aiohttp import web
from multidict import MultiDictProxy

from gateway.console.access import Viewer, may_add
from gateway.console.pages import SESSION, VIEWER, managed_key, render_keys
from gateway.lifecycle import PolicyError
from gateway.models import KeyRecord
from gateway.store import Conflict, KeyNotActive, LimitExceeded, NameTaken, NotFound

log = logging.getLogger("keystile.console")


def _list_url(viewer: Viewer, principal: str, project: str) -> str:
    from urllib.parse import urlencode

    params = {"project": project} if not viewer.is_operator else {"principal": principal, "project": project}
    return "/keys?" + urlencode(params)


def _console(request: web.Request) -> Any:
    from gateway.console.server import CONSOLE

    return request.app[CONSOLE]


def _field(form: MultiDictProxy[Any], name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _done(request: web.Request, url: str, notice: str) -> NoReturn:
    request[SESSION].notice = notice
    raise web.HTTPSeeOther(url)


async def create(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    viewer = request[VIEWER]
    form = await request.post()
    project = _field(form, "project")
    if viewer.is_operator:
        try:
            principal = await console.deps.lifecycle.store.get_principal(_field(form, "principal"))
        except NotFound:
            raise web.HTTPNotFound(text="There is no such principal.") from None
    else:
        principal = viewer.principal
    if principal is None or not may_add(viewer, principal, project):
        raise web.HTTPNotFound(text="You cannot add keys in that project.")
    url = _list_url(viewer, principal.name, project)
    try:
        created = await console.deps.lifecycle.create_key(principal.id, project, actor=viewer.actor)
    except LimitExceeded:
        return _done(request, url, "The limit of active keys in this project is reached: no key was added.")
    except (PolicyError, Conflict) as e:
        return _done(request, url, f"No key was added: {e}")
    console.sessions.hold_secret(request[SESSION], created.record.id, created.secret)
    log.info("console: key created", extra={"fields": {"key_id": created.record.id, "actor": viewer.actor}})
    return _done(request, url, f"Key “{created.record.name}” was added.")


def _expiry(form: MultiDictProxy[Any]) -> float | None:
    """The expiry the modify form asks for: None for Never, else the entered local time moved to
    UTC by the browser's offset (minutes, as ``Date.getTimezoneOffset`` gives it; 0 without it)."""
    if _field(form, "expiry") == "never":
        return None
    text = _field(form, "expires_at")
    try:
        local = datetime.strptime(text, "%Y-%m-%dT%H:%M")
        offset = int(_field(form, "tz_offset") or "0")
    except ValueError:
        raise PolicyError("expires_at", "pick a date and time, or Never") from None
    if not -1440 <= offset <= 1440:
        raise PolicyError("expires_at", "the time zone offset is not valid")
    return (local.replace(tzinfo=UTC) + timedelta(minutes=offset)).timestamp()


async def update(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    viewer = request[VIEWER]
    key = await managed_key(request, request.match_info["key_id"])
    form = await request.post()
    values: dict[str, Any] = {"name": _field(form, "name"), "expiry": _field(form, "expiry")}
    values["expires_at"] = _field(form, "expires_at")
    values["scopes"] = [s for s in form.getall("scopes", []) if isinstance(s, str)]
    try:
        owner = await console.deps.lifecycle.store.get_principal(key.principal_id)
        granted = set(owner.grants.get(key.project, ()))
        chosen = sorted(set(values["scopes"]))
        if not chosen:
            raise PolicyError("scopes", "pick at least one scope")
        if not set(chosen) <= granted:
            raise PolicyError("scopes", "must be a subset of the scopes granted in this project")
        scopes = None if set(chosen) == granted else chosen
        current = None if key.scopes is None else sorted(key.scopes)
        expires_at = _expiry(form)
        name = values["name"]
        if not name:
            raise PolicyError("name", "a name is required")
        await console.deps.lifecycle.update_key(
            key.id,
            name=name if name != key.name else msgspec.UNSET,
            expires_at=expires_at if expires_at != key.expires_at else msgspec.UNSET,
            scopes=scopes if scopes != current else msgspec.UNSET,
            actor=viewer.actor,
        )
    except NameTaken:
        return await _again(
            request,
            key,
            "modify",
            f"A key named “{values['name']}” already exists in this project: pick another name.",
            values,
            409,
        )
    except PolicyError as e:
        return await _again(request, key, "modify", f"{_label(e.field)}: {e}", values, 422)
    except Conflict as e:
        return await _again(request, key, "modify", str(e), values, 409)
    return _done(request, _list_url(viewer, key.principal, key.project), "The key was saved.")


def _label(field: str) -> str:
    return {"expires_at": "Expiry", "name": "Name", "scopes": "Scopes"}.get(field, field)


async def _again(
    request: web.Request, key: KeyRecord, dialog: str, error: str, form: Mapping[str, Any], status: int
) -> web.StreamResponse:
    """The list again with the same dialog open, the message, and what the viewer entered."""
    query = {"principal": key.principal, "project": key.project, "dialog": dialog, "key": key.id}
    return await render_keys(request, query, error=error, form=form, status=status)


async def rotate(request: web.Request) -> web.StreamResponse:
    return await _rotate(request, refresh=False)


async def refresh(request: web.Request) -> web.StreamResponse:
    return await _rotate(request, refresh=True)


async def _rotate(request: web.Request, *, refresh: bool) -> web.StreamResponse:
    console = _console(request)
    viewer = request[VIEWER]
    key = await managed_key(request, request.match_info["key_id"])
    form = await request.post()
    try:
        grace = 0 if refresh else int(_field(form, "grace") or "0")
    except ValueError:
        grace = -1
    url = _list_url(viewer, key.principal, key.project)
    try:
        created = await console.deps.lifecycle.rotate_key(key.id, grace=float(grace), actor=viewer.actor)
    except PolicyError as e:
        return await _again(request, key, "rotate", f"Grace: {e}", {}, 422)
    except KeyNotActive:
        return _done(request, url, "Only an active key can be rotated.")
    console.sessions.hold_secret(request[SESSION], created.record.id, created.secret)
    what = "refreshed: the old key stopped working" if refresh or not grace else "rotated"
    return _done(request, url, f"Key “{key.name}” was {what}.")


async def revoke(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    viewer = request[VIEWER]
    key = await managed_key(request, request.match_info["key_id"])
    await console.deps.lifecycle.revoke_key(key.id, actor=viewer.actor)
    return _done(request, _list_url(viewer, key.principal, key.project), f"Key “{key.name}” was revoked.")


async def delete(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    viewer = request[VIEWER]
    key = await managed_key(request, request.match_info["key_id"])
    form = await request.post()
    if _field(form, "confirm_name") != key.name:
        return await _again(request, key, "delete2", "Confirm by deleting the key named here.", {}, 400)
    await console.deps.lifecycle.delete_key(key.id, actor=viewer.actor)
    return _done(request, _list_url(viewer, key.principal, key.project), f"Key “{key.name}” was deleted.")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/keys/create", create)
    app.router.add_post("/keys/{key_id}/update", update)
    app.router.add_post("/keys/{key_id}/rotate", rotate)
    app.router.add_post("/keys/{key_id}/refresh", refresh)
    app.router.add_post("/keys/{key_id}/revoke", revoke)
    app.router.add_post("/keys/{key_id}/delete", delete)
