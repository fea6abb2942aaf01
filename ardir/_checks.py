"""Argument checks shared by the public API: every bad input fails early, naming the argument."""
from __future__ import annotations

import difflib
import functools
import math
import numbers
import warnings
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


def renamed_keywords(**renamed: str):
    """A decorator for a constructor: a keyword another library spells differently (torchattacks' ``alpha`` for
    the step) is a ``TypeError`` saying ardir's name, not Python's generic "unexpected keyword argument"."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in renamed.items():
                if old in kwargs:
                    owner = fn.__qualname__.split(".")[0]
                    raise TypeError(f"{owner}({old}={kwargs[old]!r}): ardir calls this argument {new}; pass "
                                    f"{new}={kwargs[old]!r}")
            return fn(*args, **kwargs)
        return wrapper
    return decorate


NORMS = ("linf", "l2")


def norm_name(argument: str, value: str) -> str:
    """A threat model's norm, ``"linf"`` or ``"l2"`` (a ``TypeError`` for a non-string)."""
    if not isinstance(value, str):
        raise TypeError(f"{argument}={value!r} must be the name of a norm, 'linf' or 'l2', got {type(value).__name__}")
    return one_of(argument, value, NORMS, "norm (threat model)")


def eps_value(argument: str, value: float, norm: str = "linf") -> float:
    """A radius on [0,1] images: L-inf 0 < eps <= 1; L2 eps > 0 (the L2 diameter of the image cube depends on the
    image's size, so no upper bound)."""
    value = number(argument, value)
    if norm == "l2":
        if not value > 0:
            raise ValueError(f"{argument}={value} must be > 0: an L2 radius is positive (CIFAR-10's usual L2 eps is "
                             "0.5)")
        return value
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
        params = model.parameters() if hasattr(model, "parameters") else ()
        dtypes = sorted({str(p.dtype) for p in params if p.is_floating_point()})
        if images.is_floating_point() and dtypes and str(images.dtype) not in dtypes:
            hint = (f"the images are {images.dtype} but the model's parameters {', '.join(dtypes)}: convert them "
                    "(images.float()), or the model (model.to(images.dtype))")
        elif images.dim() != 4:
            hint = "images must be shaped (N, C, H, W): add the channel dimension (images.unsqueeze(1))"
        else:
            hint = "check its input channels (ardir.models.create(..., in_chans=C)) and image size"
        raise ValueError(f"{name} cannot take the images, shaped {tuple(images.shape)} ({images.dtype}): "
                         f"{str(err).splitlines()[0]} -- {hint}") from err
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != images.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"{name} must return logits shaped (N, num_classes), got {got}: wrap it so that forward "
                        "returns the logits tensor alone")
    return out


def batch_tensors(what: str, images: Any, labels: Any = None) -> None:
    """Images a floating-point tensor (N, ...) and, when given, labels int64 (N,); else a ``TypeError`` that says
    which and how to fix it. ``what`` names the data in the message (``"the first training batch"``)."""
    import torch

    if not isinstance(images, torch.Tensor) or (labels is not None and not isinstance(labels, torch.Tensor)):
        raise TypeError(f"{what}: images and labels must be tensors, got {type(images).__name__} and "
                        f"{type(labels).__name__} (a dataset of PIL images needs transforms.ToTensor())")
    if not images.is_floating_point() or images.dim() < 2:
        raise TypeError(f"{what}: images must be a floating-point tensor (N, C, H, W) in [0, 1], got {images.dtype} "
                        f"{tuple(images.shape)} (ToTensor() converts uint8 images; or divide by 255)")
    if labels is not None and (labels.dtype != torch.int64 or labels.shape != images.shape[:1]):
        raise TypeError(f"{what}: labels must be int64 class indices shaped ({len(images)},), got {labels.dtype} "
                        f"{tuple(labels.shape)}")


def pixel_range(what: str, images: Any) -> None:
    """Images within [0, 1] (1e-4 of float slack), else a ``ValueError`` saying where normalisation belongs. One
    host synchronisation on an accelerator."""
    import torch

    if not images.numel():
        return
    lo, hi = (float(v) for v in torch.aminmax(images.detach().float()))
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"{what} has pixel values in [{lo:.3g}, {hi:.3g}], outside [0, 1]: attacks work in pixel "
                         "space (eps in [0, 1] units); drop Normalize from the transforms and put it inside the model "
                         "(ardir.models.create(..., mean=..., std=...))")


def label_range(what: str, labels: Any, num_classes: int, model: str = "model") -> None:
    """Labels within 0 .. num_classes - 1, else a ``ValueError`` naming the fix. One host synchronisation."""
    if not labels.numel():
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{what}: labels range over [{lo}, {hi}] but the {model} has {num_classes} outputs: labels "
                         f"must be 0 .. num_classes - 1; build the {model} with num_classes={max(hi + 1, num_classes)}"
                         " or fix the dataset's labels")


def check_batch(what: str, images: Any, labels: Any, num_classes: int, model: str = "model") -> None:
    """:func:`batch_tensors`, :func:`pixel_range` and :func:`label_range` on one batch (a few host syncs)."""
    batch_tensors(what, images, labels)
    pixel_range(what, images)
    label_range(what, labels, num_classes, model)


_WARNED_STEPS: set = set()


def warn_large_step(eps: float, step_size: float, steps: int, norm: str) -> None:
    """Warn once per setting when a multi-step attack's step exceeds its radius: every step then leaves the ball
    and is projected back, so the iterations add little (a one-step attack with a step of 1.25 eps, as in fast
    adversarial training, is a deliberate choice and is not warned about)."""
    key = (float(eps), float(step_size), int(steps), norm)
    if steps > 1 and step_size > eps and key not in _WARNED_STEPS:
        _WARNED_STEPS.add(key)
        usual = "eps/4, e.g. 2/255 at eps 8/255" if norm == "linf" else "2.5 * eps / steps"
        warnings.warn(f"step_size={step_size:.5g} is larger than eps={eps:.5g} for a {steps}-step attack: each step "
                      f"overshoots the {norm} ball and is projected back; the usual step is {usual}", stacklevel=4)


def images_labels(batch: Any, loader: str, extra_items: bool = False):
    """A loader's ``(images, labels)`` batch, or a ``TypeError`` saying what is expected. ``extra_items``: items
    after the labels (an index, a weight: what an evaluation loader may also yield) are ignored; without it a
    batch must be exactly the pair (a trainer silently dropping a third item would train on the wrong thing)."""
    if isinstance(batch, (tuple, list)) and (len(batch) == 2 or (extra_items and len(batch) > 2)):
        return batch[0], batch[1]
    what = f"a dict with keys {sorted(batch)}" if isinstance(batch, dict) else \
        f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise TypeError(f"{loader} must yield (images, labels) batches, got {what}: wrap the dataset so that each item "
                    "is (image, label)")
