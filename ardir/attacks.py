"""PGD in the L-inf or L2 ball, the inner maximisation of every training method and the workhorse of evaluation.

Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018,
https://arxiv.org/abs/1706.06083.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import (NORMS, batch_tensors, eps_value, label_range, logits_of, non_negative_int, norm_name, one_of,
                      pixel_range, positive)
from ._checks import renamed_keywords, warn_large_step

LOSSES = ("ce", "kl", "cw")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (adv_images, labels) -> per-sample loss (N,)
STARTS = ("uniform", "normal", "none")
MODES = ("eval", "train", "keep")
# An L2 step divides the gradient by its per-sample norm, floored at this: a zero gradient makes no step (no 0/0).
L2_NORM_FLOOR = 1e-12

# model -> the module PGD calls instead (``torch.compile(model)``); see :func:`compile_for_attack`.
_ATTACK_MODULES: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()
# Under fp16 autocast the attack loss is multiplied by this before ``autograd.grad``, so small input gradients do
# not underflow to zero in half precision; PGD only uses the gradient's sign (L-inf) or direction (L2), which the
# scale does not change.
FP16_ATTACK_LOSS_SCALE = 1024.0


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (attacks need no gradient all-reduce)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def compile_for_attack(model: nn.Module, enable: bool = True, **compile_kwargs) -> Optional[nn.Module]:
    """Make every :class:`PGD` on ``model`` run ``torch.compile(model, **compile_kwargs)`` (or stop, ``enable=False``).

    The compiled module shares ``model``'s parameters and buffers; only the attack's forward passes use it, so forward
    hooks put on ``model``'s sub-modules for the loss (:class:`~ardir.hooks.FeatureHooks`) keep working on the eager
    module (hooks added after compilation would be ignored by a compiled graph). Returns the compiled module.
    """
    if not enable:
        _ATTACK_MODULES.pop(model, None)
        return None
    compiled = torch.compile(model, **compile_kwargs)
    _ATTACK_MODULES[model] = compiled
    return compiled


def attack_module(model: nn.Module) -> nn.Module:
    """The module :class:`PGD` runs for ``model``: its compiled twin when registered with
    :func:`compile_for_attack`, else ``model`` itself. A loss callable may call it instead of ``model``."""
    model = _unwrap(model)
    return _ATTACK_MODULES.get(model, model)


def cw_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample CW margin ``max_{j != y} z_j - z_y`` of shape (N,); positive means misclassified."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    # scatter, not F.one_hot: one_hot checks the label range on the host (a CUDA sync on every attack step)
    true_class = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], True)
    others = logits.masked_fill(true_class, float("-inf"))
    return others.amax(1) - true


def kl_to(target_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(P || softmax(logits))`` of shape (N,), P given as probabilities (N, C)."""
    return F.kl_div(F.log_softmax(logits, 1), target_probs, reduction="none").sum(1)


