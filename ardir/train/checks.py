"""The Trainer's argument checks and defaults: every error names the argument and says what to pass instead.

Each function checks or builds one thing of :class:`ardir.trainer.Trainer`'s set-up; the trainer calls them in a
fixed order, so that of several mistakes the same one is reported first.
"""
from __future__ import annotations

import collections.abc
import difflib
import inspect
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn

from .. import distributed
from .._checks import (batch_tensors, check_batch, images_labels, label_range, logits_of, non_negative, positive,
                       positive_int)
from ..attacks import model_device, model_mode
from ..checkpoint import Checkpointer, PathLike
from ..methods import METHODS, Method, create_method, method_arguments

PRECISIONS = ("fp32", "bf16", "fp16")
NAN_POLICIES = ("stop", "skip")


def on_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
    """``images`` and ``labels`` on ``device`` (without waiting for the copy), 4-d images channels-last if asked."""
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def checked_batch(batch: Any, index: int, epoch: int, device: torch.device, num_classes: int, channels_last: bool,
                  flag_labels: Optional[Callable[[torch.Tensor, int], torch.Tensor]]):
    """Batch ``index`` of epoch ``epoch`` (both 0-based) on ``device``, checked cheaply: tensors of the right dtypes
    (metadata only, every batch), labels in range and, for the first batch, the pixel range.

    Labels held on the host are checked at once; labels already on an accelerator go to ``flag_labels`` (a device
    flag read with the NaN checks, so no host sync per batch), or are checked at once when it is None.
    """
    images, labels = images_labels(batch, "train_loader")
    what = f"training batch {index + 1} of epoch {epoch + 1}"
    batch_tensors(what, images, labels)
    on_host = labels.device.type == "cpu" or flag_labels is None
    if on_host:  # host values already, or host checks wanted: checking costs no device sync
        label_range(what, labels, num_classes, "student")
    images, labels = on_device(images, labels, device, channels_last)
    if not on_host:  # a loader yielding device tensors (ardir.gpu_data)
        labels = flag_labels(labels, index)
    if index == 0:
        check_batch("the first training batch", images, labels, num_classes, "student")
    return images, labels


def check_student(student: Any, teacher: Any) -> None:
    """Refuse a student that is no module, is the teacher, or has nothing to train."""
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    if teacher is student:
        raise ValueError("teacher is student: pass the frozen robust teacher and a separate student model")
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError("student has no trainable parameters (requires_grad is False everywhere): pass the "
                         "model to train, not a frozen one")


def build_method(method: Union[str, Method], kwargs: Dict[str, Any]) -> Method:
    """The method: an instance as given (then ``kwargs`` must be empty), or one created by name."""
    if isinstance(method, Method):
        if kwargs:
            raise TypeError(f"method is already built; pass {sorted(kwargs)} to its constructor instead")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a name or an ardir.methods.Method, got {type(method).__name__}")
    return create_method(method, **kwargs)


def method_and_teacher(trainer: Type, method: Union[str, Method, None], kwargs: Dict[str, Any],
                       teacher: Optional[nn.Module]) -> Tuple[Method, Optional[nn.Module]]:
    """The method ``trainer`` (a Trainer class) runs, and the teacher it uses: None for a method using none. A
    keyword that is no method argument but close to one of the Trainer's own (``epoch``) is named as that."""
    name = method or trainer.default_method
    try:
        built = build_method(name, kwargs)
    except TypeError as error:
        if not isinstance(name, str):
            raise
        known = set(method_arguments(METHODS.match(name)[0]))
        own = [p for p in inspect.signature(trainer.__init__).parameters if p not in ("self", "method_kwargs")]
        close = {k: difflib.get_close_matches(k, own, n=1, cutoff=0.75) for k in kwargs if k not in known}
        hint = " ".join(f"did you mean {c[0]!r} (an argument of ardir.{trainer.__name__}) for {k!r}?"
                        for k, c in close.items() if c)
        if not hint:
            raise
        raise TypeError(f"{hint} ({error})") from None
    if trainer.preset and built.name != trainer.default_method:
        raise TypeError(f"{trainer.__name__} always trains {trainer.default_method!r}; for "
                        f"{built.name!r} use ardir.Trainer(..., method={built.name!r})")
    if built.needs_teacher and teacher is None:
        raise ValueError(f"method {built.name!r} distils from a teacher: pass teacher=<a robust model>")
    if teacher is not None and not built.needs_teacher:
        # stacklevel: this function, Trainer.__init__, the caller of Trainer(...)
        warnings.warn(f"method {built.name!r} uses no teacher; the teacher passed is ignored", stacklevel=3)
        teacher = None  # left as it was: not frozen, not converted to channels-last
    return built, teacher


