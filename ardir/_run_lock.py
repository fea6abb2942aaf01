"""The lock of a run directory: ``DIR/train.lock`` while ``ardir train`` writes into ``DIR``.

Two ``ardir train`` processes on one ``--output-dir`` would append to one ``metrics.jsonl`` and overwrite each
other's checkpoints. The first one creates ``train.lock`` atomically (``O_CREAT | O_EXCL``), holding its pid and
host; a second one stops with a :class:`~ardir._cli_base.CLIError` naming the directory and that pid. The lock goes
when the run ends, however it ends. A lock whose process is no longer alive on this host (killed, machine
restarted: its pid is gone, or now belongs to a process started later) is stale and taken over with a note; one
from another host cannot be checked from here, so the message says which file to remove once that run is gone.
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from ._cli_base import CLIError

__all__ = ["LOCK_NAME", "RunLock", "run_lock"]

LOCK_NAME = "train.lock"
"""The lock's file name inside the run directory."""

_HELD = set()  # the real paths of the locks this process holds

UNWRITTEN_GRACE_S = 10.0
"""An empty or unreadable lock younger than this is being written by the process that just created it; an older one
was left by a process killed between creating and writing it, and is stale."""


def _process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks since boot, ``/proc/PID/stat``), or None where unknown: with the
    pid it tells a live run from a later process that was given the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, start: Optional[str]) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs on this host (True where it cannot tell)."""
    if os.name == "nt":  # os.kill(pid, 0) would send it CTRL_C_EVENT
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


def _own_record() -> Dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "ardir train"}


def _make_directories(directory: Path) -> List[Path]:
    """Create ``directory`` and its missing parents; returns those created, deepest first."""
    missing = []
    for path in (directory, *directory.parents):
        if path.exists() or os.path.islink(path):
            break
        missing.append(path)
    directory.mkdir(parents=True, exist_ok=True)
    return missing


class RunLock:
    """``DIR/train.lock`` for one process: :meth:`acquire` takes it (or raises :class:`CLIError`), :meth:`release`
    removes it, and the directories :meth:`acquire` created when they are still empty.

    Args:
        directory: the run directory (created when missing).
        note: called with one line when a stale lock is taken over.
    """

    def __init__(self, directory, note: Callable[[str], None] = print):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.note = note
        self._content: Optional[str] = None
        self._created: List[Path] = []
        self._key = os.path.realpath(self.path)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._content is not None

    def acquire(self) -> "RunLock":
        """Create the lock file, taking over a stale one; a :class:`CLIError` when another live run holds it."""
        self._created = _make_directories(self.directory)
        for _ in range(3):  # a stale lock removed, then created: another process may have been quicker
            if self._create():
                return self
            self._take_over_or_refuse()
        raise CLIError(f"{self.directory} is locked by {self.path}, which other processes keep taking; run one "
                       "ardir train on it at a time")

    def release(self) -> None:
        """Remove the lock file when it is still this one, then the directories :meth:`acquire` made if empty."""
        if self._content is not None:
            if self._read() == self._content:
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
            self._content = None
            _HELD.discard(self._key)
        for path in self._created:
            try:
                path.rmdir()  # only when nothing was written there: a run that failed before its first file
            except OSError:
                break
        self._created = []

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---------------------------------------------------------------------------------------------- helpers
    def _create(self) -> bool:
        """Create the lock file with this process's record; False when it exists."""
        content = json.dumps(_own_record())
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._content = content
        _HELD.add(self._key)
        return True

    def _read(self) -> Optional[str]:
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None

    def _take_over_or_refuse(self) -> None:
        """Remove a stale lock (with a note); a :class:`CLIError` naming the holder when it is not stale."""
        content = self._read()
        if content is None and not os.path.lexists(self.path):
            return  # released meanwhile
        holder = _parse(content)
        if holder is None:
            age = _age(self.path)
            if age is not None and age < UNWRITTEN_GRACE_S:
                raise CLIError(f"{self.directory} is being locked by another ardir train right now ({self.path} is "
                               "still empty); run one ardir train on it at a time")
            self._remove_stale(content, f"{self.path} names no process (a run killed while taking it)")
            return
        why = self._stale(holder)
        if why is not None:
            self._remove_stale(content, why)
            return
        pid, host = holder["pid"], holder.get("host")
        since = f", since {holder['since']}" if holder.get("since") else ""
        here = host == socket.gethostname()
        where = "" if here else f" on {host}"
        gone = "" if here else f"; if that run is gone, remove {self.path}"
        raise CLIError(f"{self.directory} is in use by another ardir train (pid {pid}{where}{since}): wait for it to "
                       f"end or choose another --output-dir{gone}")

    def _stale(self, holder: Dict[str, Any]) -> Optional[str]:
        """Why the lock of ``holder`` is stale, or None while its run may still go on (on another host: unknown)."""
        pid = holder["pid"]
        if holder.get("host") != socket.gethostname():
            return None
        if pid == os.getpid():  # this process, or an earlier one given the same pid (a restarted container)
            return None if self._key in _HELD else f"{self.path} was left by an earlier process with pid {pid}"
        if not _alive(pid, holder.get("start")):
            return f"{self.path} was left by process {pid}, which no longer runs"
        return None

    def _remove_stale(self, content: Optional[str], why: str) -> None:
        if self._read() != content:  # taken meanwhile by a live run: leave it to the next look
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        self.note(f"note: {why}; taking the run directory over")


def _parse(content: Optional[str]) -> Optional[Dict[str, Any]]:
    """The record of a lock file's ``content``, or None when it holds none (empty, cut short, not ardir's)."""
    try:
        record = json.loads(content or "")
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int) or record["pid"] <= 0:
        return None
    return record


def _age(path: Path) -> Optional[float]:
    try:
        return time.time() - os.lstat(path).st_mtime
    except OSError:
        return None


@contextmanager
def run_lock(directory, enabled: bool = True, note: Callable[[str], None] = print) -> Iterator[Optional[RunLock]]:
    """Hold ``directory``'s :class:`RunLock` for the ``with`` block, released however the block ends; with
    ``enabled`` False (a process of a torchrun group other than rank 0) nothing is taken."""
    if not enabled:
        yield None
        return
    lock = RunLock(directory, note).acquire()
    try:
        yield lock
    finally:
        lock.release()
