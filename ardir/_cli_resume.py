"""A run's ``last.pt``, written and read, and what ``ardir train --resume`` continues from: that ``last.pt`` or, when
further on, the Trainer's newest good mid-epoch checkpoint; the run's recorded paths, checked before any work; and
``metrics.jsonl`` made to end at the epoch resumed.

``last.pt`` (format :data:`RUN_FORMAT`) wraps the Trainer's :meth:`~ardir.Trainer.state_dict` (``trainer``: the
format of the Trainer's own checkpoints, random states included, as :mod:`ardir.rng_state` captures them) with what
the run adds: its configuration, the architecture record and the weights that ``ardir eval`` and a teacher load
read (``config``, ``model_info``, ``model``), the best epoch so far (``best``) and the epoch's log line
(``record``). It is written through :func:`ardir.checkpoint.save_finite`: atomically, and never with a NaN or an
Inf. Version 1 (ardir 0.1.0) also held ``rng``, the run's own copy of the random states that ``trainer`` holds
too; it is not read (the trainer's are restored), so a run written by 0.1.0 resumes as it would have there."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from . import config as cfg
from ._cli_base import CLIError
from .checkpoint import (CheckpointError, atomic_write_text, find_resumable, list_checkpoints, load_checkpoint,
                         save_finite)

RUN_FORMAT = "ardir-run"
"""The ``format`` of a run's ``last.pt``."""
RUN_VERSION = 2
"""The ``version`` of the ``last.pt`` written now; one from a newer version is refused on ``--resume``."""


