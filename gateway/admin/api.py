"""The admin API's route table: one entry per operation, the only description of a route.

Owns: ``Endpoint`` (method, path, the operation it runs, its request and response Structs, query
parameters, statuses, summary) and ``ENDPOINTS``; ``invoke`` runs an entry's operation on decoded
input. The HTTP layer (``server``: routes, decoding, answers), the OpenAPI document (``openapi``)
and both clients (``client``: over HTTP and on the store) are derived from this table, so a new
operation is one function in ``operations`` and one entry here. Must not: import aiohttp, or do
what an operation does.

Routes: ``/healthz``, ``/readyz`` and ``/v1/openapi.json`` (``openapi.ENDPOINT``) are public;
every other ``/v1`` route needs an admin bearer token (``server``). Changes are audited with the
token's id and the source ``api``, or ``cli`` when the request says ``X-Keystile-Source: cli``
(the CLI does); the roles and policy routes are ``access_operations``'.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

import msgspec

from gateway.admin import access_operations as acc
from gateway.admin import access_schemas as a
from gateway.admin import limit_operations as lops
from gateway.admin import limit_schemas as ls
from gateway.admin import operations as ops
from gateway.admin import schemas as s
from gateway.admin.operations import VERIFY_CODES, Context
from gateway.store import NotFound

__all__ = ["BY_OPERATION", "ENDPOINTS", "VERIFY_CODES", "Endpoint", "invoke", "required_role"]

R = TypeVar("R")
_PATH_PARAM: Final = re.compile(r"\{(\w+)\}")
RETRY_SOON: Final = {"Retry-After": "1"}


@dataclass(frozen=True)
class Endpoint(Generic[R]):
    """One operation as a route. ``operation`` is called as ``operation(ctx, <path params>,
    body=<body Struct>, query=<query Struct>)``, ``body`` and ``query`` only where the entry has
    them (``tests/admin/test_endpoints.py`` holds each function's signature to its entry)."""

    method: str
    path: str
    operation_id: str
    tag: str
    summary: str
    operation: Callable[..., Awaitable[R]]
    status: int = 200
    response: type[msgspec.Struct] | dict[str, Any] | None = None
    body: type[msgspec.Struct] | None = None
    query: type[msgspec.Struct] | None = None
    errors: tuple[int, ...] = ()
    # Other documented non-error answers: status -> body type.
    extra: dict[int, type[msgspec.Struct]] = field(default_factory=dict)
    # Which answers take one of those other statuses: result -> (status, extra headers), or None.
    status_of: Callable[[R], tuple[int, Mapping[str, str]] | None] | None = None
    description: str = ""
    public: bool = False
    # The least admin-token role that may call it (``config.ADMIN_ROLES``); empty: by method and
    # tag (``required_role``).
    role: str = ""
    cache_control: str = "no-store"
    params: tuple[str, ...] = field(init=False)  # the path's parameters, in order

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(_PATH_PARAM.findall(self.path)))


# Tags whose changes are the ``admin`` role's: who exists and what they may be granted.
ADMIN_TAGS: Final = frozenset({"principals", "roles", "policies", "projects"})


def required_role(ep: Endpoint[Any]) -> str:
    """The least role of an admin token that may call ``ep``: its own, else ``read`` for reads,
    ``admin`` for changes to principals, grants, roles and policies, ``write`` for other changes."""
    if ep.role:
        return ep.role
    if ep.method in ("GET", "HEAD"):
        return "read"
    return "admin" if ep.tag in ADMIN_TAGS else "write"


async def invoke(
    ep: Endpoint[R],
    ctx: Context,
    params: Mapping[str, str],
    body: msgspec.Struct | None,
    query: msgspec.Struct | None,
) -> R:
    """Run ``ep``'s operation on decoded input (the same call for the HTTP layer and the CLI)."""
    args: dict[str, Any] = {}
    for name in ep.params:
        value = params[name]
        if "\x00" in value:  # no id or name holds a NUL (and PostgreSQL cannot even compare one)
            raise NotFound(f"{name} {value!r} not found")
        args[name] = value
    if ep.body is not None:
        args["body"] = body
    if ep.query is not None:
        args["query"] = query
    return await ep.operation(ctx, **args)


def _unready(result: s.Readiness) -> tuple[int, Mapping[str, str]] | None:
    return None if result.ready else (503, {})


def _unavailable(result: s.VerifyResponse) -> tuple[int, Mapping[str, str]] | None:
    return (503, RETRY_SOON) if result.code == "auth_unavailable" else None  # keys cannot be checked


_P = "/v1/principals/{principal}"
_ROLE = "/v1/projects/{project}/roles/{role}"
_POLICY = "/v1/projects/{project}/policy"
_K = "/v1/keys/{key_id}"
_W = (401, 422, 503)  # every write can meet these; 400 too where there is a body to parse
_R = (401, 503)

