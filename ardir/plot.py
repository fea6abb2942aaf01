"""Pictures of a run: training curves from ``metrics.jsonl`` and robust accuracy against eps from a report.

Needs matplotlib (``pip install ardir[plot]``); it draws with the non-interactive Agg backend, so it works on
machines without a display. ``ardir plot DIR`` calls :func:`plot_run`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

__all__ = ["NON_TERMS", "read_metrics", "plot_metrics", "plot_sweep", "plot_run"]

PathLike = Union[str, os.PathLike]
NON_TERMS = frozenset({"epoch", "step", "lr", "seconds", "images_per_s", "val_natural", "val_pgd", "grad_norm",
                       "grad_norm_max", "skipped_batches", "peak_memory_mb"})
"""Keys of a metrics.jsonl record that are not loss terms (the loss terms are ``loss`` and the method's)."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'ardir[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_metrics(path: PathLike) -> List[Dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, one dict per epoch."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_metrics(records: Sequence[Mapping[str, Any]], path: PathLike) -> Path:
    """Two panels against the epoch: every loss term (and the total), and validation natural/PGD accuracy.

    Returns ``path`` (a PNG file)."""
    fig = _curves_figure(records)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return Path(path)


def _curves_figure(records: Sequence[Mapping[str, Any]]):
    """The figure :func:`plot_metrics` saves: losses, and validation accuracy when the records have it."""
    if not records:
        raise ValueError("no epochs to plot: metrics.jsonl is empty")
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    terms = [k for k in records[0] if k not in NON_TERMS and isinstance(records[0][k], (int, float))]
    has_val = any("val_pgd" in r for r in records)
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(10 if has_val else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    for term in terms:
        ax.plot(epochs, [r.get(term, float("nan")) for r in records], marker="o", markersize=3, label=term,
                linewidth=2 if term == "loss" else 1)
    _epoch_axis(ax, "training loss (mean over the epoch)")
    if has_val:
        ax = axes[0][1]
        for key, label in (("val_natural", "natural"), ("val_pgd", "PGD")):
            ax.plot(epochs, [r.get(key, float("nan")) for r in records], marker="o", markersize=3, label=label)
        _epoch_axis(ax, "validation accuracy (%)")
    fig.tight_layout()
    return fig


def _epoch_axis(ax, ylabel: str) -> None:
    """Label a panel whose x-axis is the epoch, with whole-number ticks only (no epoch 1.5), legend and grid."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def plot_sweep(report: Mapping[str, Any], path: PathLike) -> Path:
    """Robust accuracy against eps from a report's JSON (:meth:`ardir.Report.to_dict`) with an eps sweep; the
    report's own eps and its natural accuracy (eps = 0) are included. Returns ``path``."""
    sweep = dict((float(e), float(a)) for e, a in (report.get("sweep") or {}).get("accuracy", {}).items())
    if not sweep:
        raise ValueError("the report has no eps sweep: run `ardir eval --eps-sweep ...`")
    attack = report["sweep"].get("attack") or "attack"
    if attack in report.get("attacks", {}) and "eps_value" in report:
        sweep.setdefault(float(report["eps_value"]), float(report["attacks"][attack]["accuracy"]))
    if "natural" in report.get("attacks", {}):
        sweep.setdefault(0.0, float(report["attacks"]["natural"]["accuracy"]))
    plt = _pyplot()
    eps = sorted(sweep)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(eps, [sweep[e] for e in eps], marker="o")
    ax.set_xlabel("ε (L∞ radius, pixels in [0, 1]; 8/255 ≈ 0.031)")
    ax.set_ylabel(f"robust accuracy under {attack} (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_run(directory: PathLike, output_dir: Optional[PathLike] = None) -> List[Path]:
    """Draw what a run directory holds: ``training_curves.png`` from ``metrics.jsonl`` and, for every
    ``*.json`` report with an eps sweep, ``<report>_eps_sweep.png``. Returns the files written."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"run directory {directory} does not exist")
    out = Path(output_dir) if output_dir is not None else directory
    out.mkdir(parents=True, exist_ok=True)
    written = []
    metrics = directory / "metrics.jsonl"
    if metrics.is_file():
        written.append(plot_metrics(read_metrics(metrics), out / "training_curves.png"))
    for report_path in sorted(directory.glob("*.json")):
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(report, dict) and (report.get("sweep") or {}).get("accuracy"):
            written.append(plot_sweep(report, out / f"{report_path.stem}_eps_sweep.png"))
    if not written:
        raise FileNotFoundError(f"nothing to plot in {directory}: no metrics.jsonl and no report with an eps sweep")
    return written
