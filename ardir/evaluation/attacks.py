"""The attack grammar of :func:`ardir.evaluate`: attack names, the rules that build them, and the runners.

An attack is one rule of :data:`ATTACKS` (a :class:`~ardir.registry.Registry`, the idiom of methods, models and
data sets too), added by ``register_attack(pattern, examples, summary, name=None)`` on a function
``build(match, context)`` that returns a :class:`Runner`; adding an attack takes one file (see
``docs/evaluation.md``)::

    import torch
    from ardir.evaluation.attacks import Runner, register_attack

    class Noise(Runner):
        rank, family, white_box = 1, "noise", False     # as weak as FGSM; it never looks at gradients

        def __init__(self, ctx):
            super().__init__("noise", "Noise", "uniform noise in the ε-ball", {"eps": ctx.eps})
            self.model, self.eps = ctx.model, ctx.eps

        def run(self, images, labels, seed, done=None, on_component=None):
            torch.manual_seed(seed)
            adv = (images + self.eps * (2 * torch.rand_like(images) - 1)).clamp(0, 1)
            with torch.no_grad():
                return self.model(adv).argmax(1) == labels, {}

    @register_attack(r"noise", ("noise",), "uniform random noise in the ε-ball")
    def build_noise(match, ctx):
        return Noise(ctx)

The built-in rules: ``natural``, ``fgsm``, ``pgd`` (``pgdN``), ``cw`` (``cwN``), ``autoattack`` and each AutoAttack
component alone (``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``fab-t``, ``square``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..attacks import PGD, _unwrap, attack_module
from ..autoattack import COMPONENTS, STANDARD, AutoAttack, cached_fast_model, still_correct
from ..registry import Registry
from ._helpers import _fmt_eps

__all__ = ["Context", "Runner", "AttackSpec", "ATTACKS", "register_attack", "list_attacks", "parse_attack"]


@dataclass
class Context:
    """What a rule builds its runner from: the model (in eval mode, parameters frozen), the L-inf radius ``eps``,
    the PGD step ``step_size``, the model's ``num_classes`` and the AutoAttack ``engine`` (``"ardir"`` or
    ``"official"``), and the threat model's ``norm`` (``"linf"`` or ``"l2"``; ``eps`` is a radius in that norm).
    The sweep of the sanity checks builds its attack with a scaled ``eps`` and ``step_size``."""
    model: nn.Module
    eps: float
    step_size: float
    num_classes: int
    engine: str
    norm: str = "linf"


class Runner:
    """An attack ready to run: ``run(images, labels, seed) -> (correct (N,), {component: correct (N,)})``.

    ``images`` and ``labels`` are the points the model classifies correctly, on the model's device; ``correct``
    (bool) says which are still classified correctly after the attack (within ``eps``); ``seed`` is the seed of
    this attack on this batch. ``key`` is the report's key (``"pgd20"``), ``display`` the table's name
    (``"PGD-20"``), ``description`` the table's settings column, ``settings`` (JSON-ready) everything needed to
    reproduce the attack.

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
        """``(correct (N,), {component: correct (N,)})``: which points are still classified correctly."""
        raise NotImplementedError


class _Natural(Runner):
    rank = 0
    family = "natural"

    def __init__(self, model: nn.Module):
        super().__init__("natural", "Natural", "no attack", {})
        self.model = model

    def run(self, images, labels, seed, done=None, on_component=None):
        with torch.no_grad():
            return self.model(images).argmax(1) == labels, {}


