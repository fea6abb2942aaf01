"""The lock of a run directory (DIR/train.lock): a second `ardir train` on a directory in use stops in one sentence
naming it and the pid that holds it; a stale lock is taken over with a note; the lock goes when the run ends, also
when it fails or is interrupted."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from ardir import cli
from ardir._cli_base import CLIError
from ardir._run_lock import LOCK_NAME, RunLock, _process_start, run_lock

TINY = ["--dataset", "fashion-mnist", "--fake-data", "--model", "cnn_small", "--train-size", "64", "--val-size",
        "32", "--batch-size", "32", "--limit-batches", "1", "--steps", "1", "--val-attack-steps", "1", "--eps", "0.1",
        "--step-size", "0.05", "--quiet", "--method", "at"]


def run(*args):
    return cli.main([str(a) for a in args])


@pytest.fixture
def live_pid():
    """The pid of a process that runs for the test's length."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture
def dead_pid():
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(directory, pid, host=None, start="unset"):
    directory.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "since": "2025-01-01 12:00:00",
              "start": _process_start(pid) if start == "unset" else start}
    (directory / LOCK_NAME).write_text(json.dumps(record) + "\n")
    return directory / LOCK_NAME


def _one_sentence(text):
    line = text.strip()
    assert "\n" not in line and line.count(". ") == 0, line
    return line


# ------------------------------------------------------------------------------------------------ the command
@pytest.mark.parametrize("resume", [False, True])
def test_a_held_lock_refuses_a_second_run_in_one_sentence(tmp_path, live_pid, capsys, resume):
    out = tmp_path / "run"
    lock = _write_lock(out, live_pid)
    assert run("train", *TINY, "--output-dir", out, *(["--resume"] if resume else [])) == 2
    err = _one_sentence(capsys.readouterr().err)
    assert err.startswith("ardir train: error: ") and str(out) in err and f"pid {live_pid}" in err
    assert "another --output-dir" in err
    assert json.loads(lock.read_text())["pid"] == live_pid  # the holder's lock is left alone
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, dead_pid, capsys):
    out = tmp_path / "run"
    _write_lock(out, dead_pid)
    logged = []
    cli.train(cli_flags(out), log=logged.append)
    assert any(line.startswith("note: ") and f"process {dead_pid}" in line and "no longer runs" in line
               for line in logged), logged
    assert (out / "last.pt").is_file() and not (out / LOCK_NAME).exists()


def cli_flags(out, **more):
    """The flags of a tiny run, as :func:`ardir.cli.train` takes them."""
    args = cli.build_parser().parse_args(["train", *TINY, "--epochs", "1", "--output-dir", str(out)])
    options = cli.cfg.schema()
    return {**{k: v for k, v in vars(args).items() if k in options}, **more}


def test_the_lock_is_held_during_the_run_and_gone_after_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = []
    original = cli.RunLogger.__call__

    def logger(self, trainer, record):
        seen.append(json.loads((out / LOCK_NAME).read_text()))
        return original(self, trainer, record)
    monkeypatch.setattr(cli.RunLogger, "__call__", logger)
    assert run("train", *TINY, "--epochs", 2, "--output-dir", out) == 0
    assert [r["pid"] for r in seen] == [os.getpid()] * 2 and seen[0]["host"] == socket.gethostname()
    assert not (out / LOCK_NAME).exists()
    assert run("train", "--output-dir", out, "--resume", "--epochs", 3, "--quiet") == 0  # released: resumable
    assert not (out / LOCK_NAME).exists()


def test_the_lock_is_gone_after_a_failing_run(tmp_path, capsys):
    out = tmp_path / "runs" / "student"
    assert run("train", *TINY[:-2], "--method", "ard", "--output-dir", out) == 2  # no --teacher
    assert "distils from a teacher" in capsys.readouterr().err
    assert not os.path.lexists(out / LOCK_NAME)
    assert not (tmp_path / "runs").exists()  # made for the lock, empty: removed again


def test_the_lock_is_gone_after_an_interrupted_run(tmp_path, monkeypatch, capsys):
    from ardir.trainer import Trainer

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    out = tmp_path / "run"
    assert run("train", *TINY, "--epochs", 2, "--output-dir", out) == 130
    # nothing was saved: the message does not send the user to a --resume that would fail
    assert "interrupted during epoch 1, before anything was saved (no last.pt, no checkpoint in " \
        f"{out / 'checkpoints'}): run it again without --resume to start over" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists() and (out / "config.toml").is_file()


