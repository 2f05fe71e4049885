from __future__ import annotations

import hmac
import re

from gateway import keys
from gateway.keys import KeyFormat


def test_generated_keys_have_the_documented_shape() -> None:
    for env in ("live", "test"):
        k = keys.generate_key("ks", env)
        assert re.fullmatch(rf"ks_{env}_[0-9A-Za-z]{{36}}", k)
        assert KeyFormat("ks").well_formed(k)
    assert len({keys.generate_key("ks", "live") for _ in range(1000)}) == 1000


def test_checksum_rejects_any_single_change() -> None:
    fmt = KeyFormat("ks")
    k = keys.generate_key("ks", "live")
    for i in range(8, len(k)):
        for c in "0aZ":
            if k[i] != c:
                assert not fmt.well_formed(k[:i] + c + k[i + 1 :])


def test_shapes_that_are_not_keys() -> None:
    fmt = KeyFormat("ks")
    k = keys.generate_key("ks", "live")
    for bad in (
        "",
        "ks_live_",
        k + "a",
        k[:-1],
        k.replace("live", "prod"),
        "xx" + k[2:],
        k.replace("_", "-"),
        k[:10] + "é" + k[11:],
        k[:10] + " " + k[11:],
        keys.generate_key("other", "live"),
    ):
        assert not fmt.well_formed(bad)


def test_display_start_and_digest() -> None:
    k = keys.generate_key("ks", "test")
    assert keys.display_start(k) == k[:12]
    secret = b"s" * 32
    d = keys.digest(secret, k)
    assert d == hmac.digest(secret, k.encode(), "sha256")
    assert d != keys.digest(b"t" * 32, k)
    assert keys.same_digest(d, bytes(d)) and not keys.same_digest(
        d, keys.digest(secret, keys.generate_key("ks", "test"))
    )


def test_the_hot_path_digester_is_hmac_sha256() -> None:
    # Secrets shorter than, equal to and longer than SHA-256's 64-byte block (longer ones are
    # hashed first); keys of the real shape and odd lengths.
    for secret in (b"", b"s", b"k" * 32, b"x" * 64, b"y" * 65, bytes(range(256))):
        digester = keys.Digester(secret)
        for key in (keys.generate_key("ks", "live"), "", "a" * 200, keys.generate_key("acme", "test")):
            raw = key.encode()
            assert digester(raw) == hmac.digest(secret, raw, "sha256") == keys.digest(secret, key)
    d = keys.Digester(b"k" * 32)
    assert d(b"one") == d(b"one") != d(b"two")  # the saved states are copied, never advanced
