"""Small helpers of the evaluation: eps formatting, bit strings, seeds, the model's RNG and parameter guards."""
from __future__ import annotations

import contextlib
import zlib
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn


def _fmt_eps(value: float) -> str:
    """8/255 for multiples of 1/255, else a short decimal."""
    k = value * 255
    if abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f"{round(k)}/255"
    return f"{value:.4g}"


def _percent(mask: torch.Tensor) -> float:
    """Share of True in a bool mask, in %, computed exactly (64.0, not 63.99999856)."""
    return 100.0 * int(mask.sum()) / len(mask)


def _bits(mask: torch.Tensor) -> str:
    return "".join("1" if b else "0" for b in mask.tolist())


def _unbits(text: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def _derive_seed(seed: int, key: str, start: int) -> int:
    """A seed per (attack, batch), so a resumed run gives the same numbers as an uninterrupted one."""
    return zlib.crc32(f"{seed}:{key}:{start}".encode()) & 0x7FFFFFFF


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters do not require grad during the evaluation (faster, and no .grad left by FAB's backward)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _forked_rng() -> Iterator[None]:
    """The attacks reseed torch's global RNG; the caller's RNG state is restored afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` via a temporary file, fsync and ``os.replace`` (ardir.checkpoint's helper)."""
    from ..checkpoint import atomic_write_text
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(text, path)
