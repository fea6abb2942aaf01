"""APGD (L-inf and L2) for ardir's AutoAttack engine: the official algorithm, with finished points dropped early.

Croce & Hein 2020 (https://arxiv.org/abs/2003.01690). One restart of ``n_iter`` iterations: random start
``x + eps * t / max|t|`` with ``t = 2 * rand - 1`` (L-inf) or ``x + eps * t / ||t||_2`` with ``t = randn`` (L2),
drawn on the CPU so the stream is the official one, then clipped to [0, 1]; step ``2 * eps`` along
``sign(grad)`` (L-inf) or ``grad / ||grad||_2`` (L2) with momentum 0.75, each move projected onto the eps-ball
and [0, 1] (L2: :func:`project_l2`, the official radial scaling then clipping); checkpoints after
``n_iter_2 = 22`` iterations, then every ``max(k - 3, 6)``, where the step of a sample halves (and it restarts
from its best point) when its loss oscillated (improved in at most ``rho * k`` of the last ``k`` steps) or when
its step was not halved last time and its best loss has not improved since. The official quirks that shape a
sample's path are kept: ``reduced_last_check`` starts at ones, the first oscillation count wraps to the (still
zero) last row of the loss history.

Every quantity above is per sample, and in eval mode a sample's logits do not depend on the other samples in
the batch, so a sample's path does not depend on which others are in the batch. A sample that is misclassified
at some iterate counts as fooled (the official ``acc = min(acc, pred)``) and nothing later can undo that, so
:func:`apgd_run` drops it from the active batch at once (``drop=False`` keeps everyone, as the official code).
The verdicts are the official ones up to float rounding of a batch of another size.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def ce_loss(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample cross-entropy (APGD-CE's loss)."""
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample DLR loss: ``-(z_y - max_{i!=y} z_i) / (z_(1) - z_(3))`` (sorted logits, descending)."""
    top, order = logits.sort(dim=1)
    y_is_top = (order[:, -1] == y).float()
    z_y = logits.gather(1, y[:, None])[:, 0]
    other = top[:, -2] * y_is_top + top[:, -1] * (1.0 - y_is_top)
    return -(z_y - other) / (top[:, -1] - top[:, -3] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample targeted DLR loss: ``-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2)`` (APGD-T's loss)."""
    top = logits.sort(dim=1)[0]
    z_y = logits.gather(1, y[:, None])[:, 0]
    z_t = logits.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / (top[:, -1] - 0.5 * (top[:, -3] + top[:, -4]) + 1e-12)


LOSSES = {"ce": ce_loss, "dlr": dlr_loss, "dlr-targeted": dlr_targeted_loss}


def _loss_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
                   loss_fn: Loss) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, per-sample loss and the gradient of the summed loss with respect to ``x``."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        logits = model(x)
        loss = loss_fn(logits, y, target)
        grad, = torch.autograd.grad(loss.sum(), [x])
    return logits.detach(), loss.detach(), grad.detach()


def l2_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of ``v`` (N, ...), shaped (N, 1, ...) to broadcast against it."""
    return (v ** 2).flatten(1).sum(-1).sqrt().view(-1, *[1] * (v.dim() - 1))


def l2_normalized(v: torch.Tensor) -> torch.Tensor:
    """``v / ||v||_2`` per sample (the official ``+ 1e-12`` keeps a zero row zero)."""
    return v / (l2_norm(v) + 1e-12)


def project_l2(x: torch.Tensor, point: torch.Tensor, eps: float) -> torch.Tensor:
    """APGD's L2 projection, as the official code: scale ``point - x`` down to length ``eps`` if longer, then clip
    ``x + delta`` to [0, 1]. Clipping only shortens ``delta``, so the result lies in the ball and the box (it is
    not the exact projection onto their intersection, but it is the official one and the paths depend on it)."""
    delta = point - x
    return torch.clamp(x + l2_normalized(delta) * torch.clamp_max(l2_norm(delta), eps), 0.0, 1.0)


def _random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The official random start on the sphere of radius ``eps`` of ``norm``, clipped to [0, 1]. The draw is on the
    CPU generator (``rand`` for L-inf, ``randn`` for L2), whatever the device, as the official code draws it."""
    if norm == "l2":
        noise = torch.randn(x.shape).to(x.device)
        scale = l2_norm(noise) + 1e-12
    else:
        noise = (2 * torch.rand(x.shape) - 1).to(x.device)
        scale = noise.abs().flatten(1).amax(1).view(-1, *[1] * (x.dim() - 1)) + 1e-12
    return (x + eps * (noise / scale)).clamp(0.0, 1.0)


