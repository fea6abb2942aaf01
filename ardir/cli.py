"""The ``ardir`` command: ``ardir train``, ``ardir eval``, ``ardir plot`` and ``ardir layers`` (also
``python -m ardir``).

::

    ardir train --dataset fashion-mnist --model cnn_small --teacher runs/teacher/best.pt --eps 0.1 \\
                --output-dir runs/ardir
    ardir train --config run.toml --epochs 50          # a TOML file describes the run; flags override it
    ardir train --output-dir runs/ardir --resume       # continue from runs/ardir/last.pt
    ardir eval --checkpoint runs/ardir/best.pt --attacks natural pgd20 cw30 autoattack
    ardir eval --model resnet18 --weights elsewhere.pt --dataset cifar10   # a state_dict trained elsewhere
    ardir plot runs/ardir
    ardir layers --model resnet18 --dataset cifar10    # layer names, types and output shapes (for --layers)

A training run writes into ``--output-dir``:

* ``last.pt`` -- everything needed to continue: model, adapters, optimiser, schedule, epoch, step, RNG states
  (global and data order), the configuration; rewritten atomically after every epoch, never with a NaN or an Inf
  (its format: :mod:`ardir._cli_resume`; with ``--checkpoint-every-steps`` the numbered mid-epoch checkpoints go to
  ``checkpoints/``);
* ``best.pt`` -- the model with the best PGD accuracy on the validation split (held out of the *training* set,
  ``--val-size``), never chosen on the test set;
* ``metrics.jsonl`` -- one JSON line per epoch: every loss term, ``val_natural``, ``val_pgd``, ``lr``,
  ``images_per_s``, ``seconds``;
* ``config.toml`` -- the resolved configuration (``ardir train --config DIR/config.toml`` repeats the run);
* ``train.lock`` -- while the run goes on: its pid and host. A second ``ardir train`` on the directory stops, naming
  that pid; a lock whose process is gone (killed) is taken over (:mod:`ardir._run_lock`).

Paths are read from the current directory, as typed, and recorded absolute (``config.toml`` and the checkpoints):
``output_dir``, ``data_dir``, ``robustbench_dir`` (also the default one a ``robustbench:NAME`` teacher is read
from) and ``teacher``/``natural_teacher`` when they are files (:data:`ardir.config.PATH_KEYS`). So
``ardir train --output-dir DIR --resume`` and ``ardir eval`` work from any directory; a recorded path that no
longer exists is an error naming ``DIR/config.toml`` and the flag that overrides it (``--teacher PATH``, ...).

Every flag of ``ardir train`` is a key of the TOML file (``--weight-decay`` is ``weight_decay``); the list comes
from :mod:`ardir.config` (Trainer and method signatures), so ``ardir train --help`` is always complete.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import config as cfg
from . import data as ardir_data
from . import distributed
from . import models, tensorboard
from ._cli_base import (CLIError, _device, _device_flag, _flag_type, _sentence, attack_name, count, device_name,
                        sigterm_as_interrupt, unrecognized, whole)
from ._cli_eval import add_eval_parser, evaluate_checkpoint, evaluate_weights, report_path, run_eval
from ._cli_layers import add_layers_parser, show_layers
from ._cli_resume import (_best_so_far, _check_saved_paths, _resume_point, _sync_metrics, interrupted,
                          refuse_restored_changes, restore_trainer, run_state, save_last)
from ._run_lock import run_lock
from .checkpoint import CheckpointError, atomic_write_text, list_checkpoints, remove_stale_temporaries, save_finite
from .teachers import TeacherNotFoundError, load_teacher

__all__ = ["main", "build_parser", "train", "evaluate_checkpoint", "evaluate_weights", "RunLogger", "CLIError",
           "count", "whole", "attack_name", "device_name"]

MODEL_FORMAT = "ardir-model"


# ---------------------------------------------------------------------------------------------------- parser
def _add_option(group: argparse._ArgumentGroup, option: cfg.Option) -> None:
    help_ = option.help.replace("%", "%%")
    if option.default is not None and option.group != "method":
        help_ += f" (default: {option.default})"
    if option.kind == "bool":
        group.add_argument(option.flag, dest=option.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_)
        return
    nargs = "+" if option.kind.startswith("list[") else None
    metavar = option.kind.upper().replace("LIST[", "").replace("]", "")
    kind = {"device": _device_flag, "attacks": attack_name}.get(option.name) or _flag_type(option.kind, option)
    group.add_argument(option.flag, dest=option.name, type=kind, nargs=nargs,
                       default=argparse.SUPPRESS, metavar=metavar, help=help_)


def build_parser() -> argparse.ArgumentParser:
    """The ``ardir`` argument parser; ``train``'s flags are generated from :func:`ardir.config.schema`."""
    parser = argparse.ArgumentParser(prog="ardir", allow_abbrev=False,
                                     description="Adversarially robust knowledge distillation: "
                                     "train, evaluate, plot, list a model's layers.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"ardir {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,plot,layers}")

    train_p = sub.add_parser("train", help="train a model (a teacher with --method trades/at, or distil a student)",
                             description="Train with any method. Flags override --config; --resume continues "
                                         "DIR/last.pt.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train_p.add_argument("--config", metavar="TOML", help="a TOML file of key = value pairs (keys as the flags, "
                         "with _ for -)")
    train_p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last.pt")
    titles = {"run": "run", "trainer": "trainer (ardir.Trainer)",
              "method": "method arguments (unset: the method's own default)", "eval": "evaluation (ardir eval)"}
    groups = {name: train_p.add_argument_group(title) for name, title in titles.items()}
    for option in cfg.schema().values():
        _add_option(groups[option.group], option)

    add_eval_parser(sub)

    plot_p = sub.add_parser("plot", help="training curves (metrics.jsonl) and robust accuracy against eps "
                            "(report*.json with a sweep) as PNG files")
    plot_p.add_argument("directory", help="a run directory")
    plot_p.add_argument("--output-dir", default=None, help="where the PNG files go (default: the run directory)")
    add_layers_parser(sub)
    for command in sub.choices.values():
        command.allow_abbrev = False  # "--epoch" is a typo to report, not "--epochs"
    parser.commands = sub.choices
    return parser


# ----------------------------------------------------------------------------------------------- helpers
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _plain(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The configuration without unset keys (what checkpoints and config.toml store)."""
    return {k: v for k, v in config.items() if v is not None}


def _format_record(record: Mapping[str, Any], epochs: int) -> str:
    from .plot import NON_TERMS
    skip = NON_TERMS | {"loss"}
    terms = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in skip and isinstance(v, float))
    line = f"epoch {record['epoch']}/{epochs}  loss {record['loss']:.4g}" + (f" ({terms})" if terms else "")
    if "val_pgd" in record:
        line += f"  val natural {record['val_natural']:.2f}%  pgd {record['val_pgd']:.2f}%"
    skipped = f"  SKIPPED {record['skipped_batches']} non-finite batches" if record.get("skipped_batches") else ""
    return line + f"  lr {record['lr']:.3g}  {record['images_per_s']:.0f} img/s  {record['seconds']:.1f} s{skipped}"


class RunLogger:
    """The Trainer callback of a run: after every epoch it updates ``best.pt`` when the validation PGD accuracy
    improved, rewrites ``last.pt`` (:func:`ardir._cli_resume.save_last`), appends to ``metrics.jsonl`` and prints one
    log line."""

    def __init__(self, output_dir: Path, config: Mapping[str, Any], model_info: Mapping[str, Any],
                 best: Optional[Mapping[str, Any]] = None, log=None):
        self.output_dir = Path(output_dir)
        self.config = _plain(config)
        self.model_info = dict(model_info)
        self.best = dict(best or {})
        self.log = log or (lambda line: tqdm.write(line))

    @property
    def selection_metric(self) -> str:
        """What ``best.pt`` maximises on the validation split: PGD accuracy, or natural accuracy for a model
        trained without attack (``--method natural``, e.g. MTARD's natural teacher), whose PGD accuracy is noise."""
        return "val_natural" if self.config.get("method") == "natural" else "val_pgd"

    @property
    def metrics_path(self) -> Path:
        """``output_dir / "metrics.jsonl"``."""
        return self.output_dir / "metrics.jsonl"

    def __call__(self, trainer, record: Dict[str, Any]) -> None:
        record = {"epoch": record["epoch"], "step": trainer.step, **{k: v for k, v in record.items() if k != "epoch"}}
        if hasattr(trainer, "check_finite"):
            trainer.check_finite()  # no last.pt or best.pt with a NaN/Inf weight or statistic, ever
        # Order matters for a crash in between: best.pt, then last.pt (which records the best epoch only once
        # best.pt holds it, and this epoch's log line), then the log line: a logged epoch is always resumable, and a
        # resume writes the line a crash kept from the log (see _sync_metrics).
        key = self.selection_metric
        improved = key in record and record[key] > self.best.get(key, -1.0)
        if improved:
            self.best = {"epoch": record["epoch"], "val_pgd": record["val_pgd"],
                         "val_natural": record["val_natural"]}
            save_finite({"format": MODEL_FORMAT, "config": self.config, "model_info": self.model_info,
                         "model": trainer.student.state_dict(), **self.best}, self.output_dir / "best.pt")
        trainer.last_checkpoint = save_last(self.output_dir, run_state(trainer, self.config, self.model_info,
                                                                       self.best, record))
        self._append(json.dumps(record) + "\n")
        self.log(_format_record(record, trainer.epochs) + ("  *best*" if improved else ""))

    def _append(self, line: str) -> None:
        """Append to ``metrics.jsonl``, never through a symbolic link (O_NOFOLLOW where the OS has it)."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.metrics_path, flags, 0o644)
        except OSError as error:
            raise CLIError(f"cannot append to {self.metrics_path} ({error.strerror or error}): it must be a plain "
                           "file in the run directory, not a symbolic link") from None
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def last_state(self, trainer) -> Dict[str, Any]:
        """The content of ``last.pt`` (:func:`ardir._cli_resume.run_state`), without the epoch's log line."""
        return run_state(trainer, self.config, self.model_info, self.best)


def _prepare_run_directory(output_dir: Path, metrics: Path, resume: bool) -> None:
    """Remove what a kill mid-write left (``.last.pt.*.tmp``, ...); refuse to append through a linked log."""
    if not output_dir.is_dir():
        return
    remove_stale_temporaries(output_dir)
    if metrics.is_symlink():
        if resume:
            raise CLIError(f"{metrics} is a symbolic link (to {os.readlink(metrics)}): ardir appends its log only "
                           "to a file inside the run directory; replace the link by a copy of its target and resume")
        metrics.unlink()  # a new run starts a new log: the link goes, its target is left alone


def _model_info(config: Mapping[str, Any], loaders: ardir_data.Loaders) -> Dict[str, Any]:
    info: Dict[str, Any] = {"name": config["model"], "num_classes": loaders.num_classes,
                            "in_chans": loaders.in_chans, "image_size": loaders.image_size,
                            "dataset": loaders.name}
    if config["normalize"]:
        spec = ardir_data.get_spec(config["dataset"])
        info.update(mean=list(spec.mean), std=list(spec.std))
    return info


# ------------------------------------------------------------------------------------------------- train
def train(flags: Mapping[str, Any], config_file: Optional[str] = None, resume: bool = False,
          log=None) -> Path:
    """Run ``ardir train``: ``flags`` override ``config_file``, which overrides the saved configuration on
    ``resume`` and the defaults. Returns the output directory. The run holds ``DIR/train.lock`` until it ends
    (:mod:`ardir._run_lock`): a second ``ardir train`` on the directory stops with a :class:`CLIError`."""
    # under torchrun (WORLD_SIZE set) every process runs this; rank 0 alone speaks, writes and locks (the trainer runs
    # the logger's callbacks on rank 0 only); torchrun's RANK is known before the group is joined
    main_process = distributed.is_main_process() and int(os.environ.get("RANK", 0)) == 0
    say = (log or (lambda line: tqdm.write(line))) if main_process else (lambda line: None)
    file_values = cfg.load_toml(config_file) if config_file else {}
    output_dir = Path(flags.get("output_dir") or file_values.get("output_dir") or cfg.schema()["output_dir"].default)
    with run_lock(output_dir, enabled=main_process, note=say), sigterm_as_interrupt():
        return _train_locked(flags, file_values, output_dir, resume, main_process, say)


def _trackers(config: Mapping[str, Any], output_dir: Path, main_process: bool) -> list:
    """The callbacks that send the epoch records elsewhere: TensorBoard with --tensorboard (on rank 0 only, the
    one process that calls callbacks)."""
    wanted = config.get("tensorboard") and main_process
    return [tensorboard.TensorBoardLogger(output_dir / "tensorboard")] if wanted else []


def _train_locked(flags: Mapping[str, Any], file_values: Mapping[str, Any], output_dir: Path, resume: bool,
                  main_process: bool, say) -> Path:
    """:func:`train` once the run directory is locked."""
    from .trainer import Trainer

    last = output_dir / "last.pt"
    state = mid = None
    if resume:
        state, mid, saved = _resume_point(output_dir)
        refuse_restored_changes(saved, {**file_values, **flags})
        config = cfg.resolve(saved, file_values, flags)
        _check_saved_paths(config, {**file_values, **flags}, output_dir)
    else:
        if os.path.lexists(last) or list_checkpoints(output_dir / "checkpoints"):
            raise CLIError(f"{output_dir} already holds a run ({'last.pt' if os.path.lexists(last) else 'checkpoints'}"
                           "); continue it with --resume, or choose another --output-dir")
        config = cfg.with_dataset_radius(cfg.resolve(file_values, flags))  # a resumed run keeps what it saved
    config["output_dir"] = str(output_dir)
    if config.get("tensorboard") and not tensorboard.available():
        raise CLIError(f"--tensorboard needs the tensorboard package: {tensorboard.INSTALL}")
    config = cfg.absolute_paths(config)  # what last.pt and config.toml record: the run resolves from anywhere
    device, joined = distributed.join(_device(config["device"]))  # under torchrun: one process per device
    _seed_everything(config["seed"])

    loaders = ardir_data.get_loaders(config["dataset"], data_dir=config["data_dir"], batch_size=config["batch_size"],
                                     val_size=config["val_size"], fake_data=config["fake_data"],
                                     num_workers=config["num_workers"], seed=config["seed"],
                                     limit=config["train_size"], download=config["download"])
    info = _model_info(config, loaders)
    student = models.create(info["name"], num_classes=info["num_classes"], in_chans=info["in_chans"],
                            mean=info.get("mean"), std=info.get("std")).to(device)
    teacher = _teacher(config, info, device, say)

    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _prepare_run_directory(output_dir, output_dir / "metrics.jsonl", resume)
    best = state.get("best") if state else _best_so_far(output_dir, int(mid[1]["epoch"])) if mid else None
    logger = RunLogger(output_dir, config, info, best=best, log=say)
    trainer_kwargs = cfg.trainer_kwargs(config)
    if trainer_kwargs.get("checkpoint_every_steps") and "checkpoint_dir" in inspect.signature(Trainer).parameters:
        trainer_kwargs["checkpoint_dir"] = output_dir / "checkpoints"  # the Trainer's mid-epoch checkpoints
    trainer = Trainer(student, loaders.train, teacher=teacher, method=config["method"], val_loader=loaders.val,
                      progress=not config["quiet"], callbacks=[logger] + _trackers(config, output_dir, main_process),
                      **trainer_kwargs,
                      **cfg.method_kwargs(config))
    if trainer.checkpointer is not None:  # the run's one last.pt is DIR/last.pt; checkpoints/ holds numbered ones
        trainer.checkpointer.point_last = False
    if resume:
        restore_trainer(trainer, state, mid, last)
        if main_process:
            _sync_metrics(logger.metrics_path, trainer.epoch, (state or {}).get("record"))
        say(f"resuming {output_dir} at epoch {trainer.epoch}/{trainer.epochs} (step {trainer.step})")
    elif main_process and logger.metrics_path.exists():
        logger.metrics_path.unlink()  # a stale log without last.pt: the run starts over
    _record_schedule(config, trainer)
    if main_process:
        atomic_write_text(cfg.dump_config(config), output_dir / "config.toml")
    if loaders.val is None:
        say("note: --val-size 0 holds out no validation split, so no best.pt is chosen; evaluate last.pt")

    try:
        trainer.fit()
    except KeyboardInterrupt:
        raise CLIError(interrupted(output_dir, trainer.epoch + 1)) from None
    finally:
        if joined:
            distributed.cleanup()
    say(_summary(output_dir, logger))
    return output_dir


def _teacher(config: Mapping[str, Any], info: Mapping[str, Any], device: torch.device, say):
    """The run's teacher, or None for a method that distils from none (a ``--teacher`` given anyway is noted)."""
    from .methods import METHODS
    if METHODS[config["method"]].needs_teacher:
        if not config["teacher"]:
            raise CLIError(f"method {config['method']!r} distils from a teacher: pass --teacher PATH|MODEL|"
                           "robustbench:NAME, or train one first with `ardir train --method trades --output-dir DIR`")
        return load_teacher(config["teacher"], info["num_classes"], info["in_chans"], device,
                            model_name=config["teacher_model"], model_dir=config["robustbench_dir"])
    if config["teacher"]:
        say(f"note: method {config['method']!r} uses no teacher; --teacher is ignored")
    return None


def _record_schedule(config: Dict[str, Any], trainer) -> None:
    """Put the schedule actually run into ``config`` (a resumed run keeps its checkpoint's milestones, whatever
    --epochs says now) and IAD's resolved warm-up, so that ``ardir train --config DIR/config.toml`` repeats this run,
    resumed and extended ones too."""
    if "milestones" in config and hasattr(trainer.scheduler, "milestones"):
        config["milestones"] = sorted(trainer.scheduler.milestones.elements())
    if config.get("warmup_epochs", 0) is None and hasattr(trainer.method, "warmup"):
        config["warmup_epochs"] = trainer.method.warmup


def _summary(output_dir: Path, logger: RunLogger) -> str:
    """The line a finished run ends with: where last.pt is, the best epoch, how to evaluate."""
    best = logger.best
    summary = f"done: {output_dir}/last.pt"
    if best:
        which = "natural" if logger.selection_metric == "val_natural" else "PGD"
        summary += f"; best.pt from epoch {best['epoch']} (val {which} {best[logger.selection_metric]:.2f}%)"
    return summary + f"; evaluate with `ardir eval --checkpoint {output_dir}/{'best' if best else 'last'}.pt`"


# -------------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``ardir`` console script; returns the exit status (0 ok, 2 error, 130 interrupted)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        unrecognized(parser.commands[args.command], extra)
    options = cfg.schema()
    try:
        if args.command == "train":
            flags = {k: v for k, v in vars(args).items() if k in options}
            train(flags, args.config, args.resume)
        elif args.command == "eval":
            report, where = run_eval(args)
            if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 speaks for all
                print(report.to_markdown())
                print(f"wrote {where}.md and {where}.json")
        elif args.command == "layers":
            print(show_layers(args.model, args.dataset, args.in_chans, args.image_size))
        elif args.command == "plot":
            from .plot import plot_run
            for path in plot_run(args.directory, args.output_dir):
                print(f"wrote {path}")
    except (CLIError, cfg.ConfigError, ardir_data.DatasetNotFoundError, TeacherNotFoundError, CheckpointError,
            FileNotFoundError, ImportError) as err:
        if os.environ.get("ARDIR_DEBUG"):
            raise
        print(f"ardir {args.command}: error: {_sentence(err)}", file=sys.stderr)
        return 130 if "interrupted" in str(err) else 2
    except (ValueError, TypeError, OSError) as err:  # the library's checks: one sentence naming the argument
        if os.environ.get("ARDIR_DEBUG"):
            raise
        print(f"ardir {args.command}: error: {_sentence(err)} (set ARDIR_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # the run diverged: the message names the step and the last good checkpoint
        if os.environ.get("ARDIR_DEBUG"):
            raise
        print(f"ardir {args.command}: stopped: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
