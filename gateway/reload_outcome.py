"""What a running server answered to its last reload, for ``keystile reload`` to report.

Owns: the outcome file next to ``serve --pid-file`` (``<pid-file>.reload``: JSON with whether the
new config was applied, the problems that refused it and the notes about settings that need a
restart), written atomically by the server after each SIGHUP and read by the command that sent
it. Must not: read the config or signal anyone.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import msgspec

_answers = itertools.count(1)  # this process's answers: each write differs from the one before


class ReloadOutcome(msgspec.Struct, frozen=True):
    applied: bool
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    pid: int = 0
    at: float = 0.0
    answer: int = 0


def outcome_path(pid_file: str | Path) -> Path:
    return Path(f"{pid_file}.reload")


def record(pid_file: str | Path, applied: bool, problems: list[str], notes: list[str]) -> None:
    """Write this server's answer to the SIGHUP it just handled (atomically: a reader never sees
    half of it)."""
    path = outcome_path(pid_file)
    outcome = ReloadOutcome(applied, tuple(problems), tuple(notes), os.getpid(), time.time(), next(_answers))
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(msgspec.json.encode(outcome))
    os.replace(tmp, path)


def read_raw(pid_file: str | Path) -> bytes | None:
    """The outcome file as it is now (None when there is none): compared before and after a
    SIGHUP to know that the server answered."""
    try:
        return outcome_path(pid_file).read_bytes()
    except FileNotFoundError:
        return None


def decode(raw: bytes) -> ReloadOutcome:
    return msgspec.json.decode(raw, type=ReloadOutcome)
