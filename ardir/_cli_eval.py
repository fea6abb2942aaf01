"""``ardir eval``: its flags, and the evaluation of a run's checkpoint (``--checkpoint``) or of a model trained
elsewhere (``--model NAME --weights FILE --dataset NAME``), with the report written beside the file."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import config as cfg
from . import data as ardir_data
from . import distributed
from . import models
from ._cli_base import (CLIError, _dataset_name, _device, _device_flag, _flag_type, _model_name, attack_name,
                         count)
from .checkpoint import load_checkpoint
from .teachers import load_weights, model_from_checkpoint


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``sub`` (the ``ardir`` parser's subparsers); returns its parser."""
    eval_p = sub.add_parser("eval", help="evaluate a checkpoint, or a model's weights trained elsewhere; writes "
                            "<name>_report.md and .json beside it")
    source = eval_p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="FILE", help="an ardir checkpoint (DIR/best.pt or DIR/last.pt)")
    source.add_argument("--weights", metavar="FILE", help="a plain state_dict file (or a dict with it under "
                        "state_dict or model) of a model trained elsewhere; with --model and --dataset")
    eval_p.add_argument("--model", type=_model_name, metavar="NAME", help="the architecture of --weights: a name of "
                        "ardir.models.list_models() or timm/<name>")
    eval_p.add_argument("--dataset", type=_dataset_name, metavar="NAME", help="the test set of --weights; its "
                        "classes and channels size the model")
    eval_p.add_argument("--normalize", action="store_true", help="with --weights: the model normalises its input "
                        "with the dataset's mean and std (as `ardir train --normalize`)")
    eval_p.add_argument("--attacks", nargs="+", default=None, type=attack_name, help="attack names (ardir.evaluate's "
                        "grammar: natural, fgsm, pgd20, cw30, autoattack, ...); default: the run's `attacks`, with "
                        f"--weights {' '.join(cfg.ATTACKS_DEFAULT)}")
    # radii are checked against the threat model once it is known (the run's norm or --norm): (0, 1] under L-inf
    eval_p.add_argument("--norm", default=None, type=_norm_flag,
                        help="threat model, linf or l2 (default: the run's norm, else linf; with --weights linf)")
    radius = cfg.schema()["eps"]  # > 0 here; <= 1 as well under L-inf, checked once the norm is known
    eval_p.add_argument("--eps", type=_flag_type("float", radius), default=None,
                        help="radius in --norm, e.g. 8/255 under linf or 0.5 under l2 (default: the run's eval_eps, "
                        "else its training eps; with --weights the data set's usual L-inf radius -- 8/255, 0.1 on "
                        "fashion-mnist, 0.3 on mnist -- or 0.5 under l2)")
    eval_p.add_argument("--eps-sweep", type=_flag_type("float", radius), nargs="+", default=None,
                        help="also run --sweep-attack at these radii (robust accuracy against eps; `ardir plot`)")
    eval_p.add_argument("--sweep-attack", default="pgd20", type=attack_name,
                        help="attack of the eps sweep and of the large-eps check")
    eval_p.add_argument("--checks", action=argparse.BooleanOptionalAction, default=True,
                        help="run ardir.evaluate's sanity checks (an eps sweep needs them)")
    eval_p.add_argument("--n-examples", type=count, default=None, help="test images evaluated (default: the run's, "
                        "else all)")
    eval_p.add_argument("--data-dir", default=None, help="the dataset's location (default: the run's; with --weights "
                        "$ARDIR_DATA_DIR or ~/.cache/ardir/data)")
    eval_p.add_argument("--fake-data", action=argparse.BooleanOptionalAction, default=None,
                        help="evaluate on fake data (default: as the run was trained; with --weights no)")
    eval_p.add_argument("--batch-size", type=count, default=None, help="evaluation batch size (default: the run's; "
                        f"with --weights {cfg.schema()['batch_size'].default})")
    eval_p.add_argument("--device", default="auto", type=_device_flag, help="auto, cpu, cuda, cuda:1, ...")
    eval_p.add_argument("--output", default=None, help="report path without suffix (default: <name>_report beside "
                        "the checkpoint or weights file <name>.pt)")
    eval_p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    eval_p.add_argument("--quiet", action="store_true", help="no progress bars")
    return eval_p


