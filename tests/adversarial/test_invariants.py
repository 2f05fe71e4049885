"""The invariant helpers themselves must be able to fail."""

from __future__ import annotations

from gateway.keys import generate_key
from tests.adversarial.invariants import assert_no_key, leaked_keys


def test_a_key_is_found_anywhere_in_text() -> None:
    key = generate_key("ks", "live")
    assert leaked_keys(f'{{"line": "x-api-key: {key}\\r\\n"}}') == [key]
    assert leaked_keys(("prefix" + key).encode()) == [key]


def test_a_key_shaped_string_with_a_bad_checksum_is_not_a_key() -> None:
    key = generate_key("ks", "live")
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert leaked_keys(forged) == []


def test_assert_no_key_fails_on_a_leak() -> None:
    key = generate_key("ks", "test")
    try:
        assert_no_key("log", ["fine", key])
    except AssertionError:
        return
    raise AssertionError("a leaked key went unnoticed")
