"""The secrets a running Keystile needs: the key-hashing secret and the admin tokens.

Owns: reading them from the environment or the files the config names. Must not: put them in a
repr, an error or the effective config (``Secrets.__repr__`` shows sizes only).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final, NamedTuple

import msgspec

from gateway.config.schema import (
    ADMIN_TOKENS_ENV,
    HASH_SECRET_ENV,
    MIN_SECRET_BYTES,
    PREVIOUS_HASH_SECRET_ENV,
    Config,
    ConfigError,
)

# Admin token roles, each allowing what the ones before it allow: ``verify`` checks keys
# (``POST /v1/keys/verify``), ``read`` lists and reads keys, principals and the audit log,
# ``write`` runs the key lifecycle, ``admin`` also manages principals, grants and policies.
ADMIN_ROLES: Final = ("verify", "read", "write", "admin")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AdminToken(NamedTuple):
    """One configured admin token: the secret, its role and the label the audit log names."""

    token: bytes
    role: str
    label: str  # empty: the audit log names the token by a hash prefix


def admin_token(entry: bytes) -> AdminToken:
    """An entry of ``KEYSTILE_ADMIN_TOKENS`` or ``admin.tokens_file``: ``label:role:token``, or
    a bare token (role ``admin``, no label). Raises ValueError naming the problem, never the token."""
    parts = entry.split(b":", 2)
    if len(parts) < 3:
        label, role, token = "", "admin", entry
    else:
        label, role, token = (
            parts[0].decode("utf-8", "replace"),
            parts[1].decode("utf-8", "replace"),
            parts[2],
        )
        if not _LABEL.match(label):
            raise ValueError(
                "label must be 1-64 letters, digits, '_', '.' or '-' (entry form: label:role:token)"
            )
        if role not in ADMIN_ROLES:
            raise ValueError(f"{label}: unknown role {role!r} (use {', '.join(ADMIN_ROLES)})")
    if len(token) < 16:
        raise ValueError((f"{label}: " if label else "") + "shorter than 16 characters")
    return AdminToken(token, role, label)


class Secrets(msgspec.Struct, frozen=True):
    hash_secret: bytes
    admin_tokens: tuple[bytes, ...]
    # Secrets keys were hashed with before ``hash_secret``, tried on a miss during a rotation.
    previous_hash_secrets: tuple[bytes, ...] = ()

    def __repr__(self) -> str:
        return (
            f"Secrets(hash_secret=<{len(self.hash_secret)} bytes>, admin_tokens=<{len(self.admin_tokens)}>, "
            f"previous_hash_secrets=<{len(self.previous_hash_secrets)}>)"
        )


def load_secrets(
    cfg: Config, env: Mapping[str, str] | None = None, *, require_hash_secret: bool = True
) -> Secrets:
    """Read the key-hashing secret and admin tokens from the environment or the named files."""
    environ = os.environ if env is None else env
    problems: list[str] = []
    secret = environ.get(HASH_SECRET_ENV, "").encode()
    if not secret and cfg.security.hash_secret_file:
        secret = _read_secret_file(cfg.security.hash_secret_file, "security.hash_secret_file", problems)
    if require_hash_secret and len(secret) < MIN_SECRET_BYTES and not problems:
        what = "is not set" if not secret else f"is shorter than {MIN_SECRET_BYTES} bytes"
        problems.append(f"{HASH_SECRET_ENV}: {what} (generate one with: keystile secret)")
    previous = [p.strip().encode() for p in environ.get(PREVIOUS_HASH_SECRET_ENV, "").split(",") if p.strip()]
    for i, path in enumerate(cfg.security.previous_hash_secret_files):
        field = f"security.previous_hash_secret_files[{i}]"
        previous.append(_read_secret_file(path, field, problems))
    if any(len(p) < MIN_SECRET_BYTES for p in previous) and not problems:
        problems.append(f"{PREVIOUS_HASH_SECRET_ENV}: a secret is shorter than {MIN_SECRET_BYTES} bytes")
    # The current secret listed again as a previous one would only double every miss's lookup.
    previous = list(dict.fromkeys(p for p in previous if p != secret))
    tokens = [t.strip() for t in environ.get(ADMIN_TOKENS_ENV, "").split(",") if t.strip()]
    if cfg.admin.tokens_file:
        text = _read_secret_file(cfg.admin.tokens_file, "admin.tokens_file", problems).decode()
        tokens += [t.strip() for t in text.splitlines() if t.strip() and not t.startswith("#")]
    labels: set[str] = set()
    for t in tokens:
        try:
            parsed = admin_token(t.encode())
        except ValueError as e:
            problems.append(f"admin token: {e}")
            continue
        if parsed.label and parsed.label in labels:
            problems.append(f"admin token: {parsed.label}: label used twice")
        labels.add(parsed.label)
    if problems:
        raise ConfigError(problems)
    return Secrets(secret, tuple(t.encode() for t in tokens), tuple(previous))


def _read_secret_file(path: str, field: str, problems: list[str]) -> bytes:
    try:
        return Path(path).read_bytes().strip()
    except OSError as e:
        problems.append(f"{field}: cannot read {path}: {e.strerror}")
        return b""
