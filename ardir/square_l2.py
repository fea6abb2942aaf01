"""Square Attack under L2 (margin loss) for ardir's AutoAttack engine: the official algorithm, compact bookkeeping.

Andriushchenko et al., "Square Attack", ECCV 2020 (https://arxiv.org/abs/1912.00049), L2 version, as AutoAttack
runs it (5000 queries, one restart, ``p_init = 0.8``, the schedule for 10000 queries, see :mod:`ardir.square`).

Start: the image is tiled with windows of side ``h // 5``; each window gets the centre-weighted pattern of
:func:`window` (positive in one half, negative in the other) times a random sign per (sample, channel); the sum,
scaled to length ``eps``, is added and the result clipped to [0, 1]. Each iteration picks two windows of side
``s`` (odd, at least 3, from the schedule), the same for the whole batch: the perturbation in the second is
removed and its L2 mass moved into the first, where a fresh pattern with a random sign per (sample, channel) is
added to the old content, rescaled so that the whole perturbation keeps length ``eps`` (the budget left
unused, spread over the channels, plus what the two windows held). The new point, ``x + eps * delta / ||delta||``
clipped to [0, 1], is kept where the margin fell or the sample became misclassified; a sample leaves the batch
once its margin is not positive.

Unlike the L-inf version, a per-iteration draw depends on the batch: the signs are drawn for the active samples
only (``rand(n_active, C, 1, 1)``). The active samples here are the official ones in the same order (those with
a positive margin), so the draws are the official ones and so is every path (up to float rounding).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn

from .apgd import l2_norm as _l2  # the official arithmetic (sum of squares, sqrt), shared with APGD
from .square import _signs, accept, margin, p_selection


def _window_norms(v: torch.Tensor) -> torch.Tensor:
    """Per (sample, channel) L2 norm of ``v`` (N, C, h, w) over its last two axes, shaped (N, C, 1, 1)."""
    return (v ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()


def _rectangle(rows: int, cols: int) -> torch.Tensor:
    """(rows, cols), unit L2 norm: nested rectangles around the centre, ring ``k`` (from 0) adding ``1 / (k+1)^2``,
    so the mass peaks at the centre (the official ``eta_rectangles``)."""
    delta = torch.zeros([rows, cols])
    top, left = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        delta[max(top, 0):min(top + 2 * k + 1, rows), max(0, left):min(left + 2 * k + 1, cols)] += \
            1.0 / torch.tensor([[float(k + 1)]]) ** 2
        top, left = top - 1, left - 1
    return delta / (delta ** 2).sum(dim=(0, 1), keepdim=True).sqrt()


def window(side: int) -> torch.Tensor:
    """The (side, side) pattern of a window, unit L2 norm: a centre-weighted rectangle in the top half, its
    negative in the bottom half, transposed with probability 1/2 (one ``torch.rand([1])``, as the official code)."""
    delta = torch.zeros([side, side])
    delta[:side // 2] = _rectangle(side // 2, side)
    delta[side // 2:] = -1.0 * _rectangle(side - side // 2, side)
    delta /= (delta ** 2).sum(dim=(0, 1), keepdim=True).sqrt()
    if torch.rand([1]) > 0.5:
        delta = delta.permute([1, 0])
    return delta


def _start(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The official initial point: windows of side ``h // 5`` tiling the image from an offset of
    ``(h - 5 * side) // 2``, each a :func:`window` pattern with a random sign per (sample, channel); the sum is
    scaled to length ``eps`` and the point clipped to [0, 1]. The draws per window: the pattern, then the signs."""
    n, c, h, w = x.shape
    delta = torch.zeros_like(x)
    side = h // 5
    offset = (h - side * 5) // 2
    for row in range(h // side):
        for col in range(w // side):
            vh, vw = offset + row * side, offset + col * side  # may run past the edge: that window adds nothing
            delta[:, :, vh:vh + side, vw:vw + side] += window(side).view(1, 1, side, side).to(x.device) * \
                _signs([n, c, 1, 1]).to(x.device)
    return torch.clamp(x + delta / (_l2(delta) + 1e-12) * eps, 0.0, 1.0)


def _side(p_init: float, it: int, c: int, h: int, w: int) -> int:
    """The window side at iteration ``it``: from the schedule, at least 3, odd (so the pattern has a centre),
    at most the image."""
    n_features = c * h * w  # the official rounding: p * n_features / c, not p * h * w
    side = max(int(round(math.sqrt(p_selection(p_init, it) * n_features / c))), 3)
    if side % 2 == 0:
        side += 1
    return min(side, min(h, w))


def _proposal(xa: torch.Tensor, best: torch.Tensor, eps: float, side: int) -> torch.Tensor:
    """The next candidate of every active sample (official update and draw order: the two windows' corners, the
    pattern, the signs)."""
    n, c, h, w = xa.shape
    delta = best - xa
    vh, vw = int((h - side) * torch.rand([1])), int((w - side) * torch.rand([1]))
    vh2, vw2 = int((h - side) * torch.rand([1])), int((w - side) * torch.rand([1]))
    both = torch.zeros_like(xa)
    both[:, :, vh:vh + side, vw:vw + side] = 1.0
    both[:, :, vh2:vh2 + side, vw2:vw2 + side] = 1.0
    old = delta[:, :, vh:vh + side, vw:vw + side]
    mass = _window_norms(delta * both) ** 2          # what the two windows hold, per channel
    unused = torch.clamp_min(torch.full_like(_l2(delta), eps) ** 2 - _l2(delta) ** 2, 0.0) / c
    # in place into a contiguous tensor, as the official code: a transposed pattern would otherwise give ``new``
    # transposed strides, and its norm below would be summed in another order (a different last bit)
    new = torch.ones([n, c, side, side], device=xa.device)
    new *= window(side).view(1, 1, side, side).to(xa.device) * _signs([n, c, 1, 1]).to(xa.device)
    new += old / (1e-12 + _window_norms(old))
    new = new / (1e-12 + _window_norms(new)) * (unused + mass).sqrt()
    delta[:, :, vh2:vh2 + side, vw2:vw2 + side] = 0.0
    delta[:, :, vh:vh + side, vw:vw + side] = new
    return torch.clamp(xa + delta / (_l2(delta) + 1e-12) * eps, 0.0, 1.0)


def square_l2_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n_queries: int = 5000,
                  p_init: float = 0.8) -> Tuple[torch.Tensor, torch.Tensor]:
    """One L2 Square restart on ``x`` (N, C, H, W): ``(best points, margin)``; margin <= 0 where it succeeded."""
    _, c, h, w = x.shape
    x_best = _start(x, eps)
    with torch.no_grad():
        margin_min = margin(model, x_best, y)
    if (margin_min < 0.0).all():
        return x_best, margin_min
    active = (margin_min > 0.0).nonzero().flatten()
    xa, ya, best, m_min = x[active], y[active], x_best[active], margin_min[active]
    for i_iter in range(n_queries):
        x_new = _proposal(xa, best, eps, _side(p_init, i_iter, c, h, w))
        with torch.no_grad():
            m_new = margin(model, x_new, ya)
        m_min, best = accept(m_new, m_min, x_new, best)
        done = m_min <= 0.0
        if done.any():
            margin_min[active], x_best[active] = m_min, best
            if bool((margin_min <= 0.0).all()):
                return x_best, margin_min
            keep = ~done
            active, xa, ya, best, m_min = (t[keep] for t in (active, xa, ya, best, m_min))
    margin_min[active], x_best[active] = m_min, best
    return x_best, margin_min
