"""Robust-accuracy evaluation a paper can cite: natural, FGSM, PGD, CW-inf and AutoAttack, with sanity checks.

One call::

    report = ardir.evaluate(model, test_loader, eps=8/255)   # natural, fgsm, pgd20, cw30, autoattack
    print(report.to_markdown())
    report.save("results/resnet18_ardir")                    # .md and .json (RobustBench-style)

Protocol (the one of ARD, RSLAD, IAD and RobustBench): L-inf threat model, images in [0, 1] (normalisation
belongs inside the model); every attack runs only on the points the model classifies correctly, so a sample
counts as robust to an attack only if it is classified correctly both naturally and after the attack, and
the *worst case* is the per-sample AND over every attack. The model is evaluated in eval mode and every
module's train/eval flag is restored afterwards; its parameters are not touched (no ``.grad`` is left).

Attack names form a small grammar (see :func:`list_attacks`):

=============  =====================================================================================
natural        no attack (always evaluated, it is the base of every other number)
fgsm           one signed-gradient step of size eps on the cross-entropy, no random start
pgdN           N steps of PGD on the cross-entropy, uniform random start, step ``step_size``
cwN            CW-inf: N steps of PGD on the CW margin ``max_{j!=y} z_j - z_y``, uniform random start
autoattack     AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square (see :mod:`ardir.autoattack`)
apgd-ce, ...   one AutoAttack component alone: apgd-ce, apgd-dlr, apgd-t, fab-t, square
=============  =====================================================================================

``step_size`` defaults to ``eps / 4``, i.e. 2/255 at the standard eps = 8/255.

Sanity checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness", arXiv 1902.06705; AutoAttack's
flags): every failed check adds a :class:`SanityFlag` to ``report.flags`` and issues an
:class:`EvaluationWarning` in plain language. See ``docs/evaluation.md`` for the exact rules.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from ._checks import batch_tensors, check_batch, eps_value, label_range, logits_of, one_of, pixel_range, positive
from .attacks import PGD, model_mode
from .autoattack import COMPONENTS, STANDARD, AutoAttack, still_correct

__all__ = ["evaluate", "Report", "SanityFlag", "EvaluationWarning", "list_attacks", "parse_attack",
           "DEFAULT_ATTACKS", "MASKING_CODES"]

DEFAULT_ATTACKS = ("natural", "fgsm", "pgd20", "cw30", "autoattack")
"""The attacks of :func:`evaluate` by default: the table of ARD, RSLAD and IAD plus AutoAttack."""

SUBSETS = ("first", "random")
STATE_FORMAT = "ardir-evaluation-state/1"

MASKING_CODES = frozenset({"ordering", "eps_monotonic", "large_eps", "black_box", "zero_gradients",
                           "nonfinite_gradients", "randomized", "autoattack_official"})
"""Flag codes that mean the robust accuracy may be overestimated (see :attr:`Report.masking_suspected`)."""


class EvaluationWarning(UserWarning):
    """A sanity check of :func:`evaluate` failed: the robust accuracy may be overestimated."""


@dataclass
class SanityFlag:
    """One failed sanity check: ``code`` (e.g. ``"zero_gradients"``), a plain-language ``message``, the numbers."""
    code: str
    message: str
    details: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ attack grammar
@dataclass
class _Context:
    model: nn.Module
    eps: float
    step_size: float
    num_classes: int
    engine: str


class _Runner:
    """An attack ready to run: ``run(images, labels, seed) -> (correct (N,), {component: correct (N,)})``.

    Runners made of components (AutoAttack) also take ``done`` and ``on_component`` to resume between components.

    ``rank`` orders attacks by expected strength (natural 0 < FGSM 1 < iterative 2 < AutoAttack 3); attacks of
    one ``family`` are also ordered by ``steps``. ``white_box`` is False for a black-box attack (Square).
    """
    rank = 2
    family = ""
    steps = 0
    white_box = True

    def __init__(self, key: str, display: str, description: str, settings: Dict[str, Any]):
        self.key, self.display, self.description, self.settings = key, display, description, settings

    def run(self, images: torch.Tensor, labels: torch.Tensor, seed: int, done=None,
            on_component=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError


class _Natural(_Runner):
    rank = 0
    family = "natural"

    def __init__(self, model: nn.Module):
        super().__init__("natural", "Natural", "no attack", {})
        self.model = model

    def run(self, images, labels, seed, done=None, on_component=None):
        with torch.no_grad():
            return self.model(images).argmax(1) == labels, {}


class _PGDRunner(_Runner):
    def __init__(self, key: str, display: str, ctx: _Context, steps: int, loss: str, step_size: float,
                 random_start: str, rank: int, family: str):
        self.attack = PGD(ctx.model, eps=ctx.eps, step_size=step_size, steps=steps, loss=loss,
                          random_start=random_start)
        self.model, self.eps = ctx.model, ctx.eps
        self.rank, self.family, self.steps = rank, family, steps
        loss_name = {"ce": "cross-entropy", "cw": "CW margin"}[loss]
        start = "uniform random start" if random_start == "uniform" else "no random start"
        description = (f"{loss_name}, {steps} step{'s' if steps > 1 else ''} of {_fmt_eps(step_size)}, {start}")
        super().__init__(key, display, description,
                         {"eps": ctx.eps, "loss": loss, "steps": steps, "step_size": step_size,
                          "random_start": random_start, "restarts": 1, "implementation": "ardir.PGD"})

    def run(self, images, labels, seed, done=None, on_component=None):
        torch.manual_seed(seed)
        adv = self.attack(images, labels)
        return still_correct(self.model, images, adv, labels, self.eps), {}


class _AutoAttackRunner(_Runner):
    rank = 3
    family = "autoattack"

    def __init__(self, key: str, display: str, ctx: _Context, components: Sequence[str]):
        self.attack = AutoAttack(ctx.model, eps=ctx.eps, num_classes=ctx.num_classes, attacks=components,
                                 engine=ctx.engine)
        self.components = list(components)
        if len(components) == 1:
            self.rank, self.family = 2, components[0]
            self.white_box = components[0] != "square"
            description = ", ".join(f"{k} {v}" for k, v in self.attack.settings["components"][components[0]].items())
        else:
            description = "standard: APGD-CE, APGD-T, FAB-T, Square"
        description += f" ({ctx.engine} engine)"
        super().__init__(key, display, description, {"eps": ctx.eps, **self.attack.settings})

    def run(self, images, labels, seed, done=None, on_component=None):
        robust, per_component = self.attack.run(images, labels, seed, done, on_component)
        return robust, per_component if len(self.components) > 1 else {}


@dataclass(frozen=True)
class AttackSpec:
    """One rule of the attack grammar: names matching ``pattern`` (a regex, matched in full on the lower-cased
    name) are built by ``build(match, context)``; ``examples`` are shown in errors and :func:`list_attacks`."""
    pattern: str
    examples: Tuple[str, ...]
    summary: str
    build: Callable[[re.Match, _Context], _Runner]


_SPECS: List[AttackSpec] = []


def register_attack(pattern: str, examples: Sequence[str], summary: str):
    """Decorator adding a rule ``build(match, context) -> runner`` to the attack grammar (internal: the context
    holds the model, eps, step size, number of classes and engine; the runner is a ``_Runner``)."""
    def add(build):
        _SPECS.append(AttackSpec(pattern, tuple(examples), summary, build))
        return build
    return add


def list_attacks() -> List[str]:
    """Example names the grammar accepts (``pgdN`` and ``cwN`` take any number of steps N >= 1)."""
    return [example for spec in _SPECS for example in spec.examples]


def parse_attack(name: str) -> Tuple[AttackSpec, re.Match]:
    """The rule and regex match of an attack name; ``ValueError`` with the closest valid names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"attack names are strings such as 'pgd20', got {name!r}")
    normal = name.strip().lower().replace("_", "-")
    for spec in _SPECS:
        match = re.fullmatch(spec.pattern, normal)
        if match:
            return spec, match
    one_of("attacks", name, list_attacks(), "attack (pgdN and cwN take any N >= 1)")
    raise AssertionError("unreachable")


