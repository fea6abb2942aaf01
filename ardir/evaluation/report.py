"""What :func:`ardir.evaluate` returns: the :class:`Report` (table, JSON, save and load) and its sanity flags."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ._helpers import _atomic_write, _bits, _fmt_eps, _percent, _unbits

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
        threat_model: ``{"norm": "Linf", "eps": eps}`` or ``{"norm": "L2", "eps": eps}`` (RobustBench's names;
            the JSON's ``threat_model`` and the Markdown caption state it).
        n_examples, num_classes, seed, device, engine: as evaluated.
        subset: which samples, e.g. ``"first 1000"`` or ``"random 1000 of 10000 (seed 0)"``.
        indices: the dataset indices evaluated when ``subset="random"`` (else None: the loader's first N).
        components: per AutoAttack key, the robust accuracy (%) after each component, cumulative.
        sweep, sweep_attack: accuracy (%) per eps of the eps-sweep attack (with the large-eps check).
        flags: the failed sanity checks (:class:`SanityFlag`); :attr:`warnings` gives their messages.
        gradient_check: counts of the gradient check (``checked``, ``zero``, ``nonfinite``).
        sanity: the settings of the sanity checks (``large_eps``, ``eps_sweep``, ``attack``, ``step_size``).
        model, dataset: the model's name (its :func:`ardir.models.create` name, else its class name) and the
            dataset's, when known; both are in the Markdown caption and the JSON.
        source: the checkpoint or weights file the model came from, when known (``ardir eval`` sets it).
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
    source: Optional[str] = None
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
        eps = self._eps_text(self.threat_model["eps"])
        norm = "L2" if self.threat_model["norm"] == "L2" else "L∞"
        what = ", ".join(part for part in (f"model {self.model}" if self.model else "",
                                           f"data set {self.dataset}" if self.dataset else "",
                                           f"weights {self.source}" if self.source else "") if part)
        lines = [f"Robust accuracy, {norm} threat model, ε = {eps}, {self.n_examples} examples ({self.subset}), "
                 f"seed {self.seed}, {self.device}." + (f" {what[0].upper() + what[1:]}." if what else ""), "",
                 "| Attack | Accuracy (%) | Settings | Time (s) |", "|:--|--:|:--|--:|"]
        for key, acc in self.accuracy.items():
            lines.append(f"| {self.names[key]} | {acc:.2f} | {self.descriptions[key]} | {self.seconds[key]:.1f} |")
        lines.append(f"| **Worst case** | **{self.worst_case:.2f}** | per-sample minimum over the attacks above | "
                     f"{sum(self.seconds.values()):.1f} |")
        if self.sweep:
            points = ", ".join(f"ε = {self._eps_text(e)}: {a:.2f}" for e, a in sorted(self.sweep.items()))
            lines += ["", f"Accuracy (%) under {self.names.get(self.sweep_attack, self.sweep_attack)} against ε "
                          f"(sanity checks): {points}."]
        if self.flags:
            lines.append("")
            lines.extend(f"> **Warning ({flag.code}):** {flag.message}" for flag in self.flags)
        return "\n".join(lines) + "\n"

    def _eps_text(self, eps: float) -> str:
        """An eps as the report prints it: 8/255 for L-inf multiples of 1/255, a short decimal under L2."""
        return f"{eps:.4g}" if self.threat_model["norm"] == "L2" else _fmt_eps(eps)

    def __str__(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        accs = ", ".join(f"{k}={v:.2f}" for k, v in self.accuracy.items())
        norm = ", norm=L2" if self.threat_model["norm"] == "L2" else ""
        return (f"Report(eps={self._eps_text(self.threat_model['eps'])}{norm}, n={self.n_examples}, {accs}, "
                f"worst_case={self.worst_case:.2f}, flags={[f.code for f in self.flags]})")

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict: RobustBench's model-card keys first, then everything else.

        RobustBench keys: ``name``, ``dataset``, ``threat_model``, ``eps`` ("8/255"), ``clean_acc`` and
        ``autoattack_acc`` (strings with two decimals, as in RobustBench's model_info files; ``autoattack_acc``
        is None when AutoAttack was not run). Per-sample results are strings of 0/1, one character per sample.
        """
        aa = self.accuracy.get("autoattack")
        return {
            "name": self.model, "dataset": self.dataset, "source": self.source,
            "threat_model": self.threat_model["norm"],
            "eps": self._eps_text(self.threat_model["eps"]),
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
            dataset=record["dataset"], source=record.get("source"), total_seconds=record["total_seconds"],
            versions=record["versions"])

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
        path = report_stem(path)
        md, js = path.with_name(path.name + ".md"), path.with_name(path.name + ".json")
        _atomic_write(md, self.to_markdown())
        _atomic_write(js, self.to_json() + "\n")
        return md, js


def report_stem(path: Union[str, os.PathLike]) -> Path:
    """The path :meth:`Report.save` writes ``.md`` and ``.json`` beside: ``path`` without a ``.md``/``.json``
    suffix."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".md", ".json") else path
