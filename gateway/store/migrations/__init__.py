"""Numbered schema migrations, one SQL file per version and backend.

Owns: finding and ordering the files. Must not: connect to anything. A file's name starts with its
version (``0001_initial.sql``); versions only grow; an applied file is never edited.
"""

from __future__ import annotations

from importlib import resources


def migrations(backend: str) -> list[tuple[int, str]]:
    """(version, sql) pairs in order for ``backend`` (``sqlite`` or ``postgresql``)."""
    folder = resources.files(__package__).joinpath(backend)
    out = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            out.append((int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(out)


def latest_version(backend: str) -> int:
    found = migrations(backend)
    return found[-1][0] if found else 0
