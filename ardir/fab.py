"""Targeted FAB (L-inf and L2) for ardir's AutoAttack engine: the official algorithm, with finished points dropped.

Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary attack", ICML 2020
(https://arxiv.org/abs/1907.02044), as AutoAttack's standard version runs it: 100 iterations, one restart (so
no random start), ``alpha_max = 0.1``, ``eta = 1.05``, ``beta = 0.9``, against the 2nd .. 10th most likely
classes one after the other. Each iteration linearises ``z_t - z_y`` at the current point, projects both the
current point and the original image onto that hyperplane inside the box [0, 1] (the smallest step in the
threat model's norm: :func:`project_linf` or :func:`project_l2`), moves to a convex combination of the two
projections (weight of the original at most ``alpha_max``), overshooting by ``eta``; when the new point is
adversarial it is kept if closer than the best so far and the point is pulled back towards the original by
``beta``. Under L2 every size and distance (the weight of the two projections, the
distance to the original) is the L2 norm, as in the official code; nothing else changes.

Everything is per sample. A sample whose best adversarial point is already within ``eps`` is a success for
AutoAttack (later points are only closer), so :func:`fab_run` drops it then (``drop=False`` runs all, as the
official code). The forward pass that gives the next iteration's gradient also gives the "is it adversarial"
prediction the official code makes with a second forward pass; the gradients of the points found adversarial,
and so pulled back, are then recomputed. When the last iteration pulled back more than a third of the points,
the next one follows the official order instead (test, pull back, then one gradient pass for all), which is then
cheaper. Either way each gradient is taken at the same point as the official code's.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


TEST_FIRST_ABOVE = 1 / 3
"""Share of points pulled back above which the next iteration tests first (the official order): a forward pass
costs about a third of a forward and backward pass, so beyond it recomputing their gradients costs more."""


def project_linf(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: the L-inf-smallest ``d`` with ``w . (t + d) = b`` and ``t + d`` in [0, 1] (the box corner in the
    right direction when the hyperplane is out of reach). ``t``, ``w``: (R, D); ``b``: (R,)."""
    side = 2 * ((w * t).sum(1) - b >= 0) - 1
    w, b = w * side[:, None], b * side
    up = (w < 0).float()                      # move each coordinate towards 1 where w < 0, else towards 0
    nonzero = (w != 0).float()
    full = (up - t) * nonzero                 # the whole way to that corner
    room = up - t * (2 * up - 1)              # how far the corner is, per coordinate
    order = torch.argsort(room, dim=1)
    gap = b - (w * t).sum(1)
    full_sum = (w * full).sum(1)
    desc = order.flip((1,))
    w_desc = w.gather(1, desc)
    slope = torch.cumsum(w_desc.abs(), dim=1)            # |w| summed over the coordinates not yet saturated
    reach = torch.cumsum(-w_desc * full.gather(1, desc), dim=1) + full_sum[:, None]
    room_desc = room.gather(1, desc)
    everywhere = gap - (reach[:, -1] - slope[:, -1] * room.gather(1, order[:, :1])[:, 0]) > 0
    search = (gap - full_sum > 0) & ~everywhere
    low = torch.zeros_like(gap)
    high = torch.full_like(gap, w.shape[1] - 1)
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((low + high) / 2)
        j = mid.long()[:, None]
        ok = gap - (reach.gather(1, j) - slope.gather(1, j) * room_desc.gather(1, j))[:, 0] > 0
        low, high = torch.where(ok, mid, low), torch.where(ok, high, mid)
    j = low.long()[:, None]
    lam = torch.clamp_min((gap - reach.gather(1, j)[:, 0]) / (-slope.gather(1, j)[:, 0]), min=0)[:, None]
    lam_all = torch.clamp_min((gap - reach[:, -1]) / (-slope[:, -1]), min=0)[:, None]
    searched = torch.min(lam, full) * up + torch.max(-lam, full) * (1 - up)
    d = torch.where(everywhere[:, None], (2 * up - 1) * lam_all, torch.where(search[:, None], searched, full))
    return d * nonzero


