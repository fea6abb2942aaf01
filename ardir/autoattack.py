"""AutoAttack, the standard version, assembled faithfully; and the official code as an optional engine.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", ICML 2020, https://arxiv.org/abs/2003.01690, code https://github.com/fra31/auto-attack.

The *standard* version runs, in this order and each only on the points still classified correctly:

=========  ==========================================================================================
apgd-ce    APGD on the cross-entropy, 100 iterations, 1 restart, rho 0.75
apgd-t     targeted APGD on the targeted DLR loss, 100 iterations, 1 restart, 9 target classes
fab-t      targeted FAB, 100 iterations, 1 restart, 9 target classes (alpha_max 0.1, eta 1.05, beta 0.9)
square     Square Attack (black box), 5000 queries, 1 restart, p_init 0.8, margin loss, fixed schedule
=========  ==========================================================================================

A point counts as robust only if it survives all four (worst case per sample).

Why not ``torchattacks.AutoAttack``? In torchattacks 3.5.1 it builds APGD and APGD-T with their default
of 10 iterations (not 100), FAB-T with 10 and lets Square rescale its schedule, so its number is not the
AutoAttack number. ``engine="ardir"`` runs ardir's own components with the official settings
(:mod:`ardir.apgd`, :mod:`ardir.fab`, :mod:`ardir.square`, :mod:`ardir.square_l2`), under L-inf or L2 (the
standard version's components and settings are the same for both): the official algorithms and random draws, but a
point leaves the batch as soon as its verdict is settled (APGD: misclassified once; FAB-T: an adversarial
point within eps), the model runs with each BatchNorm folded into the layer before it, channels-last on the
CPU, and without autograd where no gradient is needed.
Every step of these attacks is per sample, so none of this changes a verdict (beyond float rounding).
``engine="official"`` runs the authors' own code: the PyPI package ``pyautoattack`` (import name
``pyautoattack``) or, failing that, the ``autoattack`` package installed from GitHub.
:func:`_torchattacks_component` keeps torchattacks' copies of the components as a reference.

With fewer than 10 classes the targeted attacks use ``num_classes - 1`` target classes.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import itertools
import logging
import warnings
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._checks import eps_value, norm_name, one_of
from .attacks import model_device, model_mode

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
"""Components of AutoAttack's standard version, in the order they run."""

COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
"""Components that can be run (``apgd-dlr`` belongs to the ``plus`` and ``rand`` versions)."""

ENGINES = ("ardir", "official")

TOLERANCE = 1e-5
"""Slack on the distance (L-inf, or L2 where it is also relative) when validating an adversarial example (float
rounding only)."""

OFFICIAL_MISSING = ("engine='official' runs the authors' AutoAttack code, which is not installed: "
                    "`pip install pyautoattack` (or `pip install ardir[autoattack]`; the authors' GitHub "
                    "version, `pip install git+https://github.com/fra31/auto-attack`, works too). "
                    "engine='ardir' needs nothing extra.")


def target_classes(num_classes: int) -> int:
    """Number of target classes of APGD-T and FAB-T: 9 (official), or ``num_classes - 1`` when fewer."""
    return min(9, num_classes - 1)


def component_settings(name: str, num_classes: int) -> Dict[str, Any]:
    """The official settings of one component (what the report prints), for ``num_classes`` outputs."""
    k = target_classes(num_classes)
    table = {
        "apgd-ce": {"loss": "ce", "steps": 100, "restarts": 1, "rho": 0.75, "eot_iter": 1},
        "apgd-dlr": {"loss": "dlr", "steps": 100, "restarts": 1, "rho": 0.75, "eot_iter": 1},
        "apgd-t": {"loss": "dlr-targeted", "steps": 100, "restarts": 1, "target_classes": k, "rho": 0.75,
                   "eot_iter": 1},
        "fab-t": {"steps": 100, "restarts": 1, "target_classes": k, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9},
        "square": {"queries": 5000, "restarts": 1, "p_init": 0.8, "loss": "margin", "rescale_schedule": False},
    }
    return dict(table[name])


def _check_classes(name: str, num_classes: int) -> None:
    need = {"apgd-dlr": 3, "apgd-t": 4}.get(name, 2)
    if num_classes < need:
        raise ValueError(f"{name} needs at least {need} classes (its DLR loss uses the top "
                         f"{need - 1} logits); the model has {num_classes}")


