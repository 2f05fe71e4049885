"""Who is using the console, and what they may act on.

Owns: ``Viewer`` (an operator signed in with an admin token, or a user named by the trusted proxy
in front), the audit actor of each, the admin-token check of the sign-in form, the "an API key
never signs in" rule, the trusted-proxy test, and ``may_manage``: the one place that says whether
a viewer may see and change a key. Must not: speak HTTP, read the store, or hold key policy
(limits, lifetimes and names are ``gateway.lifecycle``'s).

``may_manage`` today: an operator manages every key; a user manages their own keys in the projects
where they hold a grant. Roles and a per-project manage permission extend this one function.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from gateway.admin.access_operations import MANAGE_KEYS
from gateway.keys import KeyFormat
from gateway.lifecycle import Lifecycle
from gateway.models import Actor, KeyRecord, Principal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Viewer:
    kind: Literal["operator", "user"]
    # operator: "admin:<8 hex>" (the admin API's name for the token); user: the principal's name.
    subject: str
    principal: Principal | None = None  # the user's own principal; None for operators
    # Projects where the user holds the manage-keys permission: every principal's keys there.
    manages: frozenset[str] = frozenset()

    @property
    def actor(self) -> Actor:
        """The audit actor of this viewer's actions: the admin token's name or the principal's,
        with source ``console``."""
        return Actor(self.subject, "console")

    @property
    def is_operator(self) -> bool:
        return self.kind == "operator"

    def projects(self) -> list[str]:
        """The projects whose keys a user sees (where they hold a grant)."""
        return sorted(self.principal.grants) if self.principal is not None else []


async def managed_projects(lifecycle: Lifecycle, principal: Principal) -> frozenset[str]:
    """The projects where ``principal`` holds ``MANAGE_KEYS`` (granted directly or by a role)."""
    if principal.disabled:
        return frozenset()
    return frozenset([p for p in principal.grants if MANAGE_KEYS in (await lifecycle.holds(principal, p))[1]])


def may_manage(viewer: Viewer, key: KeyRecord) -> bool:
    """Whether ``viewer`` may see and act on ``key`` (every console read and write asks this):
    operators any key; a user their own keys in projects where they hold a grant, and every key of
    a project where they hold the manage-keys permission."""
    if viewer.is_operator:
        return True
    p = viewer.principal
    if p is None or p.disabled:
        return False
    return key.project in viewer.manages or (key.principal_id == p.id and key.project in p.grants)


def may_add(viewer: Viewer, principal: Principal, project: str) -> bool:
    """Whether ``viewer`` may create keys for ``principal`` in ``project``."""
    if viewer.is_operator:
        return project in principal.grants
    p = viewer.principal
    if p is None or p.disabled or project not in principal.grants:
        return False
    return p.id == principal.id or project in viewer.manages


def admin_actor(tokens: Iterable[bytes], presented: str) -> str | None:
    """The actor name of ``presented`` when it is a configured admin token, else None.

    Every token is compared in constant time, as the admin API does, and named the same way."""
    digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
    matched = False
    for t in tokens:
        matched |= hmac.compare_digest(digest, hashlib.sha256(t).digest())
    return "admin:" + digest.hex()[:8] if matched and presented else None


def looks_like_api_key(value: str, prefix: str) -> bool:
    """True for anything shaped like one of this deployment's API keys (checksum or not): an API
    key never signs in to the console, as an admin token or as an identity."""
    v = value.strip()
    return KeyFormat(prefix).well_formed(v) or v.startswith((f"{prefix}_live_", f"{prefix}_test_"))


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def trusted(peer: str | None, networks: tuple[Network, ...]) -> bool:
    if not peer or not networks:
        return False
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in n for n in networks)
