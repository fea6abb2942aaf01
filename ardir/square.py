"""Square Attack (L-inf, margin loss) for ardir's AutoAttack engine: the official algorithm, leaner bookkeeping.

The L2 version is :mod:`ardir.square_l2`; :func:`square` runs either.

Andriushchenko et al., "Square Attack", ECCV 2020 (https://arxiv.org/abs/1912.00049), as AutoAttack runs it:
5000 queries, one restart, ``p_init = 0.8`` and the schedule written for 10000 queries, not rescaled. Start:
vertical stripes ``clamp(x + eps * s)``, ``s`` a random sign per (sample, channel, column). Each iteration draws
one square (side from the schedule, position and per-channel sign shared by the batch), adds it to each active
sample's best point, and keeps the new point where the margin loss fell or the sample became misclassified.
A sample leaves the batch once its margin is not positive (the official code does the same).

The random draws are the official ones, in the same order, from the global CPU generator seeded with ``seed``,
and they do not depend on the batch, so a sample's path is the official one. What differs is bookkeeping: the
active samples are kept in compact tensors (re-indexed only when one succeeds) instead of gathered and
scattered at every query, the blends are ``torch.where`` (exactly the official ``m * a + (1 - m) * b``), and a
proposal the box leaves equal to a sample's best point is not sent to the model (on a Fashion-MNIST student
about a quarter of the queries: its pixels were already on the square's side, or at 0 or 1), since its margin is
the known best one and the official rule keeps the point either way (``m_new < m_min`` fails, and the margin of
an active point is positive, so ``m_new <= 0`` fails too). The moved rows are queried as a batch of varying
size, so on a GPU a path is the official one up to float rounding.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn

SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
            (8000, 256))
"""(last iteration, divisor of p_init): p is ``p_init / divisor`` up to that iteration (official, for 10000)."""


def p_selection(p_init: float, it: int) -> float:
    """The fraction of pixels the square covers at iteration ``it`` (official schedule, not rescaled)."""
    for last, divisor in SCHEDULE:
        if it <= last:
            return p_init / divisor
    return p_init / 512


def margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample margin ``z_y - max_{i != y} z_i`` (the loss Square minimises; <= 0 means misclassified)."""
    logits = model(x)
    z_y = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], -float("inf")).max(dim=1)[0]
    return z_y - others


def _signs(shape) -> torch.Tensor:
    return torch.sign(2 * torch.rand(shape) - 1)


def accept(m_new: torch.Tensor, m_min: torch.Tensor, x_new: torch.Tensor, best: torch.Tensor
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official acceptance rule of a query: a proposal replaces a point's best when it lowers the margin or
    fools the model; returns the new ``(margin, best point)`` (N,), (N, C, H, W)."""
    improved = (m_new < m_min) | (m_new <= 0.0)
    return torch.where(improved, m_new, m_min), torch.where(improved.view(-1, 1, 1, 1), x_new, best)


def _margin_of_moved(model: nn.Module, x_new: torch.Tensor, best: torch.Tensor, y: torch.Tensor,
                     m_min: torch.Tensor) -> torch.Tensor:
    """The margin at ``x_new`` (N,), queried only for the rows the square moved: where the box leaves a point's
    window where it was (its pixels already on the square's side of the ball, or at 0 or 1), the proposal is its
    best point, whose margin ``m_min`` is known, and :func:`accept` keeps the point either way. This assumes a
    deterministic model (as every shortcut of the ardir engine does): a randomized one could answer a repeated query
    differently."""
    moved = (x_new != best).flatten(1).any(1).nonzero().flatten()  # one host synchronisation
    with torch.no_grad():
        if len(moved) == len(x_new):
            return margin(model, x_new, y)
        m_new = m_min.clone()
        if len(moved):
            m_new[moved] = margin(model, x_new[moved], y[moved])
    return m_new


def square_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n_queries: int = 5000,
               p_init: float = 0.8) -> Tuple[torch.Tensor, torch.Tensor]:
    """One Square restart on ``x`` (N, C, H, W): ``(best points, margin)``; margin <= 0 where it succeeded."""
    n, c, h, w = x.shape
    device = x.device
    x_best = torch.clamp(x + eps * _signs([n, c, 1, w]).to(device), 0.0, 1.0)
    with torch.no_grad():
        margin_min = margin(model, x_best, y)
    if (margin_min < 0.0).all():
        return x_best, margin_min
    n_features = c * h * w
    active = (margin_min > 0.0).nonzero().flatten()
    xa, ya, best, m_min = x[active], y[active], x_best[active], margin_min[active]
    low, high = xa - eps, xa + eps
    for i_iter in range(n_queries):
        side = min(max(int(round(math.sqrt(p_selection(p_init, i_iter) * n_features / c))), 1), min(h, w))
        vh = int((h - side) * torch.rand([1]))
        vw = int((w - side) * torch.rand([1]))
        delta = torch.zeros([c, h, w])
        delta[:, vh:vh + side, vw:vw + side] = 2.0 * eps * _signs([c, 1, 1])
        x_new = torch.clamp(torch.min(torch.max(best + delta.to(device), low), high), 0.0, 1.0)
        m_new = _margin_of_moved(model, x_new, best, ya, m_min)
        m_min, best = accept(m_new, m_min, x_new, best)
        done = m_min <= 0.0
        if done.any():
            margin_min[active] = m_min
            x_best[active] = best
            if bool((margin_min <= 0.0).all()):
                return x_best, margin_min
            keep = m_min > 0.0
            active, xa, ya, best, m_min, low, high = (t[keep] for t in (active, xa, ya, best, m_min, low, high))
    margin_min[active] = m_min
    x_best[active] = best
    return x_best, margin_min


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int = 0, n_queries: int = 5000,
           p_init: float = 0.8, norm: str = "linf") -> torch.Tensor:
    """Square Attack on the points classified correctly: adversarial images (``x`` where it failed) in the
    ``eps``-ball of ``norm`` (``"linf"``, or ``"l2"``: :func:`ardir.square_l2.square_l2_run`). Seeds the CPU
    generator with ``seed`` inside a fork, as the official code seeds it before its run."""
    from .square_l2 import square_l2_run  # it imports this module's helpers

    run = square_l2_run if norm == "l2" else square_run
    adv = x.detach().clone()
    with torch.no_grad():
        todo = (model(x).max(1)[1] == y).nonzero().flatten()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if len(todo):
            best, _ = run(model, x[todo], y[todo], eps, n_queries, p_init)
            with torch.no_grad():
                fooled = model(best).max(1)[1] != y[todo]
            adv[todo[fooled]] = best[fooled]
    return adv
