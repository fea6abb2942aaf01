"""Reproduce the comparison tables: every method, every student, several seeds, one Markdown + JSON table per suite.

    python benchmarks/reproduce.py fashion-mnist                      # the CPU suite, measured here (3 seeds)
    python benchmarks/reproduce.py fashion-mnist --ablation           # the ARDIR ablation on the same settings
    python benchmarks/reproduce.py cifar10 --teacher robustbench:Zhang2019Theoretically --data-dir ~/data
    python benchmarks/reproduce.py cifar100 --data-dir ~/data         # trains its TRADES WRN-34-10 teacher first
    python benchmarks/reproduce.py cifar10 --template                 # only the table: published numbers, empty cells
    python benchmarks/reproduce.py cifar10 --fake-data --limit-batches 1 --epochs 1 --batch-size 2 ...   # dry run

A suite (:data:`SUITES`) is a dataset, a threat model, a teacher (trained once with ``teacher_method`` and cached in
the run directory, shared by every row and seed, as the papers share one fixed teacher; or loaded with
``--teacher SPEC``: a checkpoint, a model name, ``robustbench:NAME``), the students, the methods and the
evaluation. Every (student, method, seed) row is trained and evaluated independently and writes
``<run-dir>/<student>__<method>__seed<k>.json``; a rerun skips rows whose JSON exists with the same settings, so an
interrupted suite resumes. The table is rewritten from all row files after each row. Each row of the table carries
the command that reruns just that row.

Anything that departs from the suite's protocol (fewer epochs, a training subset, a smaller evaluation set, ...)
is listed at the top of the table as a REDUCED run.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

import ardir
from ardir import data, zoo
from ardir.checkpoint import atomic_save, atomic_write_text
from ardir.cli import attack_name, count, device_name, whole
from ardir.teachers import TeacherNotFoundError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the suite's own modules beside it
import table_records  # noqa: E402
from suites import (ABLATION_METHODS, ABLATIONS, HEADERS, IAD_WARMUP_FRACTION, L2_HEADERS,  # noqa: E402
                    METRICS, PUBLISHED, PUBLISHED_SOURCES, ROW_NAMES, SUITES, Suite, ablation_arguments, base_method)
from suite_tables import (add_differences, difference_metrics, format_cell, strongest_metric,  # noqa: E402,F401
                    summarize, write_table)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "benchmarks/reproduce.py"
# -------------------------------------------------------------------------------------------------- settings
def resolve(suite: Suite, args: argparse.Namespace) -> Dict[str, Any]:
    """The settings a run uses: the suite's, overridden by the command line."""
    pick = (lambda a, s: s if a is None else a)
    epochs = pick(args.epochs, suite.epochs)
    return {
        "suite": suite.name, "dataset": suite.dataset, "eps": suite.eps,
        "step_size": suite.step_size, "steps": pick(args.train_steps, suite.steps),
        "eval_step_size": suite.eval_step_size,
        "teacher_model": suite.teacher_model, "teacher_method": suite.teacher_method,
        "teacher_epochs": pick(args.teacher_epochs, pick(args.epochs, suite.teacher_epochs)),
        "teacher": pick(args.teacher, suite.teacher_spec),
        "teacher_kwargs": suite.teacher_kwargs, "students": list(pick(args.students, suite.students)),
        "epochs": epochs, "lr": suite.lr, "batch_size": pick(args.batch_size, suite.batch_size),
        "train_size": pick(args.train_size, suite.train_size),
        "attacks": list(pick(args.attacks, suite.attacks)),
        "eval_size": pick(args.eval_size, suite.eval_size), "aa_size": pick(args.aa_size, suite.aa_size),
        "eval_seed": suite.eval_seed, "limit_batches": args.limit_batches, "fake_data": args.fake_data,
        "checks": suite.checks and not args.no_checks,
        "teacher_attacks": list(suite.teacher_attacks) if suite.teacher_attacks else None,
        "method_kwargs": suite.method_kwargs, "precision": args.precision,
        "in_chans": suite.in_chans, "num_classes": suite.num_classes,
        "natural_teacher": pick(args.natural_teacher, suite.natural_teacher), "norm": suite.norm,
    }


REDUCIBLE = ("steps", "teacher_epochs", "teacher", "students", "epochs", "batch_size", "train_size", "attacks",
             "eval_size", "aa_size", "limit_batches", "fake_data", "checks", "precision")


def changes(suite: Suite, settings: Dict[str, Any], keys: Sequence[str] = REDUCIBLE) -> Dict[str, Tuple[Any, Any]]:
    """``{key: (this run's value, the suite's)}`` for the ``keys`` this run's ``settings`` set otherwise than the
    suite's own protocol."""
    base = resolve(suite, parse_args([suite.name]))
    return {key: (settings[key], base[key]) for key in keys if settings[key] != base[key]}


def departures(suite: Suite, settings: Dict[str, Any]) -> List[str]:
    """What this run changes from the suite's protocol (empty: the full suite)."""
    return [f"{key} = {ours!r} (suite: {theirs!r})" for key, (ours, theirs) in changes(suite, settings).items()]


NOT_IN_ROW_KEY = ("students", "natural_teacher", "aa_size")


def row_key(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The settings a row's JSON must match to be reused. MTARD's natural teacher is not among them (only MTARD's
    rows use it, and their ``method_config`` records it), nor the AutoAttack subset: a row records the size it was
    attacked on (``autoattack_size``), and a row without that AutoAttack gains it from its saved weights."""
    return _jsonable({k: v for k, v in settings.items() if k not in NOT_IN_ROW_KEY})


ADDED_SETTINGS = {"norm": "linf"}
"""Settings added after rows were recorded, with the value those rows ran with."""


def stored_key(rec: Dict[str, Any]) -> Dict[str, Any]:
    """A row JSON's settings as ``row_key`` makes them (rows written before it left out the AutoAttack size, and
    lack the settings added since, :data:`ADDED_SETTINGS`)."""
    stored = {k: v for k, v in rec.get("settings", {}).items() if k not in NOT_IN_ROW_KEY}
    return {**ADDED_SETTINGS, **stored} if stored else stored


def autoattack_size(rec: Dict[str, Any]) -> Optional[int]:
    """The AutoAttack subset size a row was measured on (None: the whole test set; 0: no AutoAttack)."""
    if "autoattack" not in rec.get("accuracy", {}):
        return 0
    return rec["aa_size"] if "aa_size" in rec else rec.get("settings", {}).get("aa_size")


def missing_autoattack(rec: Dict[str, Any], settings: Dict[str, Any]) -> bool:
    """Whether this run asks for an AutoAttack the row was not measured with."""
    return settings["aa_size"] != 0 and autoattack_size(rec) != settings["aa_size"]


def row_status(path: Path, settings: Dict[str, Any], method: str, variant: Optional[str],
               teacher_dir: Path) -> Tuple[str, str]:
    """What a run does with the row JSON at ``path``: ``"reuse"`` it, add ``"autoattack"`` to it from the weights
    it saved, or ``"rerun"`` it; and the sentence that says why (:data:`ROW_ACTIONS` says what is done). A trained
    teacher is the one cached in ``teacher_dir``."""
    if not path.exists():
        return "rerun", f"{path.name} not run yet"
    done = json.loads(path.read_text())
    if stored_key(done) != row_key(settings):
        return "rerun", f"{path.name} has other settings"
    config = method_config(settings, method, ablation_arguments(variant))
    if not same_method(done.get("method_config"), config, method):
        return "rerun", f"{path.name} has other method settings (this ardir builds the method differently)"
    teacher_changed = other_teacher(done, settings, teacher_dir)
    if teacher_changed:
        return "rerun", f"{path.name} {teacher_changed}"
    if not missing_autoattack(done, settings):
        return "reuse", f"done before, reusing {path.name} (--force reruns it)"
    size = "all" if settings["aa_size"] is None else settings["aa_size"]
    weights = path.with_suffix(".pt")
    if weights.exists() and done.get("weights_sha256") not in (None, zoo.file_sha256(weights)):
        return "rerun", f"{weights.name} is not the student {path.name} recorded (another run wrote it)"
    if weights.exists():
        return "autoattack", f"{path.name} has no AutoAttack on {size} images; its weights {weights.name} are kept"
    return "rerun", f"{path.name} has no AutoAttack on {size} images and no saved weights to add it from"


ROW_ACTIONS = {"rerun": "rerunning", "autoattack": "adding it from them (no retraining)"}
"""What a run does with a row :func:`row_status` does not reuse (``--table-only``: nothing)."""


def shown_autoattack(rec: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, Any]:
    """The row as this run's table shows it: an AutoAttack on another subset size than this run's is left out
    (a cell averages one protocol only). A shipped teacher's row keeps what its manifest states."""
    if rec.get("method") == "teacher" or autoattack_size(rec) in (0, settings["aa_size"]):
        return rec
    accuracy = {k: v for k, v in rec["accuracy"].items() if k not in ("autoattack", "natural_aa_subset")}
    return dict(rec, accuracy=accuracy)


