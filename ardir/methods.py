r"""Training methods. Each is one idea: the loss its attack climbs (inner maximisation) and the loss the student
descends (outer). A method is called once per batch and returns its weighted loss terms; the trainer sums them.

Notation (as in docs/methods.md): S student, T teacher, x natural batch in [0, 1], x' adversarial batch, y labels,
C classes, p(z) = softmax(z), KL(P || Q) = sum_c P_c (log P_c - log Q_c).
"""
from __future__ import annotations

import inspect
import warnings
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import eps_value, non_negative, non_negative_int, norm_name, number, one_of, positive
from .attacks import PGD, STARTS, MODES, LossFn, kl_to, model_mode
from .losses import KL_REDUCTIONS, kl_div
from .registry import Registry

Terms = Dict[str, torch.Tensor]


def _method_parameters(cls: Type["Method"]) -> List[inspect.Parameter]:
    """A method's own ``__init__`` parameters and, when that takes ``**attack``, those of :class:`Method`
    (where every method sends them). An intermediate class's are not inherited: ARDIR builds on ARD but fixes
    ARD's ``alpha``, so ``alpha`` is not an ARDIR argument."""
    found: Dict[str, inspect.Parameter] = {}
    for init in (cls.__init__, Method.__init__):
        params = [p for p in inspect.signature(init).parameters.values() if p.name != "self"]
        found.update((p.name, p) for p in params if p.kind != p.VAR_KEYWORD and p.name not in found)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return list(found.values())


METHODS = Registry("method", argument="method", normalize=str.lower, signature=_method_parameters)
"""The training methods by name (a :class:`~ardir.registry.Registry`; ``METHODS["ard"]`` is the class)."""
register_method = METHODS.register
"""Class decorator adding a method to :data:`METHODS` under ``cls.name``."""
list_methods = METHODS.list
"""Names accepted by :func:`create_method`."""


def create_method(name: str, **kwargs) -> "Method":
    """Build a method by name (``"at"``, ``"trades"``, ``"ard"``, ``"iad"``, ``"rslad"``, ``"ardir"``,
    ``"adaad"``, ``"mtard"``, ``"natural"``; any case) with its keyword arguments; unknown arguments are refused,
    naming the valid ones."""
    return METHODS.create(name, **kwargs)


