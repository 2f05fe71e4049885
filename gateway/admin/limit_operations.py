"""The admin operations on rate limits and credits: set and show them, for keys and principals.

Owns: one function per route of ``api`` for limits and credits. Must not: import aiohttp, choose
statuses, or write without telling the instances (every write publishes its invalidation through
the lifecycle, so a change reaches every instance within a second).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from gateway.admin import limit_schemas as ls
from gateway.admin.operations import Context
from gateway.admin.problems import InvalidInput
from gateway.limits.gate import owner_buckets
from gateway.limits.policy import Policy, check_policies, check_policy
from gateway.models import CreditState, Refill

if TYPE_CHECKING:
    from gateway.limits.gate import LimitGate


def _policies(specs: list[ls.LimitSpec]) -> tuple[Policy, ...]:
    out = []
    for i, spec in enumerate(specs):
        try:
            out.append(check_policy(spec.name, int(spec.limit), spec.window))
        except ValueError as e:
            raise InvalidInput(f"limits[{i}]", str(e)) from None
    try:
        return check_policies(out)
    except ValueError as e:
        raise InvalidInput("limits", str(e)) from None


def _gate(ctx: Context) -> LimitGate | None:
    gate: LimitGate | None = getattr(ctx.gateway, "limits", None)
    return gate


async def _views(ctx: Context, scope: str, owner: str, policies: tuple[Policy, ...]) -> list[ls.LimitView]:
    gate = _gate(ctx)
    if gate is None or not policies:
        return [ls.limit_view(p) for p in policies]
    left = await gate.peek(owner_buckets("k" if scope == "key" else "p", owner, policies))
    if left is None:
        return [ls.limit_view(p) for p in policies]
    return [ls.limit_view(p, s) for p, s in zip(policies, left, strict=True)]


async def _credits(ctx: Context, c: CreditState | None) -> ls.CreditsView | None:
    gate = _gate(ctx)
    if c is None or gate is None:
        return ls.credits_view(c)
    return ls.credits_view(c, await gate.credits_left(c.owner, c.epoch, c.remaining))


async def get_key_limits(ctx: Context, key_id: str) -> ls.LimitsView:
    rec = await ctx.store.get_key(key_id)
    principal = await ctx.store.get_principal(rec.principal_id)
    return ls.LimitsView(
        owner=rec.id,
        limits=await _views(ctx, "key", rec.id, rec.limits),
        pool_limits=await _views(ctx, "principal", principal.id, principal.limits),
        credits=await _credits(ctx, await ctx.store.get_credits(rec.id)),
        pool_credits=await _credits(ctx, await ctx.store.get_credits(principal.id)),
    )


async def set_key_limits(ctx: Context, key_id: str, body: ls.LimitsBody) -> ls.LimitsView:
    if isinstance(body.limits, msgspec.UnsetType):
        return await get_key_limits(ctx, key_id)  # nothing to change: no write, no audit row
    policies = _policies(body.limits)
    _, change = await ctx.store.set_key_limits(key_id, policies, ctx.actor, ctx.now())
    await ctx.lifecycle.publish(change)
    return await get_key_limits(ctx, key_id)


async def get_principal_limits(ctx: Context, principal: str) -> ls.LimitsView:
    p = await ctx.store.get_principal(principal)
    return ls.LimitsView(
        owner=p.id,
        limits=await _views(ctx, "principal", p.id, p.limits),
        pool_limits=[],
        credits=await _credits(ctx, await ctx.store.get_credits(p.id)),
    )


async def set_principal_limits(ctx: Context, principal: str, body: ls.LimitsBody) -> ls.LimitsView:
    if isinstance(body.limits, msgspec.UnsetType):
        return await get_principal_limits(ctx, principal)
    policies = _policies(body.limits)
    p, change = await ctx.store.set_principal_limits(principal, policies, ctx.actor, ctx.now())
    await ctx.lifecycle.publish(change)
    return await get_principal_limits(ctx, p.id)


async def _change_credits(ctx: Context, owner: str, principal_id: str, body: ls.CreditsBody) -> None:
    if body.remove and (
        body.remaining is not None or body.add is not None or body.refill is not msgspec.UNSET
    ):
        raise InvalidInput("remove", "remove takes no other field")
    refill: Refill | msgspec.UnsetType | None = msgspec.UNSET
    if isinstance(body.refill, ls.RefillSpec):
        r = body.refill
        refill = Refill(amount=int(r.amount), every=r.every, mode=r.mode, day=r.day)
    elif body.refill is None:
        refill = None
    if body.remove and await ctx.store.get_credits(owner) is None:
        return
    gate = _gate(ctx)
    if gate is not None and gate.credits is not None:
        # This instance's unwritten spends first: the new balance builds on them.
        await gate.credits.flush()
    action = "credits.remove" if body.remove else "credits.add" if body.add is not None else "credits.set"
    _, change = await ctx.store.change_credits(
        owner,
        principal_id,
        remaining=None if body.remaining is None else int(body.remaining),
        add=None if body.add is None else int(body.add),
        refill=refill,
        remove=body.remove,
        actor=ctx.actor,
        now=ctx.now(),
        action=action,
    )
    await ctx.lifecycle.publish(change)


async def set_key_credits(ctx: Context, key_id: str, body: ls.CreditsBody) -> ls.LimitsView:
    rec = await ctx.store.get_key(key_id)
    await _change_credits(ctx, rec.id, rec.principal_id, body)
    return await get_key_limits(ctx, key_id)


async def set_principal_credits(ctx: Context, principal: str, body: ls.CreditsBody) -> ls.LimitsView:
    p = await ctx.store.get_principal(principal)
    await _change_credits(ctx, p.id, p.id, body)
    return await get_principal_limits(ctx, p.id)
