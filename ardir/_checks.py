"""Argument checks shared by the public API: every bad input fails early, naming the argument."""
from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Iterable


def one_of(argument: str, value: str, choices: Iterable[str], what: str = "value") -> str:
    """Return ``value`` if it is in ``choices``; else raise ``ValueError`` listing the closest valid ones."""
    choices = list(choices)
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), choices, n=5, cutoff=0.4)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    shown = ", ".join(repr(c) for c in choices[:30]) + (", ..." if len(choices) > 30 else "")
    raise ValueError(f"{argument}={value!r} is not a known {what}; {hint}valid: {shown}")


def eps_value(argument: str, value: float) -> float:
    """An L-inf radius on [0,1] images: 0 < eps <= 1."""
    value = number(argument, value)
    if not 0 < value <= 1:
        raise ValueError(
            f"{argument}={value} is outside (0, 1]: images live in [0, 1], so an L-inf radius "
            f"must be positive and at most 1 (CIFAR's usual eps is 8/255 = {8 / 255:.4f})")
    return value


def positive(argument: str, value: float) -> float:
    """A strictly positive, finite number."""
    value = number(argument, value)
    if not value > 0:
        raise ValueError(f"{argument}={value} must be > 0")
    return value


def non_negative(argument: str, value: float) -> float:
    """A finite number >= 0."""
    value = number(argument, value)
    if value < 0:
        raise ValueError(f"{argument}={value} must be >= 0")
    return value


def non_negative_int(argument: str, value: int) -> int:
    """A whole number >= 0 (Python or NumPy integer)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{argument}={value!r} must be a whole number >= 0")
    return int(value)


def positive_int(argument: str, value: int) -> int:
    """A whole number >= 1 (Python or NumPy integer)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{argument}={value!r} must be a whole number >= 1")
    return int(value)


def number(argument: str, value: float) -> float:
    """A finite real number (Python or NumPy; not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argument}={value!r} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{argument}={value} must be a finite number")
    return float(value)


def logits_of(name: str, model: Any, images: Any) -> Any:
    """``model(images)`` under ``torch.no_grad``, checked to be logits (N, C); a model that cannot take the images
    (wrong input channels, image size, dtype) is a ``ValueError`` naming it and the images' shape."""
    import torch

    try:
        with torch.no_grad():
            out = model(images)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f"{name} cannot take the images, shaped {tuple(images.shape)} ({images.dtype}): "
                         f"{str(err).splitlines()[0]} -- check its input channels (ardir.models.create(..., "
                         "in_chans=C)) and image size") from err
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != images.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"{name} must return logits shaped (N, num_classes), got {got}: wrap it so that forward "
                        "returns the logits tensor alone")
    return out
