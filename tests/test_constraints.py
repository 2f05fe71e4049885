"""constraints.txt pins every dependency the tests and the image install, within pyproject's ranges."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"constraints.txt: {line!r} is not an exact pin"
        key = canonicalize_name(name)
        assert key not in pins, f"constraints.txt: {name} pinned twice"
        pins[key] = version
    return pins


def test_every_direct_dependency_is_pinned_inside_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = _pins()
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    assert "hiredis" in pins  # redis[hiredis]'s extra
    for text in wanted:
        req = Requirement(text)
        key = canonicalize_name(req.name)
        assert key in pins, f"{req.name} is not pinned in constraints.txt (run scripts/lock)"
        assert req.specifier.contains(pins[key], prereleases=True), (
            f"{req.name}=={pins[key]} is outside pyproject's {req.specifier} (run scripts/lock)"
        )


def test_installs_use_the_pins() -> None:
    test_script = (ROOT / "scripts" / "test").read_text(encoding="utf-8")
    assert re.search(r"pip install .*-c constraints\.txt", test_script)
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"pip install -c /src/constraints\.txt /src", dockerfile)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "scripts/lock && scripts/test" in readme
