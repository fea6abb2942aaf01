"""TOML text in and out for :mod:`ardir.config` (which re-exports :func:`dump_toml`): reading it, with a hint for
the commonest mistake (an unquoted fraction), and writing values back.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Optional

from ._config_values import ConfigError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.9/3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]


def read_toml(text: str, where: str = "the configuration") -> Dict[str, Any]:
    """TOML text as a dict, unchecked; :class:`ConfigError` naming ``where`` when it is no valid TOML."""
    if tomllib is None:  # pragma: no cover
        raise ConfigError("reading TOML needs Python >= 3.11 or the tomli package: pip install tomli")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where} is not valid TOML: {err}{_fraction_hint(text)}") from None


_UNQUOTED_FRACTION = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*=\s*([0-9.]+\s*/\s*[0-9.]+)\s*(#.*)?$", re.M)


def _fraction_hint(text: str) -> str:
    """TOML has no arithmetic: an unquoted ``eps = 8/255`` is the commonest reason a config fails to parse."""
    found = _UNQUOTED_FRACTION.search(text)
    if not found:
        return ""
    key, value = found.group(1), found.group(2).replace(" ", "")
    return f" (TOML has no fractions: write {key} = \"{value}\" in quotes, which ardir reads as a fraction)"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-tripping form; always has '.' or 'e'
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        for char, code in (("\n", "\\n"), ("\t", "\\t"), ("\r", "\\r"), ("\b", "\\b"), ("\f", "\\f")):
            escaped = escaped.replace(char, code)
        escaped = "".join(c if ord(c) >= 0x20 and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped)
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) else _toml_value(key)


def dump_toml(values: Mapping[str, Any], comments: Optional[Mapping[str, str]] = None) -> str:
    """TOML text of ``values``: str, int, float, bool and lists of them, plus one level of tables (dicts).

    ``None`` values are written as comments (TOML has no null). ``comments`` maps a key to a comment line
    written above it.
    """
    lines: List[str] = []
    tables = []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append((key, value))
            continue
        if comments and key in comments:
            lines.append(f"# {comments[key]}")
        if value is None:
            lines.append(f"# {_toml_key(key)} = (not set)")
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{_toml_key(name)}]")
        for key, value in table.items():
            if isinstance(value, dict):
                raise TypeError(f"dump_toml writes one level of tables; [{name}].{key} is a table")
            lines.append(f"# {_toml_key(key)} = (not set)" if value is None else
                         f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
