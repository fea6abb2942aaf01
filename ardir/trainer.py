"""The training loop: one trainer runs every method (AT, TRADES, ARD, IAD, RSLAD, ARDIR, natural)."""
from __future__ import annotations

import inspect
import math
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ._checks import non_negative_int, positive
from .attacks import PGD, model_mode
from .methods import METHODS, Method, create_method, list_methods

Callback = Callable[["Trainer", Dict[str, Any]], None]


def method_arguments(name: str) -> List[str]:
    """The keyword arguments a method accepts (its own and the attack's)."""
    names = []
    for cls in METHODS[name].__mro__:
        if cls in (nn.Module, object):
            continue
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.kind == p.KEYWORD_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "self"):
                names.append(p.name)
    return list(dict.fromkeys(names))


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
            its parameters frozen, with a warning when they were not.
        method: a method name (``ardir.methods.list_methods()``) or a :class:`~ardir.methods.Method` instance.
        epochs: default: the method's paper protocol (200 for ARD/ARDIR, 300 for RSLAD, 100 for TRADES).
        lr, momentum, weight_decay: SGD settings (0.1, 0.9, 2e-4 as in the papers).
        milestones: epochs at which the lr is multiplied by ``lr_gamma`` (0.1); default: the method's paper
            schedule scaled to ``epochs``.
        optimizer, scheduler: factories ``optimizer(params)`` and ``scheduler(optimizer)`` replacing the defaults.
        val_loader: held-out data evaluated after each epoch (natural and PGD accuracy).
        val_attack_steps: PGD steps of that evaluation (10).
        limit_batches: stop each epoch after this many batches (dry runs).
        progress: show tqdm bars (they also switch off when the output is not a terminal).
        callbacks: ``fn(trainer, record)`` called after every epoch with the epoch's record.
        method_kwargs: the method's own arguments, e.g. ``tau=30``, ``layers=["layer4"]``, ``eps=8/255``.

    Example::

        trainer = ardir.Trainer(student, train_loader, teacher=teacher, epochs=200, layers=["features"])
        history = trainer.fit()
    """
    default_method = "ardir"

    def __init__(self, student: nn.Module, train_loader: Iterable, teacher: Optional[nn.Module] = None, *,
                 method: Union[str, Method, None] = None, epochs: Optional[int] = None, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 2e-4, milestones: Optional[List[int]] = None,
                 lr_gamma: float = 0.1, optimizer: Optional[Callable] = None, scheduler: Optional[Callable] = None,
                 val_loader: Optional[Iterable] = None, val_attack_steps: int = 10,
                 limit_batches: Optional[int] = None, progress: bool = True,
                 callbacks: Iterable[Callback] = (), **method_kwargs):
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
        self.method = self._build_method(method or self.default_method, method_kwargs)
        if self.method.needs_teacher and teacher is None:
            raise ValueError(f"method {self.method.name!r} distils from a teacher: pass teacher=<a robust model>")
        self.student = student
        self.device = _model_device(student)
        self.teacher = self._freeze(teacher) if teacher is not None else None
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.val_attack_steps = non_negative_int("val_attack_steps", val_attack_steps)
        self.limit_batches = None if limit_batches is None else non_negative_int("limit_batches", limit_batches)
        self.progress = progress
        self.callbacks = list(callbacks)
        self.epochs = self.method.epochs if epochs is None else non_negative_int("epochs", epochs)
        self.epoch = 0
        self.step = 0
        self.history: List[Dict[str, Any]] = []

        sample = self._sample_batch()
        self.num_classes = self._check_models(sample)
        self.method.setup(student, self.teacher, sample)
        params = list(student.parameters()) + list(self.method.parameters())
        if optimizer is not None:
            self.optimizer = optimizer(params)
        else:
            self.optimizer = torch.optim.SGD(params, lr=positive("lr", lr), momentum=momentum,
                                             weight_decay=weight_decay)
        if scheduler is not None:
            self.scheduler = scheduler(self.optimizer)
        else:
            if milestones is None:
                milestones = sorted({max(1, round(f * self.epochs)) for f in self.method.milestones})
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(milestones), lr_gamma)

    # ---------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _build_method(method: Union[str, Method], kwargs: Dict[str, Any]) -> Method:
        if isinstance(method, Method):
            if kwargs:
                raise TypeError(f"method is already built; pass {sorted(kwargs)} to its constructor instead")
            return method
        if not isinstance(method, str):
            raise TypeError(f"method must be a name or an ardir.methods.Method, got {type(method).__name__}")
        name = method.lower()
        if name in METHODS:
            valid = method_arguments(name)
            unknown = [k for k in kwargs if k not in valid]
            if unknown:
                raise TypeError(f"unknown argument(s) {unknown} for method {name!r}; it accepts: {', '.join(valid)}")
        return create_method(name, **kwargs)

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
        dataset = getattr(self.train_loader, "dataset", None)
        try:
            if len(self.train_loader) == 0:
                raise ValueError("train_loader is empty: it yields no batch (check the dataset and drop_last)")
        except TypeError:
            pass
        with torch.random.fork_rng(devices=[]):
            if dataset is not None and len(dataset) > 0:
                images = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(min(2, len(dataset)))])
            else:
                images = next(iter(self.train_loader))[0][:2]
        return images.to(self.device)

    def _check_models(self, images: torch.Tensor) -> int:
        with torch.no_grad(), model_mode(self.student, "eval"):
            num_classes = self.student(images).shape[1]
        if self.teacher is not None:
            with torch.no_grad():
                t_classes = self.teacher(images).shape[1]
            if t_classes != num_classes:
                raise ValueError(f"teacher predicts {t_classes} classes but student {num_classes}: "
                                 "distillation needs the same label space")
        return num_classes

    def _check_batch(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-4 or hi > 1 + 1e-4:
            raise ValueError(f"the first training batch has pixel values in [{lo:.3g}, {hi:.3g}], outside [0, 1]: "
                             "attacks work in pixel space; drop Normalize from the transforms and put it inside "
                             "the model (ardir.models.create(..., mean=..., std=...))")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels range over [{int(labels.min())}, {int(labels.max())}] but the student has "
                             f"{self.num_classes} outputs")

    # ----------------------------------------------------------------------------------------------- loop
    def fit(self) -> List[Dict[str, Any]]:
        """Train until ``epochs``; returns the per-epoch records (also in ``trainer.history``)."""
        bar = tqdm(range(self.epoch, self.epochs), desc=f"{self.method.name}", unit="epoch",
                   disable=None if self.progress else True, initial=self.epoch, total=self.epochs)
        for _ in bar:
            record = self.train_epoch()
            if self.val_loader is not None:
                record.update(self.validate())
            self.history.append(record)
            bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in ("loss", "val_natural", "val_pgd")})
            for callback in self.callbacks:
                callback(self, record)
        return self.history

    def train_epoch(self) -> Dict[str, Any]:
        """One pass over ``train_loader``; returns the epoch's record (mean loss terms, lr, time, images/s)."""
        self.method.epoch = self.epoch
        self.student.train()
        lr = self.optimizer.param_groups[0]["lr"]
        sums: Dict[str, torch.Tensor] = {}
        seen, batches, start = 0, 0, time.perf_counter()
        total = len(self.train_loader) if hasattr(self.train_loader, "__len__") else None
        if self.limit_batches is not None:
            total = self.limit_batches if total is None else min(total, self.limit_batches)
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.epochs}", total=total, leave=False,
                   unit="batch", disable=None if self.progress else True)
        for images, labels in bar:
            if self.limit_batches is not None and batches >= self.limit_batches:
                break
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if batches == 0:
                self._check_batch(images, labels)
            terms = self.method(self.student, images, labels, self.teacher)
            loss = sum(terms.values())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            for name, value in [("loss", loss), *terms.items()]:
                value = value.detach() * len(labels)
                sums[name] = sums[name] + value if name in sums else value
            seen += len(labels)
            batches += 1
            self.step += 1
            if batches % 20 == 1:
                if not math.isfinite(float(loss.detach())):
                    raise FloatingPointError(
                        f"loss is {float(loss.detach())} at epoch {self.epoch + 1}, step {self.step}; terms: "
                        + ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items()))
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
        if batches == 0:
            raise ValueError("train_loader yielded no batch this epoch")
        seconds = time.perf_counter() - start
        self.scheduler.step()
        self.epoch += 1
        record = {"epoch": self.epoch, "lr": lr, "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}
        record.update({k: float(v) / seen for k, v in sums.items()})
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"mean loss of epoch {self.epoch} is {record['loss']}; terms: " +
                                     ", ".join(f"{k}={record[k]:.4g}" for k in sums))
        return record

    def validate(self) -> Dict[str, float]:
        """Natural and PGD accuracy (%) of the student on ``val_loader`` with the method's eps and step."""
        attack = PGD(self.student, eps=self.method.eps, alpha=self.method.step_size, steps=self.val_attack_steps)
        natural = correct_adv = total = 0
        with model_mode(self.student, "eval"):
            for images, labels in self.val_loader:
                images, labels = images.to(self.device), labels.to(self.device)
                with torch.no_grad():
                    natural += (self.student(images).argmax(1) == labels).sum().item()
                adv = attack(images, labels)
                with torch.no_grad():
                    correct_adv += (self.student(adv).argmax(1) == labels).sum().item()
                total += len(labels)
        return {"val_natural": 100 * natural / total, "val_pgd": 100 * correct_adv / total}

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume: student, adapters, optimiser, schedule, epoch, step, history."""
        return {"student": self.student.state_dict(), "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "epoch": self.epoch, "step": self.step, "history": list(self.history)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.student.load_state_dict(state["student"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])


ARDIRTrainer = Trainer


class ATTrainer(Trainer):
    """:class:`Trainer` running Madry PGD-AT (``method="at"``)."""
    default_method = "at"


class TRADESTrainer(Trainer):
    """:class:`Trainer` running TRADES (``method="trades"``)."""
    default_method = "trades"


class ARDTrainer(Trainer):
    """:class:`Trainer` running ARD (``method="ard"``)."""
    default_method = "ard"


class IADTrainer(Trainer):
    """:class:`Trainer` running IAD-I (``method="iad"``)."""
    default_method = "iad"


class RSLADTrainer(Trainer):
    """:class:`Trainer` running RSLAD (``method="rslad"``)."""
    default_method = "rslad"
