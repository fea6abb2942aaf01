"""The training loop: one trainer runs every method (AT, TRADES, ARD, IAD, RSLAD, ARDIR, natural)."""
from __future__ import annotations

import collections.abc
import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed
from ._checks import (batch_tensors, check_batch, label_range, logits_of, non_negative, non_negative_int, one_of,
                      positive, positive_int)
from .attacks import PGD, compile_for_attack, model_mode
from .checkpoint import (FORMAT, VERSION, CheckpointError, Checkpointer, PathLike, find_resumable, generator_states,
                         load_checkpoint, rng_state, set_generator_states, set_rng_state)
from .methods import Method, create_method

Callback = Callable[["Trainer", Dict[str, Any]], None]
PRECISIONS = ("fp32", "bf16", "fp16")
NAN_POLICIES = ("stop", "skip")


def _images_labels(batch: Any, loader: str):
    """A loader's ``(images, labels)`` batch, or an error saying what the trainer expects."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch
    what = f"a dict with keys {sorted(batch)}" if isinstance(batch, dict) else \
        f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise TypeError(f"{loader} must yield (images, labels) batches, got {what}: wrap the dataset so that each item "
                    "is (image, label)")


def _probe(name: str, model: nn.Module, images: torch.Tensor) -> int:
    """The number of classes ``model`` predicts on a sample batch (see :func:`~ardir._checks.logits_of`)."""
    with model_mode(model, "eval"):
        return int(logits_of(name, model, images).shape[1])


def _built(argument: str, factory: Any, given: Any, kind: type, example: str) -> Any:
    """``factory(given)``, refusing an already built object (a common slip) with an example of a factory."""
    if isinstance(factory, kind) or not callable(factory):
        raise TypeError(f"{argument} must be a factory, e.g. {example}; got {type(factory).__name__} (the trainer "
                        "builds it, so that it covers the ARDIR adapters too and can be restored on resume)")
    return factory(given)


def _milestones(milestones: Any, epochs: int) -> List[int]:
    """Epoch numbers 1 .. epochs, increasing; fractions of the schedule are refused (they would never be reached)."""
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, collections.abc.Iterable):
        raise TypeError(f"milestones={milestones!r} must be a list of epoch numbers, e.g. [100, 150]")
    values = list(milestones)
    if any(isinstance(m, float) and 0 < m < 1 for m in values):
        raise ValueError(f"milestones={values} look like fractions of the schedule; give epoch numbers, e.g. "
                         f"{[max(1, round(m * epochs)) if isinstance(m, float) and 0 < m < 1 else m for m in values]}")
    values = [positive_int("milestones", m) for m in values]
    if epochs and any(m > epochs for m in values):
        warnings.warn(f"milestones {[m for m in values if m > epochs]} lie after the last epoch ({epochs}); the lr "
                      "never drops there", stacklevel=3)
    return sorted(values)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class Trainer:
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
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
        if teacher is student:
            raise ValueError("teacher is student: pass the frozen robust teacher and a separate student model")
        if not any(p.requires_grad for p in student.parameters()):
            raise ValueError("student has no trainable parameters (requires_grad is False everywhere): pass the "
                             "model to train, not a frozen one")
        self.method = self._build_method(method or self.default_method, method_kwargs)
        if self.preset and self.method.name != self.default_method:
            raise TypeError(f"{type(self).__name__} always trains {self.default_method!r}; for "
                            f"{self.method.name!r} use ardir.Trainer(..., method={self.method.name!r})")
        if self.method.needs_teacher and teacher is None:
            raise ValueError(f"method {self.method.name!r} distils from a teacher: pass teacher=<a robust model>")
        if teacher is not None and not self.method.needs_teacher:
            warnings.warn(f"method {self.method.name!r} uses no teacher; the teacher passed is ignored",
                          stacklevel=2)
            teacher = None  # left as it was: not frozen, not converted to channels-last
        self.student = student
        self.device = _model_device(student)
        devices = sorted({str(t.device) for t in (*student.parameters(), *student.buffers())})
        if len(devices) > 1:
            raise ValueError(f"student has parameters or buffers on several devices ({', '.join(devices)}): move "
                             f"it to one device first, e.g. student.to({str(self.device)!r})")
        self.teacher = self._freeze(teacher) if teacher is not None else None
        self.precision = one_of("precision", precision, PRECISIONS, "precision")
        self.channels_last = (self.device.type in ("cuda", "cpu") if channels_last is None
                              else bool(channels_last))
        if self.channels_last:
            for model in (student, self.teacher):
                if model is not None:
                    model.to(memory_format=torch.channels_last)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.world_size = distributed.world_size()
        self.is_main = distributed.is_main_process()
        if self.world_size > 1:  # a plain DataLoader: each process takes its share of every global batch
            train_loader = distributed.shard_loader(train_loader, training=True, keep_global_batch=True)
            val_loader = None if val_loader is None else distributed.shard_loader(val_loader, training=False)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.val_attack_steps = non_negative_int("val_attack_steps", val_attack_steps)
        self.limit_batches = None if limit_batches is None else positive_int("limit_batches", limit_batches)
        self.progress = progress
        if callable(callbacks) or isinstance(callbacks, (str, bytes)):
            raise TypeError("callbacks must be a list of functions fn(trainer, record); for one, pass [fn]")
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not callable(callback):
                raise TypeError(f"callbacks: {callback!r} is not callable; each callback is fn(trainer, record)")
        self.epochs = self.method.epochs if epochs is None else non_negative_int("epochs", epochs)
        self.method.run_epochs = self.epochs
        self.method.check_schedule(self.epochs)
        self.epoch = 0
        self.step = 0
        self.history: List[Dict[str, Any]] = []
        self.nan_policy = one_of("nan_policy", nan_policy, NAN_POLICIES, "NaN policy")
        keep_last = positive_int("keep_last", keep_last)  # checked even without checkpoint_dir: a typo is a typo
        if checkpoint_every_steps is not None:
            checkpoint_every_steps = positive_int("checkpoint_every_steps", checkpoint_every_steps)
            if checkpoint_dir is None:
                raise ValueError("checkpoint_every_steps needs checkpoint_dir=<a directory> to write the checkpoints "
                                 "to")
        self.checkpointer = None if checkpoint_dir is None else Checkpointer(checkpoint_dir, keep_last,
                                                                               checkpoint_every_steps)
        self.last_checkpoint: Optional[Path] = None
        # Rank 0 writes checkpoints, but every process must join in gathering its share of one; so they all follow
        # rank 0's settings (a checkpoint_dir given to rank 0 alone is fine): when mid-epoch checkpoints are due,
        # and whether epoch ends are saved (rank 0's checkpointer or callbacks).
        every = self.checkpointer.every_steps if self.checkpointer is not None else None
        saves = self.checkpointer is not None or bool(self.callbacks)
        self._every_steps, self._saves_epochs = distributed.all_gather_object((every, saves))[0]
        self._progress: Optional[Dict[str, Any]] = None  # the running epoch's accumulators, while it runs
        self._ranks: Optional[List[Dict[str, Any]]] = None  # every process's own state, gathered for a checkpoint
        self._epoch_rng: Optional[Dict[str, Any]] = None  # random states at the start of the running epoch
        self._pending: Optional[Dict[str, Any]] = None  # a mid-epoch checkpoint loaded, replayed by train_epoch
        self._fault = self._new_fault()
        self._host_checks = self.device.type == "cpu"  # else device-side flags: no host sync per step

        sample = self._sample_batch()
        self.num_classes = self._check_models(sample)
        self.method.setup(student, self.teacher, sample)
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        if self.world_size > 1:  # every process starts from rank 0's weights
            for module in (student, self.teacher, self.method):
                if module is not None:
                    distributed.broadcast_module(module)
            distributed.own_random_stream()  # but draws its own random starts
        if compile:
            compile_for_attack(student)
        params = list(student.parameters()) + list(self.method.parameters())
        self._trained_params = params
        if optimizer is not None:
            self.optimizer = _built("optimizer", optimizer, params, torch.optim.Optimizer,
                                    "lambda params: torch.optim.Adam(params, lr=1e-3)")
        else:
            self.optimizer = torch.optim.SGD(params, lr=positive("lr", lr), momentum=non_negative("momentum", momentum),
                                             weight_decay=non_negative("weight_decay", weight_decay))
        if scheduler is not None:
            self.scheduler = _built("scheduler", scheduler, self.optimizer, torch.optim.lr_scheduler.LRScheduler,
                                    "lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 200)")
        else:
            if milestones is None:
                milestones = sorted({max(1, round(f * self.epochs)) for f in self.method.milestones})
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
                self.optimizer, _milestones(milestones, self.epochs), positive("lr_gamma", lr_gamma))

    # ---------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _build_method(method: Union[str, Method], kwargs: Dict[str, Any]) -> Method:
        if isinstance(method, Method):
            if kwargs:
                raise TypeError(f"method is already built; pass {sorted(kwargs)} to its constructor instead")
            return method
        if not isinstance(method, str):
            raise TypeError(f"method must be a name or an ardir.methods.Method, got {type(method).__name__}")
        return create_method(method, **kwargs)

    def _freeze(self, teacher: nn.Module) -> nn.Module:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if _model_device(teacher) != self.device:
            raise ValueError(f"teacher is on {_model_device(teacher)} but student on {self.device}: "
                             f"move both to one device (teacher.to({str(self.device)!r}))")
        if teacher.training:
            warnings.warn("teacher was in train mode; switched to eval mode (a teacher's BatchNorm must not move)",
                          stacklevel=3)
        teacher.eval()
        trainable = [p for p in teacher.parameters() if p.requires_grad]
        if trainable:
            warnings.warn(f"teacher had {len(trainable)} trainable parameter tensors; froze them "
                          "(requires_grad=False)", stacklevel=3)
            for p in trainable:
                p.requires_grad_(False)
        return teacher

    def _sample_batch(self) -> torch.Tensor:
        """A couple of images for shape probing, taken without touching the global RNG (the data order)."""
        if isinstance(self.train_loader, collections.abc.Iterator):
            raise TypeError(f"train_loader is a one-shot iterator ({type(self.train_loader).__name__}): the trainer "
                            "iterates it once per epoch; pass a DataLoader or a list of (images, labels) batches")
        dataset = getattr(self.train_loader, "dataset", None)
        try:
            if len(self.train_loader) == 0:
                raise ValueError("train_loader is empty: it yields no batch (check the dataset and drop_last)")
        except TypeError:
            pass
        with torch.random.fork_rng(devices=[]):
            if dataset is not None and len(dataset) > 0:
                images = torch.stack([torch.as_tensor(_images_labels(dataset[i], "train_loader")[0])
                                      for i in range(min(2, len(dataset)))])
            else:
                first = next(iter(self.train_loader), None)
                if first is None:
                    raise ValueError("train_loader is empty: it yields no batch (check the dataset and drop_last)")
                images = _images_labels(first, "train_loader")[0][:2]
        return images.to(self.device)

    def _check_models(self, images: torch.Tensor) -> int:
        batch_tensors("the training images", images)
        num_classes = _probe("student", self.student, images)
        if self.teacher is not None:
            t_classes = _probe("teacher", self.teacher, images)
            if t_classes != num_classes:
                raise ValueError(f"teacher predicts {t_classes} classes but student {num_classes}: "
                                 "distillation needs the same label space")
        return num_classes

    def _check_batch(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        check_batch("the first training batch", images, labels, self.num_classes, "student")

    def _checked_batch(self, batch: Any, index: int):
        """Batch ``index`` of the epoch on the device, checked cheaply: tensors of the right dtypes (metadata only,
        every batch), labels in range (host values on the CPU; on an accelerator a device flag read with the NaN
        checks, so no host sync per batch) and, for the first batch, the pixel range."""
        images, labels = _images_labels(batch, "train_loader")
        what = f"training batch {index + 1} of epoch {self.epoch + 1}"
        batch_tensors(what, images, labels)
        on_host = labels.device.type == "cpu"
        if on_host or self._host_checks:  # host values already: checking costs no device sync
            label_range(what, labels, self.num_classes, "student")
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if not (on_host or self._host_checks):  # a loader yielding device tensors (ardir.gpu_data)
            labels = self._flag_bad_labels(labels, index)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if index == 0:
            self._check_batch(images, labels)
        return images, labels

    def _flag_bad_labels(self, labels: torch.Tensor, index: int) -> torch.Tensor:
        """Record on the device the first batch with a label out of range (read by :meth:`_check_faults`) and
        return the labels with those set to 0, so that the loss kernels stay in bounds until the flag is read."""
        valid = (labels >= 0) & (labels < self.num_classes)
        current = torch.as_tensor(self._fault.get("bad_label_batch", -1), device=labels.device)
        self._fault["bad_label_batch"] = torch.where(~valid.all() & (current < 0), index + 1, current)
        return labels.masked_fill(~valid, 0)

    def _state_buffers(self) -> List[torch.Tensor]:
        """Every buffer a forward may write: the student's (BatchNorm statistics, counters) and the method's."""
        return [b for b in (*self.student.buffers(), *self.method.buffers()) if isinstance(b, torch.Tensor)]

    def _snapshot_buffers(self):
        """Copies of the buffers before a batch (small next to the activations), for ``nan_policy="skip"``."""
        return [(b, b.detach().clone()) for b in self._state_buffers()]

    @staticmethod
    def _restore_buffers(saved, ok) -> None:
        """Put the buffers back as they were before a skipped batch; on an accelerator ``ok`` is a device flag and
        the choice is made on the device (no host sync)."""
        if ok is True:
            return
        with torch.no_grad():
            for buffer, before in saved:
                buffer.copy_(before if ok is False else torch.where(ok.to(buffer.device), buffer, before))

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the first parameter, buffer or optimiser state holding a NaN or an
        Inf (and the last good checkpoint); called before any checkpoint is written, so none ever holds one."""
        from ._safety import first_non_finite
        bad = first_non_finite({"student": self.student.state_dict(), "method": self.method.state_dict(),
                                "optimizer": self.optimizer.state_dict()})
        if bad is None:
            return
        raise FloatingPointError(
            f"{bad} holds non-finite values (NaN or Inf) after epoch {self.epoch}, step {self.step}, although every "
            f"loss and gradient norm was finite (an update overflowed); no checkpoint was written with it; "
            f"{self._last_good()}. Lower the learning rate or check the loss weights")

    def _last_good(self) -> str:
        return (f"last good checkpoint: {self.last_checkpoint} (resume from it with Trainer.resume or --resume)"
                if self.last_checkpoint is not None else
                "no checkpoint was written yet (pass checkpoint_dir=... to keep some; ardir train keeps last.pt "
                "after every epoch)")

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
                self._ranks = self._rank_states(None)
            for callback in self.callbacks if self.is_main else ():  # rank 0 logs and writes files
                callback(self, record)
            if self.checkpointer is not None and self.is_main:
                self.save_checkpoint()
        return self.history

    def _rank_states(self, progress: Optional[Dict[str, Any]]) -> Optional[List[Dict[str, Any]]]:
        """Every process's own share of a checkpoint, gathered (a collective: all processes call it): its random
        states, BatchNorm statistics and, mid-epoch, its partial sums. A resume hands each process its own."""
        def cpu(value):
            if isinstance(value, torch.Tensor):
                return value.detach().cpu()
            if isinstance(value, dict):
                return {k: cpu(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(cpu(v) for v in value)
            return value
        mine = {"rng": self._rng_state(), "buffers": dict(self.student.named_buffers()), "progress": progress,
                "epoch_rng": self._epoch_rng if progress is not None else None}
        shares = distributed.all_gather_object(cpu(mine))
        return shares if self.is_main else None

    def autocast(self):
        """The context the method runs in: ``torch.autocast`` for ``precision="bf16"``/``"fp16"``, else nothing."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_epoch(self) -> Dict[str, Any]:
        """One pass over ``train_loader``; returns the epoch's record (mean loss terms, lr, time, images/s)."""
        self.method.epoch, self.method.run_epochs = self.epoch, self.epochs  # epochs may be changed after __init__
        self.student.train()
        lr = self.optimizer.param_groups[0]["lr"]
        self.method.lr_scale = lr / self.optimizer.param_groups[0].get("initial_lr", lr)  # MTARD's eta follows it
        for obj in (self.train_loader, getattr(self.train_loader, "sampler", None)):
            if hasattr(obj, "set_epoch"):  # DistributedSampler, GPULoader: a new shuffle every epoch
                obj.set_epoch(self.epoch)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        sums, seen, batches = self._begin_epoch()  # fresh, or the accumulators of a mid-epoch checkpoint
        start = time.perf_counter()
        total = len(self.train_loader) if hasattr(self.train_loader, "__len__") else None
        if self.limit_batches is not None:
            total = self.limit_batches if total is None else min(total, self.limit_batches)
        bar = tqdm(self._epoch_batches(batches), desc=f"epoch {self.epoch + 1}/{self.epochs}", total=total,
                   initial=batches, leave=False,
                   unit="batch", disable=None if self.progress and self.is_main else True)
        for batch in bar:
            if self.limit_batches is not None and batches >= self.limit_batches:
                break
            images, labels = self._checked_batch(batch, batches)
            saved = self._snapshot_buffers() if self.nan_policy == "skip" else None
            with self.autocast():
                terms = self.method(self.student, images, labels, self.teacher)
                loss = sum(terms.values())
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            if self.world_size > 1:
                distributed.all_reduce_gradients(self._trained_params)
            ok = self._guard_step(loss, terms, batches, len(labels))  # gradient norm, NaN/Inf check
            if saved is not None:
                self._restore_buffers(saved, ok)  # a skipped batch leaves no trace: BatchNorm statistics included
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            for name, value in [("loss", loss), *terms.items()]:
                value = _where_ok(ok, value.detach()) * len(labels)
                sums[name] = sums[name] + value if name in sums else value
            seen += len(labels)
            batches += 1
            self.step += 1
            self._after_step(sums, seen, batches, total)  # mid-epoch checkpoint when due
            if batches % 20 == 1:
                self._check_faults()
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
        if batches == 0:
            raise ValueError("train_loader yielded no batch this epoch")
        if self.world_size > 1:  # the epoch's mean over all processes; one model everywhere
            distributed.average_buffers(self.student)
            names = list(sums)
            counts = [torch.as_tensor(n, device=self.device).float().reshape(())
                      for n in (seen, self._fault["skipped_images"])]
            totals = distributed.all_reduce_sum(torch.stack([sums[k].float() for k in names] + counts))
            sums, seen = dict(zip(names, totals[:-2])), int(totals[-2])
            self._fault["skipped_images"] = totals[-1]  # skipped images of every process, as seen counts them
        seconds = time.perf_counter() - start
        self.scheduler.step()
        self.epoch += 1
        record = {"epoch": self.epoch, "lr": lr, "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}
        if self.device.type == "cuda":
            record["peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        record.update(self._end_epoch(sums, seen))  # mean terms over the batches not skipped, grad_norm
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"mean loss of epoch {self.epoch} is {record['loss']}; terms: " +
                                     ", ".join(f"{k}={record[k]:.4g}" for k in sums))
        return record

    def validate(self) -> Dict[str, float]:
        """Natural and PGD accuracy (%) of the student on ``val_loader`` with the method's norm, eps and step."""
        attack = PGD(self.student, eps=self.method.eps, step_size=self.method.step_size, steps=self.val_attack_steps,
                     norm=self.method.norm)
        checked = False
        # (natural correct, adversarial correct, seen) counted on the device: no host sync per batch; summed over
        # the processes of a process group (each evaluates its shard, see ardir.distributed.shard_loader).
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)
        with model_mode(self.student, "eval"), self.autocast():
            for batch in self.val_loader:
                images, labels = _images_labels(batch, "val_loader")
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                if self.channels_last and images.dim() == 4:
                    images = images.contiguous(memory_format=torch.channels_last)
                if not checked:  # once per validation: a normalised val_loader would give meaningless accuracies
                    check_batch("the first validation batch", images, labels, self.num_classes, "student")
                    checked = True
                with torch.no_grad():
                    counts[0] += (self.student(images).argmax(1) == labels).sum()
                adv = attack.forward(images, labels)
                with torch.no_grad():
                    counts[1] += (self.student(adv).argmax(1) == labels).sum()
                counts[2] += len(labels)
        natural, correct_adv, total = distributed.all_reduce_sum(counts).tolist()
        if total == 0:
            raise ValueError("val_loader yielded no batch: give it at least one (images, labels) batch, or pass "
                             "val_loader=None")
        return {"val_natural": 100 * natural / total, "val_pgd": 100 * correct_adv / total}

    # ------------------------------------------------------------------------ checkpoints, faults, resume
    @staticmethod
    def _new_fault() -> Dict[str, Any]:
        return {"grad_sum": 0.0, "grad_max": 0.0, "good_steps": 0, "skipped": 0, "skipped_images": 0,
                "bad_step": -1, "bad_batch": -1, "bad_loss": 0.0, "bad_terms": None, "bad_names": [],
                "bad_label_batch": -1}

    def _begin_epoch(self):
        """``(sums, seen, batches)`` the epoch starts from: zeros, or a resumed mid-epoch checkpoint's."""
        pending, self._pending = self._pending, None
        if pending is None:
            # Before the loader's iterator exists: what its shuffle (and worker seeds) will be drawn from.
            self._epoch_rng = {"torch": torch.get_rng_state(), "generators": generator_states(self.train_loader)}
            self._fault = self._new_fault()
            self._fault["epoch"] = self.epoch
            self._replay = None
            return {}, 0, 0
        progress = pending["progress"]
        move = (lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v)
        self._epoch_rng = pending["epoch_rng"]
        self._fault = {k: move(v) for k, v in progress["fault"].items()}
        self._replay = (int(progress["batches"]), pending["rng"])
        return {k: move(v) for k, v in progress["sums"].items()}, int(progress["seen"]), int(progress["batches"])

    def _epoch_batches(self, done: int):
        """The epoch's batches. After a mid-epoch resume the loader restarts from the epoch's random states, the
        ``done`` batches already trained on are loaded and dropped (replaying the order, the augmentation draws
        and the DataLoader workers' seeds) and every random state is then set as it was at the checkpoint."""
        replay, self._replay = self._replay, None
        if replay is not None:
            torch.set_rng_state(self._epoch_rng["torch"])
            set_generator_states(self.train_loader, self._epoch_rng["generators"])
        iterator = iter(self.train_loader)
        if replay is not None:
            for i in range(replay[0]):
                if next(iterator, None) is None:
                    raise CheckpointError(f"the checkpoint was taken after batch {replay[0]} of epoch "
                                          f"{self.epoch + 1} but train_loader now yields only {i}: resume with the "
                                          "same data, batch size and seed as the interrupted run")
            self._set_rng(replay[1])
        yield from iterator

    def _guard_step(self, loss: torch.Tensor, terms: Dict[str, torch.Tensor], batch: int, size: int):
        """Between backward and the optimiser step: the gradient norm and the NaN/Inf check (see ``nan_policy``).

        Returns True, False (CPU, step skipped: the gradients are removed so the optimiser leaves every parameter
        and its momentum alone) or, on an accelerator, a 0-dim bool tensor, so that no host sync is added.
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # true gradients for the norm; the scaler's step knows
        grads = [p.grad for p in self._trained_params if p.grad is not None]
        norm = _total_norm(grads) if grads else torch.zeros((), device=self.device)
        finite = torch.isfinite(loss.detach())
        if self.scaler is None:  # with fp16 loss scaling, inf gradients are the scaler's business
            finite = finite & torch.isfinite(norm)
        f = self._fault
        if self._host_checks:  # checking now costs nothing on the CPU
            if bool(finite):
                f["grad_sum"] += float(norm)
                f["grad_max"] = max(f["grad_max"], float(norm))
                f["good_steps"] += 1
                return True
            f["skipped"] += 1
            f["skipped_images"] += size
            if self.nan_policy == "stop":
                raise self._fault_error(self.step + 1, batch + 1, float(loss.detach()),
                                        {k: float(v.detach()) for k, v in terms.items()}, float(norm))
            self.optimizer.zero_grad(set_to_none=True)
            return False
        good = finite.to(norm.dtype)
        zero = torch.zeros((), device=norm.device, dtype=norm.dtype)
        f["grad_sum"] = f["grad_sum"] + torch.where(finite, norm, zero)
        f["grad_max"] = torch.maximum(torch.as_tensor(f["grad_max"], device=norm.device, dtype=norm.dtype),
                                      torch.where(finite, norm, zero))
        f["good_steps"] = f["good_steps"] + good
        f["skipped"] = f["skipped"] + (1 - good)
        f["skipped_images"] = f["skipped_images"] + (1 - good) * size
        first = ~finite & (torch.as_tensor(f["bad_step"], device=norm.device) < 0)
        f["bad_step"] = torch.where(first, self.step + 1, torch.as_tensor(f["bad_step"], device=norm.device))
        f["bad_batch"] = torch.where(first, batch + 1, torch.as_tensor(f["bad_batch"], device=norm.device))
        f["bad_loss"] = torch.where(first, loss.detach().float(), torch.as_tensor(f["bad_loss"], device=norm.device))
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        f["bad_terms"] = values if f["bad_terms"] is None else torch.where(first, values, f["bad_terms"])
        f["bad_names"] = list(terms)
        if self.nan_policy == "skip":
            for g in grads:
                g.masked_fill_(~finite, 0.0)
        return finite

    def _check_faults(self) -> None:
        """On an accelerator with ``nan_policy="stop"``: raise if a step since the epoch began was non-finite
        (one host sync; called at log points, epoch ends and before every checkpoint)."""
        f = self._fault
        label_batch = f.get("bad_label_batch", -1)
        if isinstance(label_batch, torch.Tensor) and int(label_batch) >= 0:
            raise ValueError(f"training batch {int(label_batch)} of epoch {int(f.get('epoch', self.epoch)) + 1}: "
                             f"labels outside 0 .. {self.num_classes - 1}, but the student has {self.num_classes} "
                             "outputs: fix the dataset's labels or build the student with more classes")
        if self.nan_policy != "stop" or self._host_checks or not isinstance(f["bad_step"], torch.Tensor):
            return
        step = int(f["bad_step"])
        if step >= 0:
            terms = dict(zip(f["bad_names"], f["bad_terms"].tolist())) if f["bad_terms"] is not None else {}
            raise self._fault_error(step, int(f["bad_batch"]), float(f["bad_loss"]), terms, None)

    def _fault_error(self, step: int, batch: int, loss: float, terms: Dict[str, float],
                     grad_norm: Optional[float]) -> FloatingPointError:
        epoch = int(self._fault.get("epoch", self.epoch)) + 1  # train_epoch may have counted the epoch already
        where = f"at epoch {epoch}, step {step} (batch {batch} of the epoch)"
        what = f"loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm} (loss {loss:.4g})"
        last = self._last_good()
        return FloatingPointError(
            f"{what} {where}; loss terms: " + ", ".join(f"{k}={v:.4g}" for k, v in terms.items()) +
            f"; {last}. Lower the learning rate, check the data and the loss weights, or pass nan_policy='skip' "
            "(ardir train: --nan-policy skip) to skip such batches (counted in the record as skipped_batches)")

    def _after_step(self, sums: Dict[str, torch.Tensor], seen: int, batches: int, total: Optional[int]) -> None:
        every = self._every_steps  # rank 0's: every process decides alike
        if every is None or self.step <= 0 or self.step % every:
            return
        if total is not None and batches >= total:
            return  # the epoch ends now and its checkpoint follows
        progress = {"batches": batches, "seen": seen, "sums": dict(sums), "fault": dict(self._fault)}
        ranks = self._rank_states(progress) if self.world_size > 1 else None  # every process takes part
        if not self.is_main or self.checkpointer is None:
            return
        self._progress, self._ranks = progress, ranks
        try:
            self.save_checkpoint()
        finally:
            self._progress, self._ranks = None, None

    def _end_epoch(self, sums: Dict[str, torch.Tensor], seen: int) -> Dict[str, Any]:
        """The record's mean loss terms (over the batches not skipped), ``grad_norm`` (mean of the steps' total
        gradient L2 norms), ``grad_norm_max`` and ``skipped_batches``; one host sync."""
        self._check_faults()
        f = self._fault
        skipped, good_steps = int(f["skipped"]), int(f["good_steps"])
        good = seen - int(f["skipped_images"])
        if good <= 0:
            raise FloatingPointError(f"every batch of epoch {self.epoch} was non-finite and skipped "
                                     f"({skipped} batches): lower the learning rate or check the data")
        record = {k: float(v) / good for k, v in sums.items()}
        record.update(grad_norm=float(f["grad_sum"]) / max(good_steps, 1), grad_norm_max=float(f["grad_max"]),
                      skipped_batches=skipped)
        return record

    def save_checkpoint(self) -> Path:
        """Write :meth:`state_dict` into ``checkpoint_dir`` now (atomically); returns the file's path.

        A failed write (e.g. disk full) raises ``OSError`` naming the file; the previous checkpoints are intact.
        """
        if self.checkpointer is None:
            raise ValueError("save_checkpoint needs the trainer built with checkpoint_dir=<a directory>")
        self._check_faults()  # never save non-finite weights as a good checkpoint
        self.check_finite()  # nor weights an overflowing update made non-finite
        self.last_checkpoint = self.checkpointer.save(self.state_dict(), self.epoch, self.step)
        return self.last_checkpoint

    def resume(self, path_or_dir: PathLike, missing_ok: bool = False) -> Optional[Path]:
        """Continue from a checkpoint file, or from the newest good checkpoint in a directory (corrupt ones are
        skipped with a warning); then :meth:`fit` carries on, mid-epoch included, bit for bit on CPU.

        Returns the checkpoint's path, or None when ``missing_ok`` and the directory holds no checkpoint.
        Raises ``CheckpointError`` (a ``ValueError``) naming the file when it is corrupt, unsafe or does not fit
        this trainer (other model, method or optimiser).
        """
        path = Path(path_or_dir).expanduser()
        if path.is_dir():
            found = find_resumable(path)
            if found is None:
                if missing_ok:
                    return None
                raise FileNotFoundError(f"no checkpoint to resume from in {path}")
            path, state = found
        elif not path.exists() and missing_ok:
            return None
        else:
            state = load_checkpoint(path)
        try:
            self.load_state_dict(state)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
            raise CheckpointError(f"checkpoint {path} does not fit this trainer ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0]}): resume with the same model, method and "
                                  "optimiser settings as the run that wrote it") from None
        self.last_checkpoint = path
        return path

    def _rng_state(self) -> Dict[str, Any]:
        state = rng_state()
        state["generators"] = generator_states(self.train_loader)
        return state

    def _set_rng(self, state: Dict[str, Any]) -> None:
        set_rng_state(state)
        set_generator_states(self.train_loader, state.get("generators", []))

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly: student, adapters, optimiser, schedule, gradient scaler, epoch,
        step, history, the random states (torch, CUDA, numpy, Python, the loader's shuffling generators) and,
        when taken mid-epoch, the epoch's progress and its random states at the epoch's start. Tensors and plain
        data only, so that it loads with ``torch.load(weights_only=True)``."""
        mid_epoch = self._progress is not None
        return {"format": FORMAT, "version": VERSION,
                "student": self.student.state_dict(), "method": self.method.state_dict(),
                "method_name": self.method.name,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": self.epoch, "step": self.step, "history": list(self.history),
                "rng": self._rng_state(), "progress": self._progress if mid_epoch else None,
                "epoch_rng": self._epoch_rng if mid_epoch else None,
                "ranks": self._ranks if self.world_size > 1 else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, random states included (the global RNGs are set as they were)."""
        if not isinstance(state, dict) or "student" not in state:
            raise CheckpointError("not an ardir trainer state: expected a dict with 'student', 'optimizer', ...")
        if state.get("format", FORMAT) != FORMAT or int(state.get("version", VERSION)) > VERSION:
            raise CheckpointError(f"checkpoint format {state.get('format')!r} version {state.get('version')} is "
                                  f"not supported by this ardir (format {FORMAT!r} version <= {VERSION})")
        saved = state.get("method_name")  # absent from checkpoints written before it was recorded
        if saved is not None and saved != self.method.name:
            raise CheckpointError(f"the checkpoint was written by a {saved!r} run, this trainer runs "
                                  f"{self.method.name!r}: resume with method={saved!r}, or start a new run")
        self.student.load_state_dict(state["student"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        rng, progress, epoch_rng = state.get("rng"), state.get("progress"), state.get("epoch_rng")
        ranks, rank = state.get("ranks") or [], distributed.rank()
        own_share = len(ranks) == self.world_size
        if own_share and rank > 0:  # this process's own share (rank 0's is the checkpoint itself)
            mine = ranks[rank]
            with torch.no_grad():
                for name, buffer in self.student.named_buffers():
                    if name in mine["buffers"]:
                        buffer.copy_(mine["buffers"][name])
            rng = mine["rng"]
            if progress is not None:
                progress, epoch_rng = mine["progress"], mine["epoch_rng"]
        elif not own_share and (self.world_size > 1 or len(ranks) > 1):
            warnings.warn(f"the checkpoint was written by {max(len(ranks), 1)} process(es), this run has "
                          f"{self.world_size}: every process continues from rank 0's random states and statistics, "
                          "close to but not the same as the uninterrupted run", stacklevel=2)
        if rng is not None:
            self._set_rng(rng)
        if not own_share:  # rank 0's stream, then this process's own, as at the start
            distributed.own_random_stream()
        self._pending = None
        if progress is not None and int(progress["batches"]) > 0:
            self._pending = {"progress": progress, "epoch_rng": epoch_rng, "rng": rng}


def _where_ok(ok, value: torch.Tensor) -> torch.Tensor:
    """``value`` for a step that counts, 0 for a skipped one (``ok`` a bool or a 0-dim bool tensor)."""
    if ok is True:
        return value
    if ok is False:
        return torch.zeros_like(value)
    return torch.where(ok, value, torch.zeros_like(value))


def _total_norm(grads: List[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together (fused per device where torch offers it)."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()).to(grads[0].device)
                                                 for g in grads]))


ARDIRTrainer = Trainer


class ATTrainer(Trainer):
    """:class:`Trainer` running Madry PGD-AT (``method="at"``)."""
    default_method = "at"
    preset = True


class TRADESTrainer(Trainer):
    """:class:`Trainer` running TRADES (``method="trades"``)."""
    default_method = "trades"
    preset = True


class ARDTrainer(Trainer):
    """:class:`Trainer` running ARD (``method="ard"``)."""
    default_method = "ard"
    preset = True


class IADTrainer(Trainer):
    """:class:`Trainer` running IAD-I (``method="iad"``)."""
    default_method = "iad"
    preset = True


class RSLADTrainer(Trainer):
    """:class:`Trainer` running RSLAD (``method="rslad"``)."""
    default_method = "rslad"
    preset = True
