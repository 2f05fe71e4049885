"""The console's aiohttp application and listener: security headers, sessions, sign-in, CSRF.

Owns: ``ConsoleListener`` (started and stopped by ``gateway.app``), the middlewares every console
request passes (security headers; who is signed in; the CSRF check of every POST), the sign-in
and sign-out routes, and the static files. Must not: touch the proxy or admin listeners, decide
what a viewer may do (``access.may_manage``), or hold key policy (``gateway.lifecycle``).

Who is signed in:
- the configured identity header from a ``console.trusted_proxies`` address names a user (the
  principal of that name; created on first visit when ``auto_create_principals`` is on); the same
  header from any other address is refused with 403, whatever else the request carries;
- otherwise a session cookie from the admin-token sign-in form makes an operator.
Every browser gets a server-side session (cookie ``HttpOnly``, ``SameSite=Strict``, ``Secure``
unless ``console.cookie_secure`` is off); a POST without that session's CSRF token is refused with
403 before any handler runs.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Final, Protocol

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.clock import Clock
from gateway.config import ConsoleConfig, Secrets, parse_duration, parse_listen
from gateway.console import access, pages
from gateway.console.access import Viewer
from gateway.console.sessions import Session, SessionStore
from gateway.lifecycle import Lifecycle
from gateway.usage import UsageRecorder

log = logging.getLogger("keystile.console")

HERE: Final = Path(__file__).parent
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# Anyone may reach these: the sign-in form and the files the pages load.
PUBLIC: Final = ("/signin", "/static/")


class ConsoleDeps(Protocol):
    """What the console uses of a running gateway (``gateway.app.Gateway`` is one); read on every
    request, as a reload replaces the lifecycle."""

    @property
    def lifecycle(self) -> Lifecycle: ...

    @property
    def secrets(self) -> Secrets: ...

    @property
    def usage(self) -> UsageRecorder: ...

    @property
    def clock(self) -> Clock: ...


class Console:
    """The console's state for its application: configuration, sessions, the gateway it serves."""

    def __init__(self, deps: ConsoleDeps, cfg: ConsoleConfig) -> None:
        self.deps = deps
        self.cfg = cfg
        self.networks = access.parse_networks(cfg.trusted_proxies)
        self.sessions = SessionStore(
            parse_duration(cfg.session_idle), parse_duration(cfg.session_absolute), deps.clock
        )
        self.cookie = "__Host-keystile-console" if cfg.cookie_secure else "keystile-console"

    def set_cookie(self, response: web.StreamResponse, session: Session) -> None:
        response.set_cookie(
            self.cookie, session.id, path="/", httponly=True, samesite="Strict", secure=self.cfg.cookie_secure
        )


CONSOLE: Final[web.AppKey[Console]] = web.AppKey("console", Console)


def create_console_app(deps: ConsoleDeps, cfg: ConsoleConfig) -> web.Application:
    app = web.Application(client_max_size=64 << 10, middlewares=[headers_middleware, session_middleware])
    app[CONSOLE] = Console(deps, cfg)
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        filters=pages.FILTERS,
    )
    app.router.add_get("/", home)
    app.router.add_get("/signin", signin_form)
    app.router.add_post("/signin", signin)
    app.router.add_post("/signout", signout)
    pages.add_routes(app)
    app.router.add_static("/static/", HERE / "static", append_version=False)
    return app


async def home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/keys")


