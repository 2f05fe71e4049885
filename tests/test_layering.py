"""The layering check (``lint-imports`` with pyproject.toml's contracts) keeps checking: the code as
it is passes, and each kind of wrong import, put into a copy of the package, fails the contract
it breaks, by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the copy of the package in ``tree`` (first on the path, so it is the one
    analysed, not the installed checkout)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT), "--no-logo", "--no-cache", str(tree / "pyproject.toml")],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "gateway", tmp_path / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_package_as_it_is_keeps_every_contract(tree: Path) -> None:
    done = lint(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


# (file, import put into it, the contract it breaks)
VIOLATIONS = [
    ("store/sqlite.py", "import aiohttp", "the store knows no cache and no HTTP"),
    ("store/sql_keys.py", "from gateway.cache import IdentityCache", "the store knows no cache and no HTTP"),
    ("cache/tiers.py", "from aiohttp import web", "the cache knows no HTTP and no store"),
    (
        "proxy/exchange.py",
        "from gateway.keys import KeyFormat",
        "forwarding knows nothing of how keys are checked",
    ),
    # A chain through a third module counts: forwarding imports routing.
    (
        "routing.py",
        "from gateway.cache import IdentityCache",
        "forwarding knows nothing of how keys are checked",
    ),
    ("upstream/pool.py", "from gateway import auth", "forwarding knows nothing of how keys are checked"),
    ("auth.py", "from gateway.store import Store", "auth never calls the store"),
    ("config/load.py", "import asyncpg", "config opens no connections"),
    ("admin/operations.py", "from gateway.proxy import Forwarder", "admin never forwards"),
    ("keys.py", "from gateway.config import Config", "low-level modules import nothing of the upper layers"),
    ("wire.py", "from gateway import handler", "low-level modules import nothing of the upper layers"),
    (
        "handler.py",
        "from gateway.app import Gateway",
        "only the CLI starts the app: no piece imports the wiring",
    ),
]


@pytest.mark.parametrize(
    ("path", "line", "contract"), VIOLATIONS, ids=[v[0] + ": " + v[1] for v in VIOLATIONS]
)
def test_a_wrong_import_breaks_its_contract(tree: Path, path: str, line: str, contract: str) -> None:
    with (tree / "gateway" / path).open("a") as f:
        f.write(f"\n{line}  # injected by tests/test_layering.py\n")
    done = lint(tree)
    assert done.returncode != 0, done.stdout
    broken = done.stdout.partition("Broken contracts")[2]
    assert contract in broken, done.stdout
