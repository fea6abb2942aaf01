r"""The newer robust-distillation baselines: AdaAD (Huang et al., CVPR 2023) and MTARD (Zhao et al., ECCV 2022).

Registered in :data:`ardir.methods.METHODS` like the others (``method="adaad"`` / ``"mtard"``) and importable from
:mod:`ardir.methods`. Notation as in docs/methods.md: S student, T teacher, x natural batch, x' adversarial batch,
p(z) = softmax(z), KL(P || Q) = sum_c P_c (log P_c - log Q_c).
"""
from __future__ import annotations

import os
from typing import Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from ._checks import non_negative, number, one_of, positive
from .attacks import attack_module, kl_to, model_device, model_mode
from .losses import KL_REDUCTIONS, kl_div
from .methods import RSLAD, Method, Terms, register_method, teacher_logits


def _weight(name: str, value: float) -> float:
    value = number(name, value)
    if not 0 <= value <= 1:
        raise ValueError(f"{name}={value} must be in [0, 1] (the other term gets 1 - {name})")
    return value


@register_method
class AdaAD(Method):
    r"""Huang et al., CVPR 2023, Boosting Accuracy and Robustness of Student Models via Adaptive Adversarial
    Distillation, https://openaccess.thecvf.com/content/CVPR2023/html/Huang_Boosting_Accuracy_and_Robustness_of_Student_Models_via_Adaptive_Adversarial_Distillation_CVPR_2023_paper.html.

    Inner: PGD-10 on ``sum KL(p(T(x')) || p(S(x')))``: teacher and student on the SAME perturbed x', tau = 1, no
    label; the teacher is queried at every step and the input gradient flows through both; start
    ``x + 0.001 N(0, I)``; both models in eval mode. The most expensive method here: 10 teacher forward+backward
    passes per batch in the attack.
    Outer: ``alpha KL(p(T(x')) || p(S(x'))) + (1 - alpha) KL(p(T(x)) || p(S(x)))``, the teacher frozen, the student
    in train mode; alpha = 1 (only the adversarial term); no CE, no temperature.

    Defaults are the reference code's (boyellow/AdaAD) at the paper's eps = 8/255, step 2/255, 10 steps, which its
    README's command passes; note that the script's own argparse defaults are eps 16/255 and step 4/255.
    The reference's recipe: SGD lr 0.1, momentum 0.9, weight decay 5e-4 (pass ``weight_decay=5e-4``; ardir's default
    is 2e-4), batch 128, 200 epochs, lr x0.1 at 100 and 150 (this method's default schedule).

    ``kl_reduction``: the reference script uses two conventions: ``nn.KLDivLoss()`` (sum / (N C), ``"mean"``, the
    default here, as for ARD and RSLAD) on CIFAR-10, the batch mean (sum / N, ``"batchmean"``) on CIFAR-100. With
    alpha = 1 the choice scales the whole gradient (the effective learning rate) by 1/C.

    Arguments:
        alpha: weight of the adversarial KL term; the natural one gets ``1 - alpha`` (1).
        kl_reduction: ``"mean"`` (the reference's CIFAR-10 ``nn.KLDivLoss()``, /C) or ``"batchmean"`` (its
            CIFAR-100 batch mean).
    """
    name = "adaad"
    needs_teacher = True
    attack_loss = "kl"  # not used: the attack climbs the callable discrepancy built per batch in forward()
    default_start = "normal"
    default_attack_mode = "eval"
    epochs = 200
    milestones = (0.5, 0.75)

    def __init__(self, alpha: float = 1.0, kl_reduction: str = "mean", **attack):
        super().__init__(**attack)
        self.alpha = _weight("alpha", alpha)
        self.kl_reduction = one_of("kl_reduction", kl_reduction, KL_REDUCTIONS, "KL reduction")

    def adversarial(self, student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
        """AdaAD's inner maximisation: PGD climbing ``KL(p(T(x')) || p(S(x')))`` per sample (teacher in the graph)."""
        net = attack_module(student)

        def discrepancy(adv: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
            return kl_to(F.softmax(teacher(adv).float(), 1), net(adv).float())
        return self.attack(student, images, labels, loss=discrepancy, loss_models=[teacher])

    def forward(self, student, images, labels, teacher=None) -> Terms:
        adv = self.adversarial(student, teacher, images, labels)
        t_adv = F.softmax(teacher_logits(teacher, adv), 1)
        terms = {"kl_adv": self.alpha * kl_div(t_adv, student(adv), reduction=self.kl_reduction)}
        if self.alpha < 1:
            t_nat = F.softmax(teacher_logits(teacher, images), 1)
            terms["kl_nat"] = (1 - self.alpha) * kl_div(t_nat, student(images), reduction=self.kl_reduction)
        return terms


TeacherSpec = Union[str, nn.Module, None]


@register_method
class MTARD(Method):
    r"""Zhao et al., ECCV 2022, Enhanced Accuracy and Robustness via Multi-Teacher Adversarial Distillation,
    https://arxiv.org/abs/2106.04928 (MTARD).

    Two frozen teachers: the Trainer's ``teacher`` is the adversarially trained one (T_adv), ``natural_teacher`` the
    naturally trained one (T_nat).
    Inner: PGD-10 on ``CE(S(x'), y)``, no teacher; start ``x + 0.001 N(0, I)``; student in eval mode.
    Outer: ``w_adv KL(p(T_adv(x')) || p(S(x'))) + w_nat KL(p(T_nat(x)) || p(S(x)))``, tau = 1; T_adv sees the
    ADVERSARIAL batch. ``kl_reduction="mean"`` (default, the reference's sum / (N C)); the reference multiplies by
    10 on CIFAR-100: pass ``kl_scale=10`` there.

    Adaptive weights, updated every step before the backward pass (no gradient through them):
    ``r_i = (L_i / L0_i) ** beta`` with L0 the two losses of the very first batch (never reset),
    ``w_nat <- w_nat - eta (w_nat - r_nat / (r_nat + r_adv))``, ``w_adv = 1 - w_nat``, starting at 0.5 / 0.5.
    ``eta`` follows the learning rate: it is multiplied by the lr's factor (``lr / initial lr``, which the Trainer
    passes to :meth:`~ardir.methods.Method.on_epoch_start`), i.e. by 0.1 at each milestone as in the reference.
    The weights and L0 are buffers (``nat_weight``, ``initial_losses``): saved in checkpoints and restored exactly
    on resume; the update stays on the device (no host sync); in a process group the two losses are averaged over
    the processes first, so every process keeps the same weights.
    Schedule: 300 epochs, lr x0.1 at 215, 260 and 285 (as RSLAD); weight decay 2e-4.

    Arguments:
        natural_teacher: the naturally trained teacher: a model, a checkpoint path, a model name or a shipped
            teacher ``DATASET:NAME`` (resolved with ardir.teachers.load_teacher when the Trainer starts); required.
        eta: the weights' learning rate at the initial lr (0.025).
        beta: exponent of the relative losses ``(L / L0) ** beta`` (1).
        kl_reduction: ``"mean"`` (the reference code's ``nn.KLDivLoss()``, /C) or ``"batchmean"``.
        kl_scale: factor on both terms (1; the reference code uses 10 on CIFAR-100).
    """
    name = "mtard"
    needs_teacher = True
    attack_loss = "ce"
    default_start = "normal"
    default_attack_mode = "eval"
    epochs, milestones = RSLAD.epochs, RSLAD.milestones  # the reference trains on RSLAD's schedule

    def __init__(self, natural_teacher: TeacherSpec = None, eta: float = 0.025, beta: float = 1.0,
                 kl_reduction: str = "mean", kl_scale: float = 1.0, **attack):
        super().__init__(**attack)
        if isinstance(natural_teacher, os.PathLike):
            natural_teacher = os.fspath(natural_teacher)
        if natural_teacher is None or natural_teacher == "":
            raise ValueError("MTARD distils from two teachers: pass natural_teacher=<a naturally trained model, a "
                             "checkpoint path or a shipped teacher DATASET:NAME> (ardir train: --natural-teacher); "
                             "the Trainer's teacher is the adversarially trained one")
        if not isinstance(natural_teacher, (str, nn.Module)):
            raise TypeError(f"natural_teacher must be a torch.nn.Module, a checkpoint path or a teacher name, got "
                            f"{type(natural_teacher).__name__}")
        self._natural_spec = natural_teacher if isinstance(natural_teacher, str) else None
        # kept out of the module tree: not in the method's state_dict, parameters or memory-format conversions
        object.__setattr__(self, "natural_model", natural_teacher if isinstance(natural_teacher, nn.Module) else None)
        self.eta = non_negative("eta", eta)
        self.beta = non_negative("beta", beta)
        self.kl_reduction = one_of("kl_reduction", kl_reduction, KL_REDUCTIONS, "KL reduction")
        self.kl_scale = positive("kl_scale", kl_scale)
        self.register_buffer("nat_weight", torch.tensor(0.5))
        self.register_buffer("initial_losses", torch.full((2,), float("nan")))  # L0 (natural, adversarial)

    @property
    def natural_teacher(self) -> Union[str, nn.Module]:
        """The natural teacher as given: its spec (a path or a name), or the model."""
        return self._natural_spec if self._natural_spec is not None else self.natural_model

    @property
    def weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(w_adv, w_nat)``, 0-dim tensors."""
        return 1 - self.nat_weight, self.nat_weight

    def extra_repr(self) -> str:
        text = super().extra_repr()
        model = self.natural_model
        return text if self._natural_spec is not None or model is None else \
            text.replace(repr(model), f"<{type(model).__name__}>")

    def setup(self, student, teacher, images) -> None:
        """Resolve and freeze the natural teacher, on the student's device; check its classes."""
        device = model_device(student, images.device)
        sample = images[:2].to(device)
        with torch.no_grad(), model_mode(student, "eval"):
            num_classes = int(student(sample).shape[1])
        if self.natural_model is None:
            from .teachers import load_teacher
            try:
                loaded = load_teacher(self._natural_spec, num_classes, int(sample.shape[1]), device)
            except (ValueError, FileNotFoundError) as err:  # say which of the two teachers it is
                raise type(err)(f"natural_teacher: {err}") from None
            object.__setattr__(self, "natural_model", loaded)
        model = self.natural_model
        if model is student:
            raise ValueError("natural_teacher is the student: pass a separate, naturally trained model")
        if model_device(model, device) != device:
            raise ValueError(f"natural_teacher is on {model_device(model)} but the student on {device}: move it there "
                             f"(natural_teacher.to({str(device)!r}))")
        model.eval().requires_grad_(False)
        if any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in student.parameters()):
            model.to(memory_format=torch.channels_last)  # the layout the Trainer gave the student and teacher
        t_classes = int(teacher_logits(model, sample).shape[1])
        if t_classes != num_classes:
            raise ValueError(f"natural_teacher predicts {t_classes} classes but the student {num_classes}: both "
                             "teachers need the student's label space")
        self.to(device)

    def update_weights(self, loss_nat: torch.Tensor, loss_adv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One step of the adaptive weights from this batch's two losses; returns ``(w_adv, w_nat)``.

        The first batch's losses become L0; a non-finite step (e.g. a NaN loss) leaves the weights as they were.
        """
        with torch.no_grad():
            losses = torch.stack([loss_nat.detach(), loss_adv.detach()]).to(self.initial_losses)
            if distributed.world_size() > 1:  # one weight for all processes: the update sees the global losses
                losses = distributed.all_reduce_sum(losses) / distributed.world_size()
            first = torch.isnan(self.initial_losses)
            self.initial_losses.copy_(torch.where(first, losses, self.initial_losses))
            r_nat, r_adv = (losses / self.initial_losses) ** self.beta
            target = r_nat / (r_nat + r_adv)
            eta = self.eta * self.lr_scale
            updated = self.nat_weight - eta * (self.nat_weight - target)
            self.nat_weight.copy_(torch.where(torch.isfinite(updated), updated, self.nat_weight))
        return self.weights

    def forward(self, student, images, labels, teacher=None) -> Terms:
        if self.natural_model is None:
            raise RuntimeError("MTARD.setup(student, teacher, images) must run before the first batch (the Trainer "
                               "calls it); it loads the natural teacher")
        adv = self.attack(student, images, labels)
        t_adv = F.softmax(teacher_logits(teacher, adv), 1)
        t_nat = F.softmax(teacher_logits(self.natural_model, images), 1)
        loss_adv = self.kl_scale * kl_div(t_adv, student(adv), reduction=self.kl_reduction)
        loss_nat = self.kl_scale * kl_div(t_nat, student(images), reduction=self.kl_reduction)
        w_adv, w_nat = self.update_weights(loss_nat, loss_adv)
        return {"kl_adv": w_adv.to(loss_adv.dtype) * loss_adv, "kl_nat": w_nat.to(loss_nat.dtype) * loss_nat}


__all__ = ["AdaAD", "MTARD"]
