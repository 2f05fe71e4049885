"""No secret is committed: manifests hold references or obvious placeholders only."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import gateway.config as gc
from tests.deploy._files import (
    COMPOSE_FILE,
    CONFIG_DIR,
    DEPLOY,
    K8S_BASE,
    SECRET_ENVS,
    SECRET_OVERRIDES,
    deploy_files,
    k8s_files,
    k8s_objects,
    load_yaml_docs,
    rel,
)

PLACEHOLDER = re.compile(r"REPLACE|CHANGE[-_ ]?ME|PASSWORD|<[a-z-]+>|\.\.\.", re.I)
INTERPOLATED = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:?[?-][^}]*)?\}$")
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"`)]+")
# Secret-looking material: `keystile secret` output (64 hex), Keystile keys, private keys.
LEAKS = [
    re.compile(r"\b[0-9a-f]{64}\b", re.I),
    re.compile(r"\b[a-z0-9]{1,16}_(live|test)_[0-9A-Za-z]{36}\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def _text_files() -> list[Path]:
    return [*deploy_files(), *sorted(p for p in CONFIG_DIR.rglob("*") if p.is_file())]


@pytest.mark.parametrize("path", _text_files(), ids=rel)
def test_no_secret_material(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for pattern in LEAKS:
        assert not pattern.search(text), f"{rel(path)}: matches {pattern.pattern}"


@pytest.mark.parametrize("path", _text_files(), ids=rel)
def test_urls_carry_no_real_password(path: Path) -> None:
    for url in URL.findall(path.read_text(encoding="utf-8")):
        password = urlsplit(url).password
        if password is None:
            continue
        ok = PLACEHOLDER.search(password) or password.startswith("${")
        assert ok, f"{rel(path)}: {url} carries a password"


def test_leak_patterns_work() -> None:
    assert URL.findall("x postgresql://u:hunter2@db:5432/k y") == [
        "postgresql://u:hunter2@db:5432/k"
    ]
    assert LEAKS[0].search("a" * 64)
    assert not PLACEHOLDER.search("hunter2")


def _k8s_env(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [e for c in spec.get("containers", []) for e in c.get("env", [])]


@pytest.mark.parametrize("path", k8s_files(), ids=rel)
def test_k8s_secrets_are_references(path: Path) -> None:
    for obj in k8s_objects(path):
        for e in _k8s_env(obj):
            if e["name"] in SECRET_ENVS | SECRET_OVERRIDES:
                assert "value" not in e, f"{rel(path)}: {e['name']} has a literal value"
                assert "secretKeyRef" in e["valueFrom"], f"{rel(path)}: {e['name']}"
        if obj["kind"] == "Secret":
            assert path.name == "secret.example.yaml", f"{rel(path)}: a Secret in the manifests"


def test_secret_example_values_are_placeholders() -> None:
    (secret,) = k8s_objects(K8S_BASE / "secret.example.yaml")
    assert "data" not in secret, "base64 data hides whether a value is a placeholder"
    for key, value in secret["stringData"].items():
        assert "REPLACE" in value, f"{key}: not an obvious placeholder"


def test_compose_secrets_are_interpolated() -> None:
    (doc,) = load_yaml_docs(COMPOSE_FILE)
    for name, svc in doc["services"].items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), f"{name}: use a mapping for environment"
        for var, value in env.items():
            value = str(value)
            if var in SECRET_ENVS or var.endswith("PASSWORD"):
                assert INTERPOLATED.match(value), f"{name}.{var} = {value!r}"
            if var in SECRET_OVERRIDES:
                password = urlsplit(value).password
                assert password is None or INTERPOLATED.match(password), f"{name}.{var}"


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.env.example")), ids=rel)
def test_env_examples_are_empty(path: Path) -> None:
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, value = line.partition("=")
        assert value.strip() == "", f"{rel(path)}: {name} has a value"


def test_secret_names_are_the_ones_config_reads() -> None:
    assert {gc.HASH_SECRET_ENV, gc.ADMIN_TOKENS_ENV} == SECRET_ENVS
