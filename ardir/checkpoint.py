"""Crash-safe files: atomic writes, safe checkpoint loading and a rotating checkpointer.

- Every write goes to a temporary file in the target's directory, is flushed and fsync'ed, then renamed over the
  target (``os.replace``, atomic on POSIX and Windows). A crash, a kill or a full disk while writing leaves the
  previous file untouched and no truncated target; the temporary file is removed on any error.
- Checkpoints load with ``torch.load(..., weights_only=True)``: tensors and plain data (dicts, lists, numbers,
  strings) only. A file carrying a pickled callable or any other object is refused with :class:`CheckpointError`
  ("refused: it would run code when loaded"), never executed. A truncated or corrupt file, and one holding NaN or
  Inf tensors, also raise :class:`CheckpointError`, naming the file (and the first non-finite tensor).
- No checkpoint is written with non-finite state: :func:`save_finite`, the way every ardir checkpoint is written
  (:meth:`Checkpointer.save`, ``ardir train``'s ``last.pt`` and ``best.pt``), refuses it (``FloatingPointError``).
- :class:`Checkpointer` writes numbered checkpoints ``epoch-EEEE-step-SSSSSSSSS.pt`` (``EEEE`` = epochs completed,
  ``SSSSSSSSS`` = optimiser steps done), keeps the newest ``keep_last`` of them and points ``last.pt`` at the
  newest. :func:`newest_good` finds the newest one that loads, skipping corrupt ones with a warning.
- The random states a checkpoint holds are captured and restored by :mod:`ardir.rng_state` (re-exported here).
"""
from __future__ import annotations

import errno
import io
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ._safety import first_non_finite, path_problem, refused_objects
from .rng_state import generator_states, loader_generators, rng_state, set_generator_states, set_rng_state

PathLike = Union[str, os.PathLike]

FORMAT = "ardir-checkpoint"
"""The ``format`` entry of every trainer checkpoint."""
VERSION = 1
"""The ``version`` entry; a checkpoint from a newer version is refused."""
LAST = "last.pt"
_NUMBERED = re.compile(r"^epoch-(\d+)-step-(\d+)\.pt$")
_STALE = re.compile(r"^\.(epoch-\d+-step-\d+\.pt|last\.pt|best\.pt|config\.toml|metrics\.jsonl)\..+\.(tmp|link)$")

__all__ = ["CheckpointError", "Checkpointer", "atomic_save", "save_finite", "atomic_write_bytes", "atomic_write_text",
           "rng_state", "set_rng_state", "loader_generators", "generator_states", "set_generator_states",
           "checkpoint_name", "find_resumable", "list_checkpoints", "load_checkpoint", "newest_good",
           "remove_stale_temporaries", "first_non_finite"]


class CheckpointError(ValueError):
    """A checkpoint cannot be used: corrupt, truncated, not an ardir checkpoint, or carrying unsafe objects."""


def _write_error(path: Path, error: OSError) -> OSError:
    """The same kind of OSError, with a message naming the file and what to do."""
    if error.errno == errno.ENOSPC:
        hint = "the disk is full; free space and resume (the previous file, if any, is intact)"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "the directory is not writable; fix its permissions or choose another output directory"
    else:
        hint = "the previous file, if any, is intact"
    message = f"could not write {path}: {error.strerror or error}; {hint}"
    try:
        return type(error)(error.errno, message) if error.errno is not None else type(error)(message)
    except TypeError:  # an OSError subclass with another constructor
        return OSError(error.errno, message)


def _umask_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask), which mkstemp's 0o600 is not."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_CREATE_MODE = _umask_mode()  # read once: os.umask is process-wide and not thread-safe to query


