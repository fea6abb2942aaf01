"""One optimiser step of the Trainer: precision, backward, gradient all-reduce, gradient scaler, NaN/Inf policy.

The policy (``nan_policy``): a non-finite loss or gradient norm either stops the run with an error naming the
step, or skips the batch (no update, its buffer writes undone). On the CPU the check is made at once; on an
accelerator every flag stays on the device (no host sync per step) and is read at log points, epoch ends and
before every checkpoint (:meth:`Stepper.check`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .. import distributed
from .._safety import first_non_finite


def new_fault() -> Dict[str, Any]:
    """The fault record of a fresh epoch. Its keys are part of a mid-epoch checkpoint (``progress["fault"]``)."""
    return {"grad_sum": 0.0, "grad_max": 0.0, "good_steps": 0, "skipped": 0, "skipped_images": 0,
            "bad_step": -1, "bad_batch": -1, "bad_loss": 0.0, "bad_terms": None, "bad_names": [],
            "bad_label_batch": -1}


def total_norm(grads: List[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together (fused per device where torch offers it)."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()).to(grads[0].device)
                                                 for g in grads]))


def grad_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """The loss scaler fp16 needs (its small gradients would underflow), None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


class Stepper:
    """Backward, gradient all-reduce, the optimiser step and the NaN/Inf policy, for a Trainer.

    Arguments:
        optimizer, params: the optimiser and every parameter it trains (student's and method's).
        scaler: the fp16 gradient scaler (:func:`grad_scaler`), or None.
        device, precision, nan_policy, world_size: as the Trainer's.
        last_good: a function returning the sentence naming the last good checkpoint, for the errors.

    ``fault`` holds the running epoch's gradient-norm sums, skip counts and the first bad step: host numbers
    with ``host_checks`` (the CPU), device tensors otherwise.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: List[torch.Tensor],
                 scaler: Optional[torch.amp.GradScaler], device: torch.device, precision: str, nan_policy: str,
                 world_size: int, last_good: Callable[[], str]):
        self.optimizer, self.params, self.scaler = optimizer, params, scaler
        self.device, self.precision, self.nan_policy, self.world_size = device, precision, nan_policy, world_size
        self.last_good = last_good
        self.host_checks = device.type == "cpu"  # else device-side flags: no host sync per step
        self.fault = new_fault()

    def autocast(self):
        """``torch.autocast`` for ``precision="bf16"``/``"fp16"``, else nothing."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def start_epoch(self, epoch: int, fault: Optional[Dict[str, Any]] = None) -> None:
        """A fresh fault record for ``epoch``, or the one of a resumed mid-epoch checkpoint."""
        if fault is None:
            fault = new_fault()
            fault["epoch"] = epoch
        self.fault = fault

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` (scaled under fp16), averaged over the processes of a process group."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.world_size > 1:
            distributed.all_reduce_gradients(self.params)

    def apply(self, ok, saved) -> None:
        """The optimiser step, after a skipped batch's buffers are put back (``saved``: :meth:`snapshot`)."""
        if saved is not None:
            restore_buffers(saved, ok)  # a skipped batch leaves no trace: BatchNorm statistics included
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def snapshot(self, *modules: nn.Module):
        """Copies of every buffer a forward may write (small next to the activations), under
        ``nan_policy="skip"`` only; None otherwise."""
        if self.nan_policy != "skip":
            return None
        buffers = [b for m in modules for b in m.buffers() if isinstance(b, torch.Tensor)]
        return [(b, b.detach().clone()) for b in buffers]

    def guard(self, loss: torch.Tensor, terms: Dict[str, torch.Tensor], step: int, epoch: int, batch: int,
              size: int):
        """Between backward and the optimiser step: the gradient norm and the NaN/Inf check of optimiser step
        ``step + 1`` on batch ``batch`` of ``epoch`` (both 0-based), ``size`` images.

        Returns True, False (CPU, step skipped: the gradients are removed so the optimiser leaves every parameter
        and its momentum alone) or, on an accelerator, a 0-dim bool tensor, so that no host sync is added.
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # true gradients for the norm; the scaler's step knows
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = total_norm(grads) if grads else torch.zeros((), device=self.device)
        finite = torch.isfinite(loss.detach())
        if self.scaler is None:  # with fp16 loss scaling, inf gradients are the scaler's business
            finite = finite & torch.isfinite(norm)
        if self.host_checks:  # checking now costs nothing on the CPU
            return self._host_guard(bool(finite), loss, terms, norm, step, epoch, batch, size)
        f = self.fault
        good = finite.to(norm.dtype)
        zero = torch.zeros((), device=norm.device, dtype=norm.dtype)
        f["grad_sum"] = f["grad_sum"] + torch.where(finite, norm, zero)
        f["grad_max"] = torch.maximum(torch.as_tensor(f["grad_max"], device=norm.device, dtype=norm.dtype),
                                      torch.where(finite, norm, zero))
        f["good_steps"] = f["good_steps"] + good
        f["skipped"] = f["skipped"] + (1 - good)
        f["skipped_images"] = f["skipped_images"] + (1 - good) * size
        first = ~finite & (torch.as_tensor(f["bad_step"], device=norm.device) < 0)
        f["bad_step"] = torch.where(first, step + 1, torch.as_tensor(f["bad_step"], device=norm.device))
        f["bad_batch"] = torch.where(first, batch + 1, torch.as_tensor(f["bad_batch"], device=norm.device))
        f["bad_loss"] = torch.where(first, loss.detach().float(), torch.as_tensor(f["bad_loss"], device=norm.device))
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        f["bad_terms"] = values if f["bad_terms"] is None else torch.where(first, values, f["bad_terms"])
        f["bad_names"] = list(terms)
        if self.nan_policy == "skip":
            for g in grads:
                g.masked_fill_(~finite, 0.0)
        return finite

    def _host_guard(self, finite: bool, loss, terms, norm, step: int, epoch: int, batch: int, size: int) -> bool:
        f = self.fault
        if finite:
            f["grad_sum"] += float(norm)
            f["grad_max"] = max(f["grad_max"], float(norm))
            f["good_steps"] += 1
            return True
        f["skipped"] += 1
        f["skipped_images"] += size
        if self.nan_policy == "stop":
            raise self.error(step + 1, batch + 1, float(loss.detach()),
                             {k: float(v.detach()) for k, v in terms.items()}, float(norm), epoch)
        self.optimizer.zero_grad(set_to_none=True)
        return False

    def flag_bad_labels(self, labels: torch.Tensor, index: int, num_classes: int) -> torch.Tensor:
        """Record on the device the first batch with a label out of range (read by :meth:`check`) and return the
        labels with those set to 0, so that the loss kernels stay in bounds until the flag is read."""
        valid = (labels >= 0) & (labels < num_classes)
        current = torch.as_tensor(self.fault.get("bad_label_batch", -1), device=labels.device)
        self.fault["bad_label_batch"] = torch.where(~valid.all() & (current < 0), index + 1, current)
        return labels.masked_fill(~valid, 0)

    def check(self, epoch: int, num_classes: int) -> None:
        """On an accelerator: raise if a batch since the epoch began had bad labels or (``nan_policy="stop"``)
        a non-finite step; one host sync. ``epoch`` (0-based) is named when the record does not hold its own."""
        f = self.fault
        label_batch = f.get("bad_label_batch", -1)
        if isinstance(label_batch, torch.Tensor) and int(label_batch) >= 0:
            raise ValueError(f"training batch {int(label_batch)} of epoch {int(f.get('epoch', epoch)) + 1}: "
                             f"labels outside 0 .. {num_classes - 1}, but the student has {num_classes} "
                             "outputs: fix the dataset's labels or build the student with more classes")
        if self.nan_policy != "stop" or self.host_checks or not isinstance(f["bad_step"], torch.Tensor):
            return
        step = int(f["bad_step"])
        if step >= 0:
            terms = dict(zip(f["bad_names"], f["bad_terms"].tolist())) if f["bad_terms"] is not None else {}
            raise self.error(step, int(f["bad_batch"]), float(f["bad_loss"]), terms, None, epoch)

    def error(self, step: int, batch: int, loss: float, terms: Dict[str, float], grad_norm: Optional[float],
              epoch: int) -> FloatingPointError:
        """The error naming a non-finite step, its loss terms and the last good checkpoint. ``epoch`` (0-based) is
        named when the fault record holds no epoch of its own."""
        epoch = int(self.fault.get("epoch", epoch)) + 1  # the trainer may have counted the epoch already
        where = f"at epoch {epoch}, step {step} (batch {batch} of the epoch)"
        what = f"loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm} (loss {loss:.4g})"
        return FloatingPointError(
            f"{what} {where}; loss terms: " + ", ".join(f"{k}={v:.4g}" for k, v in terms.items()) +
            f"; {self.last_good()}. Lower the learning rate, check the data and the loss weights, or pass "
            "nan_policy='skip' (ardir train: --nan-policy skip) to skip such batches (counted in the record as "
            "skipped_batches)")

    def check_weights(self, states: Dict[str, Any], epoch: int, step: int) -> None:
        """Raise ``FloatingPointError`` naming the first tensor of ``states`` (nested state dicts) holding a NaN
        or an Inf: an update that overflowed although every loss and gradient norm was finite."""
        bad = first_non_finite(states)
        if bad is None:
            return
        raise FloatingPointError(
            f"{bad} holds non-finite values (NaN or Inf) after epoch {epoch}, step {step}, although every "
            f"loss and gradient norm was finite (an update overflowed); no checkpoint was written with it; "
            f"{self.last_good()}. Lower the learning rate or check the loss weights")

    def summary(self, sums: Dict[str, torch.Tensor], seen: int, epoch: int) -> Dict[str, Any]:
        """The record's mean loss terms (over the batches not skipped), ``grad_norm`` (mean of the steps' total
        gradient L2 norms), ``grad_norm_max`` and ``skipped_batches``; ``epoch`` is 1-based."""
        f = self.fault
        skipped, good_steps = int(f["skipped"]), int(f["good_steps"])
        good = seen - int(f["skipped_images"])
        if good <= 0:
            raise FloatingPointError(f"every batch of epoch {epoch} was non-finite and skipped "
                                     f"({skipped} batches): lower the learning rate or check the data")
        record = {k: float(v) / good for k, v in sums.items()}
        record.update(grad_norm=float(f["grad_sum"]) / max(good_steps, 1), grad_norm_max=float(f["grad_max"]),
                      skipped_batches=skipped)
        return record


def restore_buffers(saved, ok) -> None:
    """Put the buffers back as they were before a skipped batch; on an accelerator ``ok`` is a device flag and
    the choice is made on the device (no host sync)."""
    if ok is True:
        return
    with torch.no_grad():
        for buffer, before in saved:
            buffer.copy_(before if ok is False else torch.where(ok.to(buffer.device), buffer, before))