ENDPOINTS: Final[tuple[Endpoint[Any], ...]] = (
    Endpoint(
        "GET", "/healthz", "getHealth", "health", "Liveness", ops.health, response=s.Health, public=True
    ),
    Endpoint(
        "GET",
        "/readyz",
        "getReadiness",
        "health",
        "Readiness: the store answers and its schema is current",
        ops.readiness,
        response=s.Readiness,
        extra={503: s.Readiness},
        status_of=_unready,
        public=True,
    ),
    Endpoint(
        "POST",
        "/v1/principals",
        "createPrincipal",
        "principals",
        "Create a principal (a user or a service account) with its grants",
        ops.create_principal,
        status=201,
        response=s.PrincipalView,
        body=s.PrincipalCreate,
        errors=(400, *_W, 409),
    ),
    Endpoint(
        "GET",
        "/v1/principals",
        "listPrincipals",
        "principals",
        "List principals by name",
        ops.list_principals,
        response=s.PrincipalPage,
        query=s.PrincipalQuery,
        errors=(*_R, 422),
    ),
    Endpoint(
        "GET",
        _P,
        "getPrincipal",
        "principals",
        "Get a principal by id or name",
        ops.get_principal,
        response=s.PrincipalView,
        errors=(*_R, 404),
    ),
    Endpoint(
        "PATCH",
        _P,
        "updatePrincipal",
        "principals",
        "Replace a principal's grants or metadata",
        ops.update_principal,
        response=s.PrincipalView,
        body=s.PrincipalUpdate,
        errors=(400, *_W, 404),
        description="New grants take effect for every key of the principal at once, without re-issuing them.",
    ),
    Endpoint(
        "POST",
        _P + "/disable",
        "disablePrincipal",
        "principals",
        "Disable a principal: all of its keys stop working",
        ops.disable_principal,
        response=s.PrincipalView,
        errors=(*_W, 404),
    ),
    Endpoint(
        "POST",
        _P + "/enable",
        "enablePrincipal",
        "principals",
        "Enable a principal again: its keys work again",
        ops.enable_principal,
        response=s.PrincipalView,
        errors=(*_W, 404),
    ),
    Endpoint(
        "DELETE",
        _P,
        "deletePrincipal",
        "principals",
        "Delete a principal",
        ops.delete_principal,
        status=204,
        query=s.PrincipalDeleteQuery,
        errors=(*_W, 404, 409),
        description="A principal that still has keys (of any status) is refused with 409 "
        "`principal_has_keys`, unless `with_keys=true`, which deletes its keys with it.",
    ),
    Endpoint(
        "POST",
        "/v1/keys",
        "createKey",
        "keys",
        "Create a key; the secret is in this response only",
        ops.create_key,
        status=201,
        response=s.IssuedKey,
        body=s.KeyCreate,
        errors=(400, *_W, 409),
        description="Policies: at most `policy.max_active_keys` active keys per principal and "
        "project (409 `key_limit_reached`); names unique per principal and project (409 "
        "`name_taken`), at most 200 characters, `API Key name YYYYMMDDHHMMSS` when omitted; "
        "`policy.default_lifetime` applies without an expiry and `policy.max_lifetime` caps it (422).",
    ),
    Endpoint(
        "GET",
        "/v1/keys",
        "listKeys",
        "keys",
        "List keys, newest first",
        ops.list_keys,
        response=s.KeyPage,
        query=s.KeyQuery,
        errors=(*_R, 422),
        description="Expired and revoked keys stay listed with their status.",
    ),
    Endpoint(
        "POST",
        "/v1/keys/verify",
        "verifyKey",
        "keys",
        "Check a key as the proxy would, for services not behind it",
        ops.verify_key,
        response=s.VerifyResponse,
        body=s.VerifyRequest,
        role="verify",
        errors=(400, 401, 422),
        extra={503: s.VerifyResponse},
        status_of=_unavailable,
        description="A bad key is a 200 answer with `valid: false` and the code the proxy would "
        "send; 503 (`auth_unavailable`) only when keys cannot be checked right now. A valid key's "
        "use counts as use (last used, request count).",
    ),
    Endpoint(
        "GET",
        _K,
        "getKey",
        "keys",
        "Get a key",
        ops.get_key,
        response=s.KeyView,
        errors=(*_R, 404),
    ),
    Endpoint(
        "PATCH",
        _K,
        "updateKey",
        "keys",
        "Change a key's name, expiry, scopes or metadata",
        ops.update_key,
        response=s.KeyView,
        body=s.KeyUpdate,
        errors=(400, *_W, 404, 409),
    ),
    Endpoint(
        "POST",
        _K + "/revoke",
        "revokeKey",
        "keys",
        "Revoke a key: it stops at once and stays listed as revoked",
        ops.revoke_key,
        response=s.KeyView,
        errors=(*_W, 404),
    ),
    Endpoint(
        "POST",
        _K + "/rotate",
        "rotateKey",
        "keys",
        "Give a key a new secret with the same settings",
        ops.rotate_key,
        response=s.IssuedKey,
        body=s.KeyRotate,
        errors=(400, *_W, 404, 409),
        description="The old secret stops at once, or works until `previous_valid_until` when "
        "`grace_seconds` is given (at most `policy.max_rotation_grace`, 24 h). Only an active key "
        "can be rotated (409 `conflict`).",
    ),
    Endpoint(
        "DELETE",
        _K,
        "deleteKey",
        "keys",
        "Delete a key: it is gone (revoke to keep a record)",
        ops.delete_key,
        status=204,
        errors=(*_W, 404),
    ),
    Endpoint(
        "GET",
        _K + "/limits",
        "getKeyLimits",
        "limits",
        "A key's rate limits and its principal's, what is left of each, and their credits",
        lops.get_key_limits,
        response=ls.LimitsView,
        errors=(*_R, 404),
    ),
    Endpoint(
        "PATCH",
        _K + "/limits",
        "setKeyLimits",
        "limits",
        "Replace a key's rate limits",
        lops.set_key_limits,
        response=ls.LimitsView,
        body=ls.LimitsBody,
        errors=(400, *_W, 404),
        description="Every instance applies the change within a second. Each limit allows `limit` "
        "requests at once, refilled at `limit` per `window` (GCRA).",
    ),
    Endpoint(
        "POST",
        _K + "/credits",
        "changeKeyCredits",
        "limits",
        "Set, top up or remove a key's credits, or its calendar refill",
        lops.set_key_credits,
        response=ls.LimitsView,
        body=ls.CreditsBody,
        errors=(400, *_W, 404),
    ),
    Endpoint(
        "GET",
        _P + "/limits",
        "getPrincipalLimits",
        "limits",
        "A principal's rate limits (a pool shared by its keys) and credits",
        lops.get_principal_limits,
        response=ls.LimitsView,
        errors=(*_R, 404),
    ),
    Endpoint(
        "PATCH",
        _P + "/limits",
        "setPrincipalLimits",
        "limits",
        "Replace a principal's rate limits (a pool shared by all its keys)",
        lops.set_principal_limits,
        response=ls.LimitsView,
        body=ls.LimitsBody,
        errors=(400, *_W, 404),
    ),
    Endpoint(
        "POST",
        _P + "/credits",
        "changePrincipalCredits",
        "limits",
        "Set, top up or remove a principal's credits (shared by its keys), or its calendar refill",
        lops.set_principal_credits,
        response=ls.LimitsView,
        body=ls.CreditsBody,
        errors=(400, *_W, 404),
    ),
    Endpoint(
        "GET",
        "/v1/audit",
        "listAudit",
        "audit",
        "List audit events, newest first",
        ops.list_audit,
        response=s.AuditPage,
        query=s.AuditQuery,
        errors=(*_R, 422),
        description="Every lifecycle change, with its actor, its source (api, cli, console) and "
        "the record before and after.",
    ),
    Endpoint(
        "GET",
        "/v1/projects/{project}/roles",
        "listRoles",
        "projects",
        "List a project's roles",
        acc.list_roles,
        response=a.RoleList,
        errors=(*_R, 422),
    ),
    Endpoint(
        "GET",
        _ROLE,
        "getRole",
        "projects",
        "Get a role",
        acc.get_role,
        response=a.RoleView,
        errors=(*_R, 404, 422),
    ),
    Endpoint(
        "PUT",
        _ROLE,
        "putRole",
        "projects",
        "Create a role or replace its scopes",
        acc.put_role,
        response=a.RoleView,
        body=a.RolePut,
        errors=(400, *_W),
        description="A role is a named set of scopes in a project; a principal's `roles` name the "
        "roles it holds. A key acts with its owner's granted scopes and those of its roles "
        "(narrowed by the key's own scopes); a change here reaches every key of every holder at once.",
    ),
    Endpoint(
        "DELETE",
        _ROLE,
        "deleteRole",
        "projects",
        "Delete a role: every holder loses it, and its scopes, at once",
        acc.delete_role,
        status=204,
        errors=(*_W, 404),
    ),
    Endpoint(
        "GET",
        _POLICY,
        "getProjectPolicy",
        "projects",
        "The key policy that applies in a project, and where each value comes from",
        acc.get_project_policy,
        response=a.PolicyView,
        errors=(*_R, 422),
    ),
    Endpoint(
        "PUT",
        _POLICY,
        "setProjectPolicy",
        "projects",
        "Set a project's own key policy values",
        acc.set_project_policy,
        response=a.PolicyView,
        body=a.ProjectPolicyPut,
        errors=(400, *_W),
        description="Stored values win over `[policy.projects.<project>]` in the config, which wins "
        "over `[policy]`; a field left out falls back. The values apply to every later write in "
        "the project (create, update, rotate).",
    ),
    Endpoint(
        "DELETE",
        _POLICY,
        "clearProjectPolicy",
        "projects",
        "Forget a project's own key policy values: the config's apply again",
        acc.clear_project_policy,
        response=a.PolicyView,
        errors=(*_W, 404),
    ),
)
# operation -> its entry: how the clients find the route of the operation they are asked for.
BY_OPERATION: Final[Mapping[Callable[..., Awaitable[Any]], Endpoint[Any]]] = {
    ep.operation: ep for ep in ENDPOINTS
}