def _atomic_write(path: PathLike, write) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it and rename it over ``path``."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as error:
        raise _write_error(path, error) from error
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if hasattr(os, "fchmod"):  # colleagues read a run as they read any file the user writes
                os.fchmod(f.fileno(), _CREATE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:  # also KeyboardInterrupt: never leave the temporary file behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise _write_error(path, error) from error
        raise
    _fsync_directory(directory)
    return path


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(data: bytes, path: PathLike) -> Path:
    """Write ``data`` to ``path`` atomically: the file is either the old one or the complete new one."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: PathLike, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (logs such as ``metrics.jsonl`` rewritten whole, reports, configs)."""
    return atomic_write_bytes(text.encode(encoding), path)


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` atomically. On any error (e.g. ``OSError`` ENOSPC, disk full) the temporary
    file is deleted, an existing ``path`` is left untouched and the error names ``path``."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def save_finite(state: Dict[str, Any], path: PathLike, when: str = "") -> Path:
    """:func:`atomic_save` of a checkpoint that holds no NaN or Inf: the one way ardir writes a checkpoint (the
    :class:`Checkpointer`'s files, ``ardir train``'s ``last.pt`` and ``best.pt``).

    Raises ``FloatingPointError`` naming the first tensor holding a NaN or an Inf (and ``when``, e.g. ``"after
    12 steps"``), writing nothing: a checkpoint is always a state worth resuming from, and ``path`` stays as it
    was."""
    bad = first_non_finite(state)
    if bad is not None:
        raise FloatingPointError(f"{bad} holds non-finite values (NaN or Inf){' ' + when if when else ''}: no "
                                 f"checkpoint was written with it ({Path(path).name} is as it was)")
    return atomic_save(state, path)


def load_checkpoint(path: PathLike, allow_non_finite: bool = False) -> Dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``, onto the CPU) and check that its tensors are finite.

    Arguments:
        path: the file.
        allow_non_finite: accept NaN/Inf tensors (to inspect a diverged state); by default a checkpoint whose
            weights, statistics or optimiser state hold a NaN or an Inf is refused, naming the first such tensor.

    Raises:
        FileNotFoundError, IsADirectoryError, OSError: the path is missing, a directory, a dangling symbolic link
            or a link loop (the message says which).
        CheckpointError: the file is truncated or corrupt; or it would run code when loaded (a pickled class or
            callable: refused, never executed); or it holds non-finite tensors.
    """
    path = Path(path)
    problem = path_problem(path)
    if problem is not None:
        raise problem
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's WeightsUnpickler refused an object, or the pickle is broken
        state = _refusal_or_corruption(path)
    except Exception as error:  # RuntimeError, EOFError, struct.error, ...: whatever a damaged file raises
        raise _corrupt(path, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    if not allow_non_finite:
        bad = first_non_finite(state)
        if bad is not None:
            raise CheckpointError(f"checkpoint {path} holds non-finite values (NaN or Inf) in {bad}: it is not a "
                                  "usable state; use an older checkpoint (resuming from a directory picks the "
                                  "newest good one)")
    return state


def _corrupt(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is truncated or corrupt, or not a torch checkpoint ({detail}); "
                           "use an older checkpoint (resuming from a directory picks the newest good one)")


def _refusal_or_corruption(path: Path):
    """Raise what a weights-only ``UnpicklingError`` means for this file: a refusal when its pickle is complete
    and names objects weights-only loading does not build, else corruption (see :func:`refused_objects`)."""
    named = refused_objects(path)
    if named is None:
        raise _corrupt(path, "its pickle is damaged; nothing in it was executed") from None
    what = f" (it names {', '.join(named[:4])}{' ...' if len(named) > 4 else ''})" if named else ""
    raise CheckpointError(f"refused: it would run code when loaded: checkpoint {path}{what} holds objects other "
                          "than tensors and plain data (a pickled class or callable); it was not executed. "
                          "ardir loads only tensors and plain data: use a checkpoint written by ardir or a plain "
                          "state_dict") from None


def remove_stale_temporaries(directory: PathLike) -> List[Path]:
    """Delete the temporary files a writer killed mid-write left in ``directory`` (``.last.pt.*.tmp``,
    ``.best.pt.*.tmp``, ``.epoch-...pt.*.tmp``, ...: never a complete checkpoint, never taken for one); returns
    the files removed."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if _STALE.match(entry.name) and not entry.is_dir():
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def checkpoint_name(epoch: int, step: int) -> str:
    """File name of the checkpoint taken after ``epoch`` completed epochs and ``step`` optimiser steps."""
    return f"epoch-{epoch:04d}-step-{step:09d}.pt"


def list_checkpoints(directory: PathLike) -> List[Path]:
    """The numbered checkpoints in ``directory``, newest first (by steps, then epochs)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _NUMBERED.match(entry.name)
        if match and entry.is_file():
            found.append(((int(match.group(2)), int(match.group(1))), entry))
    return [p for _, p in sorted(found, reverse=True)]


def find_resumable(directory: PathLike) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """``(path, state)`` of the newest checkpoint in ``directory`` that loads; ``None`` when it holds none.

    Numbered checkpoints are tried newest first, then ``last.pt``; a corrupt or unsafe one is skipped with a
    warning. Raises :class:`CheckpointError` when checkpoints exist but none loads.
    """
    directory = Path(directory)
    candidates = list_checkpoints(directory)
    if (directory / LAST).is_file():
        candidates.append(directory / LAST)
    failures = []
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except (CheckpointError, OSError) as error:
            failures.append(str(error))
            warnings.warn(f"skipping checkpoint {path}: {error}", stacklevel=2)
    if failures:
        raise CheckpointError(f"no usable checkpoint in {directory}: " + " | ".join(failures))
    return None


def newest_good(directory: PathLike) -> Optional[Path]:
    """The newest checkpoint in ``directory`` that loads (corrupt ones skipped with a warning), or ``None``."""
    try:
        found = find_resumable(directory)
    except CheckpointError:
        return None
    return None if found is None else found[0]


class Checkpointer:
    """Writes a run's checkpoints into ``directory`` atomically and keeps the newest ``keep_last``.

    Arguments:
        directory: created if missing; it must be writable (checked now, not after the first epoch).
        keep_last: numbered checkpoints kept (>= 1); older ones are deleted after a newer one is written.
        every_steps: also checkpoint every this many optimiser steps (mid-epoch); ``None``: only at epoch ends.
        point_last: keep ``last.pt`` the newest checkpoint; ``False`` where another file is the run's ``last.pt``
            (``ardir train``'s ``DIR/last.pt``, beside the numbered ``DIR/checkpoints/``), so a run has one.

    Each save writes ``epoch-EEEE-step-SSSSSSSSS.pt`` and then makes ``last.pt`` the same file (a hard link,
    or a copy where links are not supported), both atomically.
    """

    def __init__(self, directory: PathLike, keep_last: int = 2, every_steps: Optional[int] = None,
                 point_last: bool = True):
        from ._checks import non_negative_int
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last={keep_last!r} must be a whole number >= 1 (checkpoints kept)")
        if every_steps is not None and non_negative_int("checkpoint_every_steps", every_steps) == 0:
            raise ValueError("checkpoint_every_steps=0 must be >= 1, or None to checkpoint only at epoch ends")
        self.directory = Path(directory).expanduser()
        self.keep_last = keep_last
        self.every_steps = every_steps
        self.point_last = point_last
        self._check_writable()
        remove_stale_temporaries(self.directory)

    def _check_writable(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=self.directory)
            os.close(fd)
            os.unlink(probe)
        except OSError as error:
            raise PermissionError(
                getattr(error, "errno", None) or errno.EACCES,
                f"checkpoint directory {self.directory} is not writable ({type(error).__name__}: "
                f"{error.strerror or error}); choose a directory you can write to (output_dir / checkpoint_dir) "
                "or fix its permissions", str(self.directory)) from error

    @property
    def last(self) -> Path:
        """``directory / "last.pt"``."""
        return self.directory / LAST

    def save(self, state: Dict[str, Any], epoch: int, step: int) -> Path:
        """Write ``state`` as the checkpoint after ``epoch`` epochs and ``step`` steps; returns its path.

        Raises ``FloatingPointError`` naming the first tensor holding a NaN or an Inf, writing nothing
        (:func:`save_finite`): a checkpoint is always a state worth resuming from."""
        path = save_finite(state, self.directory / checkpoint_name(epoch, step), f"after {step} steps")
        if self.point_last:
            self._point_last_at(path)
        for old in list_checkpoints(self.directory)[self.keep_last:]:
            try:
                old.unlink()
            except OSError as error:
                warnings.warn(f"could not delete old checkpoint {old}: {error}", stacklevel=2)
        return path

    def _point_last_at(self, path: Path) -> None:
        tmp = self.directory / f".{LAST}.{os.getpid()}.link"
        try:
            if tmp.exists():
                tmp.unlink()
            os.link(path, tmp)
            os.replace(tmp, self.last)
            _fsync_directory(self.directory)
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
            _atomic_write(self.last, lambda f: _copy_into(path, f))

    def newest(self) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """``(path, state)`` of the newest checkpoint that loads (see :func:`find_resumable`)."""
        return find_resumable(self.directory)


def _copy_into(path: Path, f: io.BufferedWriter) -> None:
    with open(path, "rb") as src:
        shutil.copyfileobj(src, f)