def _norm_flag(text: str) -> str:
    """The --norm flag: linf or l2."""
    if text not in ("linf", "l2"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a norm: pass linf or l2")
    return text


def _check_radii(norm: str, eps: float, eps_sweep: Optional[Sequence[float]]) -> None:
    """--eps and --eps-sweep within the range of ``norm`` (L-inf (0, 1], L2 > 0); else one CLIError line."""
    for flag, values in (("--eps", [eps]), ("--eps-sweep", eps_sweep or [])):
        for value in values:
            if not value > 0 or (norm == "linf" and value > 1):
                hint = " (an L-inf radius on [0, 1] images: 8/255, not 8; for an L2 radius pass --norm l2)" \
                    if norm == "linf" else ""
                raise CLIError(f"{flag} {value:g} must be > 0{' and <= 1' if norm == 'linf' else ''} under "
                               f"--norm {norm}{hint}")


def report_path(checkpoint: Path) -> Path:
    """Where ``ardir eval`` writes a checkpoint's report by default: ``DIR/<name>_report`` (.md and .json)."""
    return checkpoint.parent / f"{checkpoint.stem}_report"


def _evaluate_and_save(model: torch.nn.Module, test, device: str, eps: float, attacks: Sequence[str],
                       n_examples: Optional[int], batch_size: int, eps_sweep: Optional[Sequence[float]],
                       sweep_attack: str, seed: int, quiet: bool, checks: bool, dataset: str, output: Path,
                       norm: str = "linf", source: Optional[str] = None):
    """Evaluate ``model`` on the ``test`` set (``ardir.evaluate``) and write the report at ``output`` (.md, .json)."""
    from .evaluate import evaluate

    dev, joined = distributed.join(_device(device))  # under torchrun each process attacks its share of the batches
    model = model.to(dev).eval()
    loader = torch.utils.data.DataLoader(test, batch_size=batch_size, shuffle=False)
    try:
        report = evaluate(model, loader, eps=eps, attacks=list(attacks), n_examples=n_examples, eps_sweep=eps_sweep,
                          sweep_attack=sweep_attack, seed=seed, progress=not quiet, dataset=dataset, checks=checks,
                          warn=distributed.is_main_process(), norm=norm)
    finally:
        main_process = distributed.is_main_process()
        if joined:
            distributed.cleanup()
    report.source = source
    if main_process:
        report.save(output)
    return report


def evaluate_checkpoint(checkpoint: str, attacks: Optional[Sequence[str]] = None, eps: Optional[float] = None,
                        n_examples: Optional[int] = None, data_dir: Optional[str] = None,
                        fake_data: Optional[bool] = None, batch_size: Optional[int] = None, device: str = "auto",
                        output: Optional[str] = None, eps_sweep: Optional[Sequence[float]] = None,
                        sweep_attack: str = "pgd20", seed: int = 0, quiet: bool = False, checks: bool = True,
                        norm: Optional[str] = None):
    """Run ``ardir eval --checkpoint``: rebuild the model from the checkpoint's record, evaluate it on the run's
    test set, write ``<name>_report.md`` and ``.json`` beside the checkpoint ``<name>.pt`` (or at ``output``), so
    reports of ``best.pt`` and ``last.pt`` sit side by side. The threat model is the run's (``norm`` and its eps:
    an L2 run is evaluated under L2) unless ``norm`` is given, which then needs ``eps``. Returns the report."""
    from .methods import create_method

    path = Path(checkpoint)
    state = load_checkpoint(path)
    if eps_sweep and not checks:
        raise CLIError("--eps-sweep is one of the sanity checks: drop --no-checks")
    if "model_info" not in state or "config" not in state:
        raise CLIError(f"{path} is not an ardir run checkpoint (best.pt or last.pt of `ardir train`); evaluate a "
                       "plain state_dict with --model NAME --weights FILE --dataset NAME")
    config = cfg.resolve(state["config"])
    model = model_from_checkpoint(state, source=str(path))
    run_norm = config.get("norm") or "linf"
    if norm is not None and norm != run_norm and eps is None:  # the run's radii belong to its own norm
        raise CLIError(f"--norm {norm}: {path} was trained under {run_norm}, so its eps is no {norm} radius; pass "
                       "--eps RADIUS too")
    norm = norm or run_norm
    if eps is None:
        eps = config["eval_eps"]
    if eps is None:
        eps = create_method(config["method"], **cfg.method_kwargs(config)).eps
    _check_radii(norm, eps, eps_sweep)
    fake = config["fake_data"] if fake_data is None else fake_data
    test = ardir_data.get_dataset(config["dataset"], "test", data_dir or config["data_dir"],
                                  download=config["download"], augment=False, fake=fake)
    return _evaluate_and_save(model, test, device, eps, attacks or config["attacks"],
                              n_examples if n_examples is not None else config["n_examples"],
                              batch_size or config["batch_size"], eps_sweep, sweep_attack, seed, quiet, checks,
                              config["dataset"], Path(output) if output else report_path(path), norm, str(path))


def evaluate_weights(weights: str, model: str, dataset: str, attacks: Optional[Sequence[str]] = None,
                     eps: Optional[float] = None, n_examples: Optional[int] = None, data_dir: Optional[str] = None,
                     fake_data: Optional[bool] = None, batch_size: Optional[int] = None, device: str = "auto",
                     output: Optional[str] = None, eps_sweep: Optional[Sequence[float]] = None,
                     sweep_attack: str = "pgd20", seed: int = 0, quiet: bool = False, checks: bool = True,
                     normalize: bool = False, norm: Optional[str] = None):
    """Run ``ardir eval --model NAME --weights FILE --dataset NAME``: build ``model`` with
    :func:`ardir.models.create` for the dataset's classes and channels, load the weights trained elsewhere
    (:func:`ardir.teachers.load_weights`), evaluate on the dataset's test set and write ``<name>_report.md`` and
    ``.json`` beside the weights file ``<name>.pt`` (or at ``output``). Without a run to take them from, the
    defaults are the attacks ``natural fgsm pgd20 cw30``, the data set's usual L-inf radius (8/255; 0.1 on
    Fashion-MNIST, 0.3 on MNIST) or 0.5 with ``norm="l2"``, the whole test set, batches of 128. Returns the
    report."""
    if eps_sweep and not checks:
        raise CLIError("--eps-sweep is one of the sanity checks: drop --no-checks")
    norm = norm or "linf"
    spec = ardir_data.get_spec(dataset)
    if eps is None:
        eps = spec.eps if norm == "linf" else 0.5
    _check_radii(norm, eps, eps_sweep)
    options = cfg.schema()

    def test_set():
        return ardir_data.get_dataset(spec.name, "test", data_dir, download=options["download"].default,
                                      augment=False, fake=bool(fake_data))
    test = None
    num_classes = spec.num_classes
    if num_classes is None:  # an image folder: its class folders decide
        test = test_set()
        num_classes = len(test.classes)
    mean, std = (list(spec.mean), list(spec.std)) if normalize else (None, None)
    net = models.create(model, num_classes=num_classes, in_chans=spec.in_chans, mean=mean, std=std)
    load_weights(net, weights, model_name=f"{model} ({num_classes} classes, {spec.in_chans}-channel images)")
    test = test if test is not None else test_set()
    return _evaluate_and_save(net, test, device, eps, attacks or options["attacks"].default,
                              n_examples, batch_size or options["batch_size"].default, eps_sweep, sweep_attack, seed,
                              quiet, checks, spec.name, Path(output) if output else report_path(Path(weights)), norm,
                              str(weights))


def run_eval(args: argparse.Namespace):
    """``ardir eval`` from its parsed flags: ``(report, where the report was written, without suffix)``."""
    common = dict(attacks=args.attacks, eps=args.eps, n_examples=args.n_examples, data_dir=args.data_dir,
                  fake_data=args.fake_data, batch_size=args.batch_size, device=args.device, output=args.output,
                  eps_sweep=args.eps_sweep, sweep_attack=args.sweep_attack, seed=args.seed, quiet=args.quiet,
                  checks=args.checks, norm=args.norm)
    if args.weights is not None:
        for flag, value, what in (("--model", args.model, "NAME, the architecture the weights are for "
                                   "(ardir.models.list_models() or timm/<name>)"),
                                  ("--dataset", args.dataset, "NAME, the test set to evaluate them on")):
            if value is None:
                raise CLIError(f"--weights needs {flag} {what}")
        report = evaluate_weights(args.weights, args.model, args.dataset, normalize=args.normalize, **common)
        source = Path(args.weights)
    elif args.checkpoint is not None:
        given = [flag for flag, value in (("--model", args.model), ("--dataset", args.dataset),
                                          ("--normalize", args.normalize)) if value]
        if given:
            raise CLIError(f"{' and '.join(given)} describe{'s' if len(given) == 1 else ''} --weights; an ardir "
                           "checkpoint records its model and dataset, so drop them")
        report = evaluate_checkpoint(args.checkpoint, **common)
        source = Path(args.checkpoint)
    else:
        raise CLIError("pass --checkpoint FILE (an ardir run's best.pt or last.pt), or --weights FILE with --model "
                       "NAME and --dataset NAME (a model trained elsewhere)")
    from .evaluation.report import report_stem
    return report, report_stem(args.output) if args.output else report_path(source)
