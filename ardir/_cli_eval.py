"""``ardir eval``: its flags, and the evaluation of a run's checkpoint with the report written beside it."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import config as cfg
from . import data as ardir_data
from . import distributed
from ._cli_base import CLIError, _device, _device_flag, _flag_type, attack_name, count
from .checkpoint import load_checkpoint
from .teachers import model_from_checkpoint


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``sub`` (the ``ardir`` parser's subparsers); returns its parser."""
    eval_p = sub.add_parser("eval", help="evaluate a checkpoint; writes <name>_report.md and .json beside it")
    eval_p.add_argument("--checkpoint", required=True, help="an ardir checkpoint (DIR/best.pt or DIR/last.pt)")
    eval_p.add_argument("--attacks", nargs="+", default=None, type=attack_name, help="attack names (ardir.evaluate's grammar: natural, "
                        "fgsm, pgd20, cw30, autoattack, ...); default: the run's `attacks`")
    eps_option = cfg.schema()["eps"]
    eval_p.add_argument("--eps", type=_flag_type("float", eps_option), default=None,
                        help="L-inf radius, e.g. 8/255 (default: the run's eval_eps, else its training eps)")
    eval_p.add_argument("--eps-sweep", type=_flag_type("float", eps_option), nargs="+", default=None,
                        help="also run --sweep-attack at these radii (robust accuracy against eps; `ardir plot`)")
    eval_p.add_argument("--sweep-attack", default="pgd20", type=attack_name, help="attack of the eps sweep and of the large-eps check")
    eval_p.add_argument("--checks", action=argparse.BooleanOptionalAction, default=True,
                        help="run ardir.evaluate's sanity checks (an eps sweep needs them)")
    eval_p.add_argument("--n-examples", type=count, default=None, help="test images evaluated (default: the run's, "
                        "else all)")
    eval_p.add_argument("--data-dir", default=None, help="the dataset's location (default: the run's)")
    eval_p.add_argument("--fake-data", action=argparse.BooleanOptionalAction, default=None,
                        help="evaluate on fake data (default: as the run was trained)")
    eval_p.add_argument("--batch-size", type=count, default=None, help="evaluation batch size (default: the run's)")
    eval_p.add_argument("--device", default="auto", type=_device_flag, help="auto, cpu, cuda, cuda:1, ...")
    eval_p.add_argument("--output", default=None, help="report path without suffix (default: <name>_report beside "
                        "the checkpoint <name>.pt)")
    eval_p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    eval_p.add_argument("--quiet", action="store_true", help="no progress bars")
    return eval_p


def report_path(checkpoint: Path) -> Path:
    """Where ``ardir eval`` writes a checkpoint's report by default: ``DIR/<name>_report`` (.md and .json)."""
    return checkpoint.parent / f"{checkpoint.stem}_report"


def evaluate_checkpoint(checkpoint: str, attacks: Optional[Sequence[str]] = None, eps: Optional[float] = None,
                        n_examples: Optional[int] = None, data_dir: Optional[str] = None,
                        fake_data: Optional[bool] = None, batch_size: Optional[int] = None, device: str = "auto",
                        output: Optional[str] = None, eps_sweep: Optional[Sequence[float]] = None,
                        sweep_attack: str = "pgd20", seed: int = 0, quiet: bool = False, checks: bool = True):
    """Run ``ardir eval``: rebuild the model from the checkpoint's record, evaluate it on the run's test set,
    write ``<name>_report.md`` and ``.json`` beside the checkpoint ``<name>.pt`` (or at ``output``), so
    reports of ``best.pt`` and ``last.pt`` sit side by side. Returns the report."""
    from .evaluate import evaluate
    from .methods import create_method

    path = Path(checkpoint)
    state = load_checkpoint(path)
    if eps_sweep and not checks:
        raise CLIError("--eps-sweep is one of the sanity checks: drop --no-checks")
    if "model_info" not in state or "config" not in state:
        raise CLIError(f"{path} is not an ardir run checkpoint (best.pt or last.pt of `ardir train`)")
    config = cfg.resolve(state["config"])
    dev, joined = distributed.join(_device(device))  # under torchrun each process attacks its share of the batches
    model = model_from_checkpoint(state, source=str(path)).to(dev).eval()
    if eps is None:
        eps = config["eval_eps"]
    if eps is None:
        eps = create_method(config["method"], **cfg.method_kwargs(config)).eps
    fake = config["fake_data"] if fake_data is None else fake_data
    test = ardir_data.get_dataset(config["dataset"], "test", data_dir or config["data_dir"],
                                  download=config["download"], augment=False, fake=fake)
    loader = torch.utils.data.DataLoader(test, batch_size=batch_size or config["batch_size"], shuffle=False)
    try:
        report = evaluate(model, loader, eps=eps, attacks=list(attacks or config["attacks"]),
                          n_examples=n_examples if n_examples is not None else config["n_examples"],
                          eps_sweep=eps_sweep, sweep_attack=sweep_attack, seed=seed, progress=not quiet,
                          dataset=config["dataset"], checks=checks, warn=distributed.is_main_process())
    finally:
        main_process = distributed.is_main_process()
        if joined:
            distributed.cleanup()
    if main_process:
        report.save(Path(output) if output else report_path(path))
    return report


