"""Which characters names, projects, scopes and metadata keys may hold: one rule, read two ways.

Owns: the refused Unicode categories, the checks ``gateway.lifecycle`` applies, and the same rules
as JSON Schema patterns for the OpenAPI document, so that what the document calls valid is what
the API accepts. Must not: do I/O, speak HTTP or know about policies.

Refused: control characters (Cc: C0, DEL and C1 — U+009B is a terminal's CSI), format characters
(Cf: bidi overrides and isolates, zero-width characters, the soft hyphen), line and paragraph
separators (Zl, Zp: U+2028, U+2029), surrogates (Cs) and code points unassigned in the Unicode
version of this Python (Cn). They are invisible, reorder or break text, and these values reach
upstreams in identity headers and terminals through the CLI.

The patterns are computed once, on first use, from ``unicodedata``; they end with ``(?!\\n)$`` so
that Python's ``$`` cannot accept a trailing newline, and ``tests/test_text.py`` holds them to the
checks for any text.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterable

REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Cn"})
_category = unicodedata.category


def refused_char(text: str) -> str | None:
    """The first character of ``text`` in a refused category, or None."""
    for c in text:
        if _category(c) in REFUSED_CATEGORIES:
            return c
    return None


def describe_char(c: str) -> str:
    """``U+009B (a control character)`` — never the character itself."""
    kind = {
        "Cc": "a control character",
        "Cf": "an invisible format character",
        "Zl": "a line separator",
        "Zp": "a paragraph separator",
        "Cs": "a surrogate",
        "Cn": "an unassigned code point",
    }.get(_category(c), "a character not allowed here")
    return f"U+{ord(c):04X} ({kind})"


def is_token_char(c: str) -> bool:
    """A character of a project or scope: allowed, no whitespace, no comma."""
    return _category(c) not in REFUSED_CATEGORIES and not c.isspace() and c != ","


# -- JSON Schema patterns --------------------------------------------------------------------
#
# A character class of every allowed character (some 700 ranges) would make generators such as
# Hypothesis crawl: they enumerate a class's members. So a pattern is a short negated class of the
# refused *assigned* characters (Cc, Cf, Zl, Zp: 24 ranges), and the unassigned ones (Cn) are
# refused by a lookahead, which generators skip and then check. Surrogates cannot occur in JSON
# text at all (a lone ``\\ud800`` escape is malformed JSON here), so the patterns leave them out;
# the checks refuse them for any other caller.


@functools.cache
def _runs() -> tuple[tuple[int, int, str], ...]:
    """Every code point as runs of one category: ``(first, last, category)``, one pass."""
    runs = []
    first, previous = 0, _category("\x00")
    for cp in range(1, 0x110000):
        category = _category(chr(cp))
        if category != previous:
            runs.append((first, cp - 1, previous))
            first, previous = cp, category
    runs.append((first, 0x10FFFF, previous))
    return tuple(runs)


def _ranges(categories: frozenset[str]) -> list[tuple[int, int]]:
    """The code points of ``categories`` as ranges (surrogates never: see above)."""
    out: list[tuple[int, int]] = []
    for first, last, category in _runs():
        if category not in categories or category == "Cs":
            continue
        if out and out[-1][1] == first - 1:
            out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
    return out


def _char(cp: int) -> str:
    # BMP code points as \uXXXX (read alike by ECMA-262, Python and Rust regexes); the others as
    # themselves (no escape spelling is shared by all three).
    return f"\\u{cp:04x}" if cp <= 0xFFFF else chr(cp)


def _items(ranges: Iterable[tuple[int, int]]) -> str:
    return "".join(_char(a) if a == b else f"{_char(a)}-{_char(b)}" for a, b in ranges)


@functools.cache
def _refused_assigned() -> str:
    return _items(_ranges(REFUSED_CATEGORIES - {"Cn", "Cs"}))


@functools.cache
def _spaces() -> str:
    # Among the characters not refused, exactly the Zs ones are whitespace (str.isspace).
    return _items(_ranges(frozenset({"Zs"})))


@functools.cache
def _no_unassigned() -> str:
    return "(?!.*[" + _items(_ranges(frozenset({"Cn"}))) + "])"


@functools.cache
def text_pattern() -> str:
    """Metadata keys: no refused character."""
    return f"^{_no_unassigned()}[^{_refused_assigned()}]*(?!\\n)$"


@functools.cache
def name_pattern() -> str:
    """Principal and key names: no refused character, and at least one that is not a space."""
    any_char = f"[^{_refused_assigned()}]"
    visible = f"[^{_refused_assigned()}{_spaces()}]"
    return f"^{_no_unassigned()}{any_char}*{visible}{any_char}*(?!\\n)$"


@functools.cache
def token_pattern() -> str:
    """Projects and scopes: no refused character, no space, no comma."""
    return f"^{_no_unassigned()}[^{_refused_assigned()}{_spaces()},]*(?!\\n)$"