# ------------------------------------------------------------------------------------- the ardir engine
def _ardir_component(name: str, model: nn.Module, eps: float, num_classes: int, seed: int,
                     norm: str = "linf") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """ardir's own component with the official settings, as ``attack(images, labels) -> adversarial images``,
    in ``norm`` (``"linf"`` or ``"l2"``; the official standard version uses the same settings for both)."""
    from . import apgd, fab, square

    k = target_classes(num_classes)
    if name in ("apgd-ce", "apgd-dlr"):
        return functools.partial(apgd.apgd, model, eps=eps, seed=seed, loss=name[5:], n_iter=100, rho=0.75,
                                 norm=norm)
    if name == "apgd-t":
        return functools.partial(apgd.apgd_targeted, model, eps=eps, seed=seed, n_target_classes=k, n_iter=100,
                                 rho=0.75, norm=norm)
    if name == "fab-t":
        return functools.partial(fab.fab_targeted, model, eps=eps, seed=seed, n_target_classes=k, n_iter=100,
                                 alpha_max=0.1, eta=1.05, beta=0.9, norm=norm)
    return functools.partial(square.square, model, eps=eps, seed=seed, n_queries=5000, p_init=0.8, norm=norm)


def fast_model(model: nn.Module, sample: Optional[torch.Tensor] = None) -> nn.Module:
    """The model as the ardir engine attacks it: a copy with every BatchNorm folded into the convolution or linear
    layer before it (:func:`torch.fx.experimental.optimization.fuse`; in eval mode the same affine map, so the
    same function up to float rounding), channels-last on the CPU when it has 4-d (conv) weights. On a small CNN
    on one core the two together make a forward and input-gradient pass about 2x faster.

    Nothing is folded for a model in training mode, one fx cannot trace, one with hooks (a traced copy would
    lose them, e.g. the input normalisation of ``models.create(..., mean=, std=)``), one that calls a module at
    two places, or one whose folded copy's logits on ``sample`` (a few inputs) differ from the model's: such a
    model is attacked as it is (a channels-last copy on the CPU)."""
    fast = _folded(model, sample)
    if model_device(model).type != "cpu" or not any(p.dim() == 4 for p in model.parameters()):
        return fast if fast is not None else model
    return (fast if fast is not None else copy.deepcopy(model)).to(memory_format=torch.channels_last)


_FAST_COPIES: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, nn.Module]]" = weakref.WeakKeyDictionary()


def cached_fast_model(model: nn.Module, sample: Optional[torch.Tensor] = None) -> nn.Module:
    """:func:`fast_model` of ``model``, made once and shared by every attack on it (AutoAttack's ardir engine,
    ``evaluate()``'s FGSM, PGD and CW), made again whenever a parameter or buffer of ``model`` changes (moved,
    loaded or trained), a module's train/eval flag flips or a hook is added or removed, so it never attacks a stale
    function. ``sample`` checks the first copy (see :func:`fast_model`)."""
    modules = list(model.modules())
    tensors = itertools.chain(model.parameters(), model.buffers())
    key = (tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors),
           tuple(m.training for m in modules),
           tuple(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in modules))
    cached = _FAST_COPIES.get(model)
    if cached is None or cached[0] != key:
        cached = (key, fast_model(model, sample))
        _FAST_COPIES[model] = cached
    return cached[1]


def _folded(model: nn.Module, sample: Optional[torch.Tensor]) -> Optional[nn.Module]:
    """``model`` with its BatchNorms folded, or ``None`` where folding might change the function."""
    from torch import fx
    from torch.fx.experimental.optimization import fuse

    hooked = any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or
                 getattr(m, "_backward_pre_hooks", None) for m in model.modules())
    if model.training or hooked:
        return None
    try:
        traced = fx.symbolic_trace(model)
        called = [node.target for node in traced.graph.nodes if node.op == "call_module"]
        if len(called) != len(set(called)):  # a shared module would be folded once per call site
            return None
        folded = fuse(traced, no_trace=True)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: folding is an optimisation only
        return None
    if sample is not None:
        with torch.no_grad():
            want, got = model(sample), folded(sample)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4,
                                                         atol=1e-4 * max(1.0, float(want.abs().max()))):
            return None
    return folded


