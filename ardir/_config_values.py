"""The values of a run configuration: the kinds a key may have, their conversions and their ranges.

Part of :mod:`ardir.config` (which re-exports every public name here); it knows no schema, no TOML and no file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, Optional, Tuple

SCALARS = ("str", "int", "float", "bool")
KINDS = SCALARS + ("list[str]", "list[int]", "list[float]")


class ConfigError(ValueError):
    """A configuration key is unknown, has a wrong type or an invalid value; the message names the key."""


@dataclass(frozen=True)
class Option:
    """One configuration key.

    Attributes:
        name: the TOML key (``snake_case``); the flag is ``--name-with-dashes``.
        kind: ``"str"``, ``"int"``, ``"float"``, ``"bool"``, ``"list[str]"``, ``"list[int]"`` or ``"list[float]"``.
        default: the value when the key is not given; ``None`` means "not set" (the library's default applies).
        help: one line for ``--help`` and the docs.
        group: ``"run"``, ``"trainer"``, ``"method"`` or ``"eval"``.
        choices: the allowed values of a ``str`` option, if restricted.
    """

    name: str
    kind: str
    default: Any
    help: str
    group: str
    choices: Optional[Tuple[str, ...]] = None

    @property
    def flag(self) -> str:
        """The command-line flag, ``--name-with-dashes``."""
        return "--" + self.name.replace("_", "-")


# ---------------------------------------------------------------------------------------------------- values
def _float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a float, got bool {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip())) if "/" in value else float(value)
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{key}: expected a float (or a fraction like \"8/255\"), got {type(value).__name__} "
                      f"{value!r}")


def _scalar(key: str, kind: str, value: Any) -> Any:
    if kind == "float":
        return _float(key, value)
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an int, got {type(value).__name__} {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a bool (true or false), got {type(value).__name__} {value!r}")
    if isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected a str, got {type(value).__name__} {value!r}")


# The range of every numeric key, checked when a flag is parsed or a file read (so `--train-size 0` is an error
# about --train-size, not about a data-loader argument minutes later): (lowest, lowest is allowed, highest).
LIMITS: Dict[str, Tuple[float, bool, Optional[float]]] = {
    "val_size": (0, True, None), "train_size": (1, True, None), "batch_size": (1, True, None),
    "num_workers": (0, True, None), "n_examples": (1, True, None), "eval_eps": (0, False, None),
    "epochs": (0, True, None), "lr": (0, False, None), "momentum": (0, True, None), "weight_decay": (0, True, None),
    "milestones": (1, True, None), "lr_gamma": (0, False, None), "val_attack_steps": (0, True, None),
    "limit_batches": (1, True, None), "checkpoint_every_steps": (1, True, None), "keep_last": (1, True, None),
    "eps": (0, False, None), "step_size": (0, False, None), "steps": (0, True, None), "tau": (0, False, None),
    "beta": (0, True, None), "warmup_epochs": (0, True, None), "kl_scale": (0, False, None),
    "layer_weights": (0, True, None), "w_ce": (0, True, None), "w_kl": (0, True, None), "w_ir": (0, True, None),
}
"""Allowed ranges of numeric keys: ``(lowest, lowest included, highest or None)``. The upper bound of ``eps`` and
``eval_eps`` depends on ``norm`` (1 under L-inf, none under L2), so :func:`resolve` checks it
(:func:`check_threat_model`)."""

_CHOICES = {"precision": ("fp32", "bf16", "fp16"), "nan_policy": ("stop", "skip"),  # the Trainer's own lists
            "norm": ("linf", "l2")}  # the methods' (ardir._checks.NORMS)


def check_range(key: str, value: Any) -> Any:
    """``value`` if it lies in ``key``'s range (:data:`LIMITS`; finite for every float), else :class:`ConfigError`
    naming the key (``--`` flag names are the keys with dashes)."""
    name = key.split("[", 1)[0]
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value} must be a finite number")
    if name not in LIMITS or not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    low, inclusive, high = LIMITS[name]
    if value < low or (value == low and not inclusive) or (high is not None and value > high):
        bound = f"{'>=' if inclusive else '>'} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        hint = f" (an L-inf radius on [0, 1] images: 8/255, not 8)" if high == 1.0 and value > 1 else ""
        raise ConfigError(f"{key}: {value!r} must be {bound}{hint}")
    return value


def check_value(option: Option, value: Any) -> Any:
    """``value`` converted to ``option``'s kind and checked against its range (:data:`LIMITS`) and choices;
    :class:`ConfigError` naming the key when it does not fit."""
    if value is None:
        return None
    if option.kind.startswith("list["):
        item = option.kind[5:-1]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{option.name}: expected a list of {item}, got {type(value).__name__} {value!r}")
        if option.name == "layers":  # (teacher, student) pairs as two-element lists or "teacher:student"
            value = [":".join(v) if isinstance(v, (list, tuple)) and len(v) == 2 else v for v in value]
        return [check_range(f"{option.name}[{i}]", _scalar(f"{option.name}[{i}]", item, v))
                for i, v in enumerate(value)]
    value = check_range(option.name, _scalar(option.name, option.kind, value))
    choices = option.choices or _CHOICES.get(option.name)
    if choices is not None and value not in choices:
        raise ConfigError(f"{option.name}: {value!r} is not one of {', '.join(map(repr, choices))}")
    return value
