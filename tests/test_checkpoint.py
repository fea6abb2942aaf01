"""ardir.checkpoint: atomic writes, safe loading (a pickled callable is refused, not run), corrupt files named,
the newest good checkpoint found, rotation, full disks and unwritable directories."""
import errno
import os
import pickle
import warnings

import pytest
import torch

from ardir import checkpoint as ck
from ardir.checkpoint import CheckpointError, Checkpointer


def test_atomic_save_round_trip_and_no_temporary_left(tmp_path):
    path = ck.atomic_save({"w": torch.arange(4.0), "epoch": 3, "history": [{"loss": 1.5}]}, tmp_path / "a.pt")
    state = ck.load_checkpoint(path)
    assert torch.equal(state["w"], torch.arange(4.0)) and state["epoch"] == 3 and state["history"][0]["loss"] == 1.5
    ck.atomic_write_text("line 1\n", tmp_path / "metrics.jsonl")
    ck.atomic_write_text("line 1\nline 2\n", tmp_path / "metrics.jsonl")
    assert (tmp_path / "metrics.jsonl").read_text() == "line 1\nline 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "metrics.jsonl"]


class _RunsCode:
    """An object whose unpickling calls a function: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_a_pickled_callable_is_refused_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"student": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="refused.*evil.pt.*not executed") as info:
        ck.load_checkpoint(path)
    assert isinstance(info.value, ValueError)
    assert not marker.exists(), "loading the checkpoint ran its code"
    # A plain pickle (not a torch zip file) carrying the same payload is refused too.
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps({"payload": _RunsCode(marker)}))
    with pytest.raises(CheckpointError, match="evil.pkl"):
        ck.load_checkpoint(raw)
    assert not marker.exists()


def test_truncated_and_corrupt_checkpoints_name_the_file(tmp_path):
    good = ck.atomic_save({"w": torch.randn(1000)}, tmp_path / "good.pt")
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("truncated.pt", "garbage.pt", "empty.pt"):
        with pytest.raises(CheckpointError, match=rf"{name}.*(truncated or corrupt|corrupt)"):
            ck.load_checkpoint(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ck.load_checkpoint(tmp_path / "missing.pt")


def test_checkpointer_rotation_last_and_newest_good_fallback(tmp_path):
    saver = Checkpointer(tmp_path / "run", keep_last=2)
    for step in (10, 20, 30):
        saver.save({"step": step}, epoch=step // 10, step=step)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["epoch-0002-step-000000020.pt", "epoch-0003-step-000000030.pt", "last.pt"]
    assert ck.load_checkpoint(saver.last)["step"] == 30
    assert ck.newest_good(tmp_path / "run").name == "epoch-0003-step-000000030.pt"
    # The newest file is corrupted on disk (and last.pt with it: a hard link or copy of it).
    newest = tmp_path / "run" / "epoch-0003-step-000000030.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match="skipping checkpoint .*epoch-0003"):
        path, state = ck.find_resumable(tmp_path / "run")
    assert path.name == "epoch-0002-step-000000020.pt" and state["step"] == 20
    assert ck.find_resumable(tmp_path / "empty-dir") is None


def test_every_checkpoint_corrupt_is_a_clear_error(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"junk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="no usable checkpoint.*last.pt"):
            ck.find_resumable(tmp_path)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    saver = Checkpointer(tmp_path, keep_last=1)
    saver.save({"step": 1, "w": torch.ones(3)}, epoch=1, step=1)
    before = saver.last.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write .*epoch-0002-step-000000002.pt.*disk is full") as info:
        saver.save({"step": 2, "w": torch.zeros(3)}, epoch=2, step=2)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert saver.last.read_bytes() == before and ck.load_checkpoint(saver.last)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001-step-000000001.pt", "last.pt"]


def test_unwritable_output_directory_fails_at_construction(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match=r"a-file/run is not writable.*choose a directory"):
        Checkpointer(blocker / "run")
    if os.geteuid() != 0:  # root writes anywhere; the read-only case needs an ordinary user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="locked is not writable"):
            Checkpointer(locked)


def test_checkpointer_arguments_and_stale_temporaries(tmp_path):
    with pytest.raises(ValueError, match="keep_last=0"):
        Checkpointer(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="checkpoint_every_steps=0"):
        Checkpointer(tmp_path, every_steps=0)
    stale = tmp_path / ".epoch-0001-step-000000005.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    saver = Checkpointer(tmp_path, every_steps=5)
    assert not stale.exists() and saver.every_steps == 5


def test_atomic_writes_follow_the_umask_not_mkstemps_0600(tmp_path):
    """Checkpoints and logs are readable as any file the user writes (umask 022: 0644), not private to the owner."""
    path = ck.atomic_save({"w": torch.zeros(1)}, tmp_path / "a.pt")
    text = ck.atomic_write_text("x\n", tmp_path / "m.jsonl")
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (text.stat().st_mode & 0o777) == 0o666 & ~mask


def test_a_checkpointer_that_does_not_point_last_writes_only_numbered_checkpoints(tmp_path):
    saver = ck.Checkpointer(tmp_path, keep_last=1, point_last=False)
    saver.save({"w": torch.ones(2)}, 0, 1)
    newest = saver.save({"w": torch.zeros(2)}, 1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [newest.name] and ck.newest_good(tmp_path) == newest
