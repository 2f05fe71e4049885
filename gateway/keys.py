"""API-key format: generation, checksum, parsing, digests and display forms.

Owns: what a Keystile key looks like and how it is turned into the digest the stores index.
Must not: do I/O, import aiohttp, the stores or the cache.

Format: ``{prefix}_{env}_{body}``; ``env`` is ``live`` or ``test``; ``body`` is 30 base62 random
characters (178.6 bits) followed by 6 base62 characters of the CRC32 of everything before them.
The checksum lets the hot path reject typos and forged keys with no lookup at all, and the fixed
shape lets secret scanners recognise a leaked key.

Digest: HMAC-SHA256 of the whole key under a server secret (``KEYSTILE_KEY_HASH_SECRET``). The keys
carry 178 bits of entropy, so plain SHA-256 would already resist brute force; the keyed hash is
chosen because digests do not stay in the database: they are Redis keys, cache keys and
invalidation messages. With a keyed hash, someone who reads Redis or a database dump cannot even
confirm whether a key found elsewhere (a paste, a log) is a live Keystile key, and a digest copied
between deployments is worthless. The cost is one secret every instance must share, and rotating it
invalidates every key — documented in the README.
"""

from __future__ import annotations

import hmac
import secrets
import zlib
from typing import Final

BASE62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_CHARS: Final = 30
CHECKSUM_CHARS: Final = 6
BODY_CHARS: Final = RANDOM_CHARS + CHECKSUM_CHARS
ENVIRONMENTS: Final = ("live", "test")
DISPLAY_BODY_CHARS: Final = 4
ID_CHARS: Final = 16

KeyDigest = bytes
_B62_VALUE: Final = {c: i for i, c in enumerate(BASE62)}


def _b62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(BASE62[r])
    return "".join(reversed(out))


def with_checksum(head: str) -> str:
    """``head`` (prefix, env and random part) completed with its base62 CRC32."""
    return head + _b62(zlib.crc32(head.encode("ascii")), CHECKSUM_CHARS)


def valid_prefix(prefix: str) -> bool:
    """A prefix is 1-16 lowercase letters or digits: no underscore, so parsing stays unambiguous."""
    return 0 < len(prefix) <= 16 and prefix.isascii() and prefix.isalnum() and prefix.islower()


def generate_key(prefix: str, env: str) -> str:
    """A new random key with a valid checksum."""
    if not valid_prefix(prefix):
        raise ValueError(f"invalid key prefix {prefix!r}")
    if env not in ENVIRONMENTS:
        raise ValueError(f"invalid key environment {env!r}")
    body = "".join(secrets.choice(BASE62) for _ in range(RANDOM_CHARS))
    head = f"{prefix}_{env}_{body}"
    return with_checksum(head)


def generate_id(kind: str) -> str:
    """A public identifier such as ``key_3fZ...``; never secret, safe to log."""
    return kind + "_" + "".join(secrets.choice(BASE62) for _ in range(ID_CHARS))


class KeyFormat:
    """The checks a presented key must pass before any lookup; built once from config."""

    __slots__ = ("_head_len", "_heads", "_length", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._heads = (f"{prefix}_live_", f"{prefix}_test_")
        self._head_len = len(prefix) + 6
        self._length = self._head_len + BODY_CHARS

    def well_formed(self, key: str) -> bool:
        """True when ``key`` has this deployment's shape and a correct checksum.

        Cheap checks first: length, then prefix, then charset; the CRC only runs on a key of the
        right shape, and no hashing happens here.
        """
        if len(key) != self._length:
            return False
        head_len = self._head_len
        if key[:head_len] not in self._heads:
            return False
        body = key[head_len:]
        if not (body.isascii() and body.isalnum()):
            return False
        # Decode the 6 checksum characters rather than encoding the CRC: no string building.
        value = 0
        for c in body[RANDOM_CHARS:]:
            value = value * 62 + _B62_VALUE[c]
        return value == zlib.crc32(key[: head_len + RANDOM_CHARS].encode("ascii"))


def environment_of(key: str) -> str:
    return key.split("_", 2)[1]


def display_start(key: str) -> str:
    """The short, non-secret start shown in lists and logs, e.g. ``ks_live_Ab12``."""
    prefix, env, body = key.split("_", 2)
    return f"{prefix}_{env}_{body[:DISPLAY_BODY_CHARS]}"


def digest(secret: bytes, key: str) -> KeyDigest:
    """The stored, indexed form of a key: HMAC-SHA256 under the server secret."""
    return hmac.digest(secret, key.encode("ascii"), "sha256")


def same_digest(a: KeyDigest, b: KeyDigest) -> bool:
    """Constant-time comparison of two digests."""
    return hmac.compare_digest(a, b)