def _move(s: "_State", momentum: float, eps: float, norm: str, low: torch.Tensor,
          high: torch.Tensor) -> torch.Tensor:
    """The next iterate: a step from ``s.x_adv`` along the gradient, blended with the last change by ``momentum``,
    projected (after the step and again after the blend, as the official code). ``low``/``high``: the L-inf box."""
    change = s.x_adv - s.x_old
    if norm == "l2":
        x1 = project_l2(s.x, s.x_adv + s.step * l2_normalized(s.grad), eps)
        x1 = s.x_adv + (x1 - s.x_adv) * momentum + change * (1 - momentum)
        return project_l2(s.x, x1, eps)
    x1 = torch.clamp(torch.min(torch.max(s.x_adv + s.step * torch.sign(s.grad), low), high), 0.0, 1.0)
    x1 = s.x_adv + (x1 - s.x_adv) * momentum + change * (1 - momentum)
    return torch.clamp(torch.min(torch.max(x1, low), high), 0.0, 1.0)


def _oscillated(loss_steps: torch.Tensor, i: int, k: int, rho: float) -> torch.Tensor:
    """Bool per sample: the loss rose in at most ``rho * k`` of the steps ``i - k + 1 .. i`` (official indexing,
    so a negative row wraps to the end of ``loss_steps``)."""
    n = loss_steps.shape[0]
    rows = torch.arange(i - k + 1, i + 1, device=loss_steps.device)
    rises = (loss_steps[rows % n] > loss_steps[(rows - 1) % n]).float().sum(0)
    return rises <= k * rho


class _State:
    """The per-sample tensors of an APGD run, kept compact (only the samples still active)."""

    NAMES = ("index", "x", "y", "target", "x_adv", "x_old", "grad", "x_best", "grad_best", "loss_best",
             "step", "loss_steps", "best_at_check", "reduced")

    def keep(self, mask: torch.Tensor) -> None:
        """Drop the samples where ``mask`` is False."""
        for name in self.NAMES:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[:, mask] if name == "loss_steps" else value[mask])


