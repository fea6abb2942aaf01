"""Where a training run stands, and its part of a checkpoint: counters, the running epoch's accumulators, random
states and, in a process group, every process's own share.

A mid-epoch checkpoint continues bit for bit: it holds the epoch's partial sums (``progress``) and the random
states at the epoch's start (``epoch_rng``); on resume the loader restarts from those, the batches already
trained on are drawn and dropped (replaying the order, the augmentation draws and the DataLoader workers' seeds),
and every random state is then set as it was at the checkpoint (:meth:`TrainState.epoch_batches`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import distributed
from ..checkpoint import FORMAT, VERSION, CheckpointError, PathLike, find_resumable, load_checkpoint
from ..rng_state import capture_rng, generator_states, restore_rng, set_generator_states


def read_checkpoint(path_or_dir: PathLike, missing_ok: bool) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """``(path, state)`` of a checkpoint file, or of the newest good checkpoint in a directory (corrupt ones are
    skipped with a warning); None when ``missing_ok`` and there is none."""
    path = Path(path_or_dir).expanduser()
    if path.is_dir():
        found = find_resumable(path)
        if found is None and not missing_ok:
            raise FileNotFoundError(f"no checkpoint to resume from in {path}")
        return found
    if not path.exists() and missing_ok:
        return None
    return path, load_checkpoint(path)


def resume_from(path_or_dir: PathLike, missing_ok: bool,
                load_state_dict: Callable[[Dict[str, Any]], None]) -> Optional[Path]:
    """Read a checkpoint (:func:`read_checkpoint`) and hand it to ``load_state_dict``; returns its path (None
    when ``missing_ok`` and there is none). A checkpoint that does not fit raises ``CheckpointError`` naming it."""
    found = read_checkpoint(path_or_dir, missing_ok)
    if found is None:
        return None
    path, state = found
    try:
        load_state_dict(state)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
        raise CheckpointError(f"checkpoint {path} does not fit this trainer ({type(error).__name__}: "
                              f"{str(error).splitlines()[0]}): resume with the same model, method and "
                              "optimiser settings as the run that wrote it") from None
    return path


def check_trainer_state(state: Any, method_name: str) -> None:
    """Refuse what is no trainer state, a newer format, or a checkpoint of another method than ``method_name``."""
    if not isinstance(state, dict) or "student" not in state:
        raise CheckpointError("not an ardir trainer state: expected a dict with 'student', 'optimizer', ...")
    if state.get("format", FORMAT) != FORMAT or int(state.get("version", VERSION)) > VERSION:
        raise CheckpointError(f"checkpoint format {state.get('format')!r} version {state.get('version')} is "
                              f"not supported by this ardir (format {FORMAT!r} version <= {VERSION})")
    saved = state.get("method_name")  # absent from checkpoints written before it was recorded
    if saved is not None and saved != method_name:
        raise CheckpointError(f"the checkpoint was written by a {saved!r} run, this trainer runs "
                              f"{method_name!r}: resume with method={saved!r}, or start a new run")


def where_ok(ok, value: torch.Tensor) -> torch.Tensor:
    """``value`` for a step that counts, 0 for a skipped one (``ok`` a bool or a 0-dim bool tensor)."""
    if ok is True:
        return value
    if ok is False:
        return torch.zeros_like(value)
    return torch.where(ok, value, torch.zeros_like(value))


def _cpu(value: Any) -> Any:
    """``value`` with every tensor in it copied to the CPU (for gathering between processes)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


