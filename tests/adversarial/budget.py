"""How hard the generative tests try.

In ``scripts/test`` they are bounded and seeded: the same examples every run, a few seconds each.
``scripts/fuzz`` sets ``KEYSTILE_FUZZ_SCALE`` (and ``KEYSTILE_FUZZ_SEED``): the same generators run
that many times more examples, from a new seed each round.
"""

from __future__ import annotations

import os

SCALE = max(1, int(os.environ.get("KEYSTILE_FUZZ_SCALE", "1")))
FUZZING = SCALE > 1
SEED = int(os.environ.get("KEYSTILE_FUZZ_SEED", "0"))


def examples(n: int) -> int:
    """``n`` examples in the suite, ``n × SCALE`` when fuzzing."""
    return n * SCALE


def seeded() -> bool:
    """Hypothesis' ``derandomize``: fixed examples in the suite, fresh ones when fuzzing."""
    return not FUZZING


def seed(default: int) -> int:
    """A fixed seed in the suite, the round's own when fuzzing (schemathesis)."""
    return SEED if FUZZING and SEED else default
