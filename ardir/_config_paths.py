"""The file-system paths of a run configuration: which keys are paths, and making them absolute.

Part of :mod:`ardir.config` (which re-exports every public name here).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Tuple

PATH_KEYS: Tuple[str, ...] = ("output_dir", "data_dir", "robustbench_dir", "teacher", "natural_teacher")
"""The keys whose value is a file-system path. ``teacher`` and ``natural_teacher`` are one when they name a file
(else they are a model name, a shipped teacher ``DATASET:NAME`` or ``robustbench:NAME``)."""

_TEACHER_KEYS = ("teacher", "natural_teacher")


def looks_like_path(spec: str) -> bool:
    """Whether a teacher ``spec`` names a file, existing or not: absolute, with a directory part, or ending in
    ``.pt``/``.pth``/``.tar`` (the rule of :func:`ardir.teachers.load_teacher`'s "does not exist" error), and not
    ``robustbench:NAME``."""
    if not isinstance(spec, str) or not spec or spec.startswith("robustbench:"):
        return False
    spec = os.path.expanduser(spec)
    return os.path.isabs(spec) or os.sep in spec or "/" in spec or spec.endswith((".pt", ".pth", ".tar"))


def absolute_paths(config: Mapping[str, Any]) -> Dict[str, Any]:
    """``config`` with every path of :data:`PATH_KEYS` absolute (``~`` expanded), read from the current directory.

    A teacher is made absolute only when it is an existing file (what :func:`ardir.teachers.load_teacher` loads
    first); a name stays a name. With ``teacher = "robustbench:NAME"`` and no ``robustbench_dir``, the directory
    the teacher is read from now (``$ARDIR_ROBUSTBENCH_DIR`` or ``./models``) is recorded.
    """
    config = dict(config)
    teacher = config.get("teacher")
    if isinstance(teacher, str) and teacher.startswith("robustbench:") and config.get("robustbench_dir") is None:
        from .teachers import default_robustbench_dir
        config["robustbench_dir"] = str(default_robustbench_dir())
    for key in PATH_KEYS:
        value = config.get(key)
        if not isinstance(value, str) or not value:
            continue
        path = os.path.expanduser(value)
        if key in _TEACHER_KEYS and (value.startswith("robustbench:") or not os.path.lexists(path)):
            continue
        config[key] = os.path.abspath(path)
    return config