def method_arguments(settings: Dict[str, Any], method: str, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    kwargs = dict(eps=settings["eps"], step_size=settings["step_size"], steps=settings["steps"])
    if settings.get("norm", "linf") != "linf":
        kwargs["norm"] = settings["norm"]
    method, row_extra = base_method(method)
    if method == "mtard":
        kwargs["natural_teacher"] = settings.get("natural_teacher")
    kwargs.update(settings["method_kwargs"].get(method, {}))
    kwargs.update(row_extra)
    epochs = settings["epochs"] if settings["epochs"] is not None else ardir.methods.METHODS[method].epochs
    if method == "iad":
        kwargs.setdefault("warmup_epochs", int(round(IAD_WARMUP_FRACTION * epochs)))
    kwargs.update(extra or {})
    return kwargs


# -------------------------------------------------------------------------------------------------- running
VALIDATION_SIZE = 1000
"""Images the ablation holds out of the training set (by the row's seed; seed 0 draws the shipped teacher's own
held-out split, which it never trained on). Its rows train on ``train_size`` of the rest and are scored there."""


def suite_model(settings: Dict[str, Any], name: str) -> torch.nn.Module:
    """The architecture ``name`` for the suite's data (its classes and input channels)."""
    return ardir.models.create(name, num_classes=settings["num_classes"], in_chans=settings["in_chans"])


def loaders_for(settings: Dict[str, Any], seed: int, data_dir: Optional[str], validation: bool = False):
    return data.get_loaders(settings["dataset"], data_dir=data_dir, batch_size=settings["batch_size"],
                            val_size=VALIDATION_SIZE if validation else 0, fake_data=settings["fake_data"],
                            seed=seed, limit=settings["train_size"])


def _teacher_key(settings: Dict[str, Any]) -> Dict[str, Any]:
    """What a cached teacher was trained with; the threat model only when it is not L-inf, so that the teachers
    cached before suites had a norm keep matching."""
    keys = ("dataset", "eps", "step_size", "steps", "teacher_model", "teacher_method", "teacher_epochs",
            "teacher_kwargs", "batch_size", "train_size", "limit_batches", "fake_data")
    key = {k: settings[k] for k in keys}
    if settings.get("norm", "linf") != "linf":
        key["norm"] = settings["norm"]
    return json.loads(json.dumps(key))


def cached_teacher(settings: Dict[str, Any], run_dir: Path) -> Optional[Dict[str, Any]]:
    """The record of the teacher cached in ``run_dir`` when it was trained with these settings and its file is the
    one the record vouches for (its sha256, where recorded), else None."""
    path, meta_path = run_dir / "teacher.pt", run_dir / "teacher.json"
    if not (path.exists() and meta_path.exists()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("settings") != _teacher_key(settings):
        return None
    return meta if meta.get("weights_sha256") in (None, _file_sha256(path)) else None


def trained_teacher_sha256(settings: Dict[str, Any], run_dir: Path) -> Optional[str]:
    """The sha256 of the teacher this run trains and caches in ``run_dir``, when it is cached with these settings;
    None when it is still to be trained, or when the suite loads its teacher (``--teacher``: the spec is in every
    row's settings) instead."""
    if settings["teacher"] is not None or cached_teacher(settings, run_dir) is None:
        return None
    return _file_sha256(run_dir / "teacher.pt")


@functools.lru_cache(maxsize=8)
def _cached_sha256(path: str, mtime_ns: int, size: int) -> str:
    return zoo.file_sha256(path)


def _file_sha256(path: Path) -> str:
    stat = path.stat()  # a rewritten file is hashed afresh
    return _cached_sha256(str(path), stat.st_mtime_ns, stat.st_size)


def other_teacher(rec: Dict[str, Any], settings: Dict[str, Any], run_dir: Path) -> Optional[str]:
    """Why a record was not made with the teacher cached in ``run_dir`` (None when it was, or cannot be told): a row
    distilled from, or a teacher's row evaluating, a trained teacher whose weights are not the cached one (trained
    anew after the file was deleted, say). While no teacher is cached (a clean clone) a record holds: which rows
    the next teacher leaves stale is known once it is trained (:func:`rows_of_another_teacher`). Records made
    before rows kept the teacher's sha256 cannot be told apart."""
    made_with = rec.get("teacher_sha256")
    current = None if made_with is None else trained_teacher_sha256(settings, run_dir)
    if current is None or made_with == current:
        return None
    return f"was made with another trained teacher (sha256 {made_with[:12]}; the cached one is {current[:12]})"


def rows_of_another_teacher(run: "SuiteRun", pending: Sequence["PendingJob"]) -> List["PendingJob"]:
    """The jobs, beyond ``pending``, whose finished rows the teacher now cached leaves stale (they were distilled
    from, or evaluate, another one): run once a teacher has been trained, so its rows are made again with it."""
    queued = {job[0] for job in pending}
    jobs = [(run.run_dir / f"{row_stem(*job, run.args.precision)}.json", *job) for job in run.jobs]
    if teacher_job_wanted(run):
        jobs.insert(0, teacher_eval_job(run))
    stale = []
    for job in jobs:
        if job[0] in queued or not job[0].exists() or not _needs_teacher(job):
            continue
        why = other_teacher(json.loads(job[0].read_text()), run.settings, run.teacher_dir)
        if why:
            run.log(f"{job[0].stem}: {why}; " + ("evaluating it again" if job[2] == "teacher" else "rerunning"))
            stale.append(job)
    return stale


def get_teacher(settings: Dict[str, Any], run_dir: Path, data_dir: Optional[str], device: torch.device,
                progress: bool, log) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The suite's teacher: loaded from ``settings["teacher"]``, or trained once and cached in ``run_dir``."""
    spec = settings["teacher"]
    if spec is not None:
        from ardir.teachers import load_teacher
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            teacher = load_teacher(spec, num_classes=settings["num_classes"], in_chans=settings["in_chans"],
                                   device=device, model_name=settings["teacher_model"])
        return teacher, {"spec": spec}
    key = _teacher_key(settings)
    path = run_dir / "teacher.pt"
    meta_path = run_dir / "teacher.json"
    meta = cached_teacher(settings, run_dir)
    if meta is not None:
        teacher = suite_model(settings, settings["teacher_model"]).to(device)
        teacher.load_state_dict(ardir.checkpoint.load_checkpoint(path))  # the one safe loader
        log(f"teacher: reusing {path}")
        return teacher.eval().requires_grad_(False), meta
    if path.exists():
        log(f"teacher: {path} was trained with other settings, or is not the file {meta_path.name} vouches for; "
            "training a new one")
    torch.manual_seed(0)  # the shared teacher: seed 0
    teacher = suite_model(settings, settings["teacher_model"]).to(device)
    loaders = loaders_for(settings, 0, data_dir)
    kwargs = dict(eps=settings["eps"], step_size=settings["step_size"], steps=settings["steps"],
                  norm=settings.get("norm", "linf"))
    extra = dict(settings["teacher_kwargs"])
    lr = extra.pop("lr", 0.1)
    wall, cpu = time.time(), time.process_time()
    log(f"teacher: training {settings['teacher_model']} with {settings['teacher_method']} "
        f"({settings['teacher_epochs'] or 'paper'} epochs)")
    trainer = ardir.Trainer(teacher, loaders.train, method=settings["teacher_method"],
                            epochs=settings["teacher_epochs"], lr=lr, limit_batches=settings["limit_batches"],
                            progress=progress, **kwargs, **extra)
    history = trainer.fit()
    meta = {"settings": key, "train_seconds": round(time.time() - wall, 1),
            "train_cpu_seconds": round(time.process_time() - cpu, 1), "history": _jsonable(history)}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_save(teacher.state_dict(), path)  # the weights before the record that vouches for them
    meta["weights_sha256"] = _file_sha256(path)  # what the rows distilled from it record (other_teacher)
    atomic_write_text(json.dumps(meta, indent=2), meta_path)
    log(f"teacher: trained in {meta['train_seconds']} s, saved to {path}")
    return teacher.eval().requires_grad_(False), meta


EVAL_BATCH = 500
"""Images per evaluation batch (attacks are per sample; larger batches only amortise the per-step overhead)."""


def _evaluate(model: torch.nn.Module, settings: Dict[str, Any], loader, progress: bool, attacks, n):
    return ardir.evaluate(model, loader, attacks=tuple(attacks), n_examples=n, subset="random" if n else "first",
                          eps=settings["eps"], step_size=settings["eval_step_size"], seed=settings["eval_seed"],
                          progress=progress, warn=False, checks=settings["checks"], dataset=settings["dataset"],
                          batch_size=EVAL_BATCH, norm=settings.get("norm", "linf"))


def evaluate_model(model: torch.nn.Module, settings: Dict[str, Any], test_loader, progress: bool) -> Dict[str, Any]:
    """Accuracies (%) under the suite's attacks, AutoAttack on its seeded subset; plus per-part seconds."""
    report = _evaluate(model, settings, test_loader, progress, settings["attacks"], settings["eval_size"])
    out = {"accuracy": dict(report.accuracy), "seconds": dict(report.seconds), "flags": [f.code for f in report.flags],
           "subsets": {"attacks": report.subset}}
    if settings["aa_size"] != 0:
        aa = evaluate_autoattack(model, settings, test_loader, progress)
        for part in ("accuracy", "seconds", "subsets"):
            out[part].update(aa[part])
        out["flags"] += aa["flags"]
    return out


def evaluate_autoattack(model: torch.nn.Module, settings: Dict[str, Any], loader, progress: bool) -> Dict[str, Any]:
    """AutoAttack's accuracy (%) on the seeded subset of ``aa_size`` images, the natural accuracy there, seconds."""
    report = _evaluate(model, settings, loader, progress, ("autoattack",), settings["aa_size"])
    return {"accuracy": {"autoattack": report.accuracy["autoattack"], "natural_aa_subset": report.accuracy["natural"]},
            "seconds": {"autoattack": report.seconds["autoattack"]}, "flags": [f.code for f in report.flags],
            "subsets": {"autoattack": report.subset}}


def run_row(settings: Dict[str, Any], student_name: str, method: str, seed: int, teacher, data_dir, device,
            progress: bool, extra: Optional[Dict[str, Any]] = None, validation: bool = False,
            weights: Optional[Path] = None) -> Dict[str, Any]:
    """Train one student with one method and seed, evaluate it (on the test set, or with ``validation`` on a split
    held out of the training set: the ablation's, which chooses the defaults); returns the row's record. With
    ``weights``, the trained student's state_dict is saved there before it is evaluated, so that an attack added
    later (AutoAttack) needs no retraining."""
    torch.manual_seed(seed)
    loaders = loaders_for(settings, seed, data_dir, validation)
    student = suite_model(settings, student_name).to(device)
    kwargs = method_arguments(settings, method, extra)
    needs_teacher = ardir.methods.METHODS[base_method(method)[0]].needs_teacher
    wall, cpu = time.time(), time.process_time()
    trainer = ardir.Trainer(student, loaders.train, teacher=teacher if needs_teacher else None,
                            method=base_method(method)[0],
                            epochs=settings["epochs"], lr=settings["lr"], limit_batches=settings["limit_batches"],
                            progress=progress, precision=settings.get("precision", "fp32"), **kwargs)
    history = trainer.fit()
    train_s, train_cpu = time.time() - wall, time.process_time() - cpu
    if weights is not None:
        atomic_save(student.state_dict(), weights)
        weights_sha = zoo.file_sha256(weights)
    wall, cpu = time.time(), time.process_time()
    result = evaluate_model(student, settings, loaders.val if validation else loaders.test, progress)
    return {"student": student_name, "method": method, "seed": seed, "method_kwargs": _jsonable(kwargs),
            "aa_size": settings["aa_size"], "weights_sha256": weights_sha if weights is not None else None,
            "evaluated_on": f"validation ({VALIDATION_SIZE} training images held out)" if validation else "test",
            "epochs": trainer.epochs, "accuracy": result["accuracy"], "attack_seconds": result["seconds"],
            "subsets": result["subsets"], "flags": result["flags"],
            "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu, 1),
            "eval_seconds": round(time.time() - wall, 1), "eval_cpu_seconds": round(time.process_time() - cpu, 1),
            "last_epoch": _jsonable(history[-1]) if history else None}


def add_autoattack(rec: Dict[str, Any], weights: Path, settings: Dict[str, Any], data_dir, device,
                   progress: bool) -> Dict[str, Any]:
    """A finished row with AutoAttack on this run's subset added: its student is loaded from the weights the row
    saved (no retraining) and attacked on the split the row was scored on; its other numbers are kept, and the
    seconds of an AutoAttack it replaces leave its evaluation time."""
    validation = rec.get("variant") is not None
    loaders = loaders_for(settings, rec["seed"], data_dir, validation)
    student = suite_model(settings, rec["student"]).to(device)
    student.load_state_dict(ardir.checkpoint.load_checkpoint(weights))
    wall, cpu = time.time(), time.process_time()
    result = evaluate_autoattack(student, settings, loaders.val if validation else loaders.test, progress)
    rec = json.loads(json.dumps(rec))
    replaced = rec.get("attack_seconds", {}).get("autoattack") or 0.0  # an AutoAttack on another subset size
    for name, part in (("accuracy", "accuracy"), ("attack_seconds", "seconds"), ("subsets", "subsets")):
        rec.setdefault(name, {}).update(result[part])
    rec["flags"] = rec.get("flags", []) + [f for f in result["flags"] if f not in rec.get("flags", [])]
    rec["aa_size"] = settings["aa_size"]
    rec["eval_seconds"] = round(max(0.0, rec.get("eval_seconds", 0) - replaced) + time.time() - wall, 1)
    rec["eval_cpu_seconds"] = round(rec.get("eval_cpu_seconds", 0) + time.process_time() - cpu, 1)
    return rec


SCALED_DOWN = ("steps", "teacher_epochs", "epochs", "batch_size", "train_size", "attacks", "eval_size",
               "limit_batches", "fake_data", "checks")
"""Settings whose departure from the suite makes rows that are not the suite's (a dry run, a quick look): such a
run keeps its rows, teacher and table apart from the suite's unless ``--run-dir``/``--output`` say otherwise."""


def scaled_down(args: argparse.Namespace) -> List[str]:
    """The :data:`SCALED_DOWN` settings this command line changes from its suite's."""
    suite = SUITES[args.suite]
    return list(changes(suite, resolve(suite, args), SCALED_DOWN))


def run_dirs(args: argparse.Namespace) -> Tuple[Path, Path]:
    """Where a run keeps its row JSON files, and where its teacher (``teacher.pt``, shared by every run) lives."""
    if args.run_dir:
        return Path(args.run_dir), Path(args.run_dir)
    base = ROOT / "benchmarks" / "runs"
    apart = "-fake" if args.fake_data else "-reduced" if scaled_down(args) else ""
    rows = args.suite + ("-ablation" if args.ablation else "") + \
        (f"-{args.precision}" if args.precision != "fp32" else "") + apart
    return base / rows, base / (args.suite + apart)


def output_dir(args: argparse.Namespace) -> Path:
    """Where the tables go: ``--output``; by default benchmarks/results, or for a scaled-down run (which would
    replace the suite's committed table with its own rows) a ``tables`` folder in its run directory."""
    if args.output is not None:
        return Path(args.output) if Path(args.output).is_absolute() else ROOT / args.output
    if scaled_down(args):
        return run_dirs(args)[0] / "tables"
    return ROOT / DEFAULT_OUTPUT


def _job_setup(argv: Sequence[str], workers: int) -> Tuple[argparse.Namespace, Dict[str, Any], torch.device]:
    """A job's arguments, settings and device, re-read from the command line ``argv``; with several workers the
    cores are shared out between them."""
    args = parse_args(argv)
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    return args, resolve(SUITES[args.suite], args), torch.device(args.device)


def run_job(argv: Sequence[str], job: Tuple[Path, str, str, int, Optional[str]],
            teacher: Optional[torch.nn.Module] = None, workers: int = 1) -> Dict[str, Any]:
    """Run one job of a suite -- a (student, method, seed[, variant]) row, or the teacher's evaluation when the
    method is ``"teacher"`` -- and write its JSON record to the job's path. The entry point of a worker process:
    it re-reads the command line ``argv`` and loads the cached teacher itself when the job needs one and
    ``teacher`` is None."""
    path, student, method, seed, variant = job
    args, settings, device = _job_setup(argv, workers)
    progress = args.progress and workers == 1
    run_dir, teacher_dir = run_dirs(args)
    if teacher is None and _needs_teacher(job):
        teacher, _ = get_teacher(settings, teacher_dir, args.data_dir, device, False, lambda msg: None)
    key = row_key(settings)
    if method == "teacher" and uses_manifest(settings):
        rec = shipped_teacher_row(settings["teacher"], student)
        rec["settings"] = key
    elif method == "teacher":
        meta_path = teacher_dir / "teacher.json"
        teacher_meta = json.loads(meta_path.read_text()) if meta_path.exists() and not settings["teacher"] else {}
        wall, cpu = time.time(), time.process_time()
        loaders = loaders_for(settings, 0, args.data_dir)
        own = settings["teacher_attacks"]
        result = evaluate_model(teacher, dict(settings, attacks=own, aa_size=0) if own else settings, loaders.test,
                                progress)
        rec = {"student": student, "method": "teacher", "seed": 0,
               "accuracy": result["accuracy"], "subsets": result["subsets"], "flags": result["flags"],
               "train_seconds": teacher_meta.get("train_seconds", 0.0),
               "train_cpu_seconds": teacher_meta.get("train_cpu_seconds", 0.0),
               "eval_seconds": round(time.time() - wall, 1),
               "eval_cpu_seconds": round(time.process_time() - cpu, 1), "settings": key,
               "aa_size": 0 if own else settings["aa_size"],
               "command": "(evaluated by the suite's command; the shipped teacher)" if settings["teacher"] else
               "(trained by any row's command when missing; cached)",
               "teacher_sha256": trained_teacher_sha256(settings, teacher_dir)}
    elif not args.force and row_status(path, settings, method, variant, teacher_dir)[0] == "autoattack":
        rec = add_autoattack(json.loads(path.read_text()), path.with_suffix(".pt"), settings, args.data_dir, device,
                             progress)
        rec["autoattack_commit"] = git_commit()
    else:
        rec = run_row(settings, student, method, seed, teacher, args.data_dir, device, progress,
                      ablation_arguments(variant), validation=variant is not None, weights=path.with_suffix(".pt"))
        rec.update(variant=variant, settings=key, command=row_command(args, student, method, seed, variant),
                   method_config=method_config(settings, method, ablation_arguments(variant)),
                   teacher_sha256=trained_teacher_sha256(settings, teacher_dir) if _needs_teacher(job) else None)
        rec["commit"] = git_commit()
    rec["torch_threads"] = torch.get_num_threads()
    atomic_write_text(json.dumps(rec, indent=2), path)  # a killed run leaves no half-written row behind
    return rec


def uses_manifest(settings: Dict[str, Any]) -> bool:
    """Whether the teacher's row is its shipped manifest's (measured once, under L-inf) rather than measured here."""
    return bool(settings["teacher"]) and zoo.is_shipped(settings["teacher"]) and settings.get("norm", "linf") == "linf"


def shipped_teacher_row(spec: str, student: str) -> Dict[str, Any]:
    """The teacher's row of a shipped teacher: the accuracies its manifest records (measured once, on the test
    set, by benchmarks/train_teacher.py), so that every suite states the same numbers."""
    info = zoo.manifest(spec)
    ev = info["evaluation"]
    accuracy = {k: v for k, v in ev["accuracy"].items() if v is not None}
    return {"student": student, "method": "teacher", "seed": 0, "accuracy": accuracy,
            "subsets": ev["subsets"], "flags": [], "train_seconds": info["training"]["seconds"],
            "eval_seconds": ev["seconds_total"], "train_cpu_seconds": 0.0, "eval_cpu_seconds": 0.0,
            "command": info["made_by"], "commit": info.get("commit")}


def other_subsets(rec: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, Union[int, str]]:
    """The attacks of a row measured on another number of test images than the suite's (``{metric: images}``, or
    ``"all"``), from the row's ``subsets`` (``"random N of M (seed S)"`` or ``"all"``; a key may name several
    attacks, ``"pgd20/cw30"``)."""
    sizes = {}
    for names, text in rec.get("subsets", {}).items():
        found = re.match(r"random (\d+) of", str(text))
        for name in names.split("/"):
            suite_size = settings["aa_size"] if name == "autoattack" else settings["eval_size"]
            if found and int(found.group(1)) != suite_size:
                sizes[name] = int(found.group(1))
            elif text == "all" and suite_size:  # the whole test set, where the suite measures a subset
                sizes[name] = "all"
    return sizes


def teacher_summary(spec: str) -> str:
    """One line on a shipped teacher: what it is and its manifest's accuracies."""
    info = zoo.manifest(spec)
    if "evaluation" not in info:
        return f"{spec} ({info['model']}, sha256 {info['sha256'][:12]}; not evaluated yet)"
    acc, subsets = info["evaluation"]["accuracy"], info["evaluation"]["subsets"]
    return (f"{spec} ({info['model']}, {info['parameters'] / 1e6:.2f} M parameters, {info['training']['method']} "
            f"on {info['training']['train_images']:,} images, sha256 {info['sha256'][:12]}): natural "
            f"{acc['natural']:.2f} ({subsets['natural']}), PGD-20 {acc['pgd20']:.2f} and CW∞-30 {acc['cw30']:.2f} "
            f"({subsets['pgd20/cw30']}), AutoAttack " +
            (f"{acc['autoattack']:.2f} ({subsets['autoattack']})" if acc.get("autoattack") is not None else
             "not measured (hours on two CPU cores for this network; see its manifest)"))


def train_teacher_job(argv: Sequence[str], workers: int) -> Dict[str, Any]:
    """Train and cache the suite's teacher in a worker process (while the rows that need no teacher run in the
    others); returns its record."""
    args, settings, device = _job_setup(argv, workers)
    _, meta = get_teacher(settings, run_dirs(args)[1], args.data_dir, device, False, lambda msg: None)
    return meta


def _needs_teacher(job: Tuple[Path, str, str, int, Optional[str]]) -> bool:
    return job[2] == "teacher" or ardir.methods.METHODS[base_method(job[2])[0]].needs_teacher


def _cost_rank(job: Tuple[Path, str, str, int, Optional[str]]) -> int:
    """Dispatch order: rows trained under attack first, the teacher's evaluation and the attack-free students
    (a few minutes each) last, where they fill the gaps at the end of the run instead of leaving a core idle."""
    return {"teacher": 1, "natural": 2}.get(job[2], 0)


def run_in_workers(argv: Sequence[str], jobs: Sequence[Tuple[Path, str, str, int, Optional[str]]], workers: int,
                   teacher_ready: bool, log, on_row, stale_after_teacher) -> None:
    """Run ``jobs`` (in this order, as cores free up) in ``workers`` spawned processes. A teacher that still has
    to be trained is trained first, in one of them, alongside the jobs that need no teacher; the others wait. The
    teacher trained, the jobs ``stale_after_teacher(jobs so far)`` returns (rows it leaves stale) join the queue."""
    import concurrent.futures
    import multiprocessing
    queue = list(jobs)
    log(f"{len(queue)} jobs on {workers} worker processes")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        running: Dict[concurrent.futures.Future, Optional[Tuple]] = {}
        if not teacher_ready:
            log("teacher: training in a worker, alongside the rows that need no teacher")
            running[pool.submit(train_teacher_job, argv, workers)] = None
        while queue or running:
            while len(running) < workers:
                job = next((j for j in queue if teacher_ready or not _needs_teacher(j)), None)
                if job is None:
                    break
                queue.remove(job)
                running[pool.submit(run_job, argv, job, None, workers)] = job
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                result = future.result()
                if job is None:
                    teacher_ready = True
                    log(f"teacher: trained in {result['train_seconds']} s")
                    queue += stale_after_teacher(list(jobs))
                else:
                    _log_record(log, job[0].stem, result)
                    on_row()


def with_natural_teacher(settings: Dict[str, Any], methods: List[str], explicit: bool, log) -> List[str]:
    """The methods to run: MTARD's row needs a natural teacher (the suite's or ``--natural-teacher``). Asked for by
    ``--methods`` without one, it is an error; among a suite's default methods, it is left out with a note."""
    spec = settings.get("natural_teacher")
    if "mtard" not in methods:
        return methods
    if spec:
        if zoo.is_shipped(spec) and spec not in zoo.list_shipped():
            raise SystemExit(f"reproduce.py: error: MTARD's natural teacher {spec!r} is not shipped with this ardir "
                             f"(shipped: {', '.join(zoo.list_shipped())}); train it with "
                             "`python benchmarks/train_teacher.py --method natural`, or pass --natural-teacher SPEC")
        return methods
    if explicit:
        raise SystemExit("reproduce.py: error: --methods mtard distils from two teachers: pass --natural-teacher SPEC "
                         "(a checkpoint of `ardir train --method natural`, a model name or robustbench:NAME)")
    log("note: no MTARD row: this suite has no natural teacher (add one with --natural-teacher SPEC)")
    return [m for m in methods if m != "mtard"]


def check_ardir_layers(settings: Dict[str, Any], jobs: Sequence[Tuple[Path, str, str, int, Optional[str]]]) -> None:
    """Set up every ARDIR job's method on untrained models, so that layers that do not fit (a student without the
    default layers, an ablation's layer the model lacks) fail now, in one line, not after the teacher has trained."""
    pairs = {(student, variant) for _, student, method, _, variant in jobs if method == "ardir"}
    if not pairs:
        return
    build = (lambda name: suite_model(settings, name))
    teacher = build(settings["teacher_model"])
    spec = data.DATASETS[settings["dataset"]]
    sample = torch.rand(2, settings["in_chans"], spec.image_size, spec.image_size)
    for student, variant in sorted(pairs, key=str):
        method = ardir.create_method("ardir", **method_arguments(settings, "ardir",
                                                                 ablation_arguments(variant)))
        try:
            method.setup(build(student), teacher, sample)
        except ValueError as err:
            raise SystemExit(f"reproduce.py: error: ARDIR with student {student}"
                             + (f" (variant {variant!r})" if variant else "") + f": {err}") from None


def method_config(settings: Dict[str, Any], method: str, extra: Optional[Dict[str, Any]] = None) -> Optional[Dict]:
    """Every hyperparameter of the row's method as this ardir builds it, its library defaults included (None for the
    teacher's row). Rows record it, and a row is reused only while it still holds: a changed default in the library
    (say, a corrected KL reduction) makes the rows trained under the old one stale, not silently reused."""
    if method == "teacher":
        return None
    built = ardir.create_method(base_method(method)[0], **method_arguments(settings, method, extra))
    return _jsonable({name: getattr(built, name) for name in ardir.methods.method_arguments(base_method(method)[0])
                      if hasattr(built, name)})


def same_method(stored: Optional[Dict[str, Any]], current: Optional[Dict[str, Any]], method: str) -> bool:
    """Whether a row's recorded method configuration still holds: every value equal, where an argument the row
    does not record (added to the library after it ran) counts as equal at its default, the behaviour the row ran
    with (say, ``norm="linf"``)."""
    if stored is None or current is None:
        return stored == current
    if set(stored) - set(current):
        return False
    defaults = {}
    for init in (ardir.methods.METHODS[base_method(method)[0]].__init__, ardir.methods.Method.__init__):
        for name, param in inspect.signature(init).parameters.items():
            if param.default is not inspect.Parameter.empty:
                defaults.setdefault(name, _jsonable(param.default))
    return all(stored[k] == v if k in stored else k in defaults and defaults[k] == v for k, v in current.items())


def _log_record(log, stem: str, rec: Dict[str, Any]) -> None:
    accs = ", ".join(f"{k} {v:.2f}" for k, v in rec["accuracy"].items())
    log(f"{stem}: train {rec['train_seconds']} s, eval {rec['eval_seconds']} s: {accs}")


# -------------------------------------------------------------------------------------------------- tables
# -------------------------------------------------------------------------------------------------- helpers
def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return out.stdout.strip() + (" (+ uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, {platform.system()}")


def row_command(args: argparse.Namespace, student: str, method: str, seed: int,
                variant: Optional[str] = None) -> str:
    """The command that reruns one row (same overrides as this run, one student, method and seed)."""
    parts = ["python", SCRIPT, args.suite, "--students", student, "--seeds", str(seed)]
    if variant is not None:
        parts += ["--ablation", "--variants", variant]
    else:
        parts += ["--methods", method]
    parts += _overrides(args)
    return " ".join(shlex.quote(p) for p in parts)


def suite_command(args: argparse.Namespace) -> str:
    """The command that produces this whole table (every row of the run directory with these settings)."""
    parts = ["python", SCRIPT, args.suite]
    if args.ablation:
        parts.append("--ablation")
    for name in ("students", "seeds", "methods", "variants"):
        if getattr(args, name):
            parts += [f"--{name}", *map(str, getattr(args, name))]
    parts += _overrides(args)
    if args.workers != 1:
        parts += ["--workers", str(args.workers)]
    return " ".join(shlex.quote(p) for p in parts)


def _overrides(args: argparse.Namespace) -> List[str]:
    out = []
    for name in ("epochs", "teacher_epochs", "train_size", "batch_size", "eval_size", "aa_size", "limit_batches",
                 "train_steps", "teacher", "natural_teacher", "data_dir", "output", "run_dir"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    if args.attacks is not None:
        out += ["--attacks", *args.attacks]
    if args.precision != "fp32":
        out += ["--precision", args.precision]
    for flag in ("fake_data", "no_checks", "no_teacher_eval"):
        if getattr(args, flag):
            out.append(f"--{flag.replace('_', '-')}")
    return out


DEFAULT_OUTPUT = "benchmarks/results"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=sorted(SUITES))
    p.add_argument("--methods", nargs="+", choices=ROW_NAMES, help="rows to run (default: all the suite's)")
    p.add_argument("--students", nargs="+", help="students (default: the suite's)")
    p.add_argument("--seeds", nargs="+", type=whole, help="default: the suite's (fashion-mnist 0 1 2, CIFAR 0)")
    p.add_argument("--epochs", type=count, help="student epochs (default: the suite's); also the teacher's unless "
                                              "--teacher-epochs")
    p.add_argument("--teacher-epochs", type=count)
    p.add_argument("--teacher", help="a checkpoint path, a model name or robustbench:NAME (default: train it)")
    p.add_argument("--natural-teacher", help="MTARD's naturally trained teacher: a checkpoint path, a model name, "
                                             "robustbench:NAME or a shipped DATASET:NAME (default: the suite's)")
    p.add_argument("--train-size", type=count, help="training images (default: the suite's)")
    p.add_argument("--batch-size", type=count)
    p.add_argument("--train-steps", type=whole, help="PGD steps of the training attacks (dry runs)")
    p.add_argument("--attacks", nargs="+", type=attack_name, help="attacks on the evaluation set (default: the suite's)")
    p.add_argument("--eval-size", type=count, help="evaluate on a seeded random subset of this many test images")
    p.add_argument("--aa-size", type=whole, help="AutoAttack subset size (0: skip AutoAttack)")
    p.add_argument("--limit-batches", type=count, help="stop each epoch after this many batches (dry runs)")
    p.add_argument("--fake-data", action="store_true", help="random images instead of the data set (dry runs)")
    p.add_argument("--data-dir")
    p.add_argument("--no-checks", action="store_true", help="skip evaluate()'s sanity checks (faster)")
    p.add_argument("--no-teacher-eval", action="store_true", help="do not evaluate the teacher")
    p.add_argument("--ablation", action="store_true", help="run the ARDIR ablation instead of the method table")
    p.add_argument("--variants", nargs="+", help="ablation variants (labels of ABLATIONS; default: all)")
    p.add_argument("--output", help=f"where the tables go (default {DEFAULT_OUTPUT}; a run scaled down from the "
                   "suite's settings: a tables folder in its run directory)")
    p.add_argument("--run-dir", help="per-row JSON and the teacher (default: benchmarks/runs/<suite>[-ablation])")
    p.add_argument("--force", action="store_true", help="rerun rows whose JSON exists (to check a row's numbers)")
    p.add_argument("--table-only", action="store_true",
                   help="rewrite the table from the rows that have finished; run nothing (marks missing rows)")
    p.add_argument("--template", action="store_true", help="write the table with the published numbers only")
    p.add_argument("--device", type=device_name, default="auto",
                   help="cpu, cuda, cuda:1, ... (auto: CUDA when present)")
    p.add_argument("--progress", action="store_true", help="tqdm bars (with --workers 1)")
    p.add_argument("--workers", type=count, default=1,
                   help="rows trained side by side in this many processes, the CPU cores shared between them "
                        "(small models use one core poorly; default 1)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="students' training precision (autocast); evaluation is always fp32")
    args = p.parse_args(argv)
    for name in args.students or ():
        try:
            ardir.models.check_name(name)
        except (TypeError, ValueError) as err:
            p.error(f"--students {name}: {err}")
    if args.force and args.table_only:
        p.error("--force with --table-only: --table-only runs no row, so there is none to force")
    if args.template and args.suite not in PUBLISHED_SOURCES:
        p.error(f"--template: the {args.suite} suite quotes no published numbers (it is measured here: run it "
                f"without --template); suites with a template: {sorted(PUBLISHED_SOURCES)}")
    unknown = [v for v in args.variants or () if v not in ABLATIONS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {list(ABLATIONS)}")
    settings = resolve(SUITES[args.suite], args)
    if settings["train_size"] is not None and settings["batch_size"] > settings["train_size"]:
        p.error(f"--batch-size {settings['batch_size']} is larger than the {settings['train_size']} training images "
                "(--train-size): no full batch is left")
    return args


Job = Tuple[str, str, int, Optional[str]]  # (student, method, seed, variant): a row the command line asks for
PendingJob = Tuple[Path, str, str, int, Optional[str]]  # the same with its row file first: a job to run


@dataclass
class SuiteRun:
    """What the steps of one invocation of :func:`main` share: the command line and the suite's settings, the jobs
    it asks for, where the table and the row files go, and the table's metadata (filled in as the run goes)."""
    args: argparse.Namespace
    suite: Suite
    settings: Dict[str, Any]
    device: torch.device
    log: Callable[[str], None]
    methods: List[str]
    jobs: List[Job]
    out_path: Path  # the table, without its suffix (.md, .json)
    run_dir: Path
    teacher_dir: Path
    started: float
    meta: Dict[str, Any]
    title: str
    metrics: List[str]
    published: Optional[Dict[Tuple[str, str], Dict[str, float]]]
    key: Dict[str, Any]  # the row key of this run's settings (row_key)
    teacher_eval: Path  # the teacher's row file


def _log(msg: str) -> None:
    """Print one log line, stamped with the UTC time."""
    print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {msg}", flush=True)


def suite_jobs(args: argparse.Namespace, suite: Suite, settings: Dict[str, Any],
               log) -> Tuple[List[str], List[Job], Path]:
    """The methods to run, the (student, method, seed, variant) jobs the command line asks for (every seed, student
    and method, or ablation variant) and the path of the table (without its suffix)."""
    methods = list(args.methods or suite.methods)
    if not (args.ablation or args.template or args.table_only):
        methods = with_natural_teacher(settings, methods, bool(args.methods), log)
    seeds = list(args.seeds if args.seeds is not None else suite.seeds)
    if args.ablation:
        labels = list(args.variants or ABLATIONS)
        jobs = [(s, ABLATION_METHODS.get(v, "ardir"), seed, v) for seed in seeds for s in settings["students"]
                for v in labels]
        name = f"ablation_{suite.results_name}"
    else:
        jobs = [(s, m, seed, None) for seed in seeds for s in settings["students"] for m in methods]
        name = suite.results_name
    if args.precision != "fp32":
        name += f"_{args.precision}"
    out_path = output_dir(args) / name
    return methods, jobs, out_path


def table_meta(args: argparse.Namespace, suite: Suite, settings: Dict[str, Any], device: torch.device
               ) -> Dict[str, Any]:
    """The table's metadata before any row has run: the suite's command, the commit, date and machine, what departs
    from the suite's protocol, the notes (the ablation's first), the settings and the published numbers' source.
    The teacher's line is filled in at every write (:func:`describe_teacher`)."""
    reduced = departures(suite, settings)
    meta = {"suite": suite.name, "command": suite_command(args),
            "commit": git_commit(), "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
            "machine": machine(device) + (f"; rows in {args.workers} worker processes of "
                                          f"{max(1, (os.cpu_count() or 1) // args.workers)} torch threads each"
                                          if args.workers > 1 else ""), "reduced": reduced, "notes": list(suite.notes),
            "settings": settings, "teacher": None}
    meta["published_source"] = PUBLISHED_SOURCES.get(suite.name)
    if args.ablation:
        meta["notes"].insert(0, f"Every variant is trained on {settings['train_size'] or 'all'} training images and "
                                f"scored on {VALIDATION_SIZE} others held out of the training set (seeded; seed 0 "
                                "holds out the shipped teacher's own validation split), never on the test set: "
                                "this table chooses ARDIR's defaults, and only the chosen configuration is then "
                                "reported on the test set (the method table).")
        meta["notes"] = [n for n in meta["notes"] if not n.startswith("Δ vs AT")]  # the method table's
    meta["notes"].append(evaluation_note(settings, "validation split" if args.ablation else "test set"))
    return meta


def evaluation_note(settings: Dict[str, Any], where: str) -> str:
    """The table's sentence on what each attack was measured on, from the run's settings (``--aa-size``,
    ``--eval-size``) rather than the suite's defaults."""
    seeded = f"(seed {settings['eval_seed']}, the same for every row)"
    others = ("the other attacks on the whole " + where if settings["eval_size"] is None else
              f"the other attacks on a fixed random {settings['eval_size']} images of the {where} {seeded}")
    aa, kind = settings["aa_size"], "standard L2" if settings.get("norm") == "l2" else "standard"
    if aa == 0:
        return f"No AutoAttack in this run (--aa-size 0); {others}."
    on = f"the whole {where}" if aa is None else f"a fixed random {aa} images of the {where} {seeded}"
    return f"AutoAttack ({kind}, ardir engine) on {on}; {others}."


def table_title(args: argparse.Namespace, suite: Suite) -> str:
    """The table's title: the method table or the ARDIR ablation (scored on a validation split), the suite, its
    threat model and budget."""
    return (f"ARDIR ablation, {suite.name}" if args.ablation else f"Robust distillation, {suite.name}") + \
        f" ({'L2' if suite.norm == 'l2' else 'L∞'}, ε = {_fmt_eps(suite.eps)})" + \
        (", scored on a validation split" if args.ablation else "")


def plan_run(args: argparse.Namespace, log) -> SuiteRun:
    """Everything one invocation needs, from its parsed command line: the settings, the jobs, the table's path,
    title and metadata, the run and teacher directories and the teacher's row file. Nothing is written yet."""
    suite = SUITES[args.suite]
    settings = resolve(suite, args)
    device = torch.device(args.device)
    methods, jobs, out_path = suite_jobs(args, suite, settings, log)
    run_dir, teacher_dir = run_dirs(args)
    scaled = scaled_down(args)
    if scaled and not (args.output and args.run_dir):
        log(f"a scaled-down run ({', '.join(scaled)} not the suite's): its rows go to {run_dir}, its "
            f"teacher to {teacher_dir} and its table to {out_path.parent}, apart from the suite's (--run-dir and "
            "--output choose)")
    started = time.time()
    meta = table_meta(args, suite, settings, device)
    metrics = [m for m in METRICS if m in settings["attacks"] or (m == "autoattack" and settings["aa_size"] != 0)]
    teacher_eval = teacher_dir / ("teacher_eval.json" if settings["precision"] == "fp32" else
                                  f"teacher_eval_{settings['precision']}.json")
    return SuiteRun(args=args, suite=suite, settings=settings, device=device, log=log, methods=methods, jobs=jobs,
                    out_path=out_path, run_dir=run_dir, teacher_dir=teacher_dir, started=started, meta=meta,
                    title=table_title(args, suite), metrics=metrics, published=PUBLISHED.get(suite.name),
                    key=row_key(settings), teacher_eval=teacher_eval)


def teacher_lead(rows: Sequence[Dict[str, Any]], names: Dict[str, str]) -> str:
    """How far the teacher is ahead of the AT student (its mean over the seeds) under each attack both rows have,
    strongest first: what a teacher has to hand down (``""`` when either row is missing)."""
    teacher = next((r for r in rows if r["method"] == "teacher"), None)
    at = next((r for r in rows if r["method"] == "at" and r.get("variant") is None), None)
    if not teacher or not at:
        return ""
    leads = [f"{names.get(m, m)} {teacher['mean'][m] - at['mean'][m]:+.2f} ({teacher['mean'][m]:.2f} against "
             f"{at['mean'][m]:.2f})" for m in ("autoattack", "cw30", "pgd20", "natural")
             if m in teacher["mean"] and m in at["mean"]]
    if not leads:
        return ""
    return ", ".join(leads) + " (where the teacher's cell names another subset, the two were measured on different " \
                              "test images)"


def row_commits(records: Sequence[Dict[str, Any]]) -> str:
    """Which commits the rows ran at, with how many row runs each (a table rewritten by --table-only, or from a
    committed table, carries rows of earlier commits): ``"12 at 31f3049, 17 at 6635d8b or earlier (rebuilt)"``."""
    counts: Dict[str, int] = {}
    for rec in records:
        if rec.get("commit"):
            label = "at " + rec["commit"][:7] + (" with uncommitted changes" if "uncommitted" in rec["commit"] else "")
        elif rec.get("table_commit"):
            label = f"at {rec['table_commit'][:7]} or earlier (rebuilt from the table of that commit)"
        else:
            label = "not recorded"
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{n} {label}" for label, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def describe_teacher(run: SuiteRun, records: Sequence[Dict[str, Any]] = ()) -> None:
    """Fill in the table's line on the teacher: a shipped teacher's summary, the spec of another one, or the
    trained teacher's model, method and training time (its cache's, else its row's in ``records``, as restored
    from the table on a checkout without the cache). Read again at every write: a worker may have trained it
    meanwhile."""
    settings, meta = run.settings, run.meta
    if settings["teacher"] and zoo.is_shipped(settings["teacher"]):
        meta["teacher"] = teacher_summary(settings["teacher"]) + (
            "" if uses_manifest(settings) else "; those are its manifest's L∞ numbers, its row below is measured "
                                               "here under L2")
    elif settings["teacher"]:
        meta["teacher"] = f"{settings['teacher']}"
    else:
        cached = cached_teacher(settings, run.teacher_dir)
        row = next((r for r in records if r.get("method") == "teacher"), {})
        seconds = (cached or row).get("train_seconds")
        cache = (run.teacher_dir / "teacher.pt").resolve()
        where = (f"cached in {cache.relative_to(ROOT) if cache.is_relative_to(ROOT) else cache}" if cached else
                 "not cached here (a rerun of a student row trains it again)")
        meta["teacher"] = (f"{settings['teacher_model']} trained with {settings['teacher_method']} "
                           f"({'?' if seconds is None else seconds} s), {where}")


def write_suite_table(run: SuiteRun, records: List[Dict[str, Any]], footer: Sequence[str] = ()) -> None:
    """Rewrite the suite's table (Markdown and JSON) from the row ``records``: mean and spread over the seeds, the
    teacher's attacks on another subset marked, the differences between methods, and for a published suite every
    row it lists, run or not; the wall time so far and the ``footer`` lines below."""
    args, settings, meta = run.args, run.settings, run.meta
    if not args.template:
        describe_teacher(run, records)
    rows = summarize([shown_autoattack(r, settings) for r in records], run.metrics)
    for row in rows:  # the teacher's manifest may state an attack on another subset than the students'
        if row["method"] == "teacher":
            teacher_rec = next(r for r in records if r["method"] == "teacher")
            for m, size in other_subsets(teacher_rec, settings).items():
                if row["cells"].get(m):
                    row["cells"][m] += f" (on {size})"
    if not args.ablation:
        for metric in difference_metrics(rows):
            add_differences(rows, metric)
        meta["teacher_lead"] = teacher_lead(rows, L2_HEADERS if settings.get("norm") == "l2" else HEADERS)
    if run.published is not None and not args.ablation:  # every row of the suite appears, run or not
        have = {(r["student"], r["method"]) for r in rows}
        wanted = [(f"{settings['teacher_model']} (teacher)", "teacher")] * (not args.no_teacher_eval)
        wanted += [(s, m) for s in settings["students"] for m in run.methods]
        for s, m in wanted:
            if (s, m) not in have:
                rows.append({"student": s, "method": m, "variant": None, "seeds": [], "cells": {}})
    total = sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for r in records)
    timed = [r for r in records if r.get("train_cpu_seconds") or r.get("eval_cpu_seconds")]  # restored rows: none
    cpu = sum(r.get("train_cpu_seconds", 0) + r.get("eval_cpu_seconds", 0) for r in timed)
    meta["wall_time"] = "" if args.template else (
        f"{total:.0f} s summed over the rows below (teacher training and evaluation included" +
        (f"; {cpu:.0f} CPU-seconds in the {len(timed)} of {len(records)} row runs that recorded them)" if timed
         else ")") +
        ("" if args.table_only else f"; this invocation {time.time() - run.started:.0f} s"))
    meta["row_commits"] = row_commits(records)
    meta["footer"] = list(footer)
    students = [f"{settings['teacher_model']} (teacher)"] + settings["students"]
    write_table(run.out_path, run.title, meta, rows, run.metrics, None if args.ablation else run.published,
                variant_column=args.ablation, students=students, records=records)


def write_template(run: SuiteRun) -> None:
    """``--template``: write the table with the published numbers only (the '(ours)' columns empty, no commit, date
    or machine), and run nothing."""
    suite = run.suite
    run.meta.update(command=f"python {SCRIPT} {suite.name} --data-dir DIR [--teacher SPEC]", commit="", date="",
                    machine="", reduced=[])
    write_suite_table(run, [], footer=["**Not run here: needs a GPU and the real data.** The '(ours)' columns are "
                                       "empty until the command above is run; it rewrites this file with the "
                                       "measured numbers.", "", f"Published numbers: {PUBLISHED_SOURCES[suite.name]}"])
    run.log(f"template written to {run.out_path.with_suffix('.md')}")


def collect_rows(run: SuiteRun) -> List[Dict[str, Any]]:
    """Every finished row in the run directory with this run's settings (an earlier or later invocation's too), as
    its file has it (the table leaves out an AutoAttack on another subset size: :func:`shown_autoattack`)."""
    args, settings = run.args, run.settings
    found = []
    if not args.no_teacher_eval and not args.ablation and run.teacher_eval.exists():
        rec = json.loads(run.teacher_eval.read_text())
        if _still_holds(run, rec):
            found.append(rec)
    for f in sorted(run.run_dir.glob("*__seed*.json")):
        rec = json.loads(f.read_text())
        if _still_holds(run, rec) and (rec.get("variant") is not None) == args.ablation \
                and rec["student"] in settings["students"]:
            found.append(rec)
    return found


def _config_of(settings: Dict[str, Any], method: str, variant: Optional[str]) -> Optional[Dict]:
    """A row's method configuration under ``settings`` (a variant that is no ablation's counts as none)."""
    return method_config(settings, method, ablation_arguments(variant if variant in ABLATIONS else None))


def _still_holds(run: SuiteRun, rec: Dict[str, Any]) -> bool:
    """Whether a committed row's record holds for this run: the same settings, the same trained teacher when it
    names one (:func:`other_teacher`) and, for a student's row, the same method configuration."""
    if other_teacher(rec, run.settings, run.teacher_dir):
        return False
    if rec["method"] == "teacher":
        return stored_key(rec) == run.key
    return stored_key(rec) == run.key and same_method(rec.get("method_config"), _config_of(
        run.settings, rec["method"], rec.get("variant")), rec["method"])


def _row_file(run: SuiteRun, job: Job) -> Path:
    """The row file of a (student, method, seed, variant) job: the teacher's, or one in the run directory."""
    return run.teacher_eval if job[1] == "teacher" else run.run_dir / f"{row_stem(*job, run.args.precision)}.json"


def restore_committed_rows(run: SuiteRun) -> None:
    """Copy the committed table's row records (kept in its JSON) into the run directory where a row's file is
    missing, or holds no longer for this run while the committed record does, so that a clean clone (or a run
    directory left by a dry run) resumes the suite; log how many were restored and how many were not. Rows this
    run forces (``--force``) are retrained all the same."""
    table_json = run.out_path.with_suffix(".json")
    config_of = (lambda method, variant: _config_of(run.settings, method, variant))
    try:
        committed = table_records.committed_records(table_json, config_of)
    except ValueError as err:  # a merge conflict, say: never overwrite a table that cannot be read
        sys.exit(f"reproduce.py: error: cannot read the table {table_json} ({err}); resolve it or restore it "
                 f"(git checkout -- {table_json}) before running the suite")
    replaceable = {job: rec for job, rec in committed.items() if not _holds_on_disk(run, _row_file(run, job))}
    existed = {job for job in replaceable if _row_file(run, job).exists()}
    restored = [job for job, rec in replaceable.items()
                if table_records.restore_row(_row_file(run, job), rec, lambda r: _still_holds(run, r))]
    stale = [job for job in restored if job in existed]
    if restored:
        run.log(f"{len(restored)} rows restored from the table {table_json.name} into {run.run_dir}"
                + (f" ({len(stale)} of them over row files that did not hold for this run)" if stale else "")
                + " (their weights were not kept: an attack a row lacks is added by retraining it)")
    if run.args.table_only:
        refuse_dropping_rows(run, committed, table_json)
    if len(restored) < len(replaceable):
        run.log(f"{len(replaceable) - len(restored)} rows of the table {table_json.name} were made with other "
                "settings, method configurations or trained teacher than this run's and are not restored (git keeps "
                "that table)")


def refuse_dropping_rows(run: SuiteRun, committed: Dict[Job, Dict[str, Any]], table_json: Path) -> None:
    """``--table-only`` runs nothing: exit with one sentence, the table untouched, when the rewritten table would
    lack committed rows (made with other settings or method configurations, for other students than this
    invocation's, or the teacher's under --no-teacher-eval)."""
    shown = {(r["student"], r["method"], r["seed"], r.get("variant")) for r in collect_rows(run)}
    dropped = [job for job in committed if job not in shown]
    if dropped:
        sys.exit(f"reproduce.py: error: --table-only would drop {len(dropped)} rows of the table {table_json} "
                 f"(e.g. {row_stem(*dropped[0])}) that this invocation does not show: they were made with other "
                 "settings, method configurations, students or trained teacher than its own, or it skips the "
                 "teacher; rewrite the table with the command that made it (its header's), or git rm it to start "
                 "afresh")


def _holds_on_disk(run: SuiteRun, path: Path) -> bool:
    """Whether a row file exists and still holds for this run (a file that cannot be read does not)."""
    try:
        return path.exists() and _still_holds(run, json.loads(path.read_text()))
    except ValueError:
        return False


def teacher_job_wanted(run: SuiteRun) -> bool:
    """Whether the table has a teacher's row."""
    return not (run.args.no_teacher_eval or run.args.ablation)


def teacher_eval_job(run: SuiteRun) -> PendingJob:
    """The teacher's evaluation as a job (its row file first)."""
    return (run.teacher_eval, run.settings["teacher_model"] + " (teacher)", "teacher", 0, None)


def teacher_job(run: SuiteRun) -> Optional[PendingJob]:
    """The teacher's evaluation, when the table has a teacher's row and its file is missing, was made with other
    settings or lacks the AutoAttack it should have. A shipped teacher's row is its manifest's: written here, from
    the shipped file, with nothing to run."""
    settings, teacher_eval = run.settings, run.teacher_eval
    if not teacher_job_wanted(run):
        return None
    rec = json.loads(teacher_eval.read_text()) if teacher_eval.exists() else None
    if uses_manifest(settings):  # its manifest's numbers, always the shipped file's: nothing to run
        rec = dict(shipped_teacher_row(settings["teacher"], settings["teacher_model"] + " (teacher)"),
                   settings=run.key)
        atomic_write_text(json.dumps(rec, indent=2), teacher_eval)
    measures_aa = not (uses_manifest(settings) or settings["teacher_attacks"])  # else it never has this one
    if rec is None or stored_key(rec) != run.key or (missing_autoattack(rec, settings) and measures_aa):
        return teacher_eval_job(run)
    changed = other_teacher(rec, settings, run.teacher_dir)
    if changed:
        run.log(f"{teacher_eval.stem}: {changed}; evaluating it again")
        return teacher_eval_job(run)
    return None


def pending_rows(run: SuiteRun) -> List[PendingJob]:
    """The jobs left to run, after the committed table's rows are restored: the teacher's evaluation when due, then
    every job whose row file is missing or is not to be reused as it is (each existing row's status logged); every
    job with ``--force``."""
    restore_committed_rows(run)
    teacher = teacher_job(run)
    pending: List[PendingJob] = [] if teacher is None else [teacher]
    for student, method, seed, variant in run.jobs:
        stem = row_stem(student, method, seed, variant, run.args.precision)
        path = run.run_dir / f"{stem}.json"
        if path.exists() and not run.args.force:
            status, why = row_status(path, run.settings, method, variant, run.teacher_dir)
            if status != "reuse":
                why += "; " + ("not done: --table-only runs nothing" if run.args.table_only else ROW_ACTIONS[status])
            run.log(f"{stem}: {why}")
            if status == "reuse":
                continue
        pending.append((path, student, method, seed, variant))
    return pending


def mark_unfinished(run: SuiteRun, pending: Sequence[PendingJob]) -> None:
    """``--table-only``: list in the table's metadata the pending rows that have no finished row to show
    (``partial``) and those shown without their AutoAttack (``no_autoattack``)."""
    shown = {(r["student"], r["method"], r["seed"], r.get("variant")) for r in collect_rows(run)
             if r["method"] != "teacher"}
    run.meta["partial"] = [job[0].stem for job in pending if tuple(job[1:5]) not in shown]
    run.meta["no_autoattack"] = [job[0].stem for job in pending if tuple(job[1:5]) in shown]


def run_pending(run: SuiteRun, pending: List[PendingJob], argv: List[str]) -> None:
    """Run the ``pending`` jobs, those trained under attack first, and rewrite the table after each: in this process
    (with one worker or one job; the teacher loaded or trained first when a job needs it) or in worker processes
    that re-read the command line ``argv``."""
    args, settings = run.args, run.settings
    pending.sort(key=_cost_rank)
    check_ardir_layers(settings, pending)
    needs_teacher = any(map(_needs_teacher, pending))
    if args.workers == 1 or len(pending) <= 1:
        teacher = get_teacher(settings, run.teacher_dir, args.data_dir, run.device, args.progress, run.log)[0] \
            if needs_teacher else None
        pending += rows_of_another_teacher(run, pending) if needs_teacher else []
        for job in pending:
            run.log(f"{job[0].stem}: {'evaluating' if job[2] == 'teacher' else 'training'}")
            _log_record(run.log, job[0].stem, run_job(argv, job, teacher=teacher, workers=1))
            write_suite_table(run, collect_rows(run))
    else:
        ready = not needs_teacher or settings["teacher"] is not None or cached_teacher(settings, run.teacher_dir)
        run_in_workers(argv, pending, args.workers, bool(ready), run.log,
                       lambda: write_suite_table(run, collect_rows(run)),
                       lambda queued: rows_of_another_teacher(run, queued))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a suite (or its ablation) as the command line ``argv`` asks, and write its table: restore the committed
    table's rows, decide the rows still to run, run them (rewriting the table after each) and write the table once
    more at the end. With ``--template`` only the published numbers; with ``--table-only`` nothing runs."""
    args = parse_args(argv)
    run = plan_run(args, _log)
    if args.template:
        write_template(run)
        return 0
    run.run_dir.mkdir(parents=True, exist_ok=True)
    pending = pending_rows(run)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if args.table_only:
        mark_unfinished(run, pending)
        pending = []
    run_pending(run, pending, argv_list)
    footer = [f"Published numbers: {PUBLISHED_SOURCES[run.suite.name]}"] if run.published and not args.ablation else []
    write_suite_table(run, collect_rows(run), footer=footer)
    run.log(f"table written to {run.out_path.with_suffix('.md')} ({time.time() - run.started:.0f} s)")
    return 0


def _fmt_eps(eps: float) -> str:
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 and k >= 1 else f"{eps:g}"


def row_stem(student: str, method: str, seed: int, variant: Optional[str], precision: str = "fp32") -> str:
    """The name of a row's files in the run directory (``<stem>.json``, ``<stem>.pt``)."""
    stem = f"{student}__{method}__seed{seed}" if variant is None else f"{student}__{_slug(variant)}__seed{seed}"
    return stem if precision == "fp32" else f"{stem}__{precision}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TeacherNotFoundError as err:  # a mistyped --teacher: one line, not a traceback
        sys.exit(f"reproduce.py: error: --teacher: {err}")
