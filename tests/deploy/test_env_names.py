"""Every KEYSTILE_* variable named in the deployment files is one Keystile reads."""

from __future__ import annotations

from pathlib import Path

import pytest

import gateway.config as gc
from tests.deploy._files import (
    ENV_NAME,
    README,
    deploy_files,
    env_name_problem,
    rel,
    toml_files,
)


def test_name_checker_agrees_with_config_loader() -> None:
    # The rule the tests apply is the rule config.py applies.
    for section, typ in gc._SECTION_TYPES.items():
        for fld in typ.__struct_fields__:
            name = f"KEYSTILE_{section.upper()}__{fld.upper()}"
            assert env_name_problem(name) is None
    assert env_name_problem("KEYSTILE_STORE__PASSWORD") is not None
    assert env_name_problem("KEYSTILE_ROUTES__PREFIX") is not None
    assert env_name_problem("KEYSTILE_HASH_SECRET") is not None
    with pytest.raises(gc.ConfigError):
        gc.load(None, env={"KEYSTILE_STORE__PASSWORD": "x"})
    assert env_name_problem(gc.HASH_SECRET_ENV) is None
    assert env_name_problem(gc.ADMIN_TOKENS_ENV) is None


def test_pattern_finds_names_and_skips_placeholders() -> None:
    text = "KEYSTILE_STORE__URL=x, ${KEYSTILE_ADMIN_TOKENS:?}, KEYSTILE_<SECTION>__<FIELD>"
    assert ENV_NAME.findall(text) == ["KEYSTILE_STORE__URL", "KEYSTILE_ADMIN_TOKENS"]


def _files() -> list[Path]:
    return [*deploy_files(), *toml_files()]


@pytest.mark.parametrize("path", _files(), ids=rel)
def test_every_named_variable_is_read(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    problems = sorted({p for n in ENV_NAME.findall(text) if (p := env_name_problem(n))})
    assert not problems, f"{rel(path)}:\n" + "\n".join(problems)


def test_readme_states_the_naming_rule_and_secrets() -> None:
    text = README.read_text(encoding="utf-8")
    assert "KEYSTILE_<SECTION>__<FIELD>" in text
    for name in (gc.HASH_SECRET_ENV, gc.ADMIN_TOKENS_ENV, "KEYSTILE_STORE__URL"):
        assert name in text


def test_the_deployment_names_the_variables_that_matter() -> None:
    seen = {n for p in deploy_files() for n in ENV_NAME.findall(p.read_text(encoding="utf-8"))}
    assert {gc.HASH_SECRET_ENV, gc.ADMIN_TOKENS_ENV, "KEYSTILE_STORE__URL"} <= seen
