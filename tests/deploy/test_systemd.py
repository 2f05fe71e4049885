"""deploy/systemd/keystile.service: stop budget, reload, secrets, state and hardening."""

from __future__ import annotations

from pathlib import PurePosixPath

import gateway.config as gc
from gateway.store.sqlite import path_of
from tests.deploy._files import (
    README,
    SYSTEMD_CONFIG,
    parse_seconds,
    systemd_entries,
    systemd_values,
)


def _one(key: str) -> str:
    (value,) = systemd_values("Service", key)
    return value


def test_sections() -> None:
    assert {s for s, _, _ in systemd_entries()} == {"Unit", "Service", "Install"}


def test_runs_serve_with_the_config_it_ships() -> None:
    start = _one("ExecStart").split()
    assert start[0].endswith("/keystile") and start[1] == "serve"
    config_path = start[start.index("--config") + 1]
    assert config_path == "/etc/keystile/keystile.toml"
    assert SYSTEMD_CONFIG.name == PurePosixPath(config_path).name
    gc.load(SYSTEMD_CONFIG, env={})
    readme = README.read_text(encoding="utf-8")
    assert "systemd/keystile.service" in readme and "EnvironmentFile=" in readme


def test_stop_budget_exceeds_drain() -> None:
    cfg = gc.load(SYSTEMD_CONFIG, env={})
    assert _one("KillSignal") == "SIGTERM"
    assert parse_seconds(_one("TimeoutStopSec")) > cfg.proxy.shutdown_timeout


def test_reload_sends_hup() -> None:
    reload = _one("ExecReload")
    assert "-HUP" in reload and "$MAINPID" in reload


def test_secrets_from_environment_file_only() -> None:
    assert _one("EnvironmentFile") == "/etc/keystile/keystile.env"
    for value in systemd_values("Service", "Environment"):
        name = value.partition("=")[0]
        assert name not in (gc.HASH_SECRET_ENV, gc.ADMIN_TOKENS_ENV), "secret inline in the unit"
        assert not name.endswith("__URL"), "URLs may carry passwords; use the environment file"


def test_sqlite_file_lives_in_state_directory() -> None:
    cfg = gc.load(SYSTEMD_CONFIG, env={})
    assert cfg.store.url.startswith("sqlite:")
    db = PurePosixPath(path_of(cfg.store.url))
    state = PurePosixPath("/var/lib") / _one("StateDirectory")
    assert db.is_absolute() and state in db.parents


def test_unprivileged_and_hardened() -> None:
    service = {k: v for s, k, v in systemd_entries() if s == "Service"}
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    assert service["PrivateTmp"] == "yes"
    assert "ExecStartPre" in service and " migrate " in service["ExecStartPre"] + " "
