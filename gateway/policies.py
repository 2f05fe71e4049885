"""Key policies per project: which value of each policy applies in a project, and where it comes from.

Owns: ``EffectivePolicy`` and ``resolve`` (pure: no I/O). Must not: read the store or judge a
request; ``gateway.lifecycle`` reads the project's stored values, calls ``resolve`` and enforces
the result for the admin API, the CLI and the console alike.

Each field is taken from the first of these that sets it:

1. the values stored for the project through the admin API or CLI (``ProjectPolicy``),
2. ``[policy.projects.<project>]`` in the config,
3. ``[policy]``.

The stored value wins because it is the newer, deliberate decision about one project, made while
Keystile runs; the config supplies the defaults a deployment starts from. Lifetimes are seconds,
``None`` meaning no default / no maximum; a default lifetime longer than the maximum that applies
is cut to that maximum.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from gateway.config import Config, parse_duration
from gateway.models import ProjectPolicy

PolicySource = Literal["project", "config.project", "config"]
FIELDS = ("max_active_keys", "default_lifetime", "max_lifetime", "max_rotation_grace")


class EffectivePolicy(msgspec.Struct, frozen=True, kw_only=True):
    """The policy values that apply in ``project``; ``sources`` says where each came from."""

    project: str
    max_active_keys: int
    default_lifetime: float | None
    max_lifetime: float | None
    max_rotation_grace: float
    sources: dict[str, PolicySource]


def _seconds(text: str) -> float | None:
    return parse_duration(text) if text else None


def resolve(cfg: Config, project: str, stored: ProjectPolicy | None) -> EffectivePolicy:
    """The policy of ``project`` from its stored values, its config section and ``[policy]``."""
    base = cfg.policy
    values: dict[str, object] = {
        "max_active_keys": base.max_active_keys,
        "default_lifetime": _seconds(base.default_lifetime),
        "max_lifetime": _seconds(base.max_lifetime),
        "max_rotation_grace": _seconds(base.max_rotation_grace) or 0.0,
    }
    sources: dict[str, PolicySource] = dict.fromkeys(FIELDS, "config")
    section = base.projects.get(project)
    if section is not None:
        for field in FIELDS:
            value = getattr(section, field)
            if value is None:
                continue
            if field == "max_rotation_grace":
                value = _seconds(value) or 0.0
            elif field != "max_active_keys":
                value = _seconds(value)
            values[field], sources[field] = value, "config.project"
    if stored is not None:
        for field in FIELDS:
            value = getattr(stored, field)
            if value is not msgspec.UNSET:
                values[field], sources[field] = value, "project"
    default, longest = values["default_lifetime"], values["max_lifetime"]
    if isinstance(default, float | int) and isinstance(longest, float | int) and default > longest:
        values["default_lifetime"] = longest
    return msgspec.convert({**values, "project": project, "sources": sources}, EffectivePolicy)


def duration_text(seconds: float | None) -> str:
    """``90000`` -> ``"25h"``, for messages; ``None`` -> ``"none"``."""
    if seconds is None:
        return "none"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
