"""Test helpers for the real servers some suites need (PostgreSQL, Redis).

A missing server skips those tests on a developer's machine, but fails them under CI (``CI=true``),
so a CI run can never pass by silently skipping the suites that need a server.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def require_server(name: str, reason: str) -> NoReturn:
    """Skip (locally) or fail (when ``CI=true``) because server ``name`` cannot be used."""
    message = f"{name} is not available: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: a missing server fails the run)", pytrace=False)
    pytest.skip(message)