def check_one_device(student: nn.Module, device: torch.device) -> None:
    """Refuse a student spread over several devices (the trainer moves every batch to one)."""
    devices = sorted({str(t.device) for t in (*student.parameters(), *student.buffers())})
    if len(devices) > 1:
        raise ValueError(f"student has parameters or buffers on several devices ({', '.join(devices)}): move "
                         f"it to one device first, e.g. student.to({str(device)!r})")


def freeze(teacher: nn.Module, device: torch.device) -> nn.Module:
    """The teacher in eval mode with frozen parameters (each change warned about), on the student's device."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if model_device(teacher) != device:
        raise ValueError(f"teacher is on {model_device(teacher)} but student on {device}: "
                         f"move both to one device (teacher.to({str(device)!r}))")
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


def check_callbacks(callbacks: Any) -> List[Callable]:
    """``callbacks`` as a list of functions; a single function or a string is refused."""
    if callable(callbacks) or isinstance(callbacks, (str, bytes)):
        raise TypeError("callbacks must be a list of functions fn(trainer, record); for one, pass [fn]")
    callbacks = list(callbacks)
    for callback in callbacks:
        if not callable(callback):
            raise TypeError(f"callbacks: {callback!r} is not callable; each callback is fn(trainer, record)")
    return callbacks


def build_checkpointer(checkpoint_dir: Optional[PathLike], keep_last: Any,
                 every_steps: Optional[Any]) -> Optional[Checkpointer]:
    """The checkpoint writer, or None without ``checkpoint_dir``."""
    keep_last = positive_int("keep_last", keep_last)  # checked even without checkpoint_dir: a typo is a typo
    if every_steps is not None:
        every_steps = positive_int("checkpoint_every_steps", every_steps)
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every_steps needs checkpoint_dir=<a directory> to write the checkpoints "
                             "to")
    return None if checkpoint_dir is None else Checkpointer(checkpoint_dir, keep_last, every_steps)


def sample_batch(loader: Iterable, device: torch.device) -> torch.Tensor:
    """A couple of images for shape probing, taken without touching the global RNG (the data order)."""
    if isinstance(loader, collections.abc.Iterator):
        raise TypeError(f"train_loader is a one-shot iterator ({type(loader).__name__}): the trainer "
                        "iterates it once per epoch; pass a DataLoader or a list of (images, labels) batches")
    dataset = getattr(loader, "dataset", None)
    try:
        if len(loader) == 0:
            raise ValueError("train_loader is empty: it yields no batch (check the dataset and drop_last)")
    except TypeError:
        pass
    with torch.random.fork_rng(devices=[]):
        if dataset is not None and len(dataset) > 0:
            images = torch.stack([torch.as_tensor(images_labels(dataset[i], "train_loader")[0])
                                  for i in range(min(2, len(dataset)))])
        else:
            first = next(iter(loader), None)
            if first is None:
                raise ValueError("train_loader is empty: it yields no batch (check the dataset and drop_last)")
            images = images_labels(first, "train_loader")[0][:2]
    return images.to(device)


def _probe(name: str, model: nn.Module, images: torch.Tensor) -> int:
    """The number of classes ``model`` predicts on a sample batch (see :func:`~ardir._checks.logits_of`)."""
    with model_mode(model, "eval"):
        return int(logits_of(name, model, images).shape[1])


def count_classes(student: nn.Module, teacher: Optional[nn.Module], images: torch.Tensor) -> int:
    """The student's number of classes on a sample batch, which the teacher's must equal."""
    batch_tensors("the training images", images)
    num_classes = _probe("student", student, images)
    if teacher is not None:
        t_classes = _probe("teacher", teacher, images)
        if t_classes != num_classes:
            raise ValueError(f"teacher predicts {t_classes} classes but student {num_classes}: "
                             "distillation needs the same label space")
    return num_classes


def _built(argument: str, factory: Any, given: Any, kind: type, example: str) -> Any:
    """``factory(given)``, refusing an already built object (a common slip) with an example of a factory."""
    if isinstance(factory, kind) or not callable(factory):
        raise TypeError(f"{argument} must be a factory, e.g. {example}; got {type(factory).__name__} (the trainer "
                        "builds it, so that it covers the ARDIR adapters too and can be restored on resume)")
    return factory(given)


def build_optimizer(factory: Optional[Callable], params: List[torch.Tensor], lr: float, momentum: float,
              weight_decay: float) -> torch.optim.Optimizer:
    """``factory(params)``, or the papers' SGD."""
    if factory is not None:
        return _built("optimizer", factory, params, torch.optim.Optimizer,
                      "lambda params: torch.optim.Adam(params, lr=1e-3)")
    return torch.optim.SGD(params, lr=positive("lr", lr), momentum=non_negative("momentum", momentum),
                           weight_decay=non_negative("weight_decay", weight_decay))


