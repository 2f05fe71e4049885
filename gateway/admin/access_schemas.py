"""The admin API's wire types for roles and per-project policies.

Owns: the JSON shapes of ``/v1/projects/{project}/roles`` and ``/v1/projects/{project}/policy`` and
the views that turn records into them. Must not: hold policy (``gateway.lifecycle`` and
``gateway.policies`` do), speak HTTP or touch the store. Conventions as in ``schemas``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import UNSET, Meta, UnsetType

from gateway.admin.schemas import Scopes, UnixTime, _Request, _Response
from gateway.models import ProjectPolicy, Role
from gateway.policies import EffectivePolicy, PolicySource

MAX_GRACE_SECONDS = 86400  # as the config's policy.max_rotation_grace: at most 24h
Lifetime = Annotated[float, Meta(gt=0, description="seconds")]


class RolePut(_Request):
    """A role's scopes (replacing them when it exists): every holder's keys change at once."""

    scopes: Scopes
    description: Annotated[str, Meta(max_length=500)] = ""


class RoleView(_Response):
    project: str
    name: str
    scopes: list[str]
    description: str
    created_at: UnixTime
    updated_at: UnixTime


class RoleList(_Response):
    items: list[RoleView]


class ProjectPolicyPut(_Request):
    """The project's own policy values, replacing any stored before. A field left out falls back
    to the config (``[policy.projects.<project>]``, then ``[policy]``); ``null`` lifetimes mean no
    default / no maximum in this project."""

    # A number with no fraction (JSON Schema's integer: 2.0 is one too), at least 1.
    max_active_keys: Annotated[float, Meta(ge=1, le=1_000_000, multiple_of=1)] | UnsetType = UNSET
    default_lifetime: Lifetime | UnsetType | None = UNSET
    max_lifetime: Lifetime | UnsetType | None = UNSET
    max_rotation_grace: (
        Annotated[float, Meta(ge=0, le=MAX_GRACE_SECONDS, description="seconds, 0 allows no grace")]
        | UnsetType
    ) = UNSET

    def values(self) -> ProjectPolicy:
        fields = msgspec.structs.asdict(self)
        if isinstance(self.max_active_keys, float):
            fields["max_active_keys"] = int(self.max_active_keys)
        return ProjectPolicy(**fields)


class PolicyView(_Response):
    """The policy that applies in a project, and where each value comes from: ``project`` (stored
    through this API or the CLI), ``config.project`` (``[policy.projects.<project>]``) or
    ``config`` (``[policy]``)."""

    project: str
    max_active_keys: int
    default_lifetime: Annotated[
        float | None, Meta(description="seconds; null: keys do not expire by default")
    ]
    max_lifetime: Annotated[float | None, Meta(description="seconds; null: no maximum")]
    max_rotation_grace: Annotated[float, Meta(description="seconds")]
    sources: dict[str, PolicySource]


def role_view(role: Role) -> RoleView:
    return RoleView(
        project=role.project,
        name=role.name,
        scopes=list(role.scopes),
        description=role.description,
        created_at=role.created_at,
        updated_at=role.updated_at,
    )


def policy_view(pol: EffectivePolicy) -> PolicyView:
    return PolicyView(**msgspec.structs.asdict(pol))
