"""The resume state of :func:`ardir.evaluate`: per batch, each finished attack's per-sample results in a JSON file.

The file (format ``ardir-evaluation-state/1``) holds the evaluation's settings (``config``) and, per batch, its
start, size, labels' checksum and results; an attack made of components (AutoAttack) also records the components
it finished (``partial``), so an interrupted run resumes between them.
"""
from __future__ import annotations

import hashlib
import json
import time
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ._helpers import _atomic_write, _bits, _unbits
from .attacks import Runner, _AutoAttackRunner, _Natural
from .checks import _gradient_counts

STATE_FORMAT = "ardir-evaluation-state/1"


def _model_fingerprint(model: nn.Module) -> str:
    """The model in the state's settings: a hash of each state-dict tensor's name, shape, sum and absolute sum."""
    digest = hashlib.sha1()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            t = tensor.detach()
            stats = (t.double().sum().item(), t.double().abs().sum().item()) if t.is_floating_point() or \
                t.dtype in (torch.int64, torch.int32) else (0.0, 0.0)
            digest.update(f"{name}{tuple(t.shape)}{stats[0]:.10g}{stats[1]:.10g}".encode())
    return digest.hexdigest()[:16]


class _State:
    """Resumable progress: per batch, the labels' checksum and each finished attack's per-sample results."""

    def __init__(self, path: Optional[Path], config: Dict[str, Any]):
        self.path, self.config = path, config
        self.batches: List[Dict[str, Any]] = []
        if path is not None and path.exists():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"state_path {path} cannot be read as an evaluation state ({type(err).__name__}: "
                                 f"{err}); delete it (the evaluation restarts) or pass another state_path") from None
            if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
                found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
                raise ValueError(f"{path} is not an ardir evaluation state file (format {found!r})")
            if saved["config"] != config:
                diff = sorted(k for k in set(config) | set(saved["config"])
                              if config.get(k) != saved["config"].get(k))
                raise ValueError(f"the state file {path} was written by an evaluation with other settings "
                                 f"(differences: {', '.join(diff)}); delete it or pass another state_path")
            self.batches = saved["batches"]

    def batch(self, index: int, start: int, labels: torch.Tensor) -> Dict[str, Any]:
        checksum = zlib.crc32(labels.cpu().numpy().astype("int64").tobytes())
        if index < len(self.batches):
            entry = self.batches[index]
            if (entry["start"], entry["n"], entry["labels"]) != (start, len(labels), checksum):
                raise ValueError(f"batch {index} differs from the one in the state file {self.path} (other data, "
                                 "batch size or order): resume with the same loader, unshuffled, or delete the file")
            return entry
        entry = {"start": start, "n": len(labels), "labels": checksum, "results": {}}
        self.batches.append(entry)
        return entry

    def save(self) -> None:
        if self.path is not None:
            _atomic_write(self.path, json.dumps({"format": STATE_FORMAT, "config": self.config,
                                                 "batches": self.batches}))


def _attack_batch(runner: Runner, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  natural: Optional[torch.Tensor], state: _State, entry: Dict[str, Any], seed: int,
                  checks: bool) -> Dict[str, Any]:
    """Run one attack on one batch (only on the naturally correct points) and return its state record."""
    tic = time.perf_counter()
    n = len(labels)
    if isinstance(runner, _Natural):  # plus the gradient check on the points it gets right
        correct, _ = runner.run(images, labels, seed)
        record = {"correct": _bits(correct.cpu()), "seconds": time.perf_counter() - tic, "components": {}}
        if checks:
            record["gradients"] = _gradient_counts(model, images[correct], labels[correct])
            record["checked"] = int(correct.sum())
        return record
    todo = natural.nonzero().flatten()
    correct = torch.zeros(n, dtype=torch.bool)
    components: Dict[str, torch.Tensor] = {}
    earlier = 0.0
    if len(todo):
        done, save, earlier = _partial(state, entry, runner.key, todo, n, tic)
        on_device = todo.to(images.device)
        hit, parts = runner.run(images[on_device], labels[on_device], seed, done=done, on_component=save)
        correct[todo] = hit.cpu()
        for name, mask in parts.items():
            components[name] = torch.zeros(n, dtype=torch.bool)
            components[name][todo] = mask.cpu()
    elif isinstance(runner, _AutoAttackRunner) and len(runner.components) > 1:
        components = {name: correct.clone() for name in runner.components}
    entry.get("partial", {}).pop(runner.key, None)
    return {"correct": _bits(correct), "seconds": time.perf_counter() - tic + earlier,
            "components": {name: _bits(mask) for name, mask in components.items()}}


def _partial(state: _State, entry: Dict[str, Any], key: str, todo: torch.Tensor, n: int, tic: float):
    """Components an interrupted run already finished on this batch, a callback saving each new one, and the
    seconds the interrupted run had spent on them."""
    saved = entry.setdefault("partial", {}).setdefault(key, {"components": {}, "seconds": 0.0})
    done = {c: _unbits(bits)[todo] for c, bits in saved["components"].items()}
    base = saved["seconds"]

    def save(name: str, robust: torch.Tensor) -> None:
        full = torch.zeros(n, dtype=torch.bool)
        full[todo] = robust.cpu()
        saved["components"][name] = _bits(full)
        saved["seconds"] = base + time.perf_counter() - tic
        state.save()
    return done, save, base
