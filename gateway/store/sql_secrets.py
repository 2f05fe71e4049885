"""The hash secret in the SQL store: its recorded fingerprints and keys re-keyed to a new secret.

Owns: the ``hash_secrets`` table, ``keys.digest_secret`` and the re-key of one key's digest (with
its outbox row). Must not: import the cache or aiohttp, or ever see a secret: only fingerprints
(``gateway.keys.secret_fingerprint``) and digests reach it.
"""

from __future__ import annotations

from gateway.keys import KeyDigest
from gateway.models import Invalidation
from gateway.store.sql_base import SQLBase

# The fingerprint keys are being re-keyed to: the one recorded last.
_NEWEST = "(SELECT fingerprint FROM hash_secrets ORDER BY recorded_at DESC, fingerprint DESC LIMIT 1)"


class SecretQueries(SQLBase):
    async def hash_secrets(self) -> list[str]:
        async with self._read() as conn:
            rows = await conn.fetch("SELECT fingerprint FROM hash_secrets ORDER BY recorded_at, fingerprint")
        return [str(r[0]) for r in rows]

    async def record_hash_secret(self, fingerprint: str, now: float) -> None:
        async with self._tx() as conn:
            row = await conn.fetchrow("SELECT COUNT(*) FROM hash_secrets")
            first = row is not None and int(row[0]) == 0
            # Later than every fingerprint already recorded, whatever the clocks of the instances.
            await conn.execute(
                "INSERT INTO hash_secrets (fingerprint, recorded_at) VALUES ($1, "
                f"{self.greatest}($2, COALESCE((SELECT MAX(recorded_at) FROM hash_secrets), 0) + 0.001)) "
                "ON CONFLICT (fingerprint) DO NOTHING",
                fingerprint,
                now,
            )
            if first:
                await conn.execute(
                    "UPDATE keys SET digest_secret = $1 WHERE digest_secret IS NULL", fingerprint
                )

    async def rekey(
        self, key_id: str, old: KeyDigest, new: KeyDigest, fingerprint: str, *, previous: bool
    ) -> Invalidation:
        column = "previous_digest" if previous else "digest"
        secret = "" if previous else ", digest_secret = $4"
        async with self._tx() as conn:
            row = await conn.fetchrow(
                f"UPDATE keys SET {column} = $1{secret} WHERE id = $2 AND {column} = $3 "
                f"AND revoked_at IS NULL AND $4 = {_NEWEST} RETURNING id",
                new,
                key_id,
                old,
                fingerprint,
            )
            if row is None:
                return Invalidation(0, ())
            return await self._invalidation(conn, [old, new])

    async def keys_by_secret(self, now: float) -> dict[str | None, int]:
        async with self._read() as conn:
            rows = await conn.fetch(
                "SELECT digest_secret, COUNT(*) FROM keys WHERE revoked_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > $1) GROUP BY digest_secret",
                now,
            )
        return {None if r[0] is None else str(r[0]): int(r[1]) for r in rows}
