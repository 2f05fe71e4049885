"""The character rules of ``gateway.text``: what the OpenAPI patterns accept is exactly what the
lifecycle accepts, for any text."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway import text
from gateway.lifecycle import MAX_NAME, PolicyError, _check_name, check_metadata, check_project, check_scopes
from tests.adversarial import budget


def matcher(pattern: str):  # type: ignore[no-untyped-def]
    compiled = re.compile(pattern)
    return lambda value: compiled.search(value) is not None


NAME, TOKEN, KEY = matcher(text.name_pattern()), matcher(text.token_pattern()), matcher(text.text_pattern())

# Every code point but surrogates (JSON text cannot carry a lone one), unassigned ones included,
# mixed with the characters that matter most here.
chars = st.characters(codec="utf-8") | st.sampled_from(" ,\n\t\x9b\u2028\u202e\u200b\u00a0\u0378é张🔑")
texts = st.text(chars, max_size=12)


def accepted(check, value: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        check(value)
    except PolicyError:
        return False
    return True


@settings(max_examples=budget.examples(500), derandomize=budget.seeded(), database=None)
@given(texts)
@example("ab\n")  # Python's $ also matches before a final newline: the patterns must not
@example(" \u3000 ")
@example("a,b")
def test_the_document_patterns_and_the_checks_agree(value: str) -> None:
    assert NAME(value) == accepted(_check_name, value), repr(value)
    assert (TOKEN(value) and len(value) >= 1) == accepted(check_project, value), repr(value)
    assert (TOKEN(value) and len(value) >= 1) == accepted(lambda v: check_scopes([v], "scopes"), value)
    assert KEY(value) == accepted(lambda v: check_metadata({v: ""}), value), repr(value)


@pytest.mark.parametrize("c", ["\x00", "\x1f", "\x7f", "\x85", "\x9b", "\u00ad", "\u061c", "\u200b", "\u200e",
                               "\u2028", "\u2029", "\u202a", "\u202e", "\u2066", "\u2069", "\ufeff", "\U000e0001",
                               "\ud800", "\u0378"])
def test_controls_format_characters_separators_surrogates_and_unassigned_are_refused(c: str) -> None:
    assert text.refused_char(f"a{c}b") == c
    assert unicodedata.category(c) in text.REFUSED_CATEGORIES
    assert c not in text.describe_char(c) and f"U+{ord(c):04X}" in text.describe_char(c)
    with pytest.raises(PolicyError):
        _check_name(f"a{c}b")


def test_names_are_stripped_and_bounded() -> None:
    assert _check_name("  José  ") == "José"
    assert _check_name("x" * MAX_NAME) == "x" * MAX_NAME
    with pytest.raises(PolicyError):
        _check_name("\u3000 \u00a0")
