"""The admin API's wire types: every request body, query string and response as a msgspec Struct.

Owns: the JSON shapes of ``/v1`` and the views that turn store records into them (``key_view``,
``principal_view``, ``audit_view``; the CLI prints the same views). The same Structs decode requests,
encode responses and generate the OpenAPI document, so the three cannot drift apart. Must not: hold
policy (``gateway.lifecycle`` does: names, lifetimes, limits, grace), speak HTTP or touch the store.

Conventions: times are UNIX seconds (float, UTC); request Structs reject unknown fields; a field
left out of a PATCH body is left alone (``UNSET``), ``null`` clears it where that is allowed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from gateway.config import DURATION_PATTERN
from gateway.lifecycle import MAX_NAME, MAX_TOKEN
from gateway.models import (
    AuditEvent,
    AuditSource,
    IdentityView,
    KeyRecord,
    KeyStatus,
    Principal,
    PrincipalKind,
)
from gateway.store.sql import AUDIT_CURSOR, KEY_CURSOR, PRINCIPAL_CURSOR

MAX_PAGE = 500
# String schemas whose patterns (``gateway.text``) are long: the document holds each once, under
# components, and the fields refer to it. The lifecycle enforces the same rules with messages
# that name the field.
NAME_TEXT = "#/components/schemas/NameText"
PROJECT_TEXT = "#/components/schemas/ProjectText"
KEY_TEXT = "#/components/schemas/MetadataKeyText"
NO_NUL = "^[^\\x00]*$"  # filters and references: nothing stored can hold a NUL

Name = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_NAME,
        description=f"1-{MAX_NAME} characters, not all spaces; no control, format (invisible, "
        "bidi) or unassigned characters; surrounding spaces are removed",
        extra_json_schema={"$ref": NAME_TEXT},
    ),
]
Token = Annotated[  # a project or a scope: one rule for both (``gateway.lifecycle``)
    str,
    Meta(
        min_length=1,
        max_length=MAX_TOKEN,
        description="no spaces, commas, control, format or unassigned characters",
        extra_json_schema={"$ref": PROJECT_TEXT},
    ),
]
Project = Token
Scope = Token
Filter = Annotated[str, Meta(pattern=NO_NUL)]
UnixTime = Annotated[float, Meta(description="UNIX seconds, UTC")]
Duration = Annotated[
    str,
    Meta(
        pattern=DURATION_PATTERN,
        max_length=32,
        description='a duration as in the config: seconds, or a number with s, m, h or d ("30d")',
    ),
]
Limit = Annotated[int, Meta(ge=1, le=MAX_PAGE, description=f"page size, 1-{MAX_PAGE}")]
_CURSOR = "`next_cursor` of the previous page (a position in the listing); omit for the first page"
PrincipalCursor = Annotated[str, Meta(max_length=512, pattern=PRINCIPAL_CURSOR, description=_CURSOR)]
KeyCursor = Annotated[str, Meta(max_length=512, pattern=KEY_CURSOR, description=_CURSOR)]
AuditCursor = Annotated[str, Meta(max_length=512, pattern=AUDIT_CURSOR, description=_CURSOR)]
Scopes = Annotated[list[Scope], Meta(max_length=100)]
Grants = Annotated[
    dict[Project, Scopes],
    Meta(max_length=200, description="project -> scopes granted in it; replaces every grant"),
]
RoleName = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_TOKEN,
        description="a role of the project (the rule of projects and scopes)",
        extra_json_schema={"$ref": PROJECT_TEXT},
    ),
]
Roles = Annotated[
    dict[Project, Annotated[list[RoleName], Meta(max_length=100)]],
    Meta(
        max_length=200,
        description="project -> roles held in it (each defined in that project); replaces every "
        "role held; a project named here is one the principal is a member of",
    ),
]
Metadata = Annotated[
    dict[
        Annotated[str, Meta(max_length=100, extra_json_schema={"$ref": KEY_TEXT})],
        Annotated[str, Meta(max_length=1000)],
    ],
    Meta(max_length=50, description="free-form string pairs (at most 50); keys as names"),
]
VerifyCode = Literal[
    "ok", "missing_api_key", "invalid_api_key", "expired_api_key", "insufficient_scope", "auth_unavailable"
]


class _Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class _Response(msgspec.Struct, kw_only=True):
    pass


# -- errors ----------------------------------------------------------------------------------


class ErrorBody(_Response):
    """Every error the admin API answers with."""

    error: str
    message: str
    field: str | None = None


# -- health --------------------------------------------------------------------------------


class Health(_Response):
    status: Literal["ok"]


class Readiness(_Response):
    ready: bool
    checks: Annotated[dict[str, str], Meta(description="component -> ok, or why it is not")]


# -- principals ------------------------------------------------------------------------------


class PrincipalCreate(_Request):
    """A user or service account; its keys act with its grants."""

    name: Name
    kind: PrincipalKind = "user"
    grants: Grants = {}
    metadata: Metadata = {}
    roles: Roles = {}


class PrincipalUpdate(_Request):
    """Fields left out are unchanged. New grants apply to every key of the principal at once."""

    grants: Grants | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET
    roles: Roles | UnsetType = UNSET


class PrincipalQuery(_Request):
    limit: Limit = 50
    cursor: PrincipalCursor | None = None


class PrincipalDeleteQuery(_Request):
    with_keys: Annotated[
        bool,
        Meta(description="also delete its keys; without it a principal with keys is refused (409)"),
    ] = False


class PrincipalView(_Response):
    id: str
    name: str
    kind: PrincipalKind
    disabled: bool
    created_at: UnixTime
    grants: Annotated[dict[str, list[str]], Meta(description="project -> scopes granted directly")]
    metadata: dict[str, str]
    roles: Annotated[dict[str, list[str]], Meta(description="project -> roles held")] = {}


class PrincipalPage(_Response):
    items: list[PrincipalView]
    next_cursor: str | None


# -- keys ------------------------------------------------------------------------------------


class KeyCreate(_Request):
    """A new key for ``owner`` in ``project``; the secret is in the response and nowhere else."""

    owner: Annotated[
        str, Meta(min_length=1, max_length=MAX_NAME, pattern=NO_NUL, description="principal id or name")
    ]
    project: Project
    name: Name | None = None
    scopes: Annotated[
        Scopes | None, Meta(description="narrow the owner's grant to these; null: all of it")
    ] = None
    expires_at: UnixTime | None = None
    expires_in: Annotated[float, Meta(gt=0, description="seconds from now")] | Duration | None = None
    env: Literal["live", "test"] | None = None
    metadata: Metadata = {}


class KeyUpdate(_Request):
    """Fields left out are unchanged; ``expires_at: null`` removes the expiry, ``scopes: null`` the
    narrowing (the key then has all of its owner's grant in its project). ``expires_in`` sets the
    expiry from now; ``0`` expires the key at once."""

    name: Name | UnsetType = UNSET
    expires_at: UnixTime | UnsetType | None = UNSET
    expires_in: (
        Annotated[float, Meta(ge=0, description="seconds from now; 0: expire now")] | Duration | UnsetType
    ) = UNSET
    scopes: Scopes | UnsetType | None = UNSET
    metadata: Metadata | UnsetType = UNSET


class KeyRotate(_Request):
    """A new secret for the key, same settings; the old secret stops at once or after the grace."""

    grace_seconds: Annotated[
        float,
        Meta(ge=0, description="seconds the old secret keeps working (at most policy.max_rotation_grace)"),
    ] = 0


class KeyQuery(_Request):
    owner: Annotated[Filter, Meta(description="principal id or name")] | None = None
    project: Filter | None = None
    status: KeyStatus | None = None
    q: Annotated[Filter, Meta(max_length=MAX_NAME, description="name contains (case-insensitive)")] | None = (
        None
    )
    limit: Limit = 50
    cursor: KeyCursor | None = None


class KeyView(_Response):
    """A key as lists show it: never the secret, never its digest."""

    id: str
    name: str
    start: Annotated[str, Meta(description="the first characters of the secret, for recognising it")]
    status: KeyStatus
    principal: Annotated[str, Meta(description="the owner's name")]
    principal_id: str
    project: str
    scopes: Annotated[list[str] | None, Meta(description="the key's narrowing; null: the owner's grant")]
    env: str
    created_at: UnixTime
    expires_at: UnixTime | None
    revoked_at: UnixTime | None
    last_used_at: UnixTime | None
    request_count: int
    previous_valid_until: Annotated[
        float | None, Meta(description="after a rotation with grace: the old secret works until then")
    ]
    metadata: dict[str, str]


class IssuedKey(KeyView):
    """A key with its secret: the answer to create and rotate, the only place a secret appears."""

    key: Annotated[str, Meta(description="the secret; store it now, it is never shown again")]


class KeyPage(_Response):
    items: list[KeyView]
    next_cursor: str | None


# -- verify ----------------------------------------------------------------------------------


class VerifyRequest(_Request):
    key: Annotated[str, Meta(max_length=256)] | None = None
    scopes: Annotated[Scopes, Meta(description="all of these must be among the key's effective scopes")] = []


class Identity(IdentityView, frozen=True):
    """Who a valid key acts as: the same fields as the proxy's whoami
    (``last_used_at`` is the use before this one)."""


class VerifyResponse(_Response):
    valid: bool
    code: VerifyCode
    identity: Identity | None = None


# -- audit -----------------------------------------------------------------------------------


class AuditQuery(_Request):
    key_id: Filter | None = None
    principal: Annotated[Filter, Meta(description="principal id or name")] | None = None
    source: Annotated[AuditSource, Meta(description="where the change came from")] | None = None
    since: Annotated[float, Meta(description="at or after, UNIX seconds")] | None = None
    until: Annotated[float, Meta(description="before, UNIX seconds")] | None = None
    limit: Limit = 50
    cursor: AuditCursor | None = None


class AuditEventView(_Response):
    id: int
    at: UnixTime
    actor: str
    action: str
    target_type: Annotated[str, Meta(description="key, principal, role or project")]
    target_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    source: Annotated[AuditSource, Meta(description="api, cli or console")] = "api"


class AuditPage(_Response):
    items: list[AuditEventView]
    next_cursor: str | None


# -- views -----------------------------------------------------------------------------------


def key_view(rec: KeyRecord, now: float) -> KeyView:
    """The one public view of a key (API responses, CLI tables and ``--json``)."""
    return KeyView(**_key_fields(rec, now))


def issued_key(rec: KeyRecord, secret: str, now: float) -> IssuedKey:
    return IssuedKey(**_key_fields(rec, now), key=secret)


def _key_fields(rec: KeyRecord, now: float) -> dict[str, Any]:
    return {
        "id": rec.id,
        "name": rec.name,
        "start": rec.start + "…",
        "status": rec.status(now),
        "principal": rec.principal,
        "principal_id": rec.principal_id,
        "project": rec.project,
        "scopes": None if rec.scopes is None else list(rec.scopes),
        "env": rec.env,
        "created_at": rec.created_at,
        "expires_at": rec.expires_at,
        "revoked_at": rec.revoked_at,
        "last_used_at": rec.last_used_at,
        "request_count": rec.request_count,
        "previous_valid_until": rec.previous_valid_until,
        "metadata": dict(rec.metadata),
    }


def principal_view(p: Principal) -> PrincipalView:
    return PrincipalView(
        id=p.id,
        name=p.name,
        kind=p.kind,
        disabled=p.disabled,
        created_at=p.created_at,
        grants={project: list(scopes) for project, scopes in p.grants.items()},
        metadata=dict(p.metadata),
        roles={project: list(names) for project, names in p.roles.items()},
    )


def audit_view(e: AuditEvent) -> AuditEventView:
    return AuditEventView(**msgspec.structs.asdict(e))  # the same fields: an event has no secret