def test_only_rank_0_of_a_torchrun_group_takes_the_lock(tmp_path, live_pid):
    with run_lock(tmp_path / "run", enabled=False) as lock:
        assert lock is None and not (tmp_path / "run").exists()
    _write_lock(tmp_path / "run", live_pid)
    with run_lock(tmp_path / "run", enabled=False):  # rank 1 of the run holding it
        pass
    assert (tmp_path / "run" / LOCK_NAME).exists()


# -------------------------------------------------------------------------------------------------- the lock
def test_a_second_lock_on_one_directory_is_refused(tmp_path):
    with RunLock(tmp_path) as first:
        assert first.held and json.loads(first.path.read_text())["pid"] == os.getpid()
        with pytest.raises(CLIError, match=rf"^{re.escape(str(tmp_path))} is in use by another ardir train \(pid {os.getpid()}, "
                                           r"since [-0-9: ]+\): wait for it to end or choose another --output-dir$"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists() and not first.held


def test_a_lock_from_another_host_is_refused_with_the_file_to_remove(tmp_path, dead_pid):
    lock = _write_lock(tmp_path, dead_pid, host="elsewhere.example", start=None)
    with pytest.raises(CLIError, match=rf"pid {dead_pid} on elsewhere\.example, since .*; if that run is gone, "
                                       rf"remove {re.escape(str(lock))}$"):
        RunLock(tmp_path).acquire()
    assert lock.exists()


def test_a_lock_whose_pid_now_belongs_to_a_later_process_is_stale(tmp_path, live_pid):
    if _process_start(live_pid) is None:
        pytest.skip("no /proc: process start times unknown")
    _write_lock(tmp_path, live_pid, start="1")  # the pid, but not the process that took the lock
    notes = []
    with RunLock(tmp_path, note=notes.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and f"process {live_pid}, which no longer runs" in notes[0]


def test_a_lock_with_this_process_pid_not_held_here_is_stale(tmp_path):
    _write_lock(tmp_path, os.getpid(), start=None)  # an earlier process given the same pid (a restarted container)
    notes = []
    with RunLock(tmp_path, note=notes.append):
        pass
    assert len(notes) == 1 and "an earlier process" in notes[0]


@pytest.mark.parametrize("content", ["", "{\"pid\": ", "not json\n"])
def test_an_unwritten_lock_is_refused_while_young_and_stale_when_old(tmp_path, content):
    lock = tmp_path / LOCK_NAME
    lock.write_text(content)
    with pytest.raises(CLIError, match="is being locked by another ardir train right now"):
        RunLock(tmp_path).acquire()
    old = time.time() - 60
    os.utime(lock, (old, old))
    notes = []
    with RunLock(tmp_path, note=notes.append):
        pass
    assert len(notes) == 1 and "names no process" in notes[0] and not lock.exists()


def test_release_leaves_a_lock_that_is_no_longer_its_own(tmp_path, live_pid):
    lock = RunLock(tmp_path).acquire()
    _write_lock(tmp_path, live_pid)  # replaced behind its back
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == live_pid


def test_the_lock_is_never_written_through_a_link(tmp_path):
    target = tmp_path / "elsewhere"
    (tmp_path / "run").mkdir()
    os.symlink(target, tmp_path / "run" / LOCK_NAME)
    old = time.time() - 60
    os.utime(tmp_path / "run" / LOCK_NAME, (old, old), follow_symlinks=False)
    with RunLock(tmp_path / "run", note=lambda line: None):
        assert not target.exists()  # the dangling link was taken for a stale lock and removed, not followed
    assert not target.exists()


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM: the run stops with the interrupted message (exit 130) and releases its lock; the
    handler is the process's own again afterwards."""
    import signal
    from ardir.trainer import Trainer

    def terminated(self):
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(Trainer, "train_epoch", terminated)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    assert run("train", *TINY, "--epochs", 2, "--output-dir", out) == 130
    assert "interrupted during epoch 1" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists() and signal.getsignal(signal.SIGTERM) == before
