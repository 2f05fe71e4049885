"""Relative store paths follow the config file, and commands that only read never create a database.

The real ``keystile`` command in subprocesses, run from directories other than the config's.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.test_cli import keystile


def _config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "keystile.toml"
    path.write_text('[store]\nurl = "sqlite:///data.db"\n')
    return path


def test_a_relative_sqlite_path_is_next_to_the_config_file_for_every_command(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "etc")
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    third = tmp_path / "third"
    third.mkdir()

    migrated = keystile("migrate", "--config", str(cfg), cwd=elsewhere)
    assert migrated.returncode == 0, migrated.stderr
    assert (tmp_path / "etc" / "data.db").is_file()
    assert not (elsewhere / "data.db").exists()

    created = keystile(
        "keys", "create", "--config", str(cfg), "--owner", "alice", "--project", "p", "--json", cwd=elsewhere
    )
    assert created.returncode == 0, created.stderr
    key_id = json.loads(created.stdout.splitlines()[0])["id"]

    # Another directory, a relative --config: the same database, the same key.
    listed = keystile("keys", "list", "--config", "../etc/keystile.toml", "--json", cwd=third)
    assert listed.returncode == 0, listed.stderr
    assert [k["id"] for k in json.loads(listed.stdout)["items"]] == [key_id]
    assert not (third / "data.db").exists()


def test_read_only_commands_never_create_a_database(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "etc")
    db = tmp_path / "etc" / "data.db"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for command in (
        ("keys", "list"),
        ("keys", "show", "key_0000000000000000"),
        ("principals", "list"),
        ("audit",),
        ("secret", "status"),
    ):
        done = keystile(*command, "--config", str(cfg), cwd=elsewhere)
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, (command, done.stderr)
        assert str(db) in lines[0] and "keystile migrate" in lines[0], lines[0]
        assert not db.exists(), command
        assert list(elsewhere.iterdir()) == [], command


def test_serve_refuses_a_missing_database_without_creating_it(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "etc")
    (tmp_path / "etc" / "keystile.toml").write_text(
        '[store]\nurl = "sqlite:///data.db"\n[proxy]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:0"\n'
    )
    done = keystile("serve", "--config", str(cfg), cwd=tmp_path)
    assert done.returncode == 1
    assert "cannot start" in done.stderr and str(tmp_path / "etc" / "data.db") in done.stderr
    assert not (tmp_path / "etc" / "data.db").exists()
