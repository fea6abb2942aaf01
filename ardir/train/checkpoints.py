"""The trainer's checkpoints: what one holds, when one is written, and resuming from one.

:class:`Checkpoints` is a base class of :class:`ardir.trainer.Trainer` (its public methods are the trainer's:
``state_dict``, ``load_state_dict``, ``save_checkpoint``, ``resume``, ``check_finite``); it reads the trainer's
models, optimiser, schedule, ``state`` (:class:`~ardir.train.state.TrainState`) and ``stepper``
(:class:`~ardir.train.step.Stepper`), and imports no trainer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import distributed
from ..checkpoint import FORMAT, VERSION, PathLike
from .checks import build_checkpointer
from .state import check_trainer_state, resume_from


class Checkpoints:
    """The checkpoint part of :class:`ardir.trainer.Trainer`."""

    def _setup_checkpoints(self, checkpoint_dir: Optional[PathLike], keep_last: Any,
                           every_steps: Optional[Any]) -> None:
        """The checkpoint writer (None without ``checkpoint_dir``) and the schedule every process follows."""
        self.checkpointer = build_checkpointer(checkpoint_dir, keep_last, every_steps)
        self.last_checkpoint: Optional[Path] = None
        # Rank 0 writes checkpoints, but every process must join in gathering its share of one; so they all follow
        # rank 0's settings (a checkpoint_dir given to rank 0 alone is fine): when mid-epoch checkpoints are due,
        # and whether epoch ends are saved (rank 0's checkpointer or callbacks).
        every = self.checkpointer.every_steps if self.checkpointer is not None else None
        saves = self.checkpointer is not None or bool(self.callbacks)
        self._every_steps, self._saves_epochs = distributed.all_gather_object((every, saves))[0]

    def _after_step(self, total: Optional[int]) -> None:
        """A mid-epoch checkpoint when one is due; every process takes part in gathering its share."""
        every = self._every_steps  # rank 0's: every process decides alike
        if every is None or self.step <= 0 or self.step % every:
            return
        if total is not None and self.state.batches >= total:
            return  # the epoch ends now and its checkpoint follows
        progress = self.state.progress(self.stepper.fault)
        ranks = self.state.gather_shares(self.train_loader, self.student, progress) if self.world_size > 1 else None
        if self.is_main and self.checkpointer is not None:
            self._save(progress, ranks)

    def save_checkpoint(self) -> Path:
        """Write :meth:`state_dict` into ``checkpoint_dir`` now (atomically); returns the file's path.

        A failed write (e.g. disk full) raises ``OSError`` naming the file; the previous checkpoints are intact.
        """
        return self._save(None, self.state.ranks)

    def _save(self, progress: Optional[Dict[str, Any]], ranks: Optional[List[Dict[str, Any]]]) -> Path:
        if self.checkpointer is None:
            raise ValueError("save_checkpoint needs the trainer built with checkpoint_dir=<a directory>")
        self._check_faults()  # never save non-finite weights as a good checkpoint
        self.check_finite()  # nor weights an overflowing update made non-finite
        self.last_checkpoint = self.checkpointer.save(self._state_dict(progress, ranks), self.epoch, self.step)
        return self.last_checkpoint

    def resume(self, path_or_dir: PathLike, missing_ok: bool = False) -> Optional[Path]:
        """Continue from a checkpoint file, or from the newest good checkpoint in a directory (corrupt ones are
        skipped with a warning); then :meth:`fit` carries on, mid-epoch included, bit for bit on CPU.

        Returns the checkpoint's path, or None when ``missing_ok`` and the directory holds no checkpoint.
        Raises ``CheckpointError`` (a ``ValueError``) naming the file when it is corrupt, unsafe or does not fit
        this trainer (other model, method or optimiser).
        """
        path = resume_from(path_or_dir, missing_ok, self.load_state_dict)
        if path is not None:
            self.last_checkpoint = path
        return path

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly: student, adapters, optimiser, schedule, gradient scaler, epoch,
        step, history, the random states (torch, CUDA, numpy, Python, the loader's shuffling generators) and,
        when taken mid-epoch, the epoch's progress and its random states at the epoch's start. Tensors and plain
        data only, so that it loads with ``torch.load(weights_only=True)``."""
        return self._state_dict(None, self.state.ranks)

    def _state_dict(self, progress: Optional[Dict[str, Any]], ranks: Optional[List[Dict[str, Any]]]):
        return {"format": FORMAT, "version": VERSION,
                "student": self.student.state_dict(), "method": self.method.state_dict(),
                "method_name": self.method.name,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                **self.state.state_dict(self.train_loader, progress, ranks if self.world_size > 1 else None)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, random states included (the global RNGs are set as they were)."""
        check_trainer_state(state, self.method.name)
        self.student.load_state_dict(state["student"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.state.load_state_dict(state, self.train_loader, self.student, self.world_size)

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the first parameter, buffer or optimiser state holding a NaN or an
        Inf (and the last good checkpoint); called before any checkpoint is written, so none ever holds one."""
        self.stepper.check_weights({"student": self.student.state_dict(), "method": self.method.state_dict(),
                                    "optimizer": self.optimizer.state_dict()}, self.epoch, self.step)

    def _last_good(self) -> str:
        return (f"last good checkpoint: {self.last_checkpoint} (resume from it with Trainer.resume or --resume)"
                if self.last_checkpoint is not None else
                "no checkpoint was written yet (pass checkpoint_dir=... to keep some, --checkpoint-every-steps N in "
                "ardir train; ardir train keeps last.pt after every epoch)")
