"""The admin operations: what each admin route does, as plain async functions.

Owns: one function per operation, each taking a ``Context`` (who acts, the current lifecycle and,
for verify and readiness, the running gateway's ``Services``) and the decoded input, and returning
a wire Struct of ``schemas``. The table in ``api`` names each one; the HTTP layer (``server``) and
the CLI's store mode (``client.StoreAdmin``) both run them through it. Must not: import aiohttp or
choose HTTP statuses (the table does), hold policy (every write goes through
``gateway.lifecycle``: policies, audit via the store, cache invalidation), decide about keys
itself (``verify_key`` asks ``gateway.auth``), or log a key secret.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import msgspec

from gateway import auth
from gateway.admin import schemas as s
from gateway.admin.problems import InvalidInput
from gateway.lifecycle import Lifecycle, check_scopes
from gateway.store import AuditFilter, KeyFilter, NotFound, Store, StoreError

if TYPE_CHECKING:
    from gateway.auth import Authenticator
    from gateway.usage import UsageRecorder

T = TypeVar("T")


class Services(Protocol):
    """What the admin operations use of a running gateway (``gateway.app.Gateway`` is one).

    Read on every request: a reload replaces the lifecycle and the authenticator.
    """

    @property
    def lifecycle(self) -> Lifecycle: ...

    @property
    def authenticator(self) -> Authenticator: ...

    @property
    def usage(self) -> UsageRecorder: ...

    async def last_used(self, key_id: str) -> float | None: ...

    async def readiness(self) -> tuple[bool, dict[str, str]]: ...


@dataclass(frozen=True, slots=True)
class Context:
    """One operation's surroundings: the lifecycle it writes through and the actor audited for
    it (a ``gateway.models.Actor`` also names the source: api, cli or console; a plain name counts
    as api); ``gateway`` is the running gateway (None in the CLI's store mode, which has no
    cache)."""

    lifecycle: Lifecycle
    actor: str
    gateway: Services | None = None

    @property
    def store(self) -> Store:
        return self.lifecycle.store

    def now(self) -> float:
        """Wall time from the lifecycle's clock: views say expired or not as the policies do."""
        return self.lifecycle.now()

    @property
    def running(self) -> Services:
        if self.gateway is None:
            raise RuntimeError("this operation needs a running gateway")
        return self.gateway


# -- health ----------------------------------------------------------------------------------


async def health(ctx: Context) -> s.Health:
    return s.Health(status="ok")


async def readiness(ctx: Context) -> s.Readiness:
    ready, checks = await ctx.running.readiness()
    return s.Readiness(ready=ready, checks=checks)


# -- principals ------------------------------------------------------------------------------


async def create_principal(ctx: Context, body: s.PrincipalCreate) -> s.PrincipalView:
    p = await ctx.lifecycle.create_principal(
        body.name,
        kind=body.kind,
        grants=dict(body.grants),
        metadata=dict(body.metadata),
        roles=dict(body.roles),
        actor=ctx.actor,
    )
    return s.principal_view(p)


async def list_principals(ctx: Context, query: s.PrincipalQuery) -> s.PrincipalPage:
    items, nxt = await _paged(ctx.store.list_principals(query.limit, query.cursor))
    return s.PrincipalPage(items=[s.principal_view(p) for p in items], next_cursor=nxt)


async def get_principal(ctx: Context, principal: str) -> s.PrincipalView:
    return s.principal_view(await ctx.store.get_principal(principal))


async def update_principal(ctx: Context, principal: str, body: s.PrincipalUpdate) -> s.PrincipalView:
    if all(getattr(body, f) is msgspec.UNSET for f in body.__struct_fields__):
        return await get_principal(ctx, principal)  # nothing to change: no write, no audit row
    p = await ctx.lifecycle.update_principal(
        principal,
        grants=body.grants if isinstance(body.grants, msgspec.UnsetType) else dict(body.grants),
        roles=body.roles if isinstance(body.roles, msgspec.UnsetType) else dict(body.roles),
        metadata=body.metadata,
        kind=body.kind,
        actor=ctx.actor,
    )
    return s.principal_view(p)


async def disable_principal(ctx: Context, principal: str) -> s.PrincipalView:
    return s.principal_view(await ctx.lifecycle.update_principal(principal, disabled=True, actor=ctx.actor))


async def enable_principal(ctx: Context, principal: str) -> s.PrincipalView:
    return s.principal_view(await ctx.lifecycle.update_principal(principal, disabled=False, actor=ctx.actor))


async def delete_principal(ctx: Context, principal: str, query: s.PrincipalDeleteQuery) -> None:
    await ctx.lifecycle.delete_principal(principal, with_keys=query.with_keys, actor=ctx.actor)


# -- keys ------------------------------------------------------------------------------------


