"""The hash secret from the command line: a wrong one is refused in one line, and
``keystile secret status`` counts the keys still on a previous secret."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integration.test_cli import env

A, B = "a" * 64, "b" * 64


def run(*args: str, secret: str, previous: str = "", cwd: Path) -> subprocess.CompletedProcess[str]:
    e = env()
    e["KEYSTILE_KEY_HASH_SECRET"] = secret
    e["KEYSTILE_ADMIN_TOKENS"] = "an-admin-token-for-these-tests"  # else serve warns first
    if previous:
        e["KEYSTILE_KEY_HASH_SECRET_PREVIOUS"] = previous
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=e, timeout=60, cwd=cwd
    )


def test_a_wrong_secret_is_refused_by_every_command_that_hashes_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "keystile.toml"
    cfg.write_text(
        '[store]\nurl = "sqlite:///ks.db"\n[proxy]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:0"\n'
    )
    c = str(cfg)
    assert run("migrate", "-c", c, secret=A, cwd=tmp_path).returncode == 0
    assert (
        run("keys", "create", "-c", c, "--owner", "o", "--project", "p", secret=A, cwd=tmp_path).returncode
        == 0
    )

    for command in (
        ("serve", "-c", c),
        ("migrate", "-c", c),
        ("keys", "create", "-c", c, "--owner", "o", "--project", "p"),
    ):
        done = run(*command, secret=B, cwd=tmp_path)
        assert done.returncode == 1, (command, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "KEYSTILE_KEY_HASH_SECRET is not the secret" in lines[0], done.stderr
        assert A not in done.stderr and B not in done.stderr
    # Nothing was created with the wrong secret.
    listed = run("keys", "list", "-c", c, "--json", secret=A, cwd=tmp_path)
    assert len(json.loads(listed.stdout)["items"]) == 1


def test_secret_status_counts_keys_per_secret_through_a_rotation(tmp_path: Path) -> None:
    cfg = tmp_path / "keystile.toml"
    cfg.write_text('[store]\nurl = "sqlite:///ks.db"\n')
    c = str(cfg)
    assert run("migrate", "-c", c, secret=A, cwd=tmp_path).returncode == 0
    for name in ("one", "two"):
        made = run("keys", "create", "-c", c, "--owner", name, "--project", "p", secret=A, cwd=tmp_path)
        assert made.returncode == 0, made.stderr

    before = run("secret", "status", "-c", c, "--json", secret=A, cwd=tmp_path)
    assert before.returncode == 0, before.stderr
    data = json.loads(before.stdout)
    assert (data["current_keys"], data["previous_keys"], data["newest"]) == (2, 0, True)

    # The rotation starts: a key created on the new secret, two still on the previous one.
    made = run(
        "keys", "create", "-c", c, "--owner", "three", "--project", "p", secret=B, previous=A, cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    during = run("secret", "status", "-c", c, secret=B, previous=A, cwd=tmp_path)
    assert during.returncode == 0, during.stderr
    assert "keys hashed with the current secret: 1" in during.stdout
    assert "keys hashed with a previous secret: 2" in during.stdout
    assert "KEYSTILE_KEY_HASH_SECRET_PREVIOUS" in during.stdout
    assert A not in during.stdout and B not in during.stdout
    # Seen from the old secret alone, the newest secret is another one.
    old = json.loads(run("secret", "status", "-c", c, "--json", secret=A, cwd=tmp_path).stdout)
    assert (old["newest"], old["current_keys"], old["other_keys"]) == (False, 2, 1)
