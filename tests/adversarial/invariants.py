"""The four invariants every adversarial test checks, and the helpers that check them.

1. **No cross-talk.** Every response a client receives answers the request that client sent: never
   another client's, never bytes an upstream sent after a finished response. Tests give each
   request a unique nonce that an honest upstream echoes, and check every answer carries its own
   (``answers_own_nonce``).
2. **No entry without a key.** Nothing reaches an upstream on an ``auth = "required"`` route
   without a valid key, whatever the path, headers or framing: tests compare what the recording
   upstream received with what was authorised.
3. **Identity is the key's owner.** The identity headers an upstream sees belong to the key that
   was checked (``X-Keystile-Key-Id`` / ``-Owner`` match the key the client sent).
4. **No key leaves.** No string that passes Keystile's key-format check appears in a log line, a
   metric, an error body, or a header sent upstream (``leaked_keys``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from gateway.keys import KeyFormat

# Anything shaped like a key of any prefix; ``leaked_keys`` then keeps those with a valid checksum.
_CANDIDATE = re.compile(r"[a-z0-9]{1,16}_(?:live|test)_[0-9A-Za-z]{36}")


def leaked_keys(text: str | bytes, prefix: str = "ks") -> list[str]:
    """Every substring of ``text`` that passes the key-format check (shape and checksum)."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    fmt = KeyFormat(prefix)
    found = []
    for m in _CANDIDATE.finditer(text):
        s = m.group(0)
        # The regex is greedy on the prefix: try every start that leaves a key-sized tail.
        for i in range(len(s)):
            if fmt.well_formed(s[i:]):
                found.append(s[i:])
                break
    return found


def assert_no_key(where: str, texts: Iterable[str | bytes], prefix: str = "ks") -> None:
    """Invariant 4 over everything in ``texts`` (log lines, bodies, header values)."""
    for text in texts:
        leaked = leaked_keys(text, prefix)
        assert not leaked, f"{where}: a key left the gateway ({len(leaked)} found)"


def answers_own_nonce(nonce: str, body: bytes) -> bool:
    """Invariant 1 for one answer: the body names this request's nonce and no other."""
    return nonce.encode() in body