def method_arguments(name: Union[str, Type["Method"]]) -> List[str]:
    """The keyword arguments a method (a registered name, or a class) accepts: its own ``__init__``'s and, when
    that takes ``**attack``, the attack settings of :class:`~ardir.methods.Method` (see :data:`METHODS`)."""
    if isinstance(name, str):
        return list(METHODS.arguments(name))
    return [p.name for p in _method_parameters(name) if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


class Method(nn.Module):
    """Base class: attack settings (the inner maximisation) and the paper's schedule.

    Arguments:
        eps: radius of the training attack's ball (8/255): L-inf in (0, 1], L2 > 0 (CIFAR-10: 0.5).
        step_size: PGD step (2/255); under L2 the L2 length of a step (CIFAR-10: 2.5 * eps / steps).
        steps: PGD steps (10).
        random_start: ``"uniform"``, ``"normal"`` (x + 0.001 N(0, I)) or ``"none"``; default: the method's own.
        attack_mode: the student's mode during the attack, ``"eval"`` or ``"train"``; default: the method's own.
        norm: the threat model of the training attack and of the Trainer's validation PGD, ``"linf"`` (default) or
            ``"l2"``. See :class:`~ardir.attacks.PGD`.

    Subclasses set ``name``, the attack's loss and defaults, and implement :meth:`forward`.
    """
    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    attack_loss: ClassVar[str] = "ce"
    default_start: ClassVar[str] = "uniform"
    default_attack_mode: ClassVar[str] = "eval"
    # The paper's schedule: epochs, and lr x0.1 milestones as fractions of the epochs.
    epochs: ClassVar[int] = 200
    milestones: ClassVar[Tuple[float, ...]] = (0.5, 0.75)

    def __init__(self, eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10,
                 random_start: Optional[str] = None, attack_mode: Optional[str] = None, norm: str = "linf"):
        super().__init__()
        self.norm = norm_name("norm", norm)
        self.eps = eps_value("eps", eps, self.norm)
        self.step_size = positive("step_size", step_size)
        self.steps = non_negative_int("steps", steps)
        self.random_start = one_of("random_start", random_start or self.default_start, STARTS, "random start")
        self.attack_mode = one_of("attack_mode", attack_mode or self.default_attack_mode, MODES, "model mode")
        self.epoch = 0  # until the Trainer calls on_epoch_start: a method used alone is at epoch 0 of its paper's run
        self.run_epochs = self.epochs
        self.lr_scale = 1.0

    def on_epoch_start(self, epoch: int, epochs: int, lr_scale: float = 1.0) -> None:
        """Called by the Trainer before every epoch, and once when it is built (``epoch`` 0): the running epoch
        (0-based), the run's number of epochs and the lr's factor (running lr / initial lr).

        The default keeps them in :attr:`epoch`, :attr:`run_epochs` and :attr:`lr_scale`, which the methods read
        (IAD's warm-up, MTARD's eta); a subclass overriding it calls ``super().on_epoch_start(...)``.
        """
        self.epoch, self.run_epochs, self.lr_scale = epoch, epochs, lr_scale

    def check_schedule(self, epochs: int) -> None:
        """Called by the Trainer with the run's number of epochs: warn about settings that cannot work in it."""

    def extra_repr(self) -> str:
        """Every argument of the method (:func:`method_arguments`) with its value: what will be trained."""
        def show(value):
            return f"{value:.5g}" if isinstance(value, float) else repr(value)
        return ", ".join(f"{name}={show(getattr(self, name))}" for name in method_arguments(type(self))
                         if hasattr(self, name))

    def attack(self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               target_probs: Optional[torch.Tensor] = None, loss: Union[str, LossFn, None] = None,
               loss_models: Sequence[nn.Module] = ()) -> torch.Tensor:
        """The inner maximisation: PGD with this method's settings; returns x' (N, C, H, W), detached.
        ``loss`` (default: the method's ``attack_loss``) may be a callable (see :class:`~ardir.attacks.PGD`)."""
        pgd = PGD(student, eps=self.eps, step_size=self.step_size, steps=self.steps, loss=loss or self.attack_loss,
                  random_start=self.random_start, mode=self.attack_mode, loss_models=loss_models, norm=self.norm)
        return pgd.forward(images, labels, target_probs)  # the trainer has checked the data

    def setup(self, student: nn.Module, teacher: Optional[nn.Module], images: torch.Tensor) -> None:
        """Called once by the trainer before the optimiser is built, with a sample batch (to create adapters)."""

    def forward(self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                teacher: Optional[nn.Module] = None) -> Terms:
        """Return the weighted loss terms for one batch (their sum is the loss); the student is in train mode."""
        raise NotImplementedError


def teacher_logits(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The frozen teacher's logits (N, C): eval mode, no autograd graph."""
    with torch.no_grad(), model_mode(teacher, "eval"):
        return teacher(images)


@register_method
class Natural(Method):
    """Standard training without attack: ``CE(S(x), y)``. The no-robustness baseline."""
    name = "natural"

    def forward(self, student, images, labels, teacher=None) -> Terms:
        return {"ce": F.cross_entropy(student(images), labels)}


@register_method
class AT(Method):
    """Madry et al. 2018, PGD adversarial training ("SAT" in tables).

    Inner: PGD on ``CE(S(x'), y)``, uniform start. Outer: ``CE(S(x'), y)``.
    The student is attacked in eval mode by default so attack steps do not move BatchNorm statistics.
    """
    name = "at"

    def forward(self, student, images, labels, teacher=None) -> Terms:
        adv = self.attack(student, images, labels)
        return {"ce_adv": F.cross_entropy(student(adv), labels)}


@register_method
class TRADES(Method):
    """Zhang et al. 2019, https://arxiv.org/abs/1901.08573.

    Inner: PGD on ``KL(p(S(x)) || p(S(x')))``, start ``x + 0.001 N(0, I)``, student in eval mode.
    Outer: ``CE(S(x), y) + beta * KL(p(S(x)) || p(S(x')))``, KL averaged over the batch; beta = 6 (CIFAR-10).
    Schedule: 100 epochs, lr x0.1 at 75 and 90, the TRADES script's lr steps run for 100 epochs (the script itself
    stops at 76 by default: ``epochs=76, milestones=[74]``).

    Arguments:
        beta: weight of the robust KL term (6).
    """
    name = "trades"
    attack_loss = "kl"
    default_start = "normal"
    epochs = 100
    milestones = (0.75, 0.9)

    def __init__(self, beta: float = 6.0, **attack):
        super().__init__(**attack)
        self.beta = non_negative("beta", beta)

    def forward(self, student, images, labels, teacher=None) -> Terms:
        adv = self.attack(student, images, labels)  # target: the student's own natural prediction
        logits = student(images)
        robust = kl_to(F.softmax(logits, 1), student(adv)).mean()
        return {"ce": F.cross_entropy(logits, labels), "kl_robust": self.beta * robust}


@register_method
class ARD(Method):
    """Goldblum et al. 2020, Adversarially Robust Distillation, https://arxiv.org/abs/1905.09747.

    Inner: PGD-10 on ``CE(S(x'), y)``, uniform start, the student in train mode (as the reference code).
    Outer: ``alpha * tau^2 * KL(p(T(x)/tau) || p(S(x')/tau)) + (1 - alpha) * CE(S(x), y)``, teacher on the natural
    batch. Defaults tau = 30, alpha = 1.

    ``kl_reduction="mean"`` (default) divides the batch-mean KL by C, as the reference code's ``nn.KLDivLoss()``
    does; with alpha = 1 it scales the whole gradient, i.e. the effective learning rate, so the published numbers
    depend on it. ``"batchmean"`` is the KL as written in the paper.
    Schedule: 200 epochs, lr x0.1 at 100 and 150.

    Arguments:
        tau: temperature of the distillation KL (ARD 30, IAD and ARDIR 1).
        alpha: weight of the distillation term, in [0, 1]; the natural CE gets ``1 - alpha`` (1).
        kl_reduction: ``"mean"`` (the reference code's ``nn.KLDivLoss()``, /C) or ``"batchmean"``.
    """
    name = "ard"
    needs_teacher = True
    default_attack_mode = "train"

    def __init__(self, tau: float = 30.0, alpha: float = 1.0, kl_reduction: str = "mean", **attack):
        super().__init__(**attack)
        self.tau = positive("tau", tau)
        self.alpha = number("alpha", alpha)
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={alpha} must be in [0, 1] (the weight of the distillation term)")
        self.kl_reduction = one_of("kl_reduction", kl_reduction, KL_REDUCTIONS, "KL reduction")

    def distillation(self, t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
        """``tau^2 * KL(p(T/tau) || p(S/tau))`` with this method's reduction."""
        target = F.softmax(t_logits / self.tau, 1)
        return self.tau ** 2 * kl_div(target, s_logits, self.tau, self.kl_reduction)

    def forward(self, student, images, labels, teacher=None) -> Terms:
        t_logits = teacher_logits(teacher, images)
        adv = self.attack(student, images, labels)
        terms = {"kl": self.alpha * self.distillation(t_logits, student(adv))}
        if self.alpha < 1:
            terms["ce"] = (1 - self.alpha) * F.cross_entropy(student(images), labels)
        return terms


@register_method
class IAD(ARD):
    """Zhu et al. 2022, Introspective Adversarial Distillation (IAD-I), https://arxiv.org/abs/2110.01968.

    ARD (tau = 1) plus, after ``warmup_epochs`` (60 of 200) of plain ARD, the student's introspection term
    ``mean_i (1 - a_i) * KL(p(S(x_i)) || p(S(x'_i)))`` with ``a_i = p_T(y_i | x'_i) ** beta``, beta = 0.1: the less
    the teacher is trusted on x'_i, the more the student relies on itself.

    Unlike ARD's, IAD's reference code (IAD-I.py) averages the KL over the batch only (``(1/N) sum_i KL_i``), so
    ``kl_reduction="batchmean"`` is its default; both terms are weighted by ``alpha``, as there.

    Arguments:
        beta: exponent of the teacher's trust ``p_T(y | x') ** beta`` (0.1).
        warmup_epochs: epochs of plain ARD before the introspection term starts; default (None): 30 % of the
            run's epochs, the paper's 60 of 200, so a shorter run keeps the paper's proportions.
        kl_reduction: ``"batchmean"`` (IAD-I.py's batch mean) or ``"mean"`` (also divided by C).
    """
    name = "iad"

    warmup_fraction = 60 / 200

    def __init__(self, tau: float = 1.0, alpha: float = 1.0, beta: float = 0.1, warmup_epochs: Optional[int] = None,
                 kl_reduction: str = "batchmean", **attack):
        super().__init__(tau=tau, alpha=alpha, kl_reduction=kl_reduction, **attack)
        self.beta = non_negative("beta", beta)
        self.warmup_epochs = None if warmup_epochs is None else non_negative_int("warmup_epochs", warmup_epochs)

    @property
    def warmup(self) -> int:
        """The epochs of plain ARD in this run: ``warmup_epochs``, or 30 % of the run's epochs."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return round(self.warmup_fraction * self.run_epochs)

    def get_extra_state(self) -> Dict[str, int]:
        # checkpoints pin the warm-up this run started with: resuming with more epochs must not move it
        return {"warmup": self.warmup}

    def set_extra_state(self, state: Dict[str, int]) -> None:
        self.warmup_epochs = int(state["warmup"])

    def check_schedule(self, epochs: int) -> None:
        if self.warmup_epochs is not None and self.warmup_epochs >= epochs > 0:
            warnings.warn(f"IAD's warmup_epochs={self.warmup_epochs} >= epochs={epochs}: the introspection term never "
                          "runs, so this is ARD with tau = 1; leave warmup_epochs unset for 30 % of the epochs",
                          stacklevel=3)

    def forward(self, student, images, labels, teacher=None) -> Terms:
        if self.epoch < self.warmup:
            return super().forward(student, images, labels, teacher)
        t_logits = teacher_logits(teacher, images)
        adv = self.attack(student, images, labels)
        s_adv, s_nat = student(adv), student(images)
        trust = F.softmax(teacher_logits(teacher, adv), 1).gather(1, labels[:, None]).squeeze(1) ** self.beta
        terms = {"kl": self.alpha * self.distillation(t_logits, s_adv),
                 "introspection": self.alpha * ((1 - trust) * kl_to(F.softmax(s_nat, 1), s_adv)).mean()}
        if self.alpha < 1:
            terms["ce"] = (1 - self.alpha) * F.cross_entropy(s_nat, labels)
        return terms


@register_method
class RSLAD(Method):
    """Zi et al. 2021, Robust Soft Label Adversarial Distillation, https://arxiv.org/abs/2108.07969.

    Inner: PGD-10 on ``sum KL(p(T(x)) || p(S(x')))``, start ``x + 0.001 N(0, I)``, student in eval mode.
    Outer: ``5/6 KL(p(T(x)) || p(S(x'))) + 1/6 KL(p(T(x)) || p(S(x)))``, tau = 1, no hard labels.
    ``kl_reduction="mean"`` (default, the reference code) divides by C; the reference multiplies by 10 on
    CIFAR-100 to keep the scale: pass ``kl_scale=10`` there.
    Schedule: 300 epochs, lr x0.1 at 215, 260 and 285.

    Arguments:
        adv_weight: weight of the adversarial KL term; the natural one gets ``1 - adv_weight`` (5/6).
        kl_reduction: ``"mean"`` (the reference code's ``nn.KLDivLoss()``, /C) or ``"batchmean"``.
        kl_scale: factor on both terms (1; the reference code uses 10 on CIFAR-100).
    """
    name = "rslad"
    needs_teacher = True
    attack_loss = "kl"
    default_start = "normal"
    epochs = 300
    milestones = (215 / 300, 260 / 300, 285 / 300)

    def __init__(self, adv_weight: float = 5 / 6, kl_reduction: str = "mean", kl_scale: float = 1.0, **attack):
        super().__init__(**attack)
        self.adv_weight = number("adv_weight", adv_weight)
        if not 0 <= self.adv_weight <= 1:
            raise ValueError(f"adv_weight={adv_weight} must be in [0, 1] (the natural term gets 1 - adv_weight)")
        self.kl_reduction = one_of("kl_reduction", kl_reduction, KL_REDUCTIONS, "KL reduction")
        self.kl_scale = positive("kl_scale", kl_scale)

    def forward(self, student, images, labels, teacher=None) -> Terms:
        t_probs = F.softmax(teacher_logits(teacher, images), 1)
        adv = self.attack(student, images, labels, target_probs=t_probs)
        w, scale = self.adv_weight, self.kl_scale
        return {"kl_adv": w * scale * kl_div(t_probs, student(adv), reduction=self.kl_reduction),
                "kl_nat": (1 - w) * scale * kl_div(t_probs, student(images), reduction=self.kl_reduction)}


# Registered after the methods above, which they build on; importable from here.
from .methods_ardir import ARDIR, LayerSpec  # noqa: E402,F401
from .methods_recent import MTARD, AdaAD  # noqa: E402,F401  (registers the newer baselines)
