"""docker-compose.yml: wiring, config mount, ports and environment agree with the config."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest

import gateway.config as gc
from tests.deploy._files import (
    COMPOSE_FILE,
    DEPLOY,
    README,
    config_ports,
    env_name_problem,
    load_yaml_docs,
    parse_seconds,
)

INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_yaml_docs(COMPOSE_FILE)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _substitute(value: str) -> str:
    # Interpolated variables become well-formed stand-ins (hex, URL-safe).
    return INTERPOLATION.sub(lambda m: "0" * 64 if "SECRET" in m.group(1) else "a" * 32, value)


def _config_mount(service: dict[str, Any]) -> tuple[str, str]:
    """(host path, container path) of the volume carrying the --config file."""
    cmd = service["command"]
    config_path = cmd[cmd.index("--config") + 1]
    for vol in service.get("volumes", []):
        src, _, rest = vol.partition(":")
        dst = rest.partition(":")[0]
        if dst == config_path:
            return src, dst
    raise AssertionError(f"no volume mounted at {config_path}")


def _effective(service: dict[str, Any]) -> tuple[gc.Config, dict[str, str]]:
    src, _ = _config_mount(service)
    env = {k: _substitute(v) for k, v in _env(service).items()}
    return gc.load((DEPLOY / src).resolve(), env=env), env


def test_services(services: dict[str, Any]) -> None:
    assert {"keystile", "migrate", "postgres", "redis", "echo"} <= set(services)


@pytest.mark.parametrize("name", ["keystile", "migrate"])
def test_config_file_is_mounted_and_exists(services: dict[str, Any], name: str) -> None:
    src, _ = _config_mount(services[name])
    path = (DEPLOY / src).resolve()
    assert path.is_file(), path
    assert path.parent.parent == DEPLOY


def test_both_use_the_same_config(services: dict[str, Any]) -> None:
    assert _config_mount(services["keystile"]) == _config_mount(services["migrate"])


def test_ports_match_listeners(services: dict[str, Any]) -> None:
    cfg, _ = _effective(services["keystile"])
    proxy, admin = config_ports(cfg)
    published = {}
    for spec in services["keystile"]["ports"]:
        parts = str(spec).split(":")
        published[int(parts[-1])] = parts[:-1]
    assert set(published) == {proxy, admin}
    assert published[admin][0] == "127.0.0.1", "the admin port must not be published publicly"
    for host in (cfg.proxy.listen, cfg.admin.listen):
        assert gc.parse_listen(host)[0] == "0.0.0.0", "a container listener must accept outside"


def test_effective_config_and_secrets_load(services: dict[str, Any]) -> None:
    cfg, env = _effective(services["keystile"])
    gc.load_secrets(cfg, env)
    assert cfg.store.url.startswith("postgresql://")
    assert "@postgres:" in cfg.store.url
    assert cfg.redis.url.startswith("redis://redis:")
    assert cfg.routes and all("//echo:" in r.upstream for r in cfg.routes)


def test_environment_names_are_read(services: dict[str, Any]) -> None:
    for name in ("keystile", "migrate"):
        for var in _env(services[name]):
            if var.startswith("KEYSTILE_"):
                assert env_name_problem(var) is None, var


def test_migrate_runs_first(services: dict[str, Any]) -> None:
    assert services["migrate"]["command"][0] == "migrate"
    assert services["migrate"].get("restart", "no") == "no"
    dep = services["keystile"]["depends_on"]
    assert dep["migrate"]["condition"] == "service_completed_successfully"
    assert dep["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["keystile"]["command"][0] == "serve"


def test_store_url_matches_postgres_service(services: dict[str, Any]) -> None:
    cfg, _ = _effective(services["keystile"])
    pg = _env(services["postgres"])
    url = urlsplit(cfg.store.url)
    assert url.username == pg["POSTGRES_USER"]
    assert url.path.lstrip("/") == pg["POSTGRES_DB"]
    # Same interpolated variable on both sides.
    store_env = _env(services["keystile"])["KEYSTILE_STORE__URL"]
    (var,) = {m.group(1) for m in INTERPOLATION.finditer(store_env)}
    assert INTERPOLATION.fullmatch(pg["POSTGRES_PASSWORD"]).group(1) == var


def test_stop_grace_exceeds_drain(services: dict[str, Any]) -> None:
    cfg, _ = _effective(services["keystile"])
    assert parse_seconds(services["keystile"]["stop_grace_period"]) > cfg.proxy.shutdown_timeout


def test_image_is_built_from_the_dockerfile(services: dict[str, Any]) -> None:
    for name in ("keystile", "migrate"):
        build = services[name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert (context / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()


def test_demo_upstream_is_named_in_readme(services: dict[str, Any]) -> None:
    image = services["echo"]["image"].partition(":")[0]
    assert image in README.read_text(encoding="utf-8")


def test_env_example_lists_every_interpolated_variable(compose: dict[str, Any]) -> None:
    used = set(INTERPOLATION.findall(COMPOSE_FILE.read_text(encoding="utf-8")))
    example = DEPLOY / ".env.example"
    defined = {
        line.partition("=")[0].strip()
        for line in example.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert used == defined
