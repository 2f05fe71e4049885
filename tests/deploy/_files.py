"""Shared readers for the deployment tests: paths, YAML, the Dockerfile, the systemd unit.

Pure and offline: nothing here starts a process, touches the network or needs Docker.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import gateway.config as gc

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONFIG_DIR = ROOT / "config"
K8S = DEPLOY / "k8s"
K8S_BASE = K8S / "base"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKER_DEFAULT_CONFIG = DEPLOY / "docker" / "keystile.toml"
SYSTEMD_UNIT = DEPLOY / "systemd" / "keystile.service"
SYSTEMD_CONFIG = DEPLOY / "systemd" / "keystile.toml"
README = DEPLOY / "README.md"
REFERENCE = CONFIG_DIR / "reference.toml"
PRODUCTION = CONFIG_DIR / "production.toml"

# Environment variables Keystile reads that are not KEYSTILE_<SECTION>__<FIELD> overrides.
CONFIG_ENV = getattr(gc, "CONFIG_ENV", "KEYSTILE_CONFIG")  # read by the CLI
SECRET_ENVS = frozenset({gc.HASH_SECRET_ENV, gc.ADMIN_TOKENS_ENV})
# Optional: previous hash secrets, set only while a rotation re-keys the store.
PLAIN_ENVS = SECRET_ENVS | {CONFIG_ENV, gc.PREVIOUS_HASH_SECRET_ENV}
# Overrides that carry credentials inside a URL.
SECRET_OVERRIDES = frozenset({"KEYSTILE_STORE__URL", "KEYSTILE_REDIS__URL"})

# A KEYSTILE_ name as written in text; "KEYSTILE_<SECTION>__<FIELD>" (a pattern) is not one.
ENV_NAME = re.compile(r"\bKEYSTILE_[A-Z0-9_]+\b(?![<{])")


def _local_only(path: Path) -> bool:
    # deploy/.env and the like hold an operator's real secrets and are never committed.
    return path.name == ".env" or path.name.endswith(".env") or "__pycache__" in path.parts


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and not _local_only(p))


def yaml_files() -> list[Path]:
    return [p for p in deploy_files() if p.suffix in (".yml", ".yaml")]


def k8s_files() -> list[Path]:
    return [p for p in yaml_files() if K8S in p.parents]


def toml_files() -> list[Path]:
    return sorted([*CONFIG_DIR.rglob("*.toml"), *DEPLOY.rglob("*.toml")])


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load_yaml_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_objects(path: Path) -> list[dict[str, Any]]:
    return [d for d in load_yaml_docs(path) if isinstance(d, dict) and "kind" in d]


def k8s_base_resources() -> dict[str, dict[str, Any]]:
    """Objects applied by the base kustomization, keyed ``Kind/name``."""
    kust = load_yaml_docs(K8S_BASE / "kustomization.yaml")[0]
    out: dict[str, dict[str, Any]] = {}
    for name in kust["resources"]:
        for obj in k8s_objects(K8S_BASE / name):
            out[f"{obj['kind']}/{obj['metadata']['name']}"] = obj
    return out


def env_name_problem(name: str) -> str | None:
    """Why Keystile would not read ``name``, or None when it does."""
    if name in PLAIN_ENVS:
        return None
    rest = name.removeprefix(gc.ENV_PREFIX)
    if "__" not in rest:
        return f"{name}: not a secret/config variable and not KEYSTILE_<SECTION>__<FIELD>"
    section, _, fld = rest.lower().partition("__")
    typ = gc._SECTION_TYPES.get(section)
    if typ is None:
        return f"{name}: no section [{section}]"
    if fld not in typ.__struct_fields__:
        return f"{name}: section [{section}] has no field {fld!r}"
    return None


def listen_port(value: str) -> int:
    return gc.parse_listen(value)[1]


def config_ports(cfg: gc.Config) -> tuple[int, int]:
    """(proxy port, admin port)."""
    return listen_port(cfg.proxy.listen), listen_port(cfg.admin.listen)


def parse_seconds(text: str | int | float) -> float:
    """``45s``, ``1m30s``, ``45`` (compose and systemd style) -> seconds."""
    if isinstance(text, int | float):
        return float(text)
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), text
    scale = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def fake_secret_env() -> dict[str, str]:
    """Secret values of a valid shape, for checking that a deployment supplies what is read."""
    return {gc.HASH_SECRET_ENV: "0" * 64, gc.ADMIN_TOKENS_ENV: "a" * 32 + "," + "b" * 32}


# ---- Dockerfile ---------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Logical instructions: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        joined = " ".join(b for b in buf if b)
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buf = []
    assert not buf, "Dockerfile ends inside a continued instruction"
    return out


def dockerfile_stages(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order)."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in dockerfile_instructions(path.read_text(encoding="utf-8")):
        if ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--")]
            base = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0]
            )
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            if ins.keyword == "ARG" and "=" in ins.args:
                k, _, v = ins.args.partition("=")
                args[k.strip()] = v.strip()
        else:
            stages[-1].instructions.append(ins)
    return args, stages


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) instruction argument, or the shell form split like a shell."""
    args = args.strip()
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value
    return shlex.split(args)


# ---- systemd ------------------------------------------------------------------------------------


def systemd_entries(path: Path = SYSTEMD_UNIT) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; repeated keys are kept."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not an assignment: {raw!r}"
        out.append((section, key.strip(), value.strip()))
    return out


def systemd_values(section: str, key: str, path: Path = SYSTEMD_UNIT) -> list[str]:
    return [v for s, k, v in systemd_entries(path) if s == section and k == key]