def _steps(match: re.Match, name: str) -> int:
    steps = int(match[1])
    if steps < 1:
        raise ValueError(f"{name}{steps}: the number of steps must be at least 1")
    return steps


@register_attack(r"natural|clean", ("natural",), "no attack")
def _build_natural(match, ctx):
    return _Natural(ctx.model)


@register_attack(r"fgsm", ("fgsm",), "one step of size eps on the cross-entropy (Goodfellow et al. 2015)")
def _build_fgsm(match, ctx):
    return _PGDRunner("fgsm", "FGSM", ctx, steps=1, loss="ce", step_size=ctx.eps, random_start="none", rank=1,
                      family="fgsm")


@register_attack(r"pgd-?(\d+)", ("pgd20", "pgd100"), "PGD on the cross-entropy, N steps (Madry et al. 2018)")
def _build_pgd(match, ctx):
    steps = _steps(match, "pgd")
    return _PGDRunner(f"pgd{steps}", f"PGD-{steps}", ctx, steps=steps, loss="ce", step_size=ctx.step_size,
                      random_start="uniform", rank=2, family="pgd")


@register_attack(r"cw-?(\d+)", ("cw30",), "CW-inf: PGD on the CW margin loss, N steps (Carlini & Wagner 2017)")
def _build_cw(match, ctx):
    steps = _steps(match, "cw")
    return _PGDRunner(f"cw{steps}", f"CW∞-{steps}", ctx, steps=steps, loss="cw", step_size=ctx.step_size,
                      random_start="uniform", rank=2, family="cw")


@register_attack(r"autoattack|aa", ("autoattack",), "AutoAttack, standard version (Croce & Hein 2020)")
def _build_autoattack(match, ctx):
    return _AutoAttackRunner("autoattack", "AutoAttack", ctx, STANDARD)


_COMPONENT_NAMES = {"apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T", "fab-t": "FAB-T",
                    "square": "Square"}


@register_attack(r"(apgd-ce|apgd-dlr|apgd-t|fab-t|square)", COMPONENTS, "one AutoAttack component alone")
def _build_component(match, ctx):
    return _AutoAttackRunner(match[1], _COMPONENT_NAMES[match[1]], ctx, [match[1]])


# ---------------------------------------------------------------------------------------------- helpers
def _fmt_eps(value: float) -> str:
    """8/255 for multiples of 1/255, else a short decimal."""
    k = value * 255
    if abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f"{round(k)}/255"
    return f"{value:.4g}"


def _device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _percent(mask: torch.Tensor) -> float:
    """Share of True in a bool mask, in %, computed exactly (64.0, not 63.99999856)."""
    return 100.0 * int(mask.sum()) / len(mask)


def _bits(mask: torch.Tensor) -> str:
    return "".join("1" if b else "0" for b in mask.tolist())