async def create_key(ctx: Context, body: s.KeyCreate) -> s.IssuedKey:
    try:
        created = await ctx.lifecycle.create_key(
            body.owner,
            body.project,
            name=body.name,
            scopes=body.scopes,
            expires_at=body.expires_at,
            expires_in=body.expires_in,
            env=body.env,
            metadata=dict(body.metadata),
            actor=ctx.actor,
        )
    except NotFound as e:  # the owner named in the body: bad input, not a missing resource
        raise InvalidInput("owner", str(e)) from None
    return s.issued_key(created.record, created.secret, ctx.now())


async def list_keys(ctx: Context, query: s.KeyQuery) -> s.KeyPage:
    flt = KeyFilter(principal_id=query.owner, **_shared_fields(query, KeyFilter))
    now = ctx.now()
    page = await _paged(ctx.store.list_keys(flt, now))
    return s.KeyPage(items=[s.key_view(k, now) for k in page.items], next_cursor=page.next_cursor)


async def get_key(ctx: Context, key_id: str) -> s.KeyView:
    return s.key_view(await ctx.store.get_key(key_id), ctx.now())


async def update_key(ctx: Context, key_id: str, body: s.KeyUpdate) -> s.KeyView:
    if all(getattr(body, f) is msgspec.UNSET for f in body.__struct_fields__):
        return await get_key(ctx, key_id)  # nothing to change: no write, no audit row
    rec = await ctx.lifecycle.update_key(
        key_id,
        name=body.name,
        expires_at=body.expires_at,
        expires_in=body.expires_in,
        scopes=body.scopes,
        metadata=body.metadata,
        actor=ctx.actor,
    )
    return s.key_view(rec, ctx.now())


async def revoke_key(ctx: Context, key_id: str) -> s.KeyView:
    return s.key_view(await ctx.lifecycle.revoke_key(key_id, actor=ctx.actor), ctx.now())


async def delete_key(ctx: Context, key_id: str) -> None:
    await ctx.lifecycle.delete_key(key_id, actor=ctx.actor)


async def rotate_key(ctx: Context, key_id: str, body: s.KeyRotate) -> s.IssuedKey:
    created = await ctx.lifecycle.rotate_key(key_id, grace=body.grace_seconds, actor=ctx.actor)
    return s.issued_key(created.record, created.secret, ctx.now())


# auth outcome -> the code the proxy answers with (the ``error`` of gateway.errors' bodies; a test
# holds the two together)
VERIFY_CODES: Final[dict[str, s.VerifyCode]] = {
    auth.OK: "ok",
    auth.MISSING: "missing_api_key",
    auth.INVALID: "invalid_api_key",
    auth.EXPIRED: "expired_api_key",
    auth.INSUFFICIENT_SCOPE: "insufficient_scope",
    auth.UNAVAILABLE: "auth_unavailable",
}


async def verify_key(ctx: Context, body: s.VerifyRequest) -> s.VerifyResponse:
    """The proxy's decision for ``body.key`` on a route needing ``body.scopes``."""
    check_scopes(body.scopes, "scopes")  # the document's rule for scopes, as everywhere
    gw = ctx.running
    outcome, ident = await gw.authenticator.verify(body.key, body.scopes)
    identity = None
    if outcome == auth.OK and ident is not None:
        # Like whoami: the last use before this one.
        identity = s.Identity.of(ident, await gw.last_used(ident.key_id))
        gw.usage.bump(ident.key_id, ctx.now())
    return s.VerifyResponse(valid=identity is not None, code=VERIFY_CODES[outcome], identity=identity)


# -- audit -----------------------------------------------------------------------------------


async def list_audit(ctx: Context, query: s.AuditQuery) -> s.AuditPage:
    principal_id = query.principal
    if principal_id is not None:
        try:
            principal_id = (await ctx.store.get_principal(principal_id)).id
        except NotFound:
            pass  # a deleted principal's rows still carry its id
    flt = AuditFilter(principal_id=principal_id, **_shared_fields(query, AuditFilter))
    page = await _paged(ctx.store.list_audit(flt))
    return s.AuditPage(items=[s.audit_view(e) for e in page.items], next_cursor=page.next_cursor)


def _shared_fields(query: msgspec.Struct, typ: type[msgspec.Struct]) -> dict[str, Any]:
    """The fields of ``query`` that the store's filter ``typ`` has too (same name, same meaning)."""
    return {f: getattr(query, f) for f in typ.__struct_fields__ if f in query.__struct_fields__}


async def _paged(call: Awaitable[T]) -> T:
    """Await a listing; the store raises ValueError for a cursor it did not hand out."""
    try:
        return await call
    except StoreError:
        raise
    except ValueError:
        raise InvalidInput("cursor", "is not a cursor this API handed out") from None