def project_l2(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: the L2-smallest ``d`` with ``w . (t + d) = b`` and ``t + d`` in [0, 1] (the official
    ``projection_l2``; ``d = 0`` on the coordinates where ``|w| < 1e-8``). ``t``, ``w``: (R, D); ``b``: (R,).

    Moving along ``-lam * w`` (after flipping ``w`` so the hyperplane lies that way), coordinate ``i`` reaches the
    box at ``lam = r_i`` and stays there; the distance covered is piecewise linear in ``lam`` with the ``r_i``
    as knots, so a binary search over the sorted ``r`` finds the segment where it reaches the hyperplane."""
    c = (w * t).sum(1) - b
    side = 2 * (c >= 0) - 1
    w, c = w * side[:, None], c * side
    live = w.abs() > 1e-8                     # coordinates with (almost) no weight never move
    r = torch.max(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12).masked_fill(w.abs() < 1e-8, 1e12)
    r = torch.where(r == -1e12, -r, r)        # official: a coordinate clamped at -1e12 never reaches the box
    r_sorted, order = torch.sort(r, dim=1)
    r_next = F.pad(r_sorted[:, 1:], (0, 1))
    r_sorted, r_next = r_sorted.masked_fill(r_sorted == 1e12, 0), r_next.masked_fill(r_next == 1e12, 0)
    w2 = (w ** 2).gather(1, order)
    w2_total = w2.sum(dim=1, keepdim=True)
    w2_left = w2_total - torch.cumsum(w2, dim=1)     # squared weight of the coordinates not yet at the box
    d = -(r * w) * live.float()               # every coordinate at its box edge
    start = -w2_total * r_sorted[:, 0:1]
    reach = torch.cat((start, torch.cumsum((-r_next + r_sorted) * w2_left, dim=1) + start), 1)
    inside = reach[:, 0] + c < 0              # the hyperplane is met before any coordinate reaches the box
    beyond = (d * w).sum(dim=1) + c > 0       # not met even at the box corner: the corner is the answer
    search = ~(inside | beyond)
    low = torch.zeros_like(c)
    high = torch.full_like(c, w.shape[1] - 1)
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((low + high) / 2)
        ok = reach.gather(1, mid.long()[:, None])[:, 0] + c > 0
        low, high = torch.where(ok, mid, low), torch.where(ok, high, mid)
    j = low.long()[:, None]
    left = w2_left.gather(1, j)[:, 0]
    lam = (reach.gather(1, j)[:, 0] + c) / left + r_sorted.gather(1, j)[:, 0]
    lam = torch.where(left == 0, torch.zeros_like(lam), lam)[:, None]
    at_box = (lam > r).float()
    searched = d * at_box - lam * w * (1 - at_box)
    free = -(c / w2_total[:, 0])[:, None] * w
    d = torch.where(inside[:, None], free, torch.where(search[:, None], searched, d))
    return d * live.float()


PROJECTIONS = {"linf": project_linf, "l2": project_l2}


def distance(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row size of ``delta`` (N, ...) in ``norm``: ``max |delta|`` (L-inf) or ``||delta||_2`` (L2)."""
    flat = delta.flatten(1)
    return (flat ** 2).sum(dim=-1).sqrt() if norm == "l2" else flat.abs().max(dim=1)[0]


def _target_gap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at ``x``, ``f = z_t - z_y`` per sample and its gradient with respect to ``x``."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        logits = model(x)
        f = -(logits.gather(1, y[:, None])[:, 0] - logits.gather(1, target[:, None])[:, 0])
        grad, = torch.autograd.grad(f.sum(), [x])
    return logits.detach(), f.detach(), grad.detach()


def _step(x1: torch.Tensor, x0: torch.Tensor, f: torch.Tensor, g: torch.Tensor, alpha_max: float,
          eta: float, norm: str = "linf") -> torch.Tensor:
    """One FAB move from ``x1`` (original ``x0``) given ``f`` and its gradient ``g`` at ``x1``."""
    bs = len(x1)
    w = g.reshape(bs, -1)
    b = -f + (g * x1).reshape(bs, -1).sum(-1)
    d = PROJECTIONS[norm](torch.cat((x1.reshape(bs, -1), x0.reshape(bs, -1)), 0), torch.cat((w, w), 0),
                          torch.cat((b, b), 0))
    size = torch.clamp_min(distance(d, norm)[:, None], 1e-8).view(-1, *[1] * (x1.dim() - 1))
    d1, d2 = d[:bs].reshape(x1.shape), d[bs:].reshape(x1.shape)
    a1, a2 = size[:bs], size[bs:]
    alpha = torch.clamp(torch.clamp_min(a1 / (a1 + a2), 0.0), max=alpha_max)
    return ((x1 + eta * d1) * (1 - alpha) + (x0 + d2 * eta) * alpha).clamp(0.0, 1.0)


def fab_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, eps: float,
            n_iter: int = 100, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
            drop: bool = True, norm: str = "linf") -> Tuple[torch.Tensor, torch.Tensor]:
    """One targeted FAB run (no random start): ``(adv, dist)`` per sample, ``dist`` the distance in ``norm``
    (``"linf"`` or ``"l2"``) of the closest adversarial point found (1e10 if none; ``adv`` is ``x`` there).
    ``drop`` stops a sample once ``dist <= eps``, so its ``adv`` is then the first such point, not the closest."""
    n = len(x)
    adv, dist = x.detach().clone(), torch.full((n,), 1e10, device=x.device)
    index, x0, ya, ta = torch.arange(n, device=x.device), x.detach(), y, target
    x1, best, res = x0.clone(), x0.clone(), dist.clone()
    _, f, g = _target_gap(model, x1, ya, ta)
    test_first = False
    for it in range(n_iter):
        if not len(index):
            break
        x1 = _step(x1, x0, f, g, alpha_max, eta, norm)
        last = it == n_iter - 1
        if test_first or last:
            with torch.no_grad():
                logits = model(x1)
        else:
            logits, f, g = _target_gap(model, x1, ya, ta)
        hit = logits.max(1)[1] != ya
        n_hit = int(hit.sum())
        if n_hit:
            t = distance(x1 - x0, norm)
            closer = hit & (t < res)
            best = torch.where(closer.view(-1, *[1] * (x.dim() - 1)), x1, best)
            res = torch.where(closer, t, res)
            x1 = torch.where(hit.view(-1, *[1] * (x.dim() - 1)), x0 + (x1 - x0) * beta, x1)
            if not (test_first or last):
                _, f_hit, g_hit = _target_gap(model, x1[hit], ya[hit], ta[hit])
                f, g = f.clone(), g.clone()
                f[hit], g[hit] = f_hit, g_hit
            if drop:
                adv[index], dist[index] = best, res
                keep = res > eps
                index, x0, ya, ta, x1, best, res, f, g = (v[keep] for v in (index, x0, ya, ta, x1, best, res, f, g))
        if test_first and not last and len(index):
            _, f, g = _target_gap(model, x1, ya, ta)
        test_first = n_hit > TEST_FIRST_ABOVE * len(hit)
    adv[index], dist[index] = best, res
    return adv, dist


def fab_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int = 0,
                 n_target_classes: int = 9, n_iter: int = 100, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9, drop: bool = True, norm: str = "linf") -> torch.Tensor:
    """FAB-T as AutoAttack runs it: against the 2nd, 3rd, ... most likely classes (on the clean image), each on
    the points not fooled yet (an adversarial point within ``eps`` in ``norm``, ``"linf"`` or ``"l2"``);
    adversarial images, ``x`` where it failed."""
    adv = x.detach().clone()
    with torch.no_grad():
        todo = (model(x).max(1)[1] == y).nonzero().flatten()
    for rank in range(2, n_target_classes + 2):
        if not len(todo):
            break
        with torch.no_grad():
            target = model(x[todo]).sort(dim=-1)[1][:, -rank]
        adv_run, dist = fab_run(model, x[todo], y[todo], target, eps, n_iter, alpha_max, eta, beta, drop,
                                 norm)
        with torch.no_grad():
            fooled = (model(adv_run).max(1)[1] != y[todo]) & (dist <= eps)
        adv[todo[fooled]] = adv_run[fooled]
        todo = todo[~fooled]
    return adv