def run_state(trainer, config: Mapping[str, Any], model_info: Mapping[str, Any], best: Mapping[str, Any],
              record: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The content of a run's ``last.pt`` after ``trainer``'s latest epoch (``record``: that epoch's log line)."""
    state = {"format": RUN_FORMAT, "version": RUN_VERSION, "config": dict(config), "model_info": dict(model_info),
             "model": trainer.student.state_dict(), "trainer": trainer.state_dict(), "best": dict(best),
             "epoch": trainer.epoch, "step": trainer.step}
    if record is not None:
        state["record"] = dict(record)
    return state


def save_last(output_dir: Path, state: Mapping[str, Any]) -> Path:
    """Write :func:`run_state`'s ``state`` as ``output_dir / "last.pt"``, atomically; ``FloatingPointError`` naming
    the tensor, and nothing written, when it holds a NaN or an Inf."""
    return save_finite(dict(state), Path(output_dir) / "last.pt", f"after {state['step']} steps")


def _sync_metrics(path: Path, epoch: int, record: Optional[Mapping[str, Any]] = None) -> None:
    """Make the log end at ``epoch``, the checkpoint resumed: drop lines past it (or cut short by a crash) and add
    its own ``record`` when a crash came between writing ``last.pt`` and the log line."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("epoch", 0) <= epoch:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            pass
    logged = {json.loads(line).get("epoch") for line in kept}
    if record is not None and record.get("epoch") == epoch and epoch not in logged:
        kept.append(json.dumps(dict(record)))
    if kept != lines:
        atomic_write_text("".join(line + "\n" for line in kept), path)


def _load_last(last: Path):
    """``(state, error)`` of a run's ``last.pt``: its state when it loads, else why not (``None`` when absent)."""
    if not os.path.lexists(last):
        return None, None
    try:
        state = load_checkpoint(last)
    except (CheckpointError, OSError) as error:
        return None, error
    if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
        raise CLIError(f"--resume: {last} is not the last.pt of an ardir run (format "
                       f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    version = state.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CLIError(f"--resume: {last} records run format version {version!r}, not a whole number: it was not "
                       "written by ardir; start a new run or restore the file")
    if version > RUN_VERSION:
        raise CLIError(f"--resume: {last} was written by a newer ardir (run format version {version}, this "
                       f"one reads up to {RUN_VERSION}); resume it with that version of ardir")
    return state, None


def _resume_point(output_dir: Path):
    """What ``--resume`` continues from: ``(last.pt's state or None, (path, state) of the Trainer's newest good
    mid-epoch checkpoint when it is further on, or None, the run's saved configuration)``. Both kinds of checkpoint
    count: a run killed in its first epoch has only ``checkpoints/epoch-0000-step-*.pt`` (and ``config.toml``)."""
    last = output_dir / "last.pt"
    state, last_error = _load_last(last)
    mid = None
    if list_checkpoints(output_dir / "checkpoints"):
        try:
            mid = find_resumable(output_dir / "checkpoints")  # the newest that loads and is finite; warns on others
        except CheckpointError:
            mid = None
    if mid is not None and state is not None and int(mid[1]["step"]) <= int(state["step"]):
        mid = None  # last.pt is as far on
    if state is None and mid is None:
        if last_error is not None:
            raise CLIError(f"--resume: {last_error}; and {output_dir / 'checkpoints'} holds no usable checkpoint")
        raise CLIError(f"--resume: no checkpoint in {output_dir / 'checkpoints'} and {last} does not exist; "
                       "start the run without --resume")
    if state is not None:
        return state, mid, state["config"]
    if last_error is not None:
        warnings.warn(f"--resume: {last_error}; continuing from {mid[0]}", stacklevel=4)
    saved = output_dir / "config.toml"
    if not saved.is_file():
        raise CLIError(f"--resume: {mid[0]} has no run configuration beside it ({saved} is missing); start a new run")
    return None, mid, cfg.load_toml(saved)


def interrupted(output_dir: Path, epoch: int) -> str:
    """What to tell a user who stopped a run during ``epoch`` (1-based): what ``--resume`` would continue from, as
    :func:`_resume_point` chooses it, or that nothing usable is saved yet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            state, mid, _ = _resume_point(output_dir)
        except CLIError:
            return (f"interrupted during epoch {epoch}, before anything was saved (no last.pt, no checkpoint in "
                    f"{output_dir / 'checkpoints'}): run it again without --resume to start over")
    if mid is not None:
        where = f"{mid[0]} (epoch {int(mid[1]['epoch']) + 1}, step {mid[1]['step']})"
    else:
        where = f"{output_dir / 'last.pt'} (after epoch {state['epoch']}, step {state['step']})"
    return f"interrupted during epoch {epoch}; `ardir train --output-dir {output_dir} --resume` continues from {where}"


def restore_trainer(trainer, state: Optional[Mapping[str, Any]], mid, last: Path) -> None:
    """Put ``trainer`` where the run stopped (:func:`_resume_point`): at the Trainer's mid-epoch checkpoint ``mid``
    when it is further on, else at ``last.pt``'s trainer state, its random states included."""
    if mid is not None:
        try:
            trainer.resume(mid[0])
        except CheckpointError as err:
            raise CLIError(f"--resume: {err}") from None
        return
    try:
        trainer.load_state_dict(state["trainer"])
    except (CheckpointError, KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:
        raise CLIError(f"--resume: {last} does not fit this run ({type(err).__name__}: "
                       f"{str(err).splitlines()[0]}); resume with the run's own settings (drop the flags "
                       "that change the model, method or optimiser) or start a new --output-dir") from None
    trainer.last_checkpoint = last


RESTORED = ("lr", "momentum", "weight_decay", "milestones", "lr_gamma")
"""Settings a resumed run takes from its checkpoint (the optimiser's and the learning-rate schedule's state)."""


def refuse_restored_changes(saved: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """On ``--resume``: a flag or ``--config`` value that would change a setting the checkpoint restores
    (:data:`RESTORED`) is a :class:`CLIError`, rather than dropped while ``config.toml`` recorded it."""
    for key in RESTORED:
        value = given.get(key)
        if value is not None and value != saved.get(key):
            flag = cfg.schema()[key].flag
            raise CLIError(f"--resume: {flag} {value!r} differs from the run's {saved.get(key)!r}: a resumed run "
                           "continues its checkpoint's optimiser and learning-rate schedule; start a new run (another "
                           "--output-dir) to change it")


def _check_saved_paths(config: Mapping[str, Any], given: Mapping[str, Any], output_dir: Path) -> None:
    """On ``--resume``: a path the run recorded, not given again now, that this run reads and that no longer exists
    is a :class:`CLIError` naming ``DIR/config.toml`` and the flag that overrides it."""
    from .methods import METHODS
    teacher = config.get("teacher") or ""
    reads = {"teacher": METHODS[config["method"]].needs_teacher, "natural_teacher": True,
             "data_dir": not config["fake_data"], "robustbench_dir": teacher.startswith("robustbench:")}
    for key, used in reads.items():
        value = config.get(key)
        if not used or key in given or not isinstance(value, str) or not value:
            continue
        if key in ("teacher", "natural_teacher") and not cfg.looks_like_path(value):
            continue  # a name: the loader says what is wrong with it
        if not os.path.lexists(os.path.expanduser(value)):
            flag = cfg.schema()[key].flag
            raise CLIError(f"--resume: the {key} {value} recorded in {output_dir / 'config.toml'} does not exist; "
                           f"pass {flag} {'DIR' if key.endswith('_dir') else 'PATH'} to resume with it where it is "
                           "now")


def _best_so_far(output_dir: Path, epoch: int) -> Optional[Dict[str, Any]]:
    """The record of ``best.pt`` when it is usable and from an epoch <= ``epoch`` (a resume without last.pt)."""
    try:
        best = load_checkpoint(output_dir / "best.pt")
    except (CheckpointError, OSError):
        return None
    if all(k in best for k in ("epoch", "val_pgd", "val_natural")) and int(best["epoch"]) <= epoch:
        return {k: best[k] for k in ("epoch", "val_pgd", "val_natural")}
    return None