def _unbits(text: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def _derive_seed(seed: int, key: str, start: int) -> int:
    """A seed per (attack, batch), so a resumed run gives the same numbers as an uninterrupted one."""
    return zlib.crc32(f"{seed}:{key}:{start}".encode()) & 0x7FFFFFFF


def _model_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha1()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            t = tensor.detach()
            stats = (t.double().sum().item(), t.double().abs().sum().item()) if t.is_floating_point() or \
                t.dtype in (torch.int64, torch.int32) else (0.0, 0.0)
            digest.update(f"{name}{tuple(t.shape)}{stats[0]:.10g}{stats[1]:.10g}".encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters do not require grad during the evaluation (faster, and no .grad left by FAB's backward)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _forked_rng() -> Iterator[None]:
    """The attacks reseed torch's global RNG; the caller's RNG state is restored afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` via a temporary file, fsync and ``os.replace`` (ardir.checkpoint's helper)."""
    from .checkpoint import atomic_write_text
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(text, path)


def _excess(weaker: torch.Tensor, stronger: torch.Tensor) -> Tuple[int, float]:
    """How many more samples survive the ``stronger`` attack than the ``weaker`` one, and the noise level.

    Counts b = correct under ``stronger`` but not ``weaker`` and a = the reverse; excess = b - a; the noise
    is two standard deviations of that difference under "both equally strong" (McNemar): 2 * sqrt(a + b).
    """
    b = int((stronger & ~weaker).sum())
    a = int((weaker & ~stronger).sum())
    return b - a, 2.0 * math.sqrt(a + b)


# ------------------------------------------------------------------------------------------------- data
def _as_batch(batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
        if isinstance(images, torch.Tensor):
            return images, torch.as_tensor(labels)
    raise TypeError(f"the loader must yield (images, labels) batches of tensors, got {type(batch).__name__}")


def _rebatch(batches: Iterable, batch_size: Optional[int],
             limit: Optional[int]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of ``batch_size`` (or as they come), stopping after ``limit`` samples."""
    seen, buffer_x, buffer_y, buffered = 0, [], [], 0
    for batch in batches:
        images, labels = _as_batch(batch)
        if limit is not None:
            images, labels = images[:limit - seen], labels[:limit - seen]
        seen += len(labels)
        if batch_size is None:
            if len(labels):
                yield images, labels
        else:
            buffer_x.append(images)
            buffer_y.append(labels)
            buffered += len(labels)
            while buffered >= batch_size:
                x, y = torch.cat(buffer_x), torch.cat(buffer_y)
                yield x[:batch_size], y[:batch_size]
                buffer_x, buffer_y, buffered = [x[batch_size:]], [y[batch_size:]], len(y) - batch_size
        if limit is not None and seen >= limit:
            break
    if batch_size is not None and buffered:
        yield torch.cat(buffer_x), torch.cat(buffer_y)


def _select(loader: Iterable, n_examples: Optional[int], subset: str, seed: int,
            batch_size: Optional[int]) -> Tuple[Iterator, Optional[int], Optional[List[int]], str]:
    """The batches to evaluate, their total count when known, the dataset indices (random subset), a label."""
    dataset = getattr(loader, "dataset", None)
    known = None
    with contextlib.suppress(TypeError):
        known = len(dataset) if dataset is not None else None
    if subset == "random":
        if dataset is None or known is None:
            raise ValueError("subset='random' draws indices from loader.dataset, which this loader lacks; "
                             "pass a torch DataLoader or use subset='first'")
        n = known if n_examples is None else min(n_examples, known)
        order = torch.randperm(known, generator=torch.Generator().manual_seed(seed))
        indices = sorted(order[:n].tolist())
        size = batch_size or getattr(loader, "batch_size", None) or 128
        sub = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, indices), batch_size=size, shuffle=False,
            num_workers=getattr(loader, "num_workers", 0),
            collate_fn=getattr(loader, "collate_fn", None))
        return _rebatch(sub, None, None), n, indices, f"random {n} of {known} (seed {seed})"
    if isinstance(loader, torch.utils.data.DataLoader) and isinstance(loader.sampler, torch.utils.data.RandomSampler):
        warnings.warn("the loader shuffles, so the evaluated samples (and a resumed run's) change from run to run; "
                      "evaluate with shuffle=False, or use subset='random' for a seeded random subset",
                      EvaluationWarning, stacklevel=4)
    total = None
    if known is not None:
        total = known if n_examples is None else min(n_examples, known)
    elif n_examples is not None:
        total = n_examples
    label = f"first {total}" if n_examples is not None else "all"
    return _rebatch(loader, batch_size, n_examples), total, None, label


# ----------------------------------------------------------------------------------------------- report
@dataclass
class Report:
    """What :func:`evaluate` returns: accuracies, per-sample results, settings and sanity flags.

    Attributes:
        accuracy: accuracy in % per attack key (``"natural"``, ``"pgd20"``, ...), in the order evaluated.
        correct: per attack key, a bool tensor (n_examples,) on the CPU: sample i classified correctly both
            naturally and after the attack.
        names, descriptions: per attack key, the display name (``"PGD-20"``) and a one-line summary.
        settings: per attack key, every setting needed to reproduce it (eps, steps, step size, loss, engine...).
        seconds: wall-clock seconds per attack key (summed over batches; a resumed run adds them up).
        threat_model: ``{"norm": "Linf", "eps": eps}``.
        n_examples, num_classes, seed, device, engine: as evaluated.
        subset: which samples, e.g. ``"first 1000"`` or ``"random 1000 of 10000 (seed 0)"``.
        indices: the dataset indices evaluated when ``subset="random"`` (else None: the loader's first N).
        components: per AutoAttack key, the robust accuracy (%) after each component, cumulative.
        sweep, sweep_attack: accuracy (%) per eps of the eps-sweep attack (with the large-eps check).
        flags: the failed sanity checks (:class:`SanityFlag`); :attr:`warnings` gives their messages.
        gradient_check: counts of the gradient check (``checked``, ``zero``, ``nonfinite``).
        sanity: the settings of the sanity checks (``large_eps``, ``eps_sweep``, ``attack``, ``step_size``).
        model, dataset: the model's class name and an optional dataset name (for the JSON).
        total_seconds, versions: wall time of the whole call; versions of ardir, torch, torchattacks.

    ``report.worst_case`` is the accuracy (%) of the per-sample AND over every attack
    (``report.worst_case_correct``); ``report.to_markdown()`` the table for a paper, ``report.to_json()`` the
    RobustBench-style record, ``report.save(path)`` writes both.
    """
    accuracy: Dict[str, float]
    correct: Dict[str, torch.Tensor]
    names: Dict[str, str]
    descriptions: Dict[str, str]
    settings: Dict[str, Dict[str, Any]]
    seconds: Dict[str, float]
    threat_model: Dict[str, Any]
    n_examples: int
    num_classes: int
    seed: int
    device: str
    engine: str
    subset: str
    indices: Optional[List[int]] = None
    components: Dict[str, Dict[str, float]] = field(default_factory=dict)
    sweep: Dict[float, float] = field(default_factory=dict)
    sweep_attack: Optional[str] = None
    flags: List[SanityFlag] = field(default_factory=list)
    gradient_check: Dict[str, int] = field(default_factory=dict)
    sanity: Dict[str, Any] = field(default_factory=dict)
    model: str = ""
    dataset: Optional[str] = None
    total_seconds: float = 0.0
    versions: Dict[str, str] = field(default_factory=dict)

    # ----------------------------------------------------------------------------------- derived numbers
    @property
    def worst_case_correct(self) -> torch.Tensor:
        """Bool (n_examples,): correct under every attack evaluated (natural included)."""
        result = torch.ones(self.n_examples, dtype=torch.bool)
        for mask in self.correct.values():
            result &= mask
        return result

    @property
    def worst_case(self) -> float:
        """Accuracy (%) of the per-sample worst case over all attacks: the robust accuracy to report."""
        return _percent(self.worst_case_correct) if self.n_examples else float("nan")

    @property
    def robust_accuracy(self) -> float:
        """Alias of :attr:`worst_case`."""
        return self.worst_case

    @property
    def warnings(self) -> List[str]:
        """Plain-language messages of the failed sanity checks (empty when all passed)."""
        return [flag.message for flag in self.flags]

    @property
    def masking_suspected(self) -> bool:
        """True when a sanity check points at gradient masking or another unreliable evaluation."""
        return any(flag.code in MASKING_CODES for flag in self.flags)

    # ------------------------------------------------------------------------------------------- output
    def to_markdown(self) -> str:
        """A Markdown table (attack, accuracy %, settings, seconds) with a caption line and the warnings."""
        eps = _fmt_eps(self.threat_model["eps"])
        lines = [f"Robust accuracy, L∞ threat model, ε = {eps}, {self.n_examples} examples ({self.subset}), "
                 f"seed {self.seed}, {self.device}.", "",
                 "| Attack | Accuracy (%) | Settings | Time (s) |", "|:--|--:|:--|--:|"]
        for key, acc in self.accuracy.items():
            lines.append(f"| {self.names[key]} | {acc:.2f} | {self.descriptions[key]} | {self.seconds[key]:.1f} |")
        lines.append(f"| **Worst case** | **{self.worst_case:.2f}** | per-sample minimum over the attacks above | "
                     f"{sum(self.seconds.values()):.1f} |")
        if self.sweep:
            points = ", ".join(f"ε = {_fmt_eps(e)}: {a:.2f}" for e, a in sorted(self.sweep.items()))
            lines += ["", f"Accuracy (%) under {self.names.get(self.sweep_attack, self.sweep_attack)} against ε "
                          f"(sanity checks): {points}."]
        if self.flags:
            lines.append("")
            lines.extend(f"> **Warning ({flag.code}):** {flag.message}" for flag in self.flags)
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        accs = ", ".join(f"{k}={v:.2f}" for k, v in self.accuracy.items())
        return (f"Report(eps={_fmt_eps(self.threat_model['eps'])}, n={self.n_examples}, {accs}, "
                f"worst_case={self.worst_case:.2f}, flags={[f.code for f in self.flags]})")

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict: RobustBench's model-card keys first, then everything else.

        RobustBench keys: ``name``, ``dataset``, ``threat_model``, ``eps`` ("8/255"), ``clean_acc`` and
        ``autoattack_acc`` (strings with two decimals, as in RobustBench's model_info files; ``autoattack_acc``
        is None when AutoAttack was not run). Per-sample results are strings of 0/1, one character per sample.
        """
        aa = self.accuracy.get("autoattack")
        return {
            "name": self.model, "dataset": self.dataset, "threat_model": self.threat_model["norm"],
            "eps": _fmt_eps(self.threat_model["eps"]),
            "clean_acc": f"{self.accuracy['natural']:.2f}" if "natural" in self.accuracy else None,
            "autoattack_acc": None if aa is None else f"{aa:.2f}",
            "worst_case_acc": round(self.worst_case, 4),
            "eps_value": self.threat_model["eps"],
            "attacks": {key: {"name": self.names[key], "accuracy": round(acc, 4),
                              "description": self.descriptions[key], "settings": self.settings[key],
                              "seconds": round(self.seconds[key], 3)} for key, acc in self.accuracy.items()},
            "components": self.components,
            "sweep": {"attack": self.sweep_attack, "accuracy": {repr(float(e)): a for e, a in self.sweep.items()}},
            "warnings": [dataclasses.asdict(flag) for flag in self.flags],
            "gradient_check": self.gradient_check, "sanity_checks": self.sanity,
            "n_examples": self.n_examples, "num_classes": self.num_classes, "subset": self.subset,
            "indices": self.indices, "seed": self.seed, "device": self.device, "engine": self.engine,
            "total_seconds": round(self.total_seconds, 3), "versions": self.versions,
            "per_sample": {key: _bits(mask) for key, mask in self.correct.items()},
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, record: Dict[str, Any]) -> "Report":
        """Rebuild a report from :meth:`to_dict` (per-sample results included)."""
        attacks = record["attacks"]
        return cls(
            accuracy={k: v["accuracy"] for k, v in attacks.items()},
            correct={k: _unbits(v) for k, v in record["per_sample"].items()},
            names={k: v["name"] for k, v in attacks.items()},
            descriptions={k: v["description"] for k, v in attacks.items()},
            settings={k: v["settings"] for k, v in attacks.items()},
            seconds={k: v["seconds"] for k, v in attacks.items()},
            threat_model={"norm": record["threat_model"], "eps": record["eps_value"]},
            n_examples=record["n_examples"], num_classes=record["num_classes"], seed=record["seed"],
            device=record["device"], engine=record["engine"], subset=record["subset"], indices=record["indices"],
            components=record["components"],
            sweep={float(e): a for e, a in record["sweep"]["accuracy"].items()},
            sweep_attack=record["sweep"]["attack"], flags=[SanityFlag(**f) for f in record["warnings"]],
            gradient_check=record["gradient_check"], sanity=record["sanity_checks"], model=record["name"],
            dataset=record["dataset"], total_seconds=record["total_seconds"], versions=record["versions"])

    @classmethod
    def from_json(cls, text: str) -> "Report":
        """Rebuild a report from :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Report":
        """Read a report saved by :meth:`save` (give the .json file or the path without suffix)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path.with_name(path.name + ".json") if path.suffix != ".md" else path.with_suffix(".json")
        return cls.from_json(path.read_text(encoding="utf-8"))

    def save(self, path: Union[str, os.PathLike]) -> Tuple[Path, Path]:
        """Write ``<path>.md`` and ``<path>.json`` atomically (temporary file, then ``os.replace``).

        A ``.md`` or ``.json`` suffix on ``path`` is dropped first. Returns the two paths.
        """
        path = Path(path)
        if path.suffix in (".md", ".json"):
            path = path.with_suffix("")
        md, js = path.with_name(path.name + ".md"), path.with_name(path.name + ".json")
        _atomic_write(md, self.to_markdown())
        _atomic_write(js, self.to_json() + "\n")
        return md, js


# ------------------------------------------------------------------------------------------------- state
class _State:
    """Resumable progress: per batch, the labels' checksum and each finished attack's per-sample results."""

    def __init__(self, path: Optional[Path], config: Dict[str, Any]):
        self.path, self.config = path, config
        self.batches: List[Dict[str, Any]] = []
        if path is not None and path.exists():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"state_path {path} cannot be read as an evaluation state ({type(err).__name__}: "
                                 f"{err}); delete it (the evaluation restarts) or pass another state_path") from None
            if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
                found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
                raise ValueError(f"{path} is not an ardir evaluation state file (format {found!r})")
            if saved["config"] != config:
                diff = sorted(k for k in set(config) | set(saved["config"])
                              if config.get(k) != saved["config"].get(k))
                raise ValueError(f"the state file {path} was written by an evaluation with other settings "
                                 f"(differences: {', '.join(diff)}); delete it or pass another state_path")
            self.batches = saved["batches"]

    def batch(self, index: int, start: int, labels: torch.Tensor) -> Dict[str, Any]:
        checksum = zlib.crc32(labels.cpu().numpy().astype("int64").tobytes())
        if index < len(self.batches):
            entry = self.batches[index]
            if (entry["start"], entry["n"], entry["labels"]) != (start, len(labels), checksum):
                raise ValueError(f"batch {index} differs from the one in the state file {self.path} (other data, "
                                 "batch size or order): resume with the same loader, unshuffled, or delete the file")
            return entry
        entry = {"start": start, "n": len(labels), "labels": checksum, "results": {}}
        self.batches.append(entry)
        return entry

    def save(self) -> None:
        if self.path is not None:
            _atomic_write(self.path, json.dumps({"format": STATE_FORMAT, "config": self.config,
                                                 "batches": self.batches}))


def _attack_batch(runner: _Runner, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  natural: Optional[torch.Tensor], state: _State, entry: Dict[str, Any], seed: int,
                  checks: bool) -> Dict[str, Any]:
    """Run one attack on one batch (only on the naturally correct points) and return its state record."""
    tic = time.perf_counter()
    n = len(labels)
    if isinstance(runner, _Natural):  # plus the gradient check on the points it gets right
        correct, _ = runner.run(images, labels, seed)
        record = {"correct": _bits(correct.cpu()), "seconds": time.perf_counter() - tic, "components": {}}
        if checks:
            record["gradients"] = _gradient_counts(model, images[correct], labels[correct])
            record["checked"] = int(correct.sum())
        return record
    todo = natural.nonzero().flatten()
    correct = torch.zeros(n, dtype=torch.bool)
    components: Dict[str, torch.Tensor] = {}
    earlier = 0.0
    if len(todo):
        done, save, earlier = _partial(state, entry, runner.key, todo, n, tic)
        on_device = todo.to(images.device)
        hit, parts = runner.run(images[on_device], labels[on_device], seed, done=done, on_component=save)
        correct[todo] = hit.cpu()
        for name, mask in parts.items():
            components[name] = torch.zeros(n, dtype=torch.bool)
            components[name][todo] = mask.cpu()
    elif isinstance(runner, _AutoAttackRunner) and len(runner.components) > 1:
        components = {name: correct.clone() for name in runner.components}
    entry.get("partial", {}).pop(runner.key, None)
    return {"correct": _bits(correct), "seconds": time.perf_counter() - tic + earlier,
            "components": {name: _bits(mask) for name, mask in components.items()}}


def _partial(state: _State, entry: Dict[str, Any], key: str, todo: torch.Tensor, n: int, tic: float):
    """Components an interrupted run already finished on this batch, a callback saving each new one, and the
    seconds the interrupted run had spent on them."""
    saved = entry.setdefault("partial", {}).setdefault(key, {"components": {}, "seconds": 0.0})
    done = {c: _unbits(bits)[todo] for c, bits in saved["components"].items()}
    base = saved["seconds"]

    def save(name: str, robust: torch.Tensor) -> None:
        full = torch.zeros(n, dtype=torch.bool)
        full[todo] = robust.cpu()
        saved["components"][name] = _bits(full)
        saved["seconds"] = base + time.perf_counter() - tic
        state.save()
    return done, save, base


# ------------------------------------------------------------------------------------------------ checks
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


def _sanity_flags(report: Report, runners: Dict[str, _Runner], extra: Dict[str, torch.Tensor],
                  component_masks: Dict[str, Dict[str, torch.Tensor]], sweep_keys: Dict[float, str],
                  randomized: bool, official_messages: List[str]) -> List[SanityFlag]:
    """Every failed sanity check, as flags (see docs/evaluation.md for the rules)."""
    flags: List[SanityFlag] = []
    n = report.n_examples
    correct = report.correct
    adversarial = [runners[k] for k in report.accuracy if k != "natural"]
    sweep_name = runners[next(iter(sweep_keys.values()))].display if sweep_keys else ""

    # 1. natural >= FGSM >= PGD >= AutoAttack (natural holds by construction: attacks count natural errors).
    for weak in adversarial:
        for strong in adversarial:
            if not (weak.white_box and strong.white_box):
                continue
            ordered = weak.rank < strong.rank or (weak.family == strong.family and weak.steps < strong.steps)
            if not ordered:
                continue
            excess, noise = _excess(correct[weak.key], correct[strong.key])
            if excess > noise:
                flags.append(SanityFlag("ordering", (
                    f"{strong.display} leaves {report.accuracy[strong.key]:.2f}% correct, more than the weaker "
                    f"{weak.display} ({report.accuracy[weak.key]:.2f}%): {excess} more samples survive it, beyond "
                    f"noise (±{noise:.1f}). A stronger attack should never do worse; this is a classic sign of "
                    "gradient masking. Try more steps, restarts and other losses before trusting the numbers."),
                    {"weaker": weak.key, "stronger": strong.key, "excess": excess, "noise": noise}))

    # 2. A black-box attack must not beat the white-box ones.
    black = [r for r in adversarial if not r.white_box]
    for b in black:
        for w in adversarial:
            if w.white_box and w.rank >= 2:
                excess, noise = _excess(correct[b.key], correct[w.key])
                if excess > noise:
                    flags.append(SanityFlag("black_box", (
                        f"{b.display}, a black-box attack that never looks at gradients, leaves "
                        f"{report.accuracy[b.key]:.2f}% correct, fewer than the white-box {w.display} "
                        f"({report.accuracy[w.key]:.2f}%). With working gradients the white-box attack should "
                        "be at least as strong: the gradients are probably masked or obfuscated."),
                        {"black_box": b.key, "white_box": w.key, "excess": excess, "noise": noise}))
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

    # 3. Accuracy must not grow with eps, and must reach chance at a large eps.
    if report.sweep:
        points = sorted(report.sweep)
        masks = {e: (correct[report.sweep_attack] if sweep_keys[e] == report.sweep_attack else extra[sweep_keys[e]])
                 for e in points}
        for small, large in zip(points, points[1:]):
            excess, noise = _excess(masks[small], masks[large])
            if excess > noise:
                flags.append(SanityFlag("eps_monotonic", (
                    f"Accuracy under {sweep_name} rises from {report.sweep[small]:.2f}% "
                    f"at ε = {_fmt_eps(small)} to {report.sweep[large]:.2f}% at ε = {_fmt_eps(large)}. A larger "
                    "ε contains every perturbation of a smaller one, so accuracy can only fall: the attack is "
                    "failing, typically because of gradient masking."),
                    {"eps_small": small, "eps_large": large, "excess": excess, "noise": noise}))
        low, high = points[0], points[-1]
        drop, noise = _excess(masks[high], masks[low])
        if len(points) > 1 and int(masks[low].sum()) >= 10 and drop <= noise:
            flags.append(SanityFlag("eps_monotonic", (
                f"Accuracy under {sweep_name} does not fall as ε grows: "
                f"{report.sweep[low]:.2f}% at ε = {_fmt_eps(low)} and {report.sweep[high]:.2f}% at "
                f"ε = {_fmt_eps(high)}. More room to perturb must help a working attack; a flat curve means "
                "the attack is not following the loss, typically because of gradient masking."),
                {"eps_small": low, "eps_large": high, "drop": drop, "noise": noise}))
    eps_large = report.sanity.get("large_eps")
    if eps_large is not None:
        p = 1.0 / report.num_classes
        chance, noise = 100 * p, 200 * math.sqrt(p * (1 - p) / max(n, 1))
        acc = report.sweep[eps_large]
        if acc > chance + noise:
            flags.append(SanityFlag("large_eps", (
                f"At ε = {_fmt_eps(eps_large)}, {sweep_name} still leaves {acc:.2f}% "
                f"correct, above chance ({chance:.1f}%). Such a perturbation can turn any image into a flat grey "
                "one, so a working attack reaches chance or below: the attack is not finding the adversarial "
                "examples that exist, a sign of gradient masking."),
                {"eps": eps_large, "accuracy": acc, "chance": chance, "noise": noise}))

    # 4. Gradients: zero or NaN for many samples.
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
    if randomized:
        flags.append(SanityFlag("randomized", (
            "The model gives different outputs for the same input (a randomized defense, or dropout/noise left "
            "active in eval mode). Single-sample gradients are then noisy and the accuracy varies between runs: "
            "evaluate with expectation over transformation (AutoAttack's 'rand' version).")))
    for message in dict.fromkeys(official_messages):
        flags.append(SanityFlag("autoattack_official", f"The official AutoAttack code warns: {message}"))
    return flags


# ---------------------------------------------------------------------------------------------- evaluate
def evaluate(model: nn.Module, loader: Iterable, eps: float = 8 / 255,
             attacks: Union[str, Sequence[str]] = DEFAULT_ATTACKS, *, step_size: Optional[float] = None,
             n_examples: Optional[int] = None, subset: str = "first", seed: int = 0, engine: str = "ardir",
             batch_size: Optional[int] = None, checks: bool = True, large_eps: Optional[float] = 0.5,
             eps_sweep: Optional[Sequence[float]] = None, sweep_attack: str = "pgd20",
             state_path: Union[str, os.PathLike, None] = None, progress: bool = True,
             dataset: Optional[str] = None, warn: bool = True) -> Report:
    """Evaluate ``model`` on ``loader`` under every attack in ``attacks`` and return a :class:`Report`.

    Arguments:
        model: maps images (N, C, H, W) in [0, 1] to logits (N, num_classes); normalisation inside the model.
            It runs on its own device, in eval mode; its modes and ``requires_grad`` flags are restored after.
        loader: yields ``(images, labels)`` batches (a torch DataLoader, unshuffled, or any iterable).
        eps: L-inf radius, 0 < eps <= 1 (default 8/255).
        attacks: names from the grammar (:func:`list_attacks`): ``"natural"``, ``"fgsm"``, ``"pgdN"``,
            ``"cwN"``, ``"autoattack"``, ``"apgd-ce"``, ``"apgd-dlr"``, ``"apgd-t"``, ``"fab-t"``, ``"square"``.
            ``natural`` is always evaluated (first), as every robust accuracy counts natural errors.
        step_size: PGD and CW step; default ``eps / 4`` (2/255 at eps = 8/255). Sweep attacks scale it with eps.
        n_examples: evaluate only this many samples (default: all the loader gives).
        subset: ``"first"`` (the loader's first ``n_examples``) or ``"random"`` (a seeded random subset of
            ``loader.dataset``, drawn with ``seed``).
        seed: seeds the random subset and every attack (one seed per attack and batch, so a resumed run gives
            the same numbers). The caller's RNG state is left untouched.
        engine: AutoAttack implementation: ``"ardir"`` (ardir's own components with the official settings)
            or ``"official"`` (the authors' code, ``pip install pyautoattack``).
        batch_size: re-batch the samples to this size (default: the loader's batches).
        checks: run the sanity checks (gradient check, ordering, black box vs white box, large eps, eps sweep).
        large_eps: the eps of the "accuracy must reach chance" check (default 0.5; None skips it).
        eps_sweep: extra eps values at which ``sweep_attack`` runs; accuracy must not rise with eps.
        sweep_attack: the attack of the sweep and the large-eps check (default ``"pgd20"``).
        state_path: a JSON file recording which (batch, attack) pairs are done and their per-sample results;
            an interrupted run resumes from it (same settings, same model, same data order required). In a
            process group each process keeps its own, ``<state_path>.rank<r>``.
        progress: show a tqdm bar (it also switches off when the output is not a terminal).
        dataset: a dataset name stored in the report (RobustBench's ``dataset`` key), e.g. ``"cifar10"``.
        warn: issue an :class:`EvaluationWarning` for each failed sanity check (they are in the report anyway).

    In a process group (``torchrun``, :func:`ardir.distributed.init`), call it on every process with the same
    loader: each attacks every W-th batch and the results are gathered, so every process returns the report one
    process would (each batch's attacks are seeded by the batch's position, whoever runs them).

    Returns:
        a :class:`Report`; ``print(report.to_markdown())`` gives the table.

    Raises:
        ValueError: unknown attack name (with close matches), eps outside (0, 1], empty loader, pixel values
            outside [0, 1], labels outside the model's classes, or a state file from other settings.
        ImportError: ``engine="official"`` without the official package.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    eps = eps_value("eps", eps)
    step_size = eps / 4 if step_size is None else positive("step_size", step_size)
    if isinstance(attacks, str):
        attacks = [attacks]
    if not isinstance(attacks, Iterable):
        raise TypeError(f"attacks={attacks!r} must be attack names, e.g. ('natural', 'pgd20', 'autoattack')")
    attacks = list(attacks)
    if not attacks:
        raise ValueError("attacks is empty: give at least one attack name, e.g. ('natural', 'pgd20')")
    for name in attacks + [sweep_attack]:
        parse_attack(name)  # fail on a typo before touching the data
    if parse_attack(sweep_attack)[0].pattern == r"natural|clean":
        raise ValueError("sweep_attack must be an attack, not 'natural'")
    subset = one_of("subset", subset, SUBSETS, "subset")
    engine = one_of("engine", engine, ("ardir", "official"), "AutoAttack engine")
    if n_examples is not None:
        if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
            raise ValueError(f"n_examples={n_examples!r} must be a whole number >= 1 (or None for all)")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be a whole number >= 1 (or None: the loader's batches)")
    large_eps = None if (large_eps is None or not checks) else eps_value("large_eps", large_eps)
    if isinstance(eps_sweep, (int, float)):
        eps_sweep = [eps_sweep]
    sweep = sorted({eps_value("eps_sweep", e) for e in (eps_sweep or [])}) if checks else []
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed={seed!r} must be an int")

    with _forked_rng():  # the attacks (and iterating a DataLoader) draw from torch's global RNG
        report, official_messages = _run(
            model, loader, eps, attacks, step_size, n_examples, subset, seed, engine, batch_size, checks,
            large_eps, sweep, sweep_attack, state_path, progress, dataset)
    report.total_seconds = time.perf_counter() - started
    if warn:
        for flag in report.flags:
            warnings.warn(flag.message, EvaluationWarning, stacklevel=2)
    return report


def _int64(labels: torch.Tensor) -> torch.Tensor:
    """Integer labels of any width as int64; anything else (float labels) as it is, for the checks to refuse."""
    if labels.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        return labels.long()
    return labels


def _run(model, loader, eps, attacks, step_size, n_examples, subset, seed, engine, batch_size, checks, large_eps,
         sweep, sweep_attack, state_path, progress, dataset):
    """The body of :func:`evaluate` once the arguments are checked."""
    device = _device(model)
    batches, total, indices, subset_label = _select(loader, n_examples, subset, seed, batch_size)
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("the loader yields no batch (is the dataset empty, or drop_last with too few samples?)")

    with model_mode(model, "eval"), _frozen(model):
        images, labels = first[0].to(device), _int64(first[1].to(device))
        batch_tensors("the first batch", images, labels)
        pixel_range("the first batch", images)
        logits = logits_of("model", model, images)
        with torch.no_grad():
            randomized = bool(checks) and not torch.allclose(logits, model(images), rtol=1e-4, atol=1e-4)
        num_classes = logits.shape[1]
        label_range("the first batch", labels, num_classes)

        # The plan: natural first, the requested attacks, then the sweep / large-eps runs of the checks.
        ctx = _Context(model, eps, step_size, num_classes, engine)
        runners: Dict[str, _Runner] = {"natural": _Natural(model)}
        for name in attacks:
            spec, match = parse_attack(name)
            runner = spec.build(match, ctx)
            if runner.key in runners and runner.key != "natural":
                raise ValueError(f"attack {name!r} is listed twice (as {runners[runner.key].key!r})")
            runners[runner.key] = runner
        main_keys = list(runners)
        sweep_key = parse_attack(sweep_attack)[0].build(parse_attack(sweep_attack)[1], ctx).key
        sweep_eps = sorted(set(sweep) | ({large_eps} if large_eps is not None else set()))
        if sweep_eps:
            sweep_eps = sorted(set(sweep_eps) | {eps})
        sweep_keys: Dict[float, str] = {}
        for e in sweep_eps:
            if e == eps and sweep_key in runners:
                sweep_keys[e] = sweep_key
                continue
            scaled = _Context(model, e, step_size * e / eps, num_classes, engine)
            runner = parse_attack(sweep_attack)[0].build(parse_attack(sweep_attack)[1], scaled)
            runner.key = f"{runner.key}@{e:.6g}"
            runners[runner.key] = runner
            sweep_keys[e] = runner.key

        config = {"eps": eps, "seed": seed, "subset": subset_label, "engine": engine, "checks": bool(checks),
                  "model": _model_fingerprint(model), "batch_size": batch_size,
                  "attacks": {k: json.loads(json.dumps(r.settings, default=str)) for k, r in runners.items()}}
        # In a process group (torchrun) each process attacks every W-th batch and the outcomes are gathered: each
        # batch's attacks are seeded by its position, so the report is the one-process report, on every process.
        world, rank = distributed.world_size(), distributed.rank()
        if world > 1:
            config["processes"] = world
            if state_path is not None:  # one state file per process
                state_path = Path(state_path).with_name(f"{Path(state_path).name}.rank{rank}")
        state = _State(Path(state_path) if state_path is not None else None, config)

        outcomes: Dict[int, Dict[str, Any]] = {}  # batch index -> its per-sample results, seconds, components
        official_messages: List[str] = []
        bar = tqdm(total=total, unit="img", desc="evaluate",
                   disable=None if progress and distributed.is_main_process() else True)
        start, index, batch = 0, 0, first
        try:
            while batch is not None:
                if index % world != rank:  # another process's batch
                    start += len(batch[1])
                    index += 1
                    batch = next(batches, None)
                    continue
                images, labels = batch[0].to(device), _int64(batch[1].to(device))
                if index:  # the first batch was checked above; a later one out of range would count silently
                    check_batch(f"the batch of samples {start}..{start + len(labels) - 1}", images, labels,
                                num_classes)
                entry = state.batch(len(outcomes), start, labels)
                done = entry["results"]
                outcome = {"results": {}, "seconds": {}, "parts": {}, "grad": (0, 0, 0)}
                natural = None
                for key, runner in runners.items():
                    record = done.get(key)
                    if record is None:
                        bar.set_postfix_str(runner.display)
                        record = _attack_batch(runner, model, images, labels, natural, state, entry,
                                               _derive_seed(seed, key, start), checks)
                        if isinstance(runner, _AutoAttackRunner):
                            official_messages.extend(runner.attack.messages)
                            runner.attack.messages.clear()
                        done[key] = record
                        state.save()
                    mask = _unbits(record["correct"])
                    if key == "natural":
                        natural = mask
                        if "gradients" in record:
                            outcome["grad"] = (record["checked"], *record["gradients"][:2])
                    outcome["results"][key] = mask
                    outcome["seconds"][key] = record["seconds"]
                    outcome["parts"][key] = {c: _unbits(bits) for c, bits in record["components"].items()}
                outcomes[index] = outcome
                start += len(labels)
                index += 1
                # rank 0's bar stands for all processes: each has done about as much
                bar.update(len(labels) * world if bar.total is None else min(len(labels) * world, bar.total - bar.n))
                bar.set_postfix_str(", ".join(
                    f"{k}={100 * torch.cat([o['results'][k] for o in outcomes.values()]).float().mean():.1f}"
                    for k in main_keys))
                batch = next(batches, None)
        finally:
            bar.close()
        if world > 1:
            gathered = distributed.all_gather_object((outcomes, official_messages))
            outcomes = {i: o for part, _ in gathered for i, o in part.items()}
            official_messages = [m for _, messages in gathered for m in messages]

    ordered = [outcomes[i] for i in sorted(outcomes)]
    results = {k: [o["results"][k] for o in ordered] for k in runners}
    seconds = {k: sum(o["seconds"][k] for o in ordered) for k in runners}
    parts: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    for o in ordered:
        for key, comps in o["parts"].items():
            for c, mask in comps.items():
                parts.setdefault(key, {}).setdefault(c, []).append(mask)
    grad = dict(zip(("checked", "zero", "nonfinite"), (sum(o["grad"][i] for o in ordered) for i in range(3))))
    n = start
    correct = {k: torch.cat(results[k]) for k in main_keys}
    extra = {k: torch.cat(v) for k, v in results.items() if k not in main_keys}
    accuracy = {k: _percent(mask) for k, mask in correct.items()}
    components = {k: {c: _percent(torch.cat(masks)) for c, masks in comp.items()}
                  for k, comp in parts.items() if k in main_keys}
    sweep_acc = {}
    for e, key in sweep_keys.items():
        mask = correct[key] if key in correct else extra[key]
        sweep_acc[e] = _percent(mask)
    settings = {k: runners[k].settings for k in main_keys}
    import torchattacks

    from . import __version__ as ardir_version
    report = Report(
        accuracy=accuracy, correct=correct, names={k: runners[k].display for k in main_keys},
        descriptions={k: runners[k].description for k in main_keys}, settings=settings,
        seconds={k: seconds[k] for k in main_keys}, threat_model={"norm": "Linf", "eps": eps}, n_examples=n,
        num_classes=num_classes, seed=seed, device=str(device), engine=engine, subset=subset_label,
        indices=indices, components=components, sweep=sweep_acc, sweep_attack=sweep_key if sweep_acc else None,
        gradient_check=grad if checks else {}, model=type(model).__name__, dataset=dataset,
        sanity={"large_eps": large_eps, "eps_sweep": sweep, "attack": sweep_key,
                "step_size": f"{_fmt_eps(step_size)} x eps' / {_fmt_eps(eps)}"} if checks else {},
        versions={"ardir": ardir_version, "torch": torch.__version__,
                  "torchattacks": getattr(torchattacks, "__version__", "?")})
    if checks:
        component_masks = {k: {c: torch.cat(masks) for c, masks in comp.items()}
                           for k, comp in parts.items() if k in main_keys}
        report.flags = _sanity_flags(report, runners, extra, component_masks, sweep_keys, randomized,
                                     official_messages)
    return report, official_messages
