"""The CI-safe smoke benchmark: Keystile must not be grossly slower than the plain aiohttp proxy.

Judges only a ratio measured within one run (CPU per request, Keystile / plain aiohttp proxy,
threshold 1.5), never an absolute time; takes seconds and installs nothing (see
``benchmarks/smoke.py``). Skipped only while ``gateway.app`` does not exist; once it does, the
check always runs, and a Keystile that cannot start is a failure, not a skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gateway_app_exists() -> bool:
    try:
        return importlib.util.find_spec("gateway.app") is not None
    except ImportError:  # gateway itself missing
        return False


def test_keystile_not_grossly_slower_than_plain_aiohttp_proxy() -> None:
    if not _gateway_app_exists():
        reason = "gateway.app does not exist yet: Keystile's proxy is not written"
        if os.environ.get("CI") == "true":
            reason += " (CI=true, but there is nothing to measure)"
        pytest.skip(reason)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.smoke", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"benchmarks.smoke printed nothing (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    result = json.loads(lines[-1])
    status = result["status"]
    assert status != "keystile_unavailable", f"Keystile did not start:\n{result.get('reason')}"
    assert status != "error", f"smoke benchmark could not run: {result.get('reason')}"
    assert status == "pass", (
        f"Keystile used {result['ratio']:.2f}x the CPU per request of the plain aiohttp proxy "
        f"(threshold {result['threshold']}): {result['cpu_us']}; runs: {result['runs']}"
    )
