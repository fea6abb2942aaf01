"""What a checkpoint file or state is, told truthfully: paths that are not files, files that would run code when
loaded, tensors that are not finite, recorded model settings no model could have.

Used by :mod:`ardir.checkpoint` (loading and writing), :mod:`ardir.teachers` and :mod:`ardir.cli`, so that every
loading path says the same thing about the same file.
"""
from __future__ import annotations

import errno
import io
import math
import numbers
import os
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional, Tuple

import torch

# Diagnostics, not state: a trainer's fault record keeps the non-finite loss it saw (to name it in the error).
DIAGNOSTIC_KEYS = frozenset({"fault"})

# Recorded model settings beyond these are not a model anyone trained (ImageNet-21k has 21,841 classes).
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 4096


def path_problem(path: Path, what: str = "checkpoint") -> Optional[OSError]:
    """``None`` when ``path`` is a regular file (or a link to one); else the error saying what it is instead:
    missing, a directory, a dangling symbolic link, a symbolic-link loop, or another kind of file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return OSError(errno.ELOOP, f"{what} {path} is a symbolic link loop (it never reaches a file): point "
                                        "the link at a real file", str(path))
        if os.path.islink(path):
            target = os.readlink(path)
            return FileNotFoundError(errno.ENOENT, f"{what} {path} is a dangling symbolic link (to {target}, which "
                                                   "does not exist): point it at an existing file", str(path))
        if error.errno in (errno.EACCES, errno.EPERM):
            return PermissionError(error.errno, f"{what} {path} cannot be read: permission denied", str(path))
        return FileNotFoundError(errno.ENOENT, f"{what} {path} does not exist", str(path))
    import stat
    if stat.S_ISDIR(mode):
        return IsADirectoryError(errno.EISDIR, f"{what} {path} is a directory, not a file (pass a file in it, e.g. "
                                               f"{Path(path) / 'best.pt'})", str(path))
    if not stat.S_ISREG(mode):
        return OSError(errno.EINVAL, f"{what} {path} is not a regular file (a device, socket or pipe)", str(path))
    return None


# ------------------------------------------------------------------------------------- code-carrying pickles
_CODE_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "REDUCE", "BUILD"}


def _pickle_bytes(path: Path) -> Optional[bytes]:
    """The main pickle of a torch file: ``*/data.pkl`` of the zip format, or the legacy file's first pickle."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                return archive.read(names[0]) if names else None
        return path.read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError, EOFError, RuntimeError, ValueError):
        return None


def _globals_named(data: bytes) -> Optional[List[str]]:
    """The globals a pickle names (``module.name``), or ``None`` when it is not a complete, valid pickle."""
    named, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL":
                named.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                named.append(".".join(strings[-2:]) if len(strings) >= 2 else "?")
            elif op.name in _CODE_OPS:
                continue
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # ValueError for a bad opcode, truncation: not a pickle torch wrote
        return None
    return named


def _allowed_globals() -> set:
    """What ``weights_only`` loading constructs (torch's allow-list; empty when this torch hides it)."""
    try:
        from torch import _weights_only_unpickler as wo
        return set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
    except Exception:  # pragma: no cover - a torch without these internals
        return set()


def refused_objects(path: Path) -> Optional[List[str]]:
    """After ``torch.load(weights_only=True)`` raised ``pickle.UnpicklingError`` (torch's ``WeightsUnpickler``
    refusing an object): the globals the file's pickle names beyond what weights-only loading constructs (maybe
    empty, when torch refused something unnamed), or ``None`` when the file is not a valid pickle at all (so it is
    corrupt, not refused). Classified by the file's structure, not by the wording of torch's message."""
    data = _pickle_bytes(path)
    named = None if data is None else _globals_named(data)
    if named is None:
        return None
    allowed = _allowed_globals()
    return [name for name in dict.fromkeys(named) if name not in allowed]


# ------------------------------------------------------------------------------------------- finiteness
def _tensors(state: Any, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() or state.is_complex():
            yield prefix or "tensor", state
    elif isinstance(state, Mapping):
        for key, value in state.items():
            if key not in DIAGNOSTIC_KEYS:
                yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from _tensors(value, f"{prefix}[{i}]")


def first_non_finite(state: Any) -> Optional[str]:
    """The dotted name of the first floating-point tensor in ``state`` (nested dicts and lists) holding a NaN or an
    Inf, e.g. ``"student.bn.running_var"``; ``None`` when all are finite. One host synchronisation per device."""
    items = [(name, tensor) for name, tensor in _tensors(state) if tensor.numel()]
    groups: dict = {}
    for i, (_, tensor) in enumerate(items):
        groups.setdefault(tensor.device, []).append(i)
    bad = []
    for indices in groups.values():
        flags = torch.stack([torch.isfinite(items[i][1].detach()).all() for i in indices])
        if not bool(flags.all()):
            bad += [i for i, ok in zip(indices, flags.tolist()) if not ok]
    return items[min(bad)][0] if bad else None


# ----------------------------------------------------------------------------------- recorded model settings
def _whole(info: Mapping[str, Any], key: str, most: int, source: str) -> int:
    value = info.get(key)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= most:
        raise ValueError(f"{source} records {key}={value!r}, which no model has (a whole number 1 .. {most}): the "
                         "file is damaged or was not written by ardir")
    return int(value)


def check_model_info(info: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    """The recorded architecture of a checkpoint (``name``, ``num_classes``, ``in_chans``, ``mean``/``std``),
    checked before a model is built from it: absurd sizes (``num_classes=2**40``) are a ``ValueError`` naming the
    setting instead of an attempt to allocate them."""
    if not isinstance(info.get("name"), str) or not info["name"]:
        raise ValueError(f"{source} records model name {info.get('name')!r}, not a model name")
    _whole(info, "num_classes", MAX_CLASSES, source)
    chans = _whole(info, "in_chans", MAX_CHANNELS, source)
    for key in ("mean", "std"):
        value = info.get(key)
        if value is None:
            continue
        ok = isinstance(value, (list, tuple)) and len(value) in (1, chans) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not ok or (key == "std" and any(v <= 0 for v in value)):
            raise ValueError(f"{source} records {key}={value!r}: expected {chans} finite numbers"
                             f"{' > 0' if key == 'std' else ''} (one per input channel)")
    return info
