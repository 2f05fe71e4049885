"""deploy/Dockerfile: multi-stage, no compilers in the final image, non-root, healthcheck."""

from __future__ import annotations

import re

import pytest

import gateway.config as gc
from tests.deploy._files import (
    DEPLOY,
    DOCKER_DEFAULT_CONFIG,
    README,
    ROOT,
    Stage,
    config_ports,
    dockerfile_instructions,
    dockerfile_stages,
    exec_form,
)

BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|cc|make|build-essential|libc6-dev|python3-dev|cargo|rustc)\b"
)


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages()[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_parser_joins_continuations() -> None:
    ins = dockerfile_instructions("# c\nRUN a \\\n    # inner\n    && b\nUSER 1\n")
    assert [(i.keyword, i.args) for i in ins] == [("RUN", "a && b"), ("USER", "1")]


def test_multi_stage_on_python_311_slim(stages: list[Stage], final: Stage) -> None:
    assert len(stages) >= 2
    assert final.base == "python:3.11-slim"
    builders = {s.name for s in stages[:-1]}
    copied_from = {
        m.group(1) for i in final.all("COPY") if (m := re.search(r"--from=(\S+)", i.args))
    }
    assert copied_from and copied_from <= builders


def test_final_stage_has_no_build_tools(final: Stage) -> None:
    for ins in final.all("RUN"):
        assert not BUILD_TOOLS.search(ins.args), f"line {ins.line}: {ins.args}"
        assert "apt-get install" not in ins.args, f"line {ins.line}: packages in the final stage"


def test_runs_as_non_root(final: Stage) -> None:
    users = final.all("USER")
    assert users, "final stage sets no USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    # Numeric, so Kubernetes runAsNonRoot can check it; the manifests use the same uid.
    assert user.isdigit()
    k8s = (DEPLOY / "k8s" / "base" / "deployment.yaml").read_text(encoding="utf-8")
    assert f"runAsUser: {user}" in k8s


def test_ports_and_healthcheck_match_built_in_config(final: Stage) -> None:
    cfg = gc.load(DOCKER_DEFAULT_CONFIG, env={})
    proxy, admin = config_ports(cfg)
    exposed = {int(p.split("/")[0]) for i in final.all("EXPOSE") for p in i.args.split()}
    assert exposed == {proxy, admin} == {8080, 8081}
    (hc,) = final.all("HEALTHCHECK")
    assert f"127.0.0.1:{admin}/healthz" in hc.args
    assert "urllib" in hc.args
    assert not re.search(r"\b(curl|wget)\b", hc.args)


def test_built_in_config_is_the_default_command_config(final: Stage) -> None:
    (entry,) = final.all("ENTRYPOINT")
    (cmd,) = final.all("CMD")
    assert exec_form(entry.args) == ["keystile"]
    args = exec_form(cmd.args)
    assert args[0] == "serve"
    config_path = args[args.index("--config") + 1]
    copies = [
        exec_form(i.args) if i.args.startswith("[") else i.args.split() for i in final.all("COPY")
    ]
    assert [str(DOCKER_DEFAULT_CONFIG.relative_to(ROOT)), config_path] in copies
    envs = " ".join(i.args for i in final.all("ENV"))
    assert f"KEYSTILE_CONFIG={config_path}" in envs


def test_entrypoint_and_cmd_are_documented(final: Stage) -> None:
    readme = README.read_text(encoding="utf-8")
    (entry,) = final.all("ENTRYPOINT")
    (cmd,) = final.all("CMD")
    command = " ".join(exec_form(entry.args) + exec_form(cmd.args))
    assert command in readme
    assert "keystile serve --config" in readme and "keystile migrate --config" in readme


def test_copied_sources_exist_and_are_not_ignored(stages: list[Stage]) -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the ignore file is an allow-list"
    for stage in stages:
        for ins in stage.all("COPY"):
            if "--from=" in ins.args:
                continue
            words = [w for w in ins.args.split() if not w.startswith("--")]
            for src in words[:-1]:
                assert (ROOT / src).exists(), src
                assert src.rstrip("/") in allowed, f"{src} is excluded from the build context"


def test_stop_signal_is_sigterm(final: Stage) -> None:
    stops = final.all("STOPSIGNAL")
    assert not stops or stops[-1].args == "SIGTERM"