@dataclass
class TrainState:
    """The counters and accumulators of a run; :meth:`state_dict` is their part of a Trainer's checkpoint.

    Attributes:
        epoch: epochs finished; step: optimiser steps taken; history: the finished epochs' records.
        sums, seen, batches: the running epoch's loss sums (each term times its batch size, on the device),
            images and batches so far.
        epoch_rng: the random states at the running epoch's start (what its shuffle was drawn from).
        pending: a loaded mid-epoch checkpoint's ``progress``, ``epoch_rng`` and ``rng``, continued by the next
            epoch.
        ranks: every process's share (:meth:`gather_shares`) taken at the last epoch end, for rank 0's
            checkpoints.
    """
    epoch: int = 0
    step: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    sums: Dict[str, torch.Tensor] = field(default_factory=dict)
    seen: int = 0
    batches: int = 0
    epoch_rng: Optional[Dict[str, Any]] = None
    pending: Optional[Dict[str, Any]] = None
    ranks: Optional[List[Dict[str, Any]]] = None
    _replay: Optional[Tuple[int, Dict[str, Any]]] = field(default=None, repr=False)

    # ------------------------------------------------------------------------------------------ the epoch
    def begin_epoch(self, loader: Iterable, device: torch.device) -> Optional[Dict[str, Any]]:
        """Start the accumulators afresh, or from the pending mid-epoch checkpoint; then returns the fault
        record that checkpoint saved (on ``device``), None for a fresh epoch."""
        pending, self.pending = self.pending, None
        if pending is None:
            # Before the loader's iterator exists: what its shuffle (and worker seeds) will be drawn from.
            self.epoch_rng = {"torch": torch.get_rng_state(), "generators": generator_states(loader)}
            self._replay = None
            self.sums, self.seen, self.batches = {}, 0, 0
            return None
        progress = pending["progress"]
        move = (lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)
        self.epoch_rng = pending["epoch_rng"]
        self._replay = (int(progress["batches"]), pending["rng"])
        self.sums = {k: move(v) for k, v in progress["sums"].items()}
        self.seen, self.batches = int(progress["seen"]), int(progress["batches"])
        return {k: move(v) for k, v in progress["fault"].items()}

    def epoch_batches(self, loader: Iterable) -> Iterator[Any]:
        """The running epoch's batches from ``loader``; after a mid-epoch resume, those after the checkpoint."""
        replay, self._replay = self._replay, None
        if replay is not None:
            torch.set_rng_state(self.epoch_rng["torch"])
            set_generator_states(loader, self.epoch_rng["generators"])
        iterator = iter(loader)
        if replay is not None:
            for i in range(replay[0]):
                if next(iterator, None) is None:
                    raise CheckpointError(f"the checkpoint was taken after batch {replay[0]} of epoch "
                                          f"{self.epoch + 1} but train_loader now yields only {i}: resume with the "
                                          "same data, batch size and seed as the interrupted run")
            restore_rng(loader, replay[1])
        yield from iterator

    def add(self, loss: torch.Tensor, terms: Dict[str, torch.Tensor], ok, size: int) -> None:
        """Count a trained batch of ``size`` images: its loss and terms (0 when skipped, see ``ok``)."""
        for name, value in [("loss", loss), *terms.items()]:
            value = where_ok(ok, value.detach()) * size
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.seen += size
        self.batches += 1

    def all_reduce(self, device: torch.device, fault: Dict[str, Any]) -> None:
        """Sum the epoch's accumulators, and ``fault``'s skipped images, over the processes (a collective)."""
        names = list(self.sums)
        counts = [torch.as_tensor(n, device=device).float().reshape(()) for n in (self.seen, fault["skipped_images"])]
        totals = distributed.all_reduce_sum(torch.stack([self.sums[k].float() for k in names] + counts))
        self.sums, self.seen = dict(zip(names, totals[:-2])), int(totals[-2])
        fault["skipped_images"] = totals[-1]  # skipped images of every process, as seen counts them

    def progress(self, fault: Dict[str, Any]) -> Dict[str, Any]:
        """The running epoch's accumulators and fault record, as a mid-epoch checkpoint keeps them."""
        return {"batches": self.batches, "seen": self.seen, "sums": dict(self.sums), "fault": dict(fault)}

    # ---------------------------------------------------------------------------------------- checkpoints
    def gather_shares(self, loader: Iterable, student: nn.Module,
                      progress: Optional[Dict[str, Any]]) -> Optional[List[Dict[str, Any]]]:
        """Every process's own share of a checkpoint, gathered (a collective: all processes call it): its random
        states, BatchNorm statistics and, mid-epoch, its partial sums. A resume hands each process its own."""
        mine = {"rng": capture_rng(loader), "buffers": dict(student.named_buffers()), "progress": progress,
                "epoch_rng": self.epoch_rng if progress is not None else None}
        return distributed.all_gather_object(_cpu(mine))

    def state_dict(self, loader: Iterable, progress: Optional[Dict[str, Any]] = None,
                   ranks: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        """The run's part of a checkpoint: counters, history, random states now and, mid-epoch (``progress``
        given), the epoch's progress and its random states at the start, and ``ranks`` (None outside a process
        group)."""
        mid_epoch = progress is not None
        return {"epoch": self.epoch, "step": self.step, "history": list(self.history),
                "rng": capture_rng(loader), "progress": progress if mid_epoch else None,
                "epoch_rng": self.epoch_rng if mid_epoch else None,
                "ranks": ranks}

    def load_state_dict(self, state: Dict[str, Any], loader: Iterable, student: nn.Module, world_size: int) -> None:
        """Restore :meth:`state_dict`'s part, random states included; in a process group of ``world_size``
        processes, each takes its own share of the checkpoint (its random states and ``student``'s buffers)."""
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        rng, progress, epoch_rng = state.get("rng"), state.get("progress"), state.get("epoch_rng")
        ranks, rank = state.get("ranks") or [], distributed.rank()
        own_share = len(ranks) == world_size
        if own_share and rank > 0:  # this process's own share (rank 0's is the checkpoint itself)
            mine = ranks[rank]
            with torch.no_grad():
                for name, buffer in student.named_buffers():
                    if name in mine["buffers"]:
                        buffer.copy_(mine["buffers"][name])
            rng = mine["rng"]
            if progress is not None:
                progress, epoch_rng = mine["progress"], mine["epoch_rng"]
        elif not own_share and (world_size > 1 or len(ranks) > 1):
            # stacklevel: this method, Trainer.load_state_dict, its caller
            warnings.warn(f"the checkpoint was written by {max(len(ranks), 1)} process(es), this run has "
                          f"{world_size}: every process continues from rank 0's random states and statistics, "
                          "close to but not the same as the uninterrupted run", stacklevel=3)
        if rng is not None:
            restore_rng(loader, rng)
        if not own_share:  # rank 0's stream, then this process's own, as at the start
            distributed.own_random_stream()
        self.pending = None
        if progress is not None and int(progress["batches"]) > 0:
            self.pending = {"progress": progress, "epoch_rng": epoch_rng, "rng": rng}
