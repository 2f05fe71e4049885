"""Every TOML file shipped under config/ and deploy/ loads, and the reference matches the code."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest

import gateway.config as gc
from tests.deploy._files import PRODUCTION, REFERENCE, rel, toml_files

SETTING_LINE = re.compile(r"^([a-z_]+)\s*=")


def test_there_are_config_files() -> None:
    names = {rel(p) for p in toml_files()}
    assert {"config/reference.toml", "config/production.toml"} <= names
    assert len(names) >= 5  # plus the compose, kubernetes, systemd and image configs


@pytest.mark.parametrize("path", toml_files(), ids=rel)
def test_toml_loads_without_environment(path: Path) -> None:
    gc.load(path, env={})


@pytest.mark.parametrize("path", toml_files(), ids=rel)
def test_urls_in_files_carry_no_password(path: Path) -> None:
    cfg = gc.load(path, env={})
    for what, url in (("store.url", cfg.store.url), ("redis.url", cfg.redis.url)):
        assert urlsplit(url).password is None, f"{rel(path)}: {what} holds a password"


def _reference_raw() -> dict:
    return tomllib.loads(REFERENCE.read_text(encoding="utf-8"))


def test_sections_known_to_config_match_config_struct() -> None:
    # If Config grows a section that _SECTION_TYPES lacks, the reference check below would miss it.
    assert set(gc.Config.__struct_fields__) == set(gc._SECTION_TYPES) | {"routes"}


def test_reference_equals_defaults_apart_from_its_example_route() -> None:
    cfg = gc.load(REFERENCE, env={})
    assert len(cfg.routes) == 1
    # Its relative store path names a file next to it, as the defaults would from its directory.
    assert msgspec.structs.replace(cfg, routes=()) == gc.relative_to(gc.Config(), REFERENCE.parent)


def test_reference_lists_every_setting() -> None:
    raw = _reference_raw()
    assert set(raw) == set(gc._SECTION_TYPES) | {"routes"}
    for section, typ in gc._SECTION_TYPES.items():
        assert set(raw[section]) == set(typ.__struct_fields__), f"[{section}]"


def test_reference_route_shows_every_route_field() -> None:
    (route,) = _reference_raw()["routes"]
    assert set(route) == set(gc.RouteConfig.__struct_fields__)


def test_reference_values_are_written_as_defaults() -> None:
    # Types as written, not only values after conversion: 75 for a float reads as an int default.
    raw = _reference_raw()
    for section, typ in gc._SECTION_TYPES.items():
        default = msgspec.to_builtins(typ())
        for name, value in raw[section].items():
            expected = default[name]
            if isinstance(expected, tuple):
                expected = list(expected)
            assert value == expected and type(value) is type(expected), (
                f"[{section}] {name} = {value!r}, default is {expected!r}"
            )


def test_reference_comments_every_setting() -> None:
    lines = REFERENCE.read_text(encoding="utf-8").splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = SETTING_LINE.match(line)
        if not m:
            continue
        j = i - 1
        # A group of related settings may share the comment above the first of them.
        while j >= 0 and SETTING_LINE.match(lines[j]):
            j -= 1
        if j < 0 or not lines[j].lstrip().startswith("#"):
            undocumented.append(m.group(1))
    assert not undocumented, f"settings without a comment: {undocumented}"


def test_production_is_multi_instance() -> None:
    cfg = gc.load(PRODUCTION, env={})
    assert urlsplit(cfg.store.url).scheme in ("postgresql", "postgres")
    assert cfg.redis.url
    assert gc.parse_listen(cfg.proxy.listen)[0] == "0.0.0.0"
    assert gc.parse_listen(cfg.admin.listen)[0] == "0.0.0.0"
    assert cfg.policy.max_lifetime


def test_production_password_comes_from_the_environment() -> None:
    url = "postgresql://keystile:s3cret-from-env@db.internal:5432/keystile"
    cfg = gc.load(PRODUCTION, env={"KEYSTILE_STORE__URL": url})
    assert cfg.store.url == url
    assert "KEYSTILE_STORE__URL" in PRODUCTION.read_text(encoding="utf-8")