def _attacked_model(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """What the gradient attacks climb: the model's :func:`~ardir.autoattack.cached_fast_model` (BatchNorm folded,
    channels-last on the CPU; the same function up to float rounding; on a Fashion-MNIST student it made PGD-20 and
    CW∞-30 in ``evaluate()`` about 1.3x faster), the copy AutoAttack's ardir engine attacks; ``model`` itself when
    it is registered with :func:`~ardir.attacks.compile_for_attack` (a copy would lose its compiled twin). Every
    verdict is still taken on ``model``."""
    base = _unwrap(model)
    return model if attack_module(model) is not base else cached_fast_model(base, sample)


class _PGDRunner(Runner):
    def __init__(self, key: str, display: str, ctx: Context, steps: int, loss: str, step_size: float,
                 random_start: str, rank: int, family: str):
        self.attack = PGD(ctx.model, eps=ctx.eps, step_size=step_size, steps=steps, loss=loss,
                          random_start=random_start, norm=ctx.norm)
        self.model, self.eps, self.norm = ctx.model, ctx.eps, ctx.norm
        self.rank, self.family, self.steps = rank, family, steps
        loss_name = {"ce": "cross-entropy", "cw": "CW margin"}[loss]
        start = "uniform random start" if random_start == "uniform" else "no random start"
        step = _fmt_eps(step_size) if ctx.norm == "linf" else f"{step_size:.4g} (L2, normalised gradient)"
        description = (f"{loss_name}, {steps} step{'s' if steps > 1 else ''} of {step}, {start}")
        settings = {"eps": ctx.eps, "loss": loss, "steps": steps, "step_size": step_size,
                    "random_start": random_start, "restarts": 1, "implementation": "ardir.PGD"}
        if ctx.norm != "linf":  # L-inf settings stay as they were, so older state files still resume
            settings["norm"] = ctx.norm
        super().__init__(key, display, description, settings)

    def run(self, images, labels, seed, done=None, on_component=None):
        self.attack.model = _attacked_model(self.model, images[:8])
        torch.manual_seed(seed)
        adv = self.attack(images, labels)
        return still_correct(self.model, images, adv, labels, self.eps, self.norm), {}


class _AutoAttackRunner(Runner):
    rank = 3
    family = "autoattack"

    def __init__(self, key: str, display: str, ctx: Context, components: Sequence[str]):
        self.attack = AutoAttack(ctx.model, eps=ctx.eps, num_classes=ctx.num_classes, attacks=components,
                                 engine=ctx.engine, norm=ctx.norm)
        self.components = list(components)
        if len(components) == 1:
            self.rank, self.family = 2, components[0]
            self.white_box = components[0] != "square"
            description = ", ".join(f"{k} {v}" for k, v in self.attack.settings["components"][components[0]].items())
        else:
            description = "standard: APGD-CE, APGD-T, FAB-T, Square"
        description += f" ({ctx.engine} engine{', L2' if ctx.norm == 'l2' else ''})"
        super().__init__(key, display, description, {"eps": ctx.eps, **self.attack.settings})

    def run(self, images, labels, seed, done=None, on_component=None):
        robust, per_component = self.attack.run(images, labels, seed, done, on_component)
        return robust, per_component if len(self.components) > 1 else {}


@dataclass(frozen=True)
class AttackSpec:
    """One rule of the attack grammar, the entry :data:`ATTACKS` keeps under ``name``: names matching ``pattern``
    (a regex, matched in full on the lower-cased name) are built by ``build(match, context)``; ``examples`` are
    shown in errors and :func:`list_attacks`."""
    pattern: str
    examples: Tuple[str, ...]
    summary: str
    build: Callable[[re.Match, Context], Runner]
    name: str = ""

    def __call__(self, match: re.Match, ctx: Context) -> Runner:
        """The runner of the matched name in ``ctx``."""
        return self.build(match, ctx)


ATTACKS = Registry("attack", argument="attacks", normalize=lambda name: name.strip().lower().replace("_", "-"),
                   hint=" (pgdN and cwN take any N >= 1)")
"""The attack grammar: :class:`AttackSpec` rules by name (``pgd``, ``cw``, ``autoattack``, ...), each answering to
the names its pattern matches (a :class:`~ardir.registry.Registry`; ``ATTACKS.create("pgd20", ctx)`` builds)."""


def register_attack(pattern: str, examples: Sequence[str], summary: str, name: Optional[str] = None):
    """Decorator adding a rule ``build(match, context) -> runner`` to :data:`ATTACKS`, under ``name`` (default:
    the first example).

    ``pattern`` is a regex matched in full on the lower-cased name (``_`` read as ``-``); its groups reach
    ``build`` through ``match`` (``r"pgd-?(\\d+)"``: ``match[1]`` is the number of steps). ``context`` is a
    :class:`Context` (model, eps, step size, number of classes, engine); the runner a :class:`Runner`.
    ``examples`` are names :func:`list_attacks` lists and errors suggest; ``summary`` is one line. Rules are
    tried in the order they were added, the built-in ones first.
    """
    if not examples:
        raise ValueError(f"register_attack({pattern!r}): examples must name at least one attack the pattern "
                         "matches (list_attacks shows them)")

    def add(build):
        spec = AttackSpec(pattern, tuple(examples), summary, build, name or examples[0])
        ATTACKS.register(spec.name, spec, pattern=pattern, examples=spec.examples)
        return build
    return add


def list_attacks() -> List[str]:
    """Example names the grammar accepts (``pgdN`` and ``cwN`` take any number of steps N >= 1)."""
    return [example for spec in ATTACKS.values() for example in spec.examples]


def parse_attack(name: str) -> Tuple[AttackSpec, re.Match]:
    """The rule and regex match of an attack name; ``ValueError`` with the closest valid names otherwise."""
    rule, match = ATTACKS.match(name)
    return ATTACKS[rule], match


def _build(name: str, ctx: Context) -> Runner:
    """The runner of an attack name (parsed by :func:`parse_attack`) in ``ctx``."""
    return ATTACKS.create(name, ctx)


def _steps(match: re.Match, name: str) -> int:
    steps = int(match[1])
    if steps < 1:
        raise ValueError(f"{name}{steps}: the number of steps must be at least 1")
    return steps


@register_attack(r"natural|clean", ("natural",), "no attack", name="natural")
def _build_natural(match, ctx):
    return _Natural(ctx.model)


@register_attack(r"fgsm", ("fgsm",), "one step of size eps on the cross-entropy (Goodfellow et al. 2015); "
                 "under L2 FGM, one step of length eps along the normalised gradient", name="fgsm")
def _build_fgsm(match, ctx):
    return _PGDRunner("fgsm", "FGSM" if ctx.norm == "linf" else "FGM", ctx, steps=1, loss="ce", step_size=ctx.eps, random_start="none", rank=1,
                      family="fgsm")


@register_attack(r"pgd-?(\d+)", ("pgd20", "pgd100"), "PGD on the cross-entropy, N steps (Madry et al. 2018)",
                 name="pgd")
def _build_pgd(match, ctx):
    steps = _steps(match, "pgd")
    return _PGDRunner(f"pgd{steps}", f"PGD-{steps}", ctx, steps=steps, loss="ce", step_size=ctx.step_size,
                      random_start="uniform", rank=2, family="pgd")


@register_attack(r"cw-?(\d+)", ("cw30",), "CW-inf (CW2 under L2): PGD on the CW margin loss in the eps-ball, N steps "
                 "(Carlini & Wagner 2017)", name="cw")
def _build_cw(match, ctx):
    steps = _steps(match, "cw")
    return _PGDRunner(f"cw{steps}", f"CW∞-{steps}" if ctx.norm == "linf" else f"CW2-{steps}", ctx, steps=steps, loss="cw", step_size=ctx.step_size,
                      random_start="uniform", rank=2, family="cw")


@register_attack(r"autoattack|aa", ("autoattack",), "AutoAttack, standard version (Croce & Hein 2020)",
                 name="autoattack")
def _build_autoattack(match, ctx):
    return _AutoAttackRunner("autoattack", "AutoAttack", ctx, STANDARD)


_COMPONENT_NAMES = {"apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T", "fab-t": "FAB-T",
                    "square": "Square"}


def _build_component(match, ctx):
    return _AutoAttackRunner(match[0], _COMPONENT_NAMES[match[0]], ctx, [match[0]])


for _component in COMPONENTS:  # one rule each, so each is a name of ATTACKS
    register_attack(_component, (_component,), "one AutoAttack component alone", name=_component)(_build_component)
