"""The training loop: one trainer runs every method (AT, TRADES, ARD, IAD, RSLAD, ARDIR, natural).

The Trainer wires its collaborators (:mod:`ardir.train`) and runs the loop: the argument checks and defaults are
in :mod:`ardir.train.checks`, one optimiser step and the NaN/Inf policy in :mod:`ardir.train.step`, where the run
stands (counters, random states, every process's share of a checkpoint) in :mod:`ardir.train.state`, and
what a checkpoint holds, writing one and resuming in :mod:`ardir.train.checkpoints` (a base class of the Trainer).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed
from ._checks import non_negative_int, one_of, positive_int
from .attacks import PGD, compile_for_attack, model_device
from .checkpoint import PathLike
from .methods import Method
from .train import checks
from .train.checks import NAN_POLICIES, PRECISIONS
from .train.checkpoints import Checkpoints
from .train.state import TrainState
from .train.step import Stepper, grad_scaler, new_fault
from .train.validate import accuracies

Callback = Callable[["Trainer", Dict[str, Any]], None]


def _kept(owner: str, name: str, doc: str) -> property:
    """A Trainer attribute kept by one of its collaborators (``owner``: ``"state"`` or ``"stepper"``)."""
    return property(lambda self: getattr(getattr(self, owner), name),
                    lambda self, value: setattr(getattr(self, owner), name, value), doc=doc)


class Trainer(Checkpoints):
    """Trains a student with any method; by default ARDIR (``ardir.Trainer is ardir.ARDIRTrainer``).

    The trainer owns the loop, the optimiser and the schedule; the method owns the attack and the loss.

    Arguments:
        student: the model trained, taking (N, C, H, W) images in [0, 1].
        train_loader: yields ``(images, labels)`` batches, images in [0, 1] (normalisation inside the model).
        teacher: the frozen robust teacher (needed by ARD, IAD, RSLAD, ARDIR). It is switched to eval mode and
            its parameters frozen, with a warning when they were not; given to a method that uses none (AT, TRADES,
            natural) it is left alone, with a warning.
        method: a method name (``ardir.methods.list_methods()``) or a :class:`~ardir.methods.Method` instance.
        epochs: default: the method's paper protocol (200 for ARD/ARDIR, 300 for RSLAD, 100 for TRADES).
        lr, momentum, weight_decay: SGD settings (0.1, 0.9, 2e-4 as in the papers).
        milestones: epochs at which the lr is multiplied by ``lr_gamma`` (0.1); default: the method's paper
            schedule scaled to ``epochs``.
        optimizer, scheduler: factories ``optimizer(params)`` and ``scheduler(optimizer)`` replacing the defaults.
        val_loader: held-out data evaluated after each epoch (natural and PGD accuracy).
        val_attack_steps: PGD steps of the validation attack after each epoch (10); its norm, eps and step are the
            method's.
        limit_batches: stop each epoch after this many batches (dry runs).
        progress: show tqdm bars (they also switch off when the output is not a terminal).
        callbacks: ``fn(trainer, record)`` called after every epoch with the epoch's record.
        precision: ``"fp32"`` (default), ``"bf16"`` (``torch.autocast`` in bfloat16 around the method: attack,
            teacher and student forwards; the parameters, optimiser and feature distances stay fp32) or
            ``"fp16"`` (autocast in float16 with a gradient scaler; CUDA). bf16 is the fast choice on CUDA.
        channels_last: store the models and batches channels-last (NHWC): the same computation (equal up to float
            rounding), faster convolutions
            on CUDA tensor cores and in oneDNN on CPUs (measured on CPU: 1.5x for the small CNNs and MobileNetV2,
            parity for ResNet-18 and WRN-34-10); default: True on CUDA and CPU. Converts the student and teacher
            in place (a memory layout only; their parameter values are unchanged).
        compile: run the attack's forward passes (10 of the 11-12 student passes per batch) through
            ``torch.compile(student)`` (no ``fullgraph``); the hooked forward of the loss stays eager, so forward
            hooks keep working. Default False (the first batches pay the compilation).
        In a ``torchrun`` process group (:func:`ardir.distributed.init`) the trainer averages gradients over the
        processes after each backward, averages BatchNorm running statistics after each epoch, sums evaluation
        counts, and only rank 0 shows progress and runs ``callbacks`` (see :mod:`ardir.distributed`).
        checkpoint_dir: write a checkpoint there after every epoch (atomically, ``last.pt`` = the newest; see
            :mod:`ardir.checkpoint`); :meth:`resume` continues a killed run bit for bit (docs/guarantees.md).
        checkpoint_every_steps: also checkpoint every this many optimiser steps, mid-epoch (None: epoch ends only).
        keep_last: numbered checkpoints kept in ``checkpoint_dir`` (2).
        nan_policy: a non-finite loss or gradient norm ``"stop"``s the run (``FloatingPointError`` naming the step,
            the loss terms and the last good checkpoint; default) or is ``"skip"``ped: the batch makes no update
            and is counted in the record's ``skipped_batches``. On CUDA the check is on the device: "stop" raises
            at the next log point (every 20 batches), epoch end or checkpoint, never saving non-finite weights;
            "skip" zeroes that step's gradients (momentum and weight decay still apply).
        method_kwargs: the method's own arguments, e.g. ``tau=30``, ``layers=["layer4"]``, ``eps=8/255``,
            ``norm="l2"`` (the threat model, see :class:`~ardir.methods.Method`).

    Example::

        trainer = ardir.Trainer(student, train_loader, teacher=teacher, epochs=200, layers=["features"])
        history = trainer.fit()
    """
    default_method = "ardir"
    preset = False  # ATTrainer & co. train their default_method only

    def __init__(self, student: nn.Module, train_loader: Iterable, teacher: Optional[nn.Module] = None, *,
                 method: Union[str, Method, None] = None, epochs: Optional[int] = None, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 2e-4, milestones: Optional[List[int]] = None,
                 lr_gamma: float = 0.1, optimizer: Optional[Callable] = None, scheduler: Optional[Callable] = None,
                 val_loader: Optional[Iterable] = None, val_attack_steps: int = 10,
                 limit_batches: Optional[int] = None, progress: bool = True,
                 callbacks: Iterable[Callback] = (), precision: str = "fp32", channels_last: Optional[bool] = None,
                 compile: bool = False, checkpoint_dir: Optional[PathLike] = None,
                 checkpoint_every_steps: Optional[int] = None, keep_last: int = 2, nan_policy: str = "stop",
                 **method_kwargs):
        checks.check_student(student, teacher)
        self.method, teacher = checks.method_and_teacher(type(self), method, method_kwargs, teacher)
        self.student = student
        self.device = model_device(student)
        checks.check_one_device(student, self.device)
        self.teacher = checks.freeze(teacher, self.device) if teacher is not None else None
        self.precision = one_of("precision", precision, PRECISIONS, "precision")
        self.channels_last = checks.memory_format(channels_last, self.device, student, self.teacher)
        scaler = grad_scaler(self.precision, self.device)
        self.world_size = distributed.world_size()
        self.is_main = distributed.is_main_process()
        self.train_loader, self.val_loader = checks.shard_loaders(train_loader, val_loader, self.world_size)
        self.val_attack_steps = non_negative_int("val_attack_steps", val_attack_steps)
        self.limit_batches = None if limit_batches is None else positive_int("limit_batches", limit_batches)
        self.progress = progress
        self.callbacks = checks.check_callbacks(callbacks)
        self.epochs = self.method.epochs if epochs is None else non_negative_int("epochs", epochs)
        self.state = TrainState()
        self.method.on_epoch_start(self.epoch, self.epochs)  # the run's length is known before the first epoch
        self.method.check_schedule(self.epochs)
        nan_policy = one_of("nan_policy", nan_policy, NAN_POLICIES, "NaN policy")
        self._setup_checkpoints(checkpoint_dir, keep_last, checkpoint_every_steps)

        sample = checks.sample_batch(self.train_loader, self.device)
        self.num_classes = checks.count_classes(student, self.teacher, sample)
        self.method.setup(student, self.teacher, sample)
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        checks.start_together(self.world_size, student, self.teacher, self.method)
        if compile:
            compile_for_attack(student)
        params = list(student.parameters()) + list(self.method.parameters())
        built = checks.build_optimizer(optimizer, params, lr, momentum, weight_decay)
        self.stepper = Stepper(built, params, scaler, self.device, self.precision, nan_policy, self.world_size,
                               self._last_good)
        self.scheduler = checks.build_scheduler(scheduler, built, milestones, lr_gamma, self.epochs, self.method)

    # Where a run stands lives in ``state`` and the step's settings in ``stepper``; these read and write there.
    epoch = _kept("state", "epoch", "Epochs finished (the running epoch's 0-based number while it runs).")
    step = _kept("state", "step", "Optimiser steps taken.")
    history = _kept("state", "history", "The finished epochs' records.")
    optimizer = _kept("stepper", "optimizer", "The optimiser (SGD by default, or the ``optimizer`` factory's).")
    nan_policy = _kept("stepper", "nan_policy", '``"stop"`` or ``"skip"`` (see the class documentation).')
    scaler = property(lambda self: self.stepper.scaler, doc="The fp16 gradient scaler, None for fp32 and bf16.")
    _host_checks = _kept("stepper", "host_checks", "True: check each step on the host (the CPU), at no cost.")
    _fault = _kept("stepper", "fault", "The running epoch's fault record (see ardir.train.step).")
    _pending = _kept("state", "pending", "A loaded mid-epoch checkpoint, continued by the next epoch.")
    _new_fault = staticmethod(new_fault)

    def autocast(self):
        """The context the method runs in: ``torch.autocast`` for ``precision="bf16"``/``"fp16"``, else nothing."""
        return self.stepper.autocast()

    # ----------------------------------------------------------------------------------------------- loop
    def fit(self) -> List[Dict[str, Any]]:
        """Train until ``epochs``; returns the per-epoch records (also in ``trainer.history``)."""
        bar = tqdm(range(self.epoch, self.epochs), desc=f"{self.method.name}", unit="epoch",
                   disable=None if self.progress and self.is_main else True, initial=self.epoch, total=self.epochs)
        for _ in bar:
            record = self.train_epoch()
            if self.val_loader is not None:
                record.update(self.validate())
            self.history.append(record)
            bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in ("loss", "val_natural", "val_pgd")})
            if self.world_size > 1 and self._saves_epochs:  # what rank 0's checkpoints carry for the others
                shares = self.state.gather_shares(self.train_loader, self.student, None)
                self.state.ranks = shares if self.is_main else None
            for callback in self.callbacks if self.is_main else ():  # rank 0 logs and writes files
                callback(self, record)
            if self.checkpointer is not None and self.is_main:
                self.save_checkpoint()
        return self.history

    def train_epoch(self) -> Dict[str, Any]:
        """One pass over ``train_loader``; returns the epoch's record (mean loss terms, lr, time, images/s)."""
        lr = self._begin_epoch()
        start = time.perf_counter()
        total = len(self.train_loader) if hasattr(self.train_loader, "__len__") else None
        if self.limit_batches is not None:
            total = self.limit_batches if total is None else min(total, self.limit_batches)
        bar = tqdm(self.state.epoch_batches(self.train_loader), desc=f"epoch {self.epoch + 1}/{self.epochs}",
                   total=total, initial=self.state.batches, leave=False, unit="batch",
                   disable=None if self.progress and self.is_main else True)
        for batch in bar:
            if self.limit_batches is not None and self.state.batches >= self.limit_batches:
                break
            loss = self._train_batch(batch)
            self._after_step(total)  # mid-epoch checkpoint when due
            if self.state.batches % 20 == 1:
                self._check_faults()
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
        if self.state.batches == 0:
            raise ValueError("train_loader yielded no batch this epoch")
        if self.world_size > 1:  # the epoch's mean over all processes; one model everywhere
            distributed.average_buffers(self.student)
            self.state.all_reduce(self.device, self.stepper.fault)
        return self._end_epoch(lr, time.perf_counter() - start)

    def _train_batch(self, batch: Any) -> torch.Tensor:
        """One optimiser step on one batch; returns its loss."""
        index = self.state.batches
        images, labels = self._checked_batch(batch, index)
        saved = self.stepper.snapshot(self.student, self.method)  # under nan_policy="skip": undone if skipped
        with self.autocast():
            terms = self.method(self.student, images, labels, self.teacher)
            loss = sum(terms.values())
        self.stepper.backward(loss)
        ok = self._guard_step(loss, terms, index, len(labels))  # gradient norm, NaN/Inf check
        self.stepper.apply(ok, saved)
        self.state.add(loss, terms, ok, len(labels))
        self.step += 1
        return loss

    def _begin_epoch(self) -> float:
        """Tell the method, the loader and the state that an epoch starts; returns its lr."""
        lr = self.optimizer.param_groups[0]["lr"]
        # epochs may be changed after __init__; MTARD's eta follows the lr
        self.method.on_epoch_start(self.epoch, self.epochs, lr / self.optimizer.param_groups[0].get("initial_lr", lr))
        self.student.train()
        for obj in (self.train_loader, getattr(self.train_loader, "sampler", None)):
            if hasattr(obj, "set_epoch"):  # DistributedSampler, GPULoader: a new shuffle every epoch
                obj.set_epoch(self.epoch)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # fresh, or the accumulators and fault record of a mid-epoch checkpoint
        self.stepper.start_epoch(self.epoch, self.state.begin_epoch(self.train_loader, self.device))
        return lr

    def _end_epoch(self, lr: float, seconds: float) -> Dict[str, Any]:
        """Step the schedule, count the epoch and return its record (one host sync)."""
        self.scheduler.step()
        self.epoch += 1
        seen = self.state.seen
        record = {"epoch": self.epoch, "lr": lr, "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}
        if self.device.type == "cuda":
            record["peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        self._check_faults()
        record.update(self.stepper.summary(self.state.sums, seen, self.epoch))  # means over the kept batches
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"mean loss of epoch {self.epoch} is {record['loss']}; terms: " +
                                     ", ".join(f"{k}={record[k]:.4g}" for k in self.state.sums))
        return record

    def _checked_batch(self, batch: Any, index: int):
        """Batch ``index`` of the epoch on the device, checked (see :func:`ardir.train.checks.checked_batch`)."""
        return checks.checked_batch(batch, index, self.epoch, self.device, self.num_classes, self.channels_last,
                                    None if self._host_checks else self._flag_bad_labels)

    # The loop calls these three through the trainer, so that a test (or a subclass) can wrap one step.
    def _guard_step(self, loss: torch.Tensor, terms: Dict[str, torch.Tensor], batch: int, size: int):
        """Between backward and the optimiser step: the gradient norm and the NaN/Inf check (see ``nan_policy``
        and :meth:`ardir.train.step.Stepper.guard`)."""
        return self.stepper.guard(loss, terms, self.step, self.epoch, batch, size)

    def _check_faults(self) -> None:
        """On an accelerator: raise for bad labels or a non-finite step since the epoch began (one host sync)."""
        self.stepper.check(self.epoch, self.num_classes)

    def _flag_bad_labels(self, labels: torch.Tensor, index: int) -> torch.Tensor:
        return self.stepper.flag_bad_labels(labels, index, self.num_classes)

    def validate(self) -> Dict[str, float]:
        """Natural and PGD accuracy (%) of the student on ``val_loader`` with the method's norm, eps and step."""
        attack = PGD(self.student, eps=self.method.eps, step_size=self.method.step_size, steps=self.val_attack_steps,
                     norm=self.method.norm)
        return accuracies(self.student, attack, self.val_loader, self.device, self.channels_last, self.num_classes,
                          self.autocast())


ARDIRTrainer = Trainer


class ATTrainer(Trainer):
    """:class:`Trainer` running Madry PGD-AT (``method="at"``)."""
    default_method, preset = "at", True


class TRADESTrainer(Trainer):
    """:class:`Trainer` running TRADES (``method="trades"``)."""
    default_method, preset = "trades", True


class ARDTrainer(Trainer):
    """:class:`Trainer` running ARD (``method="ard"``)."""
    default_method, preset = "ard", True


class IADTrainer(Trainer):
    """:class:`Trainer` running IAD-I (``method="iad"``)."""
    default_method, preset = "iad", True


class RSLADTrainer(Trainer):
    """:class:`Trainer` running RSLAD (``method="rslad"``)."""
    default_method, preset = "rslad", True