def build_scheduler(factory: Optional[Callable], optimizer: torch.optim.Optimizer, milestones: Optional[Any],
              lr_gamma: float, epochs: int, method: Method):
    """``factory(optimizer)``, or lr x ``lr_gamma`` at ``milestones`` (default: the method's, scaled to
    ``epochs``)."""
    if factory is not None:
        return _built("scheduler", factory, optimizer, torch.optim.lr_scheduler.LRScheduler,
                      "lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 200)")
    if milestones is None:
        milestones = sorted({max(1, round(f * epochs)) for f in method.milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, _milestones(milestones, epochs),
                                                positive("lr_gamma", lr_gamma))


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
        # stacklevel: this function, build_scheduler(), Trainer.__init__, the caller of Trainer(...)
        warnings.warn(f"milestones {[m for m in values if m > epochs]} lie after the last epoch ({epochs}); the lr "
                      "never drops there", stacklevel=4)
    return sorted(values)


def memory_format(channels_last: Optional[bool], device: torch.device, *models: Optional[nn.Module]) -> bool:
    """Whether the run is channels-last (default: on CUDA and CPU); when it is, ``models`` are converted in place."""
    channels_last = device.type in ("cuda", "cpu") if channels_last is None else bool(channels_last)
    if channels_last:
        for model in models:
            if model is not None:
                model.to(memory_format=torch.channels_last)
    return channels_last


def shard_loaders(train_loader: Iterable, val_loader: Optional[Iterable], world_size: int):
    """In a process group, each process's share of every global batch of the (plain DataLoader) loaders."""
    if world_size > 1:
        train_loader = distributed.shard_loader(train_loader, training=True, keep_global_batch=True)
        val_loader = None if val_loader is None else distributed.shard_loader(val_loader, training=False)
    return train_loader, val_loader


def start_together(world_size: int, *modules: Optional[nn.Module]) -> None:
    """In a process group, every process starts from rank 0's weights but draws its own random starts."""
    if world_size > 1:
        for module in modules:
            if module is not None:
                distributed.broadcast_module(module)
        distributed.own_random_stream()
