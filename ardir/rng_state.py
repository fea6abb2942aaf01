"""The random states a training run draws from, captured and restored in one place: the global generators
(torch, CUDA, numpy, Python's ``random``) and a data loader's shuffling generators. The Trainer's checkpoints
(:mod:`ardir.checkpoint`, :mod:`ardir.train.state`) and so ``ardir train``'s ``last.pt`` hold them as
:func:`capture_rng` takes them.

Every state is kept as tensors and plain numbers, so that a checkpoint holding it loads with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import random
from typing import Any, Dict, Iterable, List

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state", "loader_generators", "generator_states", "set_generator_states",
           "capture_rng", "restore_rng"]


def rng_state() -> Dict[str, Any]:
    """The global random states: torch (CPU), CUDA (when initialised), numpy and Python's ``random``."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`rng_state`; CUDA states only when CUDA is initialised with as many devices."""
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if "python" in state:
        s = state["python"]
        random.setstate((s["version"], tuple(int(v) for v in s["internal"].tolist()), s["gauss_next"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


def loader_generators(loader: Any) -> List[torch.Generator]:
    """The ``torch.Generator`` objects a data loader shuffles with (its own, its sampler's), without repeats."""
    found: List[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        generator = getattr(obj, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def generator_states(loader: Any) -> List[torch.Tensor]:
    """The states of :func:`loader_generators`."""
    return [g.get_state() for g in loader_generators(loader)]


def set_generator_states(loader: Any, states: List[torch.Tensor]) -> None:
    """Restore :func:`generator_states` (ignored when the loader's generators do not match in number)."""
    generators = loader_generators(loader)
    if len(generators) == len(states):
        for generator, s in zip(generators, states):
            generator.set_state(s)


def capture_rng(loader: Iterable) -> Dict[str, Any]:
    """Every random state a run draws from: torch, CUDA, numpy, Python and ``loader``'s shuffling generators."""
    state = rng_state()
    state["generators"] = generator_states(loader)
    return state


def restore_rng(loader: Iterable, state: Dict[str, Any]) -> None:
    """Set the random states :func:`capture_rng` took."""
    set_rng_state(state)
    set_generator_states(loader, state.get("generators", []))