def _torchattacks_component(name: str, model: nn.Module, eps: float, num_classes: int,
                            seed: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A torchattacks attack with the official settings, as ``attack(images, labels) -> adversarial images``
    (the ardir engine's components before :func:`_ardir_component`; kept as a reference)."""
    import torchattacks

    k = target_classes(num_classes)
    if name in ("apgd-ce", "apgd-dlr"):
        attack = torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, seed=seed,
                                   loss=name[5:], eot_iter=1, rho=0.75, verbose=False)
    elif name == "apgd-t":
        attack = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, seed=seed,
                                    eot_iter=1, rho=0.75, verbose=False, n_classes=num_classes)
        attack.n_target_classes = k
    elif name == "fab-t":
        attack = torchattacks.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, alpha_max=0.1, eta=1.05,
                                  beta=0.9, verbose=False, seed=seed, multi_targeted=True, n_classes=num_classes)
        attack.n_target_classes = k
    else:  # square; the official code keeps the schedule for 10000 queries (resc_schedule=False)
        attack = torchattacks.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, p_init=0.8,
                                     loss="margin", resc_schedule=False, seed=seed, verbose=False)
    return attack


# ---------------------------------------------------------------------------------- the official engine
def official_module():
    """The authors' AutoAttack module: ``pyautoattack`` (PyPI) or ``autoattack`` (GitHub); ImportError if neither."""
    errors = []
    for name in ("pyautoattack", "autoattack"):
        try:
            return importlib.import_module(name)
        except ImportError as error:
            if not isinstance(error, ModuleNotFoundError) or error.name != name:
                errors.append(f"{name}: {error}")  # installed but broken (pyautoattack needs Python >= 3.10)
    detail = f" (import failed: {'; '.join(errors)})" if errors else ""
    raise ImportError(OFFICIAL_MISSING + detail)


def official_available() -> bool:
    """Whether ``engine="official"`` can run (``pyautoattack`` or ``autoattack`` importable)."""
    try:
        official_module()
        return True
    except ImportError:
        return False


