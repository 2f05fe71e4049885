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
between deployments is worthless. The cost is one secret every instance must share. Rotating it
re-keys the store as keys are used (previous secrets are tried on a miss, ``gateway.hash_secrets``),
documented in the README.

Fingerprint: HMAC-SHA256 of a fixed label under the secret, recorded in the store so an instance
started with another secret is refused; it says nothing of the secret or of any key.
"""

from __future__ import annotations

import hmac
import secrets
import zlib
from hashlib import sha256
from typing import Final

BASE62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_CHARS: Final = 30
CHECKSUM_CHARS: Final = 6
BODY_CHARS: Final = RANDOM_CHARS + CHECKSUM_CHARS
ENVIRONMENTS: Final = ("live", "test")
DISPLAY_BODY_CHARS: Final = 4
ID_CHARS: Final = 16

KeyDigest = bytes
# Base62 digit value by ASCII byte (0 for bytes that are not base62 digits: checked before use).
_B62_BYTE: Final = tuple(BASE62.find(chr(b)) if chr(b) in BASE62 else 0 for b in range(128))


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
        """True when ``key`` has this deployment's shape and a correct checksum."""
        return self.checked(key) is not None

    def checked(self, key: str) -> bytes | None:
        """The key's ASCII bytes when it has this deployment's shape and a correct checksum.

        Cheap checks first: length, then prefix, then charset; the CRC only runs on a key of the
        right shape, and no hashing happens here. The bytes are what the digest is taken of.
        """
        head_len = self._head_len
        if len(key) != self._length or key[:head_len] not in self._heads or not key.isascii():
            return None
        raw = key.encode("ascii")
        if not raw[head_len:].isalnum():
            return None
        # Decode the 6 checksum characters rather than encoding the CRC: no string building.
        at = head_len + RANDOM_CHARS
        v = _B62_BYTE
        value = (
            (((v[raw[at]] * 62 + v[raw[at + 1]]) * 62 + v[raw[at + 2]]) * 62 + v[raw[at + 3]]) * 62
            + v[raw[at + 4]]
        ) * 62 + v[raw[at + 5]]
        return raw if value == zlib.crc32(raw[:at]) else None


def environment_of(key: str) -> str:
    return key.split("_", 2)[1]


def display_start(key: str) -> str:
    """The short, non-secret start shown in lists and logs, e.g. ``ks_live_Ab12``."""
    prefix, env, body = key.split("_", 2)
    return f"{prefix}_{env}_{body[:DISPLAY_BODY_CHARS]}"


def digest(secret: bytes, key: str | bytes) -> KeyDigest:
    """The stored, indexed form of a key: HMAC-SHA256 under the server secret."""
    return hmac.digest(secret, key if isinstance(key, bytes) else key.encode("ascii"), "sha256")


class Digester:
    """``digest(secret, key)`` for the hot path, with HMAC's two padded-key blocks hashed once.

    HMAC-SHA256 (RFC 2104) is SHA-256(key ^ opad || SHA-256(key ^ ipad || message)). The one-shot
    ``hmac.digest`` derives and hashes both pads on every call; resuming copies of the two hash
    states skips that work. Same result, checked against ``hmac.digest`` in the tests.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, secret: bytes) -> None:
        block = sha256(secret).digest() if len(secret) > 64 else secret  # SHA-256's block: 64 bytes
        block = block.ljust(64, b"\0")
        self._inner = sha256(bytes(b ^ 0x36 for b in block))
        self._outer = sha256(bytes(b ^ 0x5C for b in block))

    def __call__(self, raw: bytes) -> KeyDigest:
        inner = self._inner.copy()
        inner.update(raw)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


_FINGERPRINT_LABEL: Final = b"keystile hash-secret fingerprint v1"


def secret_fingerprint(secret: bytes) -> str:
    """The recorded, comparable form of a hash secret: 32 hex characters of an HMAC of a fixed
    label (never the secret, and never a digest a key could have)."""
    return hmac.digest(secret, _FINGERPRINT_LABEL, "sha256")[:16].hex()


def same_digest(a: KeyDigest, b: KeyDigest) -> bool:
    """Constant-time comparison of two digests."""
    return hmac.compare_digest(a, b)
