"""Teachers shipped with ardir: robust models whose weights lie inside the package, each beside its manifest.

A shipped teacher is named ``"<dataset>:<name>"``, e.g. ``"fashion-mnist:cnn_xlarge-at"``, and loads with
``ardir.teachers.load_teacher("fashion-mnist:cnn_xlarge-at")`` or ``ardir train --teacher fashion-mnist:...``.
Its files are ``ardir/weights/<dataset>/<name>.pt`` (a weights-only ``state_dict``) and ``<name>.json``, the
manifest: the architecture, the file's sha256, the command and commit that trained it, the training time and
its measured accuracies. The hash is checked on every load; a file that does not match is refused.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Union

import torch
import torch.nn as nn

from . import models

__all__ = ["WEIGHTS_DIR", "TeacherIntegrityError", "list_shipped", "is_shipped", "manifest", "file_sha256",
           "load_shipped"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Where the shipped weights and their manifests live: ``WEIGHTS_DIR/<dataset>/<name>.{pt,json}``."""


class TeacherIntegrityError(ValueError):
    """A shipped teacher's weights do not match the sha256 of its manifest."""


def list_shipped() -> List[str]:
    """The names of every shipped teacher, as ``"<dataset>:<name>"``."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(f"{path.parent.name}:{path.stem}" for path in WEIGHTS_DIR.glob("*/*.json"))


def is_shipped(spec: str) -> bool:
    """Whether ``spec`` is meant as a shipped teacher: ``"<dataset>:<name>"`` with a dataset that ships any."""
    dataset, sep, _ = spec.partition(":")
    return bool(sep) and (WEIGHTS_DIR / dataset).is_dir()


def _paths(spec: str):
    dataset, _, name = spec.partition(":")
    if spec not in list_shipped():
        raise KeyError(f"no shipped teacher {spec!r}; shipped: {', '.join(list_shipped()) or 'none'}")
    return WEIGHTS_DIR / dataset / f"{name}.json", WEIGHTS_DIR / dataset / f"{name}.pt"


def manifest(spec: str) -> Dict[str, Any]:
    """The manifest of a shipped teacher: architecture, sha256, command, commit, training time, accuracies."""
    return json.loads(_paths(spec)[0].read_text())


def file_sha256(path: Union[str, Path]) -> str:
    """The sha256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_shipped(spec: str) -> nn.Module:
    """Build the shipped teacher ``spec`` on the CPU (train mode, as built), after checking its file's sha256.

    Raises:
        KeyError: no such shipped teacher (the message lists them).
        TeacherIntegrityError: the weights file is missing or does not match its manifest's sha256.
    """
    info = manifest(spec)
    weights = _paths(spec)[1]
    found = file_sha256(weights) if weights.is_file() else "no file"
    if found != info["sha256"]:
        raise TeacherIntegrityError(
            f"refused: {weights} does not match the sha256 in its manifest ({found[:12]} instead of "
            f"{info['sha256'][:12]}), so it is not the teacher ardir ships; reinstall ardir to restore it")
    from .checkpoint import load_checkpoint
    model = models.create(info["model"], num_classes=int(info["num_classes"]), in_chans=int(info["in_chans"]))
    model.load_state_dict(load_checkpoint(weights))
    return model