class _Capture(logging.Handler):
    """Collects the official code's warnings (it logs them to the ``auto-attack`` logger)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _captured_official_warnings() -> Iterator[List[str]]:
    logger = logging.getLogger("auto-attack")
    handler = _Capture()
    logger.addHandler(handler)
    old_propagate = logger.propagate
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler.messages
        handler.messages.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate


def _official_component(name: str, model: nn.Module, eps: float, num_classes: int, seed: int,
                        messages: List[str], norm: str = "linf") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One component run through the official driver (``run_standard_evaluation``) with standard settings,
    in the official norm ``"Linf"`` or ``"L2"`` (``norm`` is ardir's ``"linf"`` or ``"l2"``)."""
    module = official_module()
    device = model_device(model)
    official_norm = {"linf": "Linf", "l2": "L2"}[norm]
    if module.__name__ == "pyautoattack":
        adversary = module.AutoAttack(model, eps=eps, norm=official_norm, version="standard", seed=seed,
                                      device=device)
    else:
        adversary = module.AutoAttack(model, norm=official_norm, eps=eps, version="standard", seed=seed,
                                      device=str(device), verbose=False)
    adversary.verbose = False
    adversary.attacks_to_run = [name]
    if name == "apgd-dlr":
        adversary.apgd.n_restarts = 1
    adversary.apgd_targeted.n_target_classes = target_classes(num_classes)
    adversary.fab.n_target_classes = target_classes(num_classes)

    def run(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with _captured_official_warnings() as caught:
            if module.__name__ == "pyautoattack":
                adv, _ = adversary.run_standard_evaluation(images, labels, batch_size=len(images))
            else:
                adv = adversary.run_standard_evaluation(images, labels, bs=len(images))
        messages.extend(caught)
        return adv
    return run


# ------------------------------------------------------------------------------------------- AutoAttack
@torch.no_grad()
def still_correct(model: nn.Module, images: torch.Tensor, adv: torch.Tensor, labels: torch.Tensor,
                  eps: float, norm: str = "linf") -> torch.Tensor:
    """Per-sample bool (N,): the model classifies ``adv`` correctly, or ``adv`` is not a valid attack.

    An adversarial example is valid when it is finite, in [0, 1] and within ``eps`` (+ :data:`TOLERANCE`)
    of ``images`` in ``norm`` (``"linf"``, or ``"l2"`` with the tolerance also relative: + 1e-5 eps); an invalid
    one is replaced by the natural image, so it never counts as a success.
    """
    adv = adv.to(images.device, images.dtype)
    flat = (adv - images).flatten(1)
    valid = torch.isfinite(adv.flatten(1)).all(1)
    if norm == "l2":
        valid &= flat.double().norm(dim=1) <= eps * (1 + TOLERANCE) + TOLERANCE
    else:
        valid &= flat.abs().amax(1) <= eps + TOLERANCE
    valid &= (adv.flatten(1).amin(1) >= -TOLERANCE) & (adv.flatten(1).amax(1) <= 1 + TOLERANCE)
    adv = torch.where(valid.view(-1, *[1] * (images.dim() - 1)), adv, images)
    return model(adv).argmax(1) == labels


class AutoAttack:
    """AutoAttack (standard version by default) as ``correct, per_component = aa.run(images, labels, seed)``.

    Arguments:
        model: the classifier, images in [0, 1] -> logits; it is attacked in eval mode and every module's
            own train/eval flag is restored afterwards.
        eps: the radius in ``norm`` (default 8/255, an L-inf radius).
        num_classes: the model's number of outputs (targeted attacks use ``min(9, num_classes - 1)`` targets).
        attacks: the components, run in this order on the points still robust; default :data:`STANDARD`.
        engine: ``"ardir"`` (ardir's components with the official settings, no extra dependency) or
            ``"official"`` (the authors' code; ``pip install pyautoattack``).
        norm: ``"linf"`` (default) or ``"l2"``; both engines run either (the official standard version's
            components and settings, with the norm's random start, steps, projections and Square updates).

    :meth:`run` returns a bool tensor (N,) (True: classified correctly after every component) and, per
    component, the bool tensor (N,) of points still robust after it (cumulative, as AutoAttack's log).
    Points already misclassified on natural images are not attacked and count as not robust.
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, num_classes: int = 10,
                 attacks: Sequence[str] = STANDARD, engine: str = "ardir", norm: str = "linf"):
        self.model = model
        self.norm = norm_name("norm", norm)
        self.eps = eps_value("eps", eps, self.norm)
        self.num_classes = int(num_classes)
        self.attacks = [one_of("attacks", a, COMPONENTS, "AutoAttack component") for a in attacks]
        if not self.attacks:
            raise ValueError("attacks is empty: give at least one AutoAttack component")
        for name in self.attacks:
            _check_classes(name, self.num_classes)
        self.engine = one_of("engine", engine, ENGINES, "AutoAttack engine")
        if self.engine == "official":
            official_module()  # fail now, with the install hint
        self.messages: List[str] = []
        """Warnings printed by the official code (engine="official"), e.g. its zero-gradient check."""

    @property
    def settings(self) -> Dict[str, Any]:
        """Everything needed to reproduce the run: engine, version, and every component's settings."""
        standard = tuple(self.attacks) == STANDARD
        engine = "ardir (ardir components: apgd, fab, square)" if self.engine == "ardir" else \
            f"official ({official_module().__name__} {getattr(official_module(), '__version__', '')})".strip()
        settings = {"version": "standard" if standard else "custom", "engine": engine,
                    "components": {name: component_settings(name, self.num_classes) for name in self.attacks}}
        if self.norm != "linf":  # L-inf settings stay as they were, so older evaluation state files still resume
            settings["norm"] = "L2"
        return settings

    def _component(self, name: str, seed: int, model: nn.Module):
        if self.engine == "ardir":
            extra = {"norm": self.norm} if self.norm != "linf" else {}  # L-inf: the call as before (its default)
            return _ardir_component(name, model, self.eps, self.num_classes, seed, **extra)
        return _official_component(name, self.model, self.eps, self.num_classes, seed, self.messages, self.norm)

    def run(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0,
            done: Optional[Dict[str, torch.Tensor]] = None,
            on_component: Optional[Callable[[str, torch.Tensor], None]] = None
            ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Attack ``images`` (N, C, H, W) in [0, 1] with ``labels`` (N,); see the class docstring.

        ``done`` maps components already run (an interrupted run) to their cumulative robust mask (N,); they are
        skipped. ``on_component(name, robust)`` is called after each component with the mask so far, so a caller
        can save the progress.
        """
        done = done or {}
        per_component: Dict[str, torch.Tensor] = {}
        with model_mode(self.model, "eval"):
            with torch.no_grad():
                robust = self.model(images).argmax(1) == labels
            model = cached_fast_model(self.model, images[:8]) if self.engine == "ardir" else self.model
            for name in self.attacks:  # the official driver gives every component the same seed
                if name in done:
                    robust &= done[name].to(robust.device)
                else:
                    todo = robust.nonzero().flatten()
                    if len(todo):
                        attack = self._component(name, seed, model)
                        x, y = images[todo], labels[todo]
                        with torch.enable_grad():
                            adv = attack(x, y)
                        robust[todo] = still_correct(self.model, x, adv, y, self.eps, self.norm)
                    if on_component is not None:
                        on_component(name, robust.clone())
                per_component[name] = robust.clone()
        return robust, per_component
