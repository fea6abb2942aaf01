"""The sanity checks of :func:`ardir.evaluate`, one function per rule (as AutoAttack's ``checks.py``).

Carlini et al. 2019, "On Evaluating Adversarial Robustness" (arXiv 1902.06705), and AutoAttack's flags: each
rule returns the :class:`~ardir.evaluation.report.SanityFlag` of every failure (none when it passes); the rules
are listed in ``docs/evaluation.md``. :func:`_sanity_flags` runs them all, in the order of that page.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import Runner
from .report import Report, SanityFlag


def _gradient_counts(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Tuple[int, int]:
    """(zero, non-finite): samples whose cross-entropy input gradient is all zero / has NaN or inf."""
    if not len(labels):
        return 0, 0
    with torch.enable_grad():
        x = images.clone().requires_grad_(True)
        logits = model(x)
        if not logits.requires_grad:
            return len(labels), 0
        loss = F.cross_entropy(logits, labels, reduction="sum")
        grad, = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:
        return len(labels), 0
    grad = grad.flatten(1)
    finite = torch.isfinite(grad).all(1)
    zero = finite & (grad.abs().sum(1) == 0)
    return int(zero.sum()), int((~finite).sum())


def _excess(weaker: torch.Tensor, stronger: torch.Tensor) -> Tuple[int, float]:
    """How many more samples survive the ``stronger`` attack than the ``weaker`` one, and the noise level.

    Counts b = correct under ``stronger`` but not ``weaker`` and a = the reverse; excess = b - a; the noise
    is two standard deviations of that difference under "both equally strong" (McNemar): 2 * sqrt(a + b).
    """
    b = int((stronger & ~weaker).sum())
    a = int((weaker & ~stronger).sum())
    return b - a, 2.0 * math.sqrt(a + b)


def _check_ordering(report: Report, adversarial: List[Runner]) -> List[SanityFlag]:
    """natural >= FGSM >= PGD >= AutoAttack (natural holds by construction: attacks count natural errors)."""
    flags = []
    for weak in adversarial:
        for strong in adversarial:
            if not (weak.white_box and strong.white_box):
                continue
            ordered = weak.rank < strong.rank or (weak.family == strong.family and weak.steps < strong.steps)
            if not ordered:
                continue
            excess, noise = _excess(report.correct[weak.key], report.correct[strong.key])
            if excess > noise:
                flags.append(SanityFlag("ordering", (
                    f"{strong.display} leaves {report.accuracy[strong.key]:.2f}% correct, more than the weaker "
                    f"{weak.display} ({report.accuracy[weak.key]:.2f}%): {excess} more samples survive it, beyond "
                    f"noise (±{noise:.1f}). A stronger attack should never do worse; this is a classic sign of "
                    "gradient masking. Try more steps, restarts and other losses before trusting the numbers."),
                    {"weaker": weak.key, "stronger": strong.key, "excess": excess, "noise": noise}))
    return flags


def _check_black_box(report: Report, adversarial: List[Runner]) -> List[SanityFlag]:
    """A black-box attack must not beat the white-box ones."""
    flags = []
    for b in (r for r in adversarial if not r.white_box):
        for w in adversarial:
            if w.white_box and w.rank >= 2:
                excess, noise = _excess(report.correct[b.key], report.correct[w.key])
                if excess > noise:
                    flags.append(SanityFlag("black_box", (
                        f"{b.display}, a black-box attack that never looks at gradients, leaves "
                        f"{report.accuracy[b.key]:.2f}% correct, fewer than the white-box {w.display} "
                        f"({report.accuracy[w.key]:.2f}%). With working gradients the white-box attack should "
                        "be at least as strong: the gradients are probably masked or obfuscated."),
                        {"black_box": b.key, "white_box": w.key, "excess": excess, "noise": noise}))
    return flags


def _check_square(report: Report, runners: Dict[str, Runner],
                  component_masks: Dict[str, Dict[str, torch.Tensor]]) -> List[SanityFlag]:
    """Inside AutoAttack, Square (black box) must not break what APGD and FAB (white box) could not."""
    flags = []
    n = report.n_examples
    for key, parts in component_masks.items():
        if "square" in parts and len(parts) > 1:
            names = list(parts)
            i = names.index("square")
            if i == 0:
                continue
            gained = int((parts[names[i - 1]] & ~parts["square"]).sum())
            if gained > max(1, 0.002 * n):
                flags.append(SanityFlag("black_box", (
                    f"Inside {runners[key].display}, Square (black box) broke {gained} samples "
                    f"({gained * 100 / n:.2f}% of the set) that APGD and FAB (white box) could not. AutoAttack's "
                    "own check flags this: the white-box attacks are failing, probably because of gradient "
                    "masking; consider an adaptive attack."),
                    {"attack": key, "square_only": gained}))
    return flags


def _sweep_masks(report: Report, extra: Dict[str, torch.Tensor],
                 sweep_keys: Dict[float, str]) -> Dict[float, torch.Tensor]:
    """Per eps of the sweep (in increasing order), the per-sample results of the sweep attack."""
    return {e: (report.correct[report.sweep_attack] if sweep_keys[e] == report.sweep_attack
                else extra[sweep_keys[e]]) for e in sorted(report.sweep)}


def _check_eps_rises(report: Report, masks: Dict[float, torch.Tensor], sweep_name: str) -> List[SanityFlag]:
    """Accuracy must not grow with eps."""
    flags = []
    points = list(masks)
    for small, large in zip(points, points[1:]):
        excess, noise = _excess(masks[small], masks[large])
        if excess > noise:
            flags.append(SanityFlag("eps_monotonic", (
                f"Accuracy under {sweep_name} rises from {report.sweep[small]:.2f}% "
                f"at ε = {report._eps_text(small)} to {report.sweep[large]:.2f}% at "
                f"ε = {report._eps_text(large)}. A larger "
                "ε contains every perturbation of a smaller one, so accuracy can only fall: the attack is "
                "failing, typically because of gradient masking."),
                {"eps_small": small, "eps_large": large, "excess": excess, "noise": noise}))
    return flags


def _check_eps_flat(report: Report, masks: Dict[float, torch.Tensor], sweep_name: str) -> List[SanityFlag]:
    """Accuracy must fall, beyond noise, from the smallest eps of the sweep to the largest."""
    points = list(masks)
    low, high = points[0], points[-1]
    drop, noise = _excess(masks[high], masks[low])
    if len(points) > 1 and int(masks[low].sum()) >= 10 and drop <= noise:
        return [SanityFlag("eps_monotonic", (
            f"Accuracy under {sweep_name} does not fall as ε grows: "
            f"{report.sweep[low]:.2f}% at ε = {report._eps_text(low)} and {report.sweep[high]:.2f}% at "
            f"ε = {report._eps_text(high)}. More room to perturb must help a working attack; a flat curve means "
            "the attack is not following the loss, typically because of gradient masking."),
            {"eps_small": low, "eps_large": high, "drop": drop, "noise": noise})]
    return []


def _check_large_eps(report: Report, sweep_name: str) -> List[SanityFlag]:
    """At a large eps the accuracy must reach chance: 0.5 under L-inf by default, sqrt(C*H*W) under L2 (the
    diameter of the [0, 1] image cube, so the ball around any image holds every image)."""
    eps_large = report.sanity.get("large_eps")
    if eps_large is None:
        return []
    p = 1.0 / report.num_classes
    chance, noise = 100 * p, 200 * math.sqrt(p * (1 - p) / max(report.n_examples, 1))
    acc = report.sweep[eps_large]
    if acc > chance + noise:
        return [SanityFlag("large_eps", (
            f"At ε = {report._eps_text(eps_large)}, {sweep_name} still leaves {acc:.2f}% "
            f"correct, above chance ({chance:.1f}%). Such a perturbation can turn any image into a flat grey "
            "one, so a working attack reaches chance or below: the attack is not finding the adversarial "
            "examples that exist, a sign of gradient masking."),
            {"eps": eps_large, "accuracy": acc, "chance": chance, "noise": noise})]
    return []


def _check_gradients(report: Report) -> List[SanityFlag]:
    """The input gradient must be neither zero nor NaN for more than 1 % of the correctly classified samples."""
    flags = []
    g = report.gradient_check
    if g.get("checked"):
        for code, count, what in (("zero_gradients", g["zero"], "exactly zero"),
                                  ("nonfinite_gradients", g["nonfinite"], "NaN or infinite")):
            if count > max(0.01 * g["checked"], 0):
                flags.append(SanityFlag(code, (
                    f"The input gradient of the loss is {what} for {count} of {g['checked']} correctly classified "
                    f"samples ({100 * count / g['checked']:.1f}%). Gradient attacks (FGSM, PGD, CW, APGD, FAB) "
                    "cannot move these points, so their robust accuracy is meaningless there: typical of "
                    "non-differentiable layers (quantisation, thresholding) or saturated outputs. Use BPDA or a "
                    "black-box attack and trust only the worst case."),
                    {"count": count, "checked": g["checked"]}))
    return flags


def _check_randomized(randomized: bool) -> List[SanityFlag]:
    """The model must give the same outputs for the same input."""
    if not randomized:
        return []
    return [SanityFlag("randomized", (
        "The model gives different outputs for the same input (a randomized defense, or dropout/noise left "
        "active in eval mode). Single-sample gradients are then noisy and the accuracy varies between runs: "
        "evaluate with expectation over transformation (AutoAttack's 'rand' version)."))]


def _check_official(official_messages: List[str]) -> List[SanityFlag]:
    """Each distinct warning of the official AutoAttack code, once."""
    return [SanityFlag("autoattack_official", f"The official AutoAttack code warns: {message}")
            for message in dict.fromkeys(official_messages)]


def _sanity_flags(report: Report, runners: Dict[str, Runner], extra: Dict[str, torch.Tensor],
                  component_masks: Dict[str, Dict[str, torch.Tensor]], sweep_keys: Dict[float, str],
                  randomized: bool, official_messages: List[str]) -> List[SanityFlag]:
    """Every failed sanity check, as flags (see docs/evaluation.md for the rules)."""
    adversarial = [runners[k] for k in report.accuracy if k != "natural"]
    sweep_name = runners[next(iter(sweep_keys.values()))].display if sweep_keys else ""
    flags = _check_ordering(report, adversarial)                    # 1. stronger attacks do no worse
    flags += _check_black_box(report, adversarial)                  # 2. black box no better than white box
    flags += _check_square(report, runners, component_masks)
    if report.sweep:                                                # 3. accuracy falls with eps, to chance
        masks = _sweep_masks(report, extra, sweep_keys)
        flags += _check_eps_rises(report, masks, sweep_name)
        flags += _check_eps_flat(report, masks, sweep_name)
    flags += _check_large_eps(report, sweep_name)
    flags += _check_gradients(report)                               # 4. gradients: zero or NaN
    flags += _check_randomized(randomized)
    flags += _check_official(official_messages)
    return flags
