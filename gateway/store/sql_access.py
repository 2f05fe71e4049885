"""Roles and per-project policies in the SQL store.

Owns: role rows, the grants' references to them when a role goes, project policy rows, and the
audit and outbox rows each change writes. Must not: import the cache or aiohttp, or judge a
policy value (``gateway.lifecycle`` does).

A role change reaches keys through the outbox like a grant change: the write records the digests
of every key, in the role's project, of every principal whose grant names the role.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from gateway.keys import KeyDigest
from gateway.models import Invalidation, ProjectPolicy, Role
from gateway.store import NotFound
from gateway.store.sql_base import Conn, Row, SQLBase, _j, _scopes_dec

_ROLE_COLS = "project, name, scopes, description, created_at, updated_at"
_policy_dec = msgspec.json.Decoder(ProjectPolicy)


def _role(row: Row) -> Role:
    return Role(
        project=row[0],
        name=row[1],
        scopes=_scopes_dec.decode(row[2]),
        description=row[3],
        created_at=row[4],
        updated_at=row[5],
    )


def _role_public(role: Role) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(role)
    return data


class AccessQueries(SQLBase):
    # -- roles -----------------------------------------------------------------------------

    async def list_roles(self, project: str) -> list[Role]:
        async with self._read() as conn:
            rows = await conn.fetch(
                f"SELECT {_ROLE_COLS} FROM roles WHERE project = $1 ORDER BY name", project
            )
        return [_role(r) for r in rows]

    async def get_role(self, project: str, name: str) -> Role:
        async with self._read() as conn:
            return await self._role_row(conn, project, name)

    async def _role_row(self, conn: Conn, project: str, name: str) -> Role:
        row = await conn.fetchrow(
            f"SELECT {_ROLE_COLS} FROM roles WHERE project = $1 AND name = $2", project, name
        )
        if row is None:
            raise NotFound(f"project {project!r} has no role {name!r}")
        return _role(row)

    async def _holders(self, conn: Conn, project: str, name: str) -> list[tuple[str, list[str]]]:
        """(principal id, roles held) of every grant in ``project`` that names role ``name``."""
        rows = await conn.fetch(
            "SELECT principal_id, roles FROM grants WHERE project = $1 AND roles <> '[]' "
            "ORDER BY principal_id",
            project,
        )
        held = [(r[0], list(_scopes_dec.decode(r[1]))) for r in rows]
        return [(pid, names) for pid, names in held if name in names]

    async def _holder_digests(self, conn: Conn, project: str, principal_ids: list[str]) -> list[KeyDigest]:
        out: list[KeyDigest] = []
        for pid in principal_ids:
            rows = await conn.fetch(
                "SELECT digest, previous_digest FROM keys WHERE principal_id = $1 AND project = $2",
                pid,
                project,
            )
            out += [bytes(d) for r in rows for d in r if d is not None]
        return out

    async def put_role(self, role: Role, actor: str) -> tuple[Role, Invalidation]:
        async with self._tx() as conn:
            try:
                before: Role | None = await self._role_row(conn, role.project, role.name)
            except NotFound:
                before = None
            await conn.execute(
                f"INSERT INTO roles ({_ROLE_COLS}) VALUES ($1, $2, $3, $4, $5, $6) "
                "ON CONFLICT (project, name) DO UPDATE SET scopes = $3, description = $4, updated_at = $6",
                role.project,
                role.name,
                _j(sorted(set(role.scopes))),
                role.description,
                role.created_at,
                role.updated_at,
            )
            after = await self._role_row(conn, role.project, role.name)
            await self._audit(
                conn,
                at=role.updated_at,
                actor=actor,
                action="role.create" if before is None else "role.update",
                target_type="role",
                target_id=f"{role.project}/{role.name}",
                principal_id=None,
                before=None if before is None else _role_public(before),
                after=_role_public(after),
            )
            holders = [pid for pid, _ in await self._holders(conn, role.project, role.name)]
            digests = await self._holder_digests(conn, role.project, holders)
            return after, await self._invalidation(conn, digests)

    async def delete_role(self, project: str, name: str, actor: str) -> Invalidation:
        async with self._tx() as conn:
            before = await self._role_row(conn, project, name)
            holders = await self._holders(conn, project, name)
            for pid, names in holders:
                await conn.execute(
                    "UPDATE grants SET roles = $1 WHERE principal_id = $2 AND project = $3",
                    _j([n for n in names if n != name]),
                    pid,
                    project,
                )
            await conn.execute("DELETE FROM roles WHERE project = $1 AND name = $2", project, name)
            await self._audit(
                conn,
                at=time.time(),
                actor=actor,
                action="role.delete",
                target_type="role",
                target_id=f"{project}/{name}",
                principal_id=None,
                before={**_role_public(before), "held_by": [pid for pid, _ in holders]},
                after=None,
            )
            digests = await self._holder_digests(conn, project, [pid for pid, _ in holders])
            return await self._invalidation(conn, digests)

    # -- per-project policies --------------------------------------------------------------

    async def get_project_policy(self, project: str) -> ProjectPolicy | None:
        async with self._read() as conn:
            row = await conn.fetchrow("SELECT policy FROM project_policies WHERE project = $1", project)
        return None if row is None else _policy_dec.decode(row[0])

    async def put_project_policy(self, project: str, policy: ProjectPolicy, actor: str) -> ProjectPolicy:
        now = time.time()
        async with self._tx() as conn:
            row = await conn.fetchrow("SELECT policy FROM project_policies WHERE project = $1", project)
            await conn.execute(
                "INSERT INTO project_policies (project, policy, updated_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (project) DO UPDATE SET policy = $2, updated_at = $3",
                project,
                _j(policy),
                now,
            )
            await self._audit(
                conn,
                at=now,
                actor=actor,
                action="project.policy.update",
                target_type="project",
                target_id=project,
                principal_id=None,
                before=None if row is None else msgspec.json.decode(row[0]),
                after=msgspec.to_builtins(policy),
            )
        return policy

    async def delete_project_policy(self, project: str, actor: str) -> None:
        now = time.time()
        async with self._tx() as conn:
            row = await conn.fetchrow("SELECT policy FROM project_policies WHERE project = $1", project)
            if row is None:
                raise NotFound(f"project {project!r} has no policy of its own")
            await conn.execute("DELETE FROM project_policies WHERE project = $1", project)
            await self._audit(
                conn,
                at=now,
                actor=actor,
                action="project.policy.delete",
                target_type="project",
                target_id=project,
                principal_id=None,
                before=msgspec.json.decode(row[0]),
                after=None,
            )