@web.middleware
async def headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The security headers on every answer, errors included; pages are never cached (they may
    show a key), static files are revalidated."""
    try:
        response = await handler(request)
    except web.HTTPException as e:
        response = e
        if e.status >= 400 and e.text and e.content_type == "text/plain":
            context = {"title": e.reason, "message": e.text, "viewer": None}
            response = aiohttp_jinja2.render_template("message.html", request, context, status=e.status)
        else:
            _secure(response, request)
            raise
    _secure(response, request)
    return response


def _secure(response: web.StreamResponse, request: web.Request) -> None:
    response.headers.update(SECURITY_HEADERS)
    static = request.path.startswith("/static/")
    response.headers["Cache-Control"] = "no-cache" if static else "no-store"


@web.middleware
async def session_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    console = request.app[CONSOLE]
    if request.path.startswith("/static/"):
        return await handler(request)
    prefix = console.deps.lifecycle.cfg.keys.prefix
    header = request.headers.get(console.cfg.identity_header)
    if header is not None:
        if not access.trusted(request.remote, console.networks):
            log.warning("console: identity header from an untrusted address refused")
            raise web.HTTPForbidden(text="This address may not name a user: sign-in is refused.")
        name = header.strip()
        if not name:
            raise web.HTTPForbidden(text="The identity header is empty: sign-in is refused.")
        if access.looks_like_api_key(name, prefix):
            raise web.HTTPForbidden(text="An API key cannot sign in to the console.")
        session = console.sessions.get(request.cookies.get(console.cookie))
        if session is None or session.kind != "user" or session.subject != name:
            session = console.sessions.new("user", name)
        principal = await pages.user_principal(console, name)
        if principal is None:
            raise web.HTTPForbidden(
                text=f"{name} has no access to this console: ask an operator for a grant in a project."
            )
        viewer: Viewer | None = Viewer(
            "user", name, principal, await access.managed_projects(console.deps.lifecycle, principal)
        )
    else:
        session = console.sessions.get(request.cookies.get(console.cookie))
        if session is not None and session.kind == "user":
            session = None  # a user's session is good only with the proxy's header
        if session is None:
            session = console.sessions.new("anonymous")
        viewer = Viewer("operator", session.subject) if session.kind == "operator" else None
    if request.method == "POST":
        form = await request.post()
        token = form.get("csrf")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), session.csrf.encode()):
            raise web.HTTPForbidden(text="The form was missing its security token; nothing was changed.")
    request[pages.SESSION] = session
    if viewer is None and not request.path.startswith(PUBLIC):
        response: web.StreamResponse = web.HTTPSeeOther("/signin")
    else:
        if viewer is not None:
            request[pages.VIEWER] = viewer
        try:
            response = await handler(request)
        except web.HTTPRedirection as e:
            response = e
    console.set_cookie(response, request[pages.SESSION])  # sign-in and sign-out replace it
    if isinstance(response, web.HTTPException):
        raise response
    return response


async def signin_form(request: web.Request) -> web.StreamResponse:
    if pages.VIEWER in request:
        raise web.HTTPSeeOther("/keys")
    return pages.render(request, "signin.html", {"title": "Sign in", "error": None})


async def signin(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    token = form.get("token")
    token = token.strip() if isinstance(token, str) else ""
    error = None
    actor = None
    if access.looks_like_api_key(token, console.deps.lifecycle.cfg.keys.prefix):
        error = "An API key cannot sign in to the console. Use an admin token."
    else:
        actor = access.admin_actor(console.deps.secrets.admin_tokens, token)
        if actor is None:
            error = "That is not a valid admin token."
    if actor is None:
        log.warning("console: sign-in refused")
        return pages.render(request, "signin.html", {"title": "Sign in", "error": error}, status=403)
    console.sessions.end(request[pages.SESSION].id)
    session = console.sessions.new("operator", actor)  # a new id: no session fixation
    request[pages.SESSION] = session
    log.info("console: operator signed in", extra={"fields": {"actor": actor}})
    raise web.HTTPSeeOther("/keys")


async def signout(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    console.sessions.end(request[pages.SESSION].id)
    request[pages.SESSION] = console.sessions.new("anonymous")
    raise web.HTTPSeeOther("/signin")


class ConsoleListener:
    """The console's own listener; ``start`` binds ``console.listen``, ``runner`` is cleaned up
    with the gateway's other listeners."""

    def __init__(self, deps: ConsoleDeps, cfg: ConsoleConfig) -> None:
        self.app = create_console_app(deps, cfg)
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5)
        self.cfg = cfg
        self.port = 0

    async def start(self, *, reuse_port: bool = False) -> None:
        await self.runner.setup()
        host, port = parse_listen(self.cfg.listen)
        site = web.TCPSite(self.runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        for addr in self.runner.addresses:
            if isinstance(addr, tuple):
                self.port = int(addr[1])
                break


__all__ = ["CONSOLE", "ConsoleDeps", "ConsoleListener", "create_console_app"]
