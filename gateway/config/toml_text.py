"""Writing a config back as TOML text: what ``keystile config check`` prints as the effective config.

Owns: ``dumps`` for the plain data a config turns into (tables of strings, numbers, booleans and
arrays of them, nested tables and arrays of tables such as ``[[routes]]``), written so that
``tomllib`` reads back exactly that data. Must not: decide what is secret (``to_toml_dict`` masks
before this writes) or read anything.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else _string(name)


def _string(text: str) -> str:
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    if isinstance(v, Sequence):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _is_table_array(v: Any) -> bool:
    return (
        isinstance(v, Sequence)
        and not isinstance(v, str)
        and bool(v)
        and all(isinstance(x, Mapping) for x in v)
    )


def _table(path: list[str], data: Mapping[str, Any], out: list[str]) -> None:
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, Mapping) and not _is_table_array(v)]
    for k, v in scalars:
        out.append(f"{_key(k)} = {_value(v)}")
    for k, v in data.items():
        if isinstance(v, Mapping):
            name = ".".join(_key(p) for p in [*path, k])
            out.extend(["", f"[{name}]"])
            _table([*path, k], v, out)
        elif _is_table_array(v):
            name = ".".join(_key(p) for p in [*path, k])
            for item in v:
                out.extend(["", f"[[{name}]]"])
                _table([*path, k], item, out)


def dumps(data: Mapping[str, Any]) -> str:
    """``data`` as TOML text that ``tomllib.loads`` turns back into the same values."""
    out: list[str] = []
    _table([], data, out)
    return "\n".join(out).lstrip("\n") + "\n"
