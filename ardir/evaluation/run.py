"""The one call, :func:`evaluate`: check the arguments, plan the attacks, attack batch by batch (resumable, split
over a process group), gather the results, build the :class:`~ardir.evaluation.report.Report` and its flags."""
from __future__ import annotations

import itertools
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import distributed
from .._checks import (batch_tensors, check_batch, eps_value, label_range, logits_of, norm_name, one_of, pixel_range,
                       positive)
from ..attacks import model_device, model_mode
from ._helpers import _derive_seed, _fmt_eps, _forked_rng, _frozen, _percent, _unbits
from .attacks import Context, Runner, _AutoAttackRunner, _build, _Natural, parse_attack
from .checks import _sanity_flags
from .report import EvaluationWarning, Report
from .selection import SUBSETS, _int64, _select
from .state import _attack_batch, _model_fingerprint, _State

__all__ = ["evaluate", "DEFAULT_ATTACKS"]

DEFAULT_ATTACKS = ("natural", "fgsm", "pgd20", "cw30", "autoattack")
"""The attacks of :func:`evaluate` by default: the table of ARD, RSLAD and IAD plus AutoAttack."""


def evaluate(model: nn.Module, loader: Iterable, eps: float = 8 / 255,
             attacks: Union[str, Sequence[str]] = DEFAULT_ATTACKS, *, step_size: Optional[float] = None,
             n_examples: Optional[int] = None, subset: str = "first", seed: int = 0, engine: str = "ardir",
             batch_size: Optional[int] = None, checks: bool = True, large_eps: Union[float, str, None] = "auto",
             eps_sweep: Optional[Sequence[float]] = None, sweep_attack: str = "pgd20",
             state_path: Union[str, os.PathLike, None] = None, progress: bool = True,
             dataset: Optional[str] = None, warn: bool = True, norm: str = "linf") -> Report:
    """Evaluate ``model`` on ``loader`` under every attack in ``attacks`` and return a :class:`Report`.

    Arguments:
        model: maps images (N, C, H, W) in [0, 1] to logits (N, num_classes); normalisation inside the model.
            It runs on its own device, in eval mode; its modes and ``requires_grad`` flags are restored after.
        loader: yields ``(images, labels)`` batches (a torch DataLoader, unshuffled, or any iterable).
        eps: the radius in ``norm``: L-inf 0 < eps <= 1 (default 8/255); L2 eps > 0 (CIFAR-10's usual 0.5).
        attacks: names from the grammar (:func:`list_attacks`): ``"natural"``, ``"fgsm"``, ``"pgdN"``,
            ``"cwN"``, ``"autoattack"``, ``"apgd-ce"``, ``"apgd-dlr"``, ``"apgd-t"``, ``"fab-t"``, ``"square"``.
            ``natural`` is always evaluated (first), as every robust accuracy counts natural errors.
        step_size: PGD and CW step; default ``eps / 4`` under both norms (2/255 at L-inf eps = 8/255; 0.125 at
            L2 eps = 0.5, a step of that L2 length along the normalised gradient). Sweep attacks scale it with eps.
        n_examples: evaluate only this many samples (default: all the loader gives).
        subset: ``"first"`` (the loader's first ``n_examples``) or ``"random"`` (a seeded random subset of
            ``loader.dataset``, drawn with ``seed``).
        seed: seeds the random subset and every attack (one seed per attack and batch, so a resumed run gives
            the same numbers). The caller's RNG state is left untouched.
        engine: AutoAttack implementation: ``"ardir"`` (ardir's own components with the official settings)
            or ``"official"`` (the authors' code, ``pip install pyautoattack``).
        batch_size: re-batch the samples to this size (default: the loader's batches).
        checks: run the sanity checks (gradient check, ordering, black box vs white box, large eps, eps sweep).
        large_eps: the eps of the "accuracy must reach chance" check; ``"auto"`` (default) is 0.5 under L-inf
            and sqrt(C*H*W) under L2 (the diameter of the image cube, so the ball holds every image); None skips it.
        eps_sweep: extra eps values at which ``sweep_attack`` runs; accuracy must not rise with eps.
        sweep_attack: the attack of the sweep and the large-eps check (default ``"pgd20"``).
        state_path: a JSON file recording which (batch, attack) pairs are done and their per-sample results;
            an interrupted run resumes from it (same settings, same model, same data order required). In a
            process group each process keeps its own, ``<state_path>.rank<r>``.
        progress: show a tqdm bar (it also switches off when the output is not a terminal).
        dataset: a dataset name stored in the report (RobustBench's ``dataset`` key), e.g. ``"cifar10"``.
        warn: issue an :class:`EvaluationWarning` for each failed sanity check (they are in the report anyway).
        norm: the threat model, ``"linf"`` (default) or ``"l2"``. Under L2 ``fgsm`` is FGM (one step of length
            eps along the normalised gradient, no random start), ``pgdN`` and ``cwN`` are ``ardir.PGD(norm="l2")``
            on the cross-entropy / CW margin (uniform start in the ball), and AutoAttack and its components run
            the standard version's L2 attacks (either engine).

    In a process group (``torchrun``, :func:`ardir.distributed.init`), call it on every process with the same
    loader: each attacks every W-th batch and the results are gathered, so every process returns the report one
    process would (each batch's attacks are seeded by the batch's position, whoever runs them).

    Returns:
        a :class:`Report`; ``print(report.to_markdown())`` gives the table.

    Raises:
        ValueError: unknown attack name (with close matches), eps outside (0, 1] under L-inf or <= 0 under L2,
            empty loader, pixel values outside [0, 1], labels outside the model's classes, or a state file from
            other settings.
        ImportError: ``engine="official"`` without the official package.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    settings = _Settings(eps=eps, attacks=attacks, step_size=step_size, n_examples=n_examples, subset=subset,
                         seed=seed, engine=engine, batch_size=batch_size, checks=checks, large_eps=large_eps,
                         sweep=eps_sweep, sweep_attack=sweep_attack, state_path=state_path, progress=progress,
                         dataset=dataset, norm=norm)
    with _forked_rng():  # the attacks (and iterating a DataLoader) draw from torch's global RNG
        report = _run(model, loader, settings)
    report.total_seconds = time.perf_counter() - started
    if warn:
        for flag in report.flags:
            warnings.warn(flag.message, EvaluationWarning, stacklevel=2)
    return report


@dataclass
class _Settings:
    """The arguments of :func:`evaluate`, checked and normalised (``eps_sweep`` becomes the sorted ``sweep``)."""
    eps: float
    attacks: Any
    step_size: Optional[float]
    n_examples: Optional[int]
    subset: str
    seed: int
    engine: str
    batch_size: Optional[int]
    checks: bool
    large_eps: Optional[float]
    sweep: Any
    sweep_attack: str
    state_path: Union[str, os.PathLike, None]
    progress: bool
    dataset: Optional[str]
    norm: str = "linf"

    def __post_init__(self) -> None:
        self.norm = norm_name("norm", self.norm)
        self.eps = eps_value("eps", self.eps, self.norm)
        self.step_size = self.eps / 4 if self.step_size is None else positive("step_size", self.step_size)
        self.attacks = _attack_names(self.attacks, self.sweep_attack)
        self.subset = one_of("subset", self.subset, SUBSETS, "subset")
        self.engine = one_of("engine", self.engine, ("ardir", "official"), "AutoAttack engine")
        n_examples, batch_size = self.n_examples, self.batch_size
        if n_examples is not None:
            if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
                raise ValueError(f"n_examples={n_examples!r} must be a whole number >= 1 (or None for all)")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} must be a whole number >= 1 (or None: the loader's batches)")
        if self.large_eps is None or not self.checks:
            self.large_eps = None
        elif self.large_eps == "auto":
            self.large_eps = 0.5 if self.norm == "linf" else "auto"  # L2: sqrt(C*H*W), known at the first batch
        else:
            self.large_eps = eps_value("large_eps", self.large_eps, self.norm)
        eps_sweep = [self.sweep] if isinstance(self.sweep, (int, float)) else self.sweep
        self.sweep = sorted({eps_value("eps_sweep", e, self.norm) for e in (eps_sweep or [])}) if self.checks else []
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed={self.seed!r} must be an int")


def _attack_names(attacks: Union[str, Sequence[str]], sweep_attack: str) -> List[str]:
    """The attack names as a list, every one (and ``sweep_attack``) parsed: a typo fails before the data."""
    if isinstance(attacks, str):
        attacks = [attacks]
    if not isinstance(attacks, Iterable):
        raise TypeError(f"attacks={attacks!r} must be attack names, e.g. ('natural', 'pgd20', 'autoattack')")
    attacks = list(attacks)
    if not attacks:
        raise ValueError("attacks is empty: give at least one attack name, e.g. ('natural', 'pgd20')")
    for name in attacks:
        parse_attack(name)  # fail on a typo before touching the data
    try:
        sweep_spec = parse_attack(sweep_attack)[0]
    except ValueError as err:  # the registry's message names "attacks"
        raise ValueError(str(err).replace("attacks=", "sweep_attack=", 1)) from None
    if sweep_spec.pattern == r"natural|clean":
        raise ValueError("sweep_attack must be an attack, not 'natural'")
    return attacks


@dataclass
class _Plan:
    """The runners in order (natural first, the requested attacks, then the sweep / large-eps runs of the checks):
    ``main_keys`` are the report's attacks, ``sweep_keys`` the sweep attack's key per eps."""
    runners: Dict[str, Runner]
    main_keys: List[str]
    sweep_key: str
    sweep_keys: Dict[float, str]


def _plan(model: nn.Module, s: _Settings, num_classes: int) -> _Plan:
    """Build every runner; an attack listed twice is an error. The sweep runs at eps' with step_size * eps' / eps."""
    ctx = Context(model, s.eps, s.step_size, num_classes, s.engine, s.norm)
    runners: Dict[str, Runner] = {"natural": _Natural(model)}
    for name in s.attacks:
        runner = _build(name, ctx)
        if runner.key in runners and runner.key != "natural":
            raise ValueError(f"attack {name!r} is listed twice (as {runners[runner.key].key!r})")
        runners[runner.key] = runner
    main_keys = list(runners)
    sweep_key = _build(s.sweep_attack, ctx).key
    sweep_eps = sorted(set(s.sweep) | ({s.large_eps} if s.large_eps is not None else set()))
    if sweep_eps:
        sweep_eps = sorted(set(sweep_eps) | {s.eps})
    sweep_keys: Dict[float, str] = {}
    for e in sweep_eps:
        if e == s.eps and sweep_key in runners:
            sweep_keys[e] = sweep_key
            continue
        runner = _build(s.sweep_attack, Context(model, e, s.step_size * e / s.eps, num_classes, s.engine, s.norm))
        runner.key = f"{runner.key}@{e:.6g}"
        runners[runner.key] = runner
        sweep_keys[e] = runner.key
    return _Plan(runners, main_keys, sweep_key, sweep_keys)


def _run(model: nn.Module, loader: Iterable, s: _Settings) -> Report:
    """The body of :func:`evaluate` once the arguments are checked (it calls :func:`_select` itself, so that the
    shuffle warning points at the caller of :func:`evaluate`)."""
    batches, total, indices, subset_label = _select(loader, s.n_examples, s.subset, s.seed, s.batch_size)
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("the loader yields no batch (is the dataset empty, or drop_last with too few samples?)")
    run = _Evaluation(model, s)
    with model_mode(model, "eval"), _frozen(model):
        run.probe(first)
        if s.large_eps == "auto":  # L2: the diameter of the [0, 1] image cube, so the ball holds every image
            s.large_eps = math.sqrt(first[0][0].numel())
        run.plan = _plan(model, s, run.num_classes)
        run.open_state(subset_label)
        n = run.attack(itertools.chain([first], batches), total)
        run.gather()
    return run.report(n, indices, subset_label)


class _Evaluation:
    """One evaluation, step by step: :meth:`probe` the first batch, (``plan`` the runners), :meth:`open_state`,
    :meth:`attack` every batch, :meth:`gather` the processes' results, build the :meth:`report`."""

    def __init__(self, model: nn.Module, settings: _Settings):
        self.model, self.s = model, settings
        self.device = model_device(model)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.num_classes, self.randomized = 0, False
        self.plan: Optional[_Plan] = None
        self.state: Optional[_State] = None
        self.outcomes: Dict[int, Dict[str, Any]] = {}  # batch index -> its per-sample results, seconds, components
        self.official_messages: List[str] = []

    def probe(self, first: Tuple[torch.Tensor, torch.Tensor]) -> None:
        """Check the first batch and the model's logits; find the number of classes and a randomized model."""
        model = self.model
        images, labels = first[0].to(self.device), _int64(first[1].to(self.device))
        batch_tensors("the first batch", images, labels)
        pixel_range("the first batch", images)
        logits = logits_of("model", model, images)
        with torch.no_grad():
            self.randomized = bool(self.s.checks) and not torch.allclose(logits, model(images), rtol=1e-4, atol=1e-4)
        self.num_classes = logits.shape[1]
        label_range("the first batch", labels, self.num_classes)

    def open_state(self, subset_label: str) -> None:
        """The resume state of these settings (one file per process in a process group)."""
        s, runners = self.s, self.plan.runners
        config = {"eps": s.eps, **({"norm": s.norm} if s.norm != "linf" else {}), "seed": s.seed, "subset": subset_label, "engine": s.engine, "checks": bool(s.checks),
                  "model": _model_fingerprint(self.model), "batch_size": s.batch_size,
                  "attacks": {k: json.loads(json.dumps(r.settings, default=str)) for k, r in runners.items()}}
        # In a process group (torchrun) each process attacks every W-th batch and the outcomes are gathered: each
        # batch's attacks are seeded by its position, so the report is the one-process report, on every process.
        state_path = s.state_path
        if self.world > 1:
            config["processes"] = self.world
            if state_path is not None:  # one state file per process
                state_path = Path(state_path).with_name(f"{Path(state_path).name}.rank{self.rank}")
        self.state = _State(Path(state_path) if state_path is not None else None, config)

    def attack(self, batches: Iterator, total: Optional[int]) -> int:
        """Attack this process's share of the batches (every W-th); the number of samples of all the batches."""
        world, main_keys = self.world, self.plan.main_keys
        bar = tqdm(total=total, unit="img", desc="evaluate",
                   disable=None if self.s.progress and distributed.is_main_process() else True)
        start = 0
        try:
            for index, batch in enumerate(batches):
                if index % world != self.rank:  # another process's batch
                    start += len(batch[1])
                    continue
                images, labels = batch[0].to(self.device), _int64(batch[1].to(self.device))
                if index:  # the first batch was checked by probe; a later one out of range would count silently
                    check_batch(f"the batch of samples {start}..{start + len(labels) - 1}", images, labels,
                                self.num_classes)
                self.outcomes[index] = self._batch(images, labels, start, bar)
                start += len(labels)
                # rank 0's bar stands for all processes: each has done about as much
                bar.update(len(labels) * world if bar.total is None else min(len(labels) * world, bar.total - bar.n))
                bar.set_postfix_str(", ".join(
                    f"{k}={100 * torch.cat([o['results'][k] for o in self.outcomes.values()]).float().mean():.1f}"
                    for k in main_keys))
        finally:
            bar.close()
        return start

    def _batch(self, images: torch.Tensor, labels: torch.Tensor, start: int, bar) -> Dict[str, Any]:
        """Every attack on one batch, or its results from the state file; the batch's outcome."""
        s, state = self.s, self.state
        entry = state.batch(len(self.outcomes), start, labels)
        done = entry["results"]
        outcome = {"results": {}, "seconds": {}, "parts": {}, "grad": (0, 0, 0)}
        natural = None
        for key, runner in self.plan.runners.items():
            record = done.get(key)
            if record is None:
                bar.set_postfix_str(runner.display)
                record = _attack_batch(runner, self.model, images, labels, natural, state, entry,
                                       _derive_seed(s.seed, key, start), s.checks)
                if isinstance(runner, _AutoAttackRunner):
                    self.official_messages.extend(runner.attack.messages)
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
        return outcome

    def gather(self) -> None:
        """In a process group, every process's outcomes and official AutoAttack messages, on every process."""
        if self.world > 1:
            gathered = distributed.all_gather_object((self.outcomes, self.official_messages))
            self.outcomes = {i: o for part, _ in gathered for i, o in part.items()}
            self.official_messages = [m for _, messages in gathered for m in messages]

    def _masks(self) -> Tuple[Dict[str, List[torch.Tensor]], Dict[str, float], Dict[str, Dict[str, torch.Tensor]],
                              Dict[str, int]]:
        """Over the batches in order: per runner its per-sample results and seconds, per runner with components
        each component's results, and the gradient check's counts."""
        ordered = [self.outcomes[i] for i in sorted(self.outcomes)]
        runners = self.plan.runners
        results = {k: [o["results"][k] for o in ordered] for k in runners}
        seconds = {k: sum(o["seconds"][k] for o in ordered) for k in runners}
        parts: Dict[str, Dict[str, List[torch.Tensor]]] = {}
        for o in ordered:
            for key, comps in o["parts"].items():
                for c, mask in comps.items():
                    parts.setdefault(key, {}).setdefault(c, []).append(mask)
        grad = dict(zip(("checked", "zero", "nonfinite"), (sum(o["grad"][i] for o in ordered) for i in range(3))))
        return results, seconds, parts, grad

    def report(self, n: int, indices: Optional[List[int]], subset_label: str) -> Report:
        """The report of ``n`` samples, with the flags of the sanity checks when they are on."""
        s, runners, main_keys, sweep_keys = self.s, self.plan.runners, self.plan.main_keys, self.plan.sweep_keys
        results, seconds, parts, grad = self._masks()
        correct = {k: torch.cat(results[k]) for k in main_keys}
        extra = {k: torch.cat(v) for k, v in results.items() if k not in main_keys}
        accuracy = {k: _percent(mask) for k, mask in correct.items()}
        components = {k: {c: _percent(torch.cat(masks)) for c, masks in comp.items()}
                      for k, comp in parts.items() if k in main_keys}
        sweep_acc = {e: _percent(correct[key] if key in correct else extra[key]) for e, key in sweep_keys.items()}
        sweep_key = self.plan.sweep_key
        report = Report(
            accuracy=accuracy, correct=correct, names={k: runners[k].display for k in main_keys},
            descriptions={k: runners[k].description for k in main_keys},
            settings={k: runners[k].settings for k in main_keys},
            seconds={k: seconds[k] for k in main_keys}, threat_model={"norm": {"linf": "Linf", "l2": "L2"}[s.norm], "eps": s.eps}, n_examples=n,
            num_classes=self.num_classes, seed=s.seed, device=str(self.device), engine=s.engine,
            subset=subset_label, indices=indices, components=components, sweep=sweep_acc,
            sweep_attack=sweep_key if sweep_acc else None, gradient_check=grad if s.checks else {},
            model=getattr(self.model, "ardir_name", type(self.model).__name__), dataset=s.dataset,
            sanity={"large_eps": s.large_eps, "eps_sweep": s.sweep, "attack": sweep_key,
                    "step_size": f"{_fmt_eps(s.step_size)} x eps' / {_fmt_eps(s.eps)}"} if s.checks else {},
            versions=_versions())
        if s.checks:
            component_masks = {k: {c: torch.cat(masks) for c, masks in comp.items()}
                               for k, comp in parts.items() if k in main_keys}
            report.flags = _sanity_flags(report, runners, extra, component_masks, sweep_keys, self.randomized,
                                         self.official_messages)
        return report


def _versions() -> Dict[str, str]:
    """The versions of ardir, torch and torchattacks, for the report."""
    import torchattacks

    from .. import __version__ as ardir_version
    return {"ardir": ardir_version, "torch": torch.__version__,
            "torchattacks": getattr(torchattacks, "__version__", "?")}