def apgd_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, loss: str = "ce",
             target: Optional[torch.Tensor] = None, n_iter: int = 100, rho: float = 0.75,
             drop: bool = True, norm: str = "linf") -> Tuple[torch.Tensor, torch.Tensor]:
    """One APGD restart on ``x`` (N, ...) in [0, 1] in the ``eps``-ball of ``norm`` (``"linf"`` or ``"l2"``):
    ``(adv, fooled)``.

    ``fooled`` (N,) bool: misclassified at the start or at some iterate; ``adv`` holds that iterate for the
    fooled samples and ``x`` for the others. The random start consumes ``torch.rand(x.shape)`` (L2:
    ``torch.randn``) of the global CPU generator. ``drop=True`` stops computing a sample once it is fooled (the
    verdicts are unchanged, see the module docstring); ``target`` (N,) is the target class of
    ``loss="dlr-targeted"``.
    """
    loss_fn = LOSSES[loss]
    n_iter_2, n_iter_min, size_decr = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    s = _State()
    s.x, s.y, s.target = x.detach(), y, target
    s.index = torch.arange(len(x), device=x.device)
    s.x_adv = _random_start(s.x, eps, norm)
    adv, fooled = x.detach().clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    logits, s.loss_best, s.grad = _loss_and_grad(model, s.x_adv, s.y, s.target, loss_fn)
    s.x_best, s.grad_best, s.x_old = s.x_adv.clone(), s.grad.clone(), s.x_adv.clone()
    s.step = torch.full((len(x), *[1] * (x.dim() - 1)), 2.0 * eps, device=x.device)
    s.loss_steps = torch.zeros(n_iter, len(x), device=x.device)
    s.best_at_check, s.reduced = s.loss_best.clone(), torch.ones(len(x), dtype=torch.bool, device=x.device)
    wrong = logits.max(1)[1] != s.y
    _record(s, wrong, adv, fooled, drop)
    low, high = s.x - eps, s.x + eps
    k, since_check = n_iter_2, 0
    for i in range(n_iter):
        if not len(s.index):
            break
        if drop and len(low) != len(s.x):
            low, high = s.x - eps, s.x + eps
        momentum = 0.75 if i > 0 else 1.0
        with torch.no_grad():
            s.x_adv, s.x_old = _move(s, momentum, eps, norm, low, high), s.x_adv
        logits, value, s.grad = _loss_and_grad(model, s.x_adv, s.y, s.target, loss_fn)
        wrong = logits.max(1)[1] != s.y
        with torch.no_grad():
            s.loss_steps[i] = value
            better = value > s.loss_best
            s.x_best = torch.where(better.view_as(s.step), s.x_adv, s.x_best)
            s.grad_best = torch.where(better.view_as(s.step), s.grad, s.grad_best)
            s.loss_best = torch.where(better, value, s.loss_best)
            since_check += 1
            if since_check == k:
                halve = _oscillated(s.loss_steps, i, k, rho) | (~s.reduced & (s.best_at_check >= s.loss_best))
                s.reduced, s.best_at_check = halve, s.loss_best.clone()
                h = halve.view_as(s.step)
                s.step = torch.where(h, s.step / 2.0, s.step)
                s.x_adv = torch.where(h, s.x_best, s.x_adv)
                s.grad = torch.where(h, s.grad_best, s.grad)
                k, since_check = max(k - size_decr, n_iter_min), 0
        _record(s, wrong, adv, fooled, drop)
    return adv, fooled


def _record(s: _State, wrong: torch.Tensor, adv: torch.Tensor, fooled: torch.Tensor, drop: bool) -> None:
    """Write the iterate of the samples misclassified now into ``adv``/``fooled``; drop them if ``drop``."""
    if not wrong.any():
        return
    adv[s.index[wrong]] = s.x_adv[wrong]
    fooled[s.index[wrong]] = True
    if drop:
        s.keep(~wrong)


def _correct_subset(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(x).max(1)[1] == y).nonzero().flatten()


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int = 0, loss: str = "ce",
         n_iter: int = 100, rho: float = 0.75, drop: bool = True, norm: str = "linf") -> torch.Tensor:
    """APGD (one restart, as AutoAttack's standard version) on the points classified correctly: the adversarial
    images (``x`` where it failed) in the ``eps``-ball of ``norm`` (``"linf"`` or ``"l2"``). Seeds the CPU
    generator with ``seed`` inside a fork, as the official code."""
    adv = x.detach().clone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        todo = _correct_subset(model, x, y)
        if len(todo):
            adv_run, fooled = apgd_run(model, x[todo], y[todo], eps, loss, None, n_iter, rho, drop, norm)
            adv[todo[fooled]] = adv_run[fooled]
    return adv


def apgd_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int = 0,
                  n_target_classes: int = 9, n_iter: int = 100, rho: float = 0.75, drop: bool = True,
                  norm: str = "linf") -> torch.Tensor:
    """APGD-T: targeted DLR APGD against the 2nd, 3rd, ... most likely classes (on the clean image), one target
    after the other, each on the points not fooled yet; one seed for all, drawn once, as the official code.
    ``norm``: ``"linf"`` or ``"l2"``, as :func:`apgd`."""
    adv = x.detach().clone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        todo = _correct_subset(model, x, y)
        for rank in range(2, n_target_classes + 2):
            if not len(todo):
                break
            with torch.no_grad():
                target = model(x[todo]).sort(dim=1)[1][:, -rank]
            adv_run, fooled = apgd_run(model, x[todo], y[todo], eps, "dlr-targeted", target, n_iter, rho, drop,
                                      norm)
            adv[todo[fooled]] = adv_run[fooled]
            todo = todo[~fooled]
    return adv