def _sample_norms(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each sample of ``t`` (N, ...), shaped (N, 1, ..., 1) to broadcast against it."""
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True)


def project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """``delta`` (N, ...) with every sample longer than ``eps`` (L2) scaled back onto the sphere of radius ``eps``;
    the others unchanged. Same shape and dtype."""
    return delta * (eps / _sample_norms(delta).clamp(min=eps))


def l2_direction(grad: torch.Tensor) -> torch.Tensor:
    """``grad / ||grad||_2`` per sample (N, ...); a zero gradient stays zero (norm floored at
    :data:`L2_NORM_FLOOR`)."""
    return grad / _sample_norms(grad).clamp(min=L2_NORM_FLOOR)


def uniform_l2_ball(like: torch.Tensor, eps: float) -> torch.Tensor:
    """Perturbations uniform in volume in the L2 ball of radius ``eps``, one per sample of ``like`` (N, ...).

    A direction ``z / ||z||`` with ``z ~ N(0, I)`` (uniform on the sphere) times a radius ``eps * U ** (1 / d)``,
    ``U ~ U(0, 1)`` and ``d`` the dimension of a sample (the radius of a uniform point has density proportional to
    ``r ** (d - 1)``). In high dimension the radius is close to ``eps``, as the L-inf uniform start's points lie
    far out in their cube.
    """
    z = torch.randn_like(like)
    dim = max(like.numel() // max(len(like), 1), 1)
    shape = (len(like),) + (1,) * (like.dim() - 1)
    radius = torch.rand(shape, dtype=like.dtype, device=like.device).pow_(1.0 / dim).mul_(eps)
    return z / _sample_norms(z).clamp(min=L2_NORM_FLOOR) * radius


def model_device(model: nn.Module, default: Optional[torch.device] = None) -> torch.device:
    """Where ``model`` lives: its first parameter's device, else its first buffer's, else ``default`` (the CPU
    when ``None``)."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    if tensor is not None:
        return tensor.device
    return torch.device("cpu") if default is None else torch.device(default)


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Put ``model`` in ``mode`` ("eval", "train" or "keep") and restore every module's own flag on exit."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        if mode != "keep":
            model.train(mode == "train")
        yield
    finally:
        for m, training in saved:
            m.training = training


class PGD:
    r"""Projected gradient ascent in the L-inf or L2 ball, like ``torchattacks.PGD`` / ``PGDL2`` but with the loss to
    climb selectable.

    Each step, per sample:
    L-inf (default): ``x' <- clip_[0,1](clip_{x±eps}(x' + step_size * sign(grad L(x'))))``;
    L2: ``x' <- clip_[0,1](x + P_eps(x' + step_size * g / ||g||_2 - x))`` with ``g = grad L(x')`` (a zero gradient
    makes no step) and ``P_eps`` the projection onto the L2 ball of radius eps (``delta * min(1, eps / ||delta||)``).
    One L2 step of size eps from ``random_start="none"`` is FGM, the L2 counterpart of FGSM.

    Arguments:
        model: the network attacked; it must take images in [0, 1] (put normalisation inside it).
        eps: radius of the ball (default 8/255): L-inf in (0, 1]; L2 > 0 (e.g. 0.5 on CIFAR-10).
        step_size: the step (default 2/255; torchattacks calls it ``alpha``, which in ardir's ARD and IAD
            is the weight of the distillation term); under L2 the L2 length of each step.
        steps: number of ascent steps (default 10); 0 returns the random start.
        loss: what the attack climbs:
            ``"ce"``: cross-entropy to ``labels`` (Madry AT, ARD);
            ``"kl"``: ``KL(P || softmax(model(x')))`` where P is ``target_probs`` given to the call, or, when
            none is given, the model's own prediction on the natural images (TRADES); RSLAD passes the teacher's;
            ``"cw"``: the CW margin ``max_{j != y} z_j - z_y`` (CW-inf evaluation);
            a callable ``loss(adv_images, labels)`` returning the per-sample loss (N,) of the adversarial batch:
            anything differentiable in ``adv_images``, calling ``model`` and other models (AdaAD climbs
            ``KL(p(T(x')) || p(S(x')))`` with the teacher in the graph). Its models' parameters get no ``.grad``
            (the gradient is taken with respect to the input only); name the models it calls besides ``model`` in
            ``loss_models``. It may call :func:`attack_module` ``(model)`` to run a compiled ``model``.
        random_start: ``"uniform"`` in the ball (Madry; under L2 uniform in volume, see :func:`uniform_l2_ball`,
            where torchattacks' ``PGDL2`` draws the radius uniformly in [0, eps]), ``"normal"`` =
            ``x + 0.001 * N(0, I)`` (TRADES, RSLAD; under L2 projected onto the ball) or ``"none"``; then clipped
            to [0, 1].
        mode: the model's mode while attacking: ``"eval"`` (default), ``"train"`` (ARD: BatchNorm uses batch
            statistics) or ``"keep"``. Every module's own train/eval flag is restored afterwards.
        loss_models: the other modules a callable ``loss`` runs (e.g. a teacher): held in eval mode during the
            attack (a teacher's BatchNorm statistics must not move, whatever ``mode`` the attacked model has) and
            every module's flag restored afterwards.
        norm: the threat model, ``"linf"`` (default) or ``"l2"``.

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,) int64; target_probs: (N, K) rows summing to 1.
        Returns adversarial images of the same shape and dtype, detached.

    The gradient is taken with ``torch.autograd.grad`` with respect to the input only, so no weight gradient is
    computed and no ``.grad`` is left on any parameter; a DistributedDataParallel model is attacked through its
    ``.module`` (no gradient all-reduce). A call checks its inputs (:meth:`check_inputs`: types, shapes, devices;
    the [0, 1] pixel range on the first call only, as that check is a host synchronisation); the loop itself never
    synchronises with the host. Called under ``torch.autocast`` it runs in that precision (the sign and the
    direction of the gradient are robust to bf16; under fp16 the loss is scaled by :data:`FP16_ATTACK_LOSS_SCALE`
    first). A model registered with :func:`compile_for_attack` is run compiled.

    Example::

        attack = ardir.PGD(model, eps=8/255, step_size=2/255, steps=20)
        adv_images = attack(images, labels)
        adv_l2 = ardir.PGD(model, eps=0.5, step_size=0.125, steps=20, norm="l2")(images, labels)

        # any loss: here AdaAD's, the teacher-student discrepancy on the perturbed batch (labels unused)
        def discrepancy(adv, labels):
            return ardir.attacks.kl_to(F.softmax(teacher(adv), 1), student(adv))  # (N,)
        adv_images = ardir.PGD(student, loss=discrepancy, random_start="normal", loss_models=[teacher])(
            images, labels)
    """

    @renamed_keywords(alpha="step_size")  # torchattacks' spelling; in ARD/IAD alpha is a loss weight
    def __init__(self, model: nn.Module, eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10,
                 loss: Union[str, LossFn] = "ce", random_start: str = "uniform", mode: str = "eval",
                 loss_models: Sequence[nn.Module] = (), norm: str = "linf"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = _unwrap(model)
        self.norm = norm_name("norm", norm)
        self.eps = eps_value("eps", eps, self.norm)
        self.step_size = positive("step_size", step_size)
        self.steps = non_negative_int("steps", steps)
        warn_large_step(self.eps, self.step_size, self.steps, self.norm)
        if callable(loss) and not isinstance(loss, (str, nn.Module)):
            self.loss: Union[str, LossFn] = loss
        elif isinstance(loss, str):
            self.loss = one_of("loss", loss, LOSSES, "attack loss")
        else:
            raise TypeError(f"loss must be one of {', '.join(map(repr, LOSSES))} or a function "
                            f"loss(adv_images, labels) -> per-sample loss (N,), got {type(loss).__name__}")
        if isinstance(loss_models, nn.Module):
            loss_models = [loss_models]
        bad = [type(m).__name__ for m in loss_models if not isinstance(m, nn.Module)]
        if bad:
            raise TypeError(f"loss_models must be torch.nn.Modules (the models the loss calls), got {bad}")
        self.loss_models = [_unwrap(m) for m in loss_models]
        self.random_start = one_of("random_start", "none" if random_start is None else random_start,
                                   STARTS, "random start")
        self.mode = one_of("mode", mode, MODES, "model mode")
        self._range_checked = False

    def __repr__(self) -> str:
        loss = self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", type(self.loss).__name__)
        return (f"PGD(eps={self.eps:.5g}, step_size={self.step_size:.5g}, steps={self.steps}, loss={loss!r}, "
                f"random_start={self.random_start!r}, mode={self.mode!r}, norm={self.norm!r})")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 target_probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.check_inputs(images, labels, target_probs, check_range=not self._range_checked)
        self._range_checked = True
        return self.forward(images, labels, target_probs)

    def check_inputs(self, images: torch.Tensor, labels: torch.Tensor, target_probs: Optional[torch.Tensor] = None,
                     check_range: bool = True) -> None:
        """Raise a ``TypeError``/``ValueError`` naming the problem: images a floating-point tensor (N, ...) on the
        model's device, labels int64 (N,), target_probs (N, K); with ``check_range`` also images in [0, 1]."""
        batch_tensors("PGD", images, labels)
        device = model_device(self.model, images.device)
        if images.device != device or labels.device != device:
            raise ValueError(f"images ({images.device}) and labels ({labels.device}) must be on the model's device "
                             f"({device})")
        if target_probs is not None and (not isinstance(target_probs, torch.Tensor) or target_probs.dim() != 2
                                         or len(target_probs) != len(images)):
            got = tuple(target_probs.shape) if isinstance(target_probs, torch.Tensor) else type(target_probs).__name__
            raise TypeError(f"target_probs must be probabilities shaped (N, K) = ({len(images)}, K), got {got}")
        if check_range:  # once per attack: a probe forward and two host syncs
            pixel_range("PGD's images", images)
            with model_mode(self.model, "eval"):  # no BatchNorm update from the probe
                num_classes = logits_of("PGD's model", self.model, images[:2]).shape[1]
            label_range("PGD's labels", labels, num_classes)

    def start(self, images: torch.Tensor) -> torch.Tensor:
        """The random starting point, inside the ball and [0, 1]."""
        if self.norm == "l2" and self.random_start != "none":
            delta = (uniform_l2_ball(images, self.eps) if self.random_start == "uniform" else
                     project_l2(0.001 * torch.randn_like(images), self.eps))
            return (images + delta).clamp(0, 1)
        if self.random_start == "uniform":
            delta = torch.empty_like(images).uniform_(-self.eps, self.eps)
        elif self.random_start == "normal":
            delta = 0.001 * torch.randn_like(images)
        else:
            return images.clone()
        return (images + delta).clamp(0, 1)

    def objective(self, logits: torch.Tensor, labels: torch.Tensor,
                  target_probs: Optional[torch.Tensor]) -> torch.Tensor:
        """The summed loss the attack climbs (summed, so each sample's gradient is its own); named losses only
        (a callable's is :meth:`custom_objective`)."""
        if self.loss == "ce":
            return F.cross_entropy(logits, labels, reduction="sum")
        if self.loss == "kl":
            return kl_to(target_probs, logits).sum()
        return cw_margin(logits, labels).sum()

    def custom_objective(self, adv: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The callable loss on ``adv``, checked (shape (N,), differentiable in ``adv``: metadata only, no host
        sync) and summed."""
        value = self.loss(adv, labels)
        name = getattr(self.loss, "__name__", "loss")
        if not isinstance(value, torch.Tensor) or value.shape != (len(adv),):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"PGD's loss {name}(adv_images, labels) must return the per-sample loss, a tensor of "
                             f"shape ({len(adv)},), got {got}: return e.g. F.cross_entropy(..., reduction='none')")
        if not value.requires_grad:
            raise ValueError(f"PGD's loss {name}(adv_images, labels) returned a tensor that does not depend on "
                             "adv_images (computed under no_grad, detached, or from other inputs); the attack needs "
                             "its gradient with respect to adv_images")
        return value.float().sum()

    def forward(self, images: torch.Tensor, labels: torch.Tensor,
                target_probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Return adversarial examples for ``images`` (N, C, H, W) in [0, 1] with ``labels`` (N,)."""
        images = images.detach()
        labels = labels.detach()
        net = _ATTACK_MODULES.get(self.model, self.model)
        device = images.device.type
        scale = (FP16_ATTACK_LOSS_SCALE if torch.is_autocast_enabled(device)
                 and torch.get_autocast_dtype(device) == torch.float16 else None)
        custom = not isinstance(self.loss, str)
        with contextlib.ExitStack() as modes:
            for module in self.loss_models:
                modes.enter_context(model_mode(module, "eval"))
            modes.enter_context(model_mode(self.model, self.mode))
            modes.enter_context(torch.enable_grad())
            if self.loss == "kl" and target_probs is None:
                with torch.no_grad():
                    target_probs = F.softmax(net(images).float(), 1)
            target_probs = None if target_probs is None else target_probs.detach()
            adv = self.start(images)
            # L-inf: the eps-ball and [0, 1] intersect in [low, high] (images are in [0, 1]), so one clamp projects
            # onto both
            bounds = ((images - self.eps).clamp_(min=0), (images + self.eps).clamp_(max=1)) \
                if self.norm == "linf" else None
            for _ in range(self.steps):
                adv.requires_grad_(True)
                loss = (self.custom_objective(adv, labels) if custom else
                        self.objective(net(adv), labels, target_probs))
                if scale is not None:
                    loss = loss * scale
                grad, = torch.autograd.grad(loss, adv, allow_unused=custom)
                if grad is None:
                    raise ValueError(f"PGD's loss {getattr(self.loss, '__name__', 'loss')}(adv_images, labels) does "
                                     "not depend on adv_images (it uses other inputs); the attack needs its gradient "
                                     "with respect to adv_images")
                adv = self.step(adv.detach(), grad, images, bounds)
        return adv.detach()

    def step(self, adv: torch.Tensor, grad: torch.Tensor, images: torch.Tensor,
             bounds: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One ascent step from ``adv`` along ``grad`` (both (N, C, H, W)), back into the ball around ``images`` and
        [0, 1]: L-inf clamps to ``bounds`` = (low, high); L2 moves by ``step_size`` along ``grad / ||grad||_2``,
        projects onto the eps-ball around ``images``, then clips to [0, 1] (which keeps it in the ball: clipping
        only moves a pixel towards the image's own, which lies in [0, 1])."""
        if bounds is not None:
            return torch.clamp(torch.add(adv, grad.sign(), alpha=self.step_size), *bounds)
        moved = torch.add(adv, l2_direction(grad), alpha=self.step_size)
        return (images + project_l2(moved - images, self.eps)).clamp_(0, 1)
