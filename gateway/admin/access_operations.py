"""The admin operations for roles, per-project policies and who may manage whose keys.

Owns: one function per role or policy route (named in ``api``'s table, run by the HTTP layer and
the CLI alike), and the checks the console asks before acting on someone's keys: ``grant_of`` (a
principal's scopes and roles in a project) and ``may_manage``. Must not: import aiohttp, choose
HTTP statuses or hold policy (every write goes through ``gateway.lifecycle``).

The manage-keys permission: a principal whose grant in a project carries ``MANAGE_KEYS`` (directly
or through a role, e.g. a ``project_admin`` role) may manage every principal's keys in that
project; everyone else only their own, and only in projects where they hold a grant.
"""

from __future__ import annotations

from typing import Final

import msgspec

from gateway.admin import access_schemas as a
from gateway.admin.operations import Context
from gateway.lifecycle import check_project
from gateway.models import Principal
from gateway.store import NotFound

MANAGE_KEYS: Final = "keystile:keys:manage"


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """What a principal holds in a project: scopes granted directly, roles, and both together."""

    project: str
    member: bool
    scopes: tuple[str, ...]
    roles: tuple[str, ...]
    effective: tuple[str, ...]


async def grant_of(ctx: Context, principal: Principal, project: str) -> Grant:
    """``principal``'s grant in ``project`` with its roles resolved (roles that no longer exist
    give nothing), as the keys' identities resolve it."""
    own = principal.grants.get(project)
    if own is None:
        return Grant(project=project, member=False, scopes=(), roles=(), effective=())
    roles, effective = await ctx.lifecycle.holds(principal, project)
    return Grant(project=project, member=True, scopes=own, roles=roles, effective=tuple(sorted(effective)))


async def may_manage(ctx: Context, actor_principal: str, target_principal: str, project: str) -> bool:
    """Whether ``actor_principal`` (id or name) may create, change, rotate, revoke or delete keys
    of ``target_principal`` in ``project``: its own keys in a project where it holds a grant, and
    anyone's there when its grant carries ``MANAGE_KEYS``. A disabled or unknown actor may not."""
    try:
        actor = await ctx.store.get_principal(actor_principal)
        target = await ctx.store.get_principal(target_principal)
    except NotFound:
        return False
    if actor.disabled:
        return False
    grant = await grant_of(ctx, actor, project)
    if not grant.member:
        return False
    return target.id == actor.id or MANAGE_KEYS in grant.effective


# -- roles -------------------------------------------------------------------------------------


async def list_projects(ctx: Context) -> a.ProjectList:
    projects = await ctx.store.list_projects()
    return a.ProjectList(items=[a.ProjectSummary(project=p, policy=has) for p, has in projects.items()])


async def list_roles(ctx: Context, project: str) -> a.RoleList:
    roles = await ctx.store.list_roles(check_project(project))
    return a.RoleList(items=[a.role_view(r) for r in roles])


async def get_role(ctx: Context, project: str, role: str) -> a.RoleView:
    return a.role_view(await ctx.store.get_role(check_project(project), role))


async def put_role(ctx: Context, project: str, role: str, body: a.RolePut) -> a.RoleView:
    r = await ctx.lifecycle.put_role(
        project, role, scopes=body.scopes, description=body.description, actor=ctx.actor
    )
    return a.role_view(r)


async def delete_role(ctx: Context, project: str, role: str) -> None:
    await ctx.lifecycle.delete_role(check_project(project), role, actor=ctx.actor)


# -- per-project policies ----------------------------------------------------------------------


async def get_project_policy(ctx: Context, project: str) -> a.PolicyView:
    """The effective policy of ``project``: what every write in it is held to."""
    return a.policy_view(await ctx.lifecycle.policy(check_project(project)))


async def set_project_policy(ctx: Context, project: str, body: a.ProjectPolicyPut) -> a.PolicyView:
    return a.policy_view(await ctx.lifecycle.set_project_policy(project, body.values(), actor=ctx.actor))


async def clear_project_policy(ctx: Context, project: str) -> a.PolicyView:
    return a.policy_view(await ctx.lifecycle.clear_project_policy(project, actor=ctx.actor))
