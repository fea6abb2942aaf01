"""Exact resume: a run interrupted anywhere (mid-epoch included) and resumed from its checkpoints ends with the
same weights, bit for bit, as the uninterrupted run of the same seed on CPU: data order, augmentation and attack
random starts all replay. The SIGKILL tests kill real training processes twice at random points."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ardir
from ardir import checkpoint as ck
from ardir.data import get_loaders
from conftest import TinyNet

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def make_trainer(directory, method="at", every=3, epochs=3, **kwargs):
    """Fashion-MNIST-shaped fake data (random crop + flip augmentation from torch's global RNG), a seeded shuffle,
    PGD with uniform random starts: every source of randomness a run has."""
    torch.manual_seed(0)
    loaders = get_loaders("fashion-mnist", fake_data=True, limit=64, batch_size=8, val_size=0, seed=0)
    teacher = None
    if method == "ardir":  # a wider teacher: the IR term needs a trained adapter (method state, optimiser)
        teacher = TinyNet(width=16, num_classes=10).eval().requires_grad_(False)
    return ardir.Trainer(TinyNet(num_classes=10), loaders.train, teacher=teacher, method=method, epochs=epochs,
                         lr=0.05, progress=False, eps=0.1, step_size=0.03, steps=2, checkpoint_dir=directory,
                         checkpoint_every_steps=every, **kwargs)


def crash_at(trainer, step):
    """Make the batch after optimiser step ``step`` die (as a kill would, between two checkpoints)."""
    forward = trainer.method.forward

    def dying(*args, **kwargs):
        if trainer.step == step:
            raise KeyboardInterrupt(f"simulated crash after step {step}")
        return forward(*args, **kwargs)

    trainer.method.forward = dying


def states(trainer):
    opt = trainer.optimizer.state_dict()["state"]
    return ({k: v.clone() for k, v in trainer.student.state_dict().items()},
            {k: v.clone() for k, v in trainer.method.state_dict().items()},
            {i: s["momentum_buffer"].clone() for i, s in opt.items()})


def assert_identical(a, b):
    for part_a, part_b in zip(a, b):
        assert part_a.keys() == part_b.keys()
        for key in part_a:
            assert torch.equal(part_a[key], part_b[key]), f"{key} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted runs (no crash), per method."""
    runs = {}
    for method in ("at", "ardir"):
        trainer = make_trainer(tmp_path_factory.mktemp(f"ref-{method}"), method)
        trainer.fit()
        runs[method] = (states(trainer), [r["loss"] for r in trainer.history])
    return runs


# 8 batches per epoch, a checkpoint every 3 steps: crash after step 13 resumes mid-epoch 2 from step 12; after
# step 16 from the end of epoch 2 (step 16); after step 4 mid-epoch 1 from step 3; after 20, twice in a row.
@pytest.mark.parametrize("method,crashes", [("at", [13]), ("at", [16]), ("at", [4, 20]), ("ardir", [10])])
def test_crash_and_resume_is_bit_identical(tmp_path, reference, method, crashes):
    for step in crashes:
        trainer = make_trainer(tmp_path, method)
        trainer.resume(tmp_path, missing_ok=True)
        crash_at(trainer, step)
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
        torch.manual_seed(12345)  # the crashed process's random state is lost
    trainer = make_trainer(tmp_path, method)
    path = trainer.resume(tmp_path)
    assert trainer.step == (max(crashes) // 3) * 3 if max(crashes) % 8 else max(crashes), path
    trainer.fit()
    expected, losses = reference[method]
    assert_identical(states(trainer), expected)
    assert [r["loss"] for r in trainer.history] == losses  # the epoch records replay too


def test_resume_without_the_random_states_would_differ(tmp_path, reference):
    """The comparison above is sensitive: dropping the checkpoint's random states breaks bit identity."""
    trainer = make_trainer(tmp_path)
    crash_at(trainer, 13)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    state = ck.load_checkpoint(ck.newest_good(tmp_path))
    assert state["progress"]["batches"] == 4 and state["epoch"] == 1
    state["rng"]["torch"] = torch.manual_seed(777).get_state()
    fresh = make_trainer(tmp_path / "other")
    fresh.load_state_dict(state)
    fresh.fit()
    student = states(fresh)[0]
    assert any(not torch.equal(student[k], v) for k, v in reference["at"][0][0].items())


def test_resume_falls_back_to_the_newest_good_checkpoint(tmp_path, reference):
    trainer = make_trainer(tmp_path, keep_last=3)
    crash_at(trainer, 14)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    newest = ck.list_checkpoints(tmp_path)[0]
    assert newest.name == "epoch-0001-step-000000012.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # corrupted on disk after the crash
    trainer = make_trainer(tmp_path, keep_last=3)
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-000000012.pt.*truncated or corrupt"):
        path = trainer.resume(tmp_path)
    assert path.name == "epoch-0001-step-000000009.pt" and trainer.step == 9
    trainer.fit()
    assert_identical(states(trainer), reference["at"][0])


def test_resume_errors_name_the_file(tmp_path):
    trainer = make_trainer(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        trainer.resume(tmp_path / "a")
    assert trainer.resume(tmp_path / "a", missing_ok=True) is None
    other = ardir.Trainer(TinyNet(width=4, num_classes=10), trainer.train_loader, method="at", epochs=1,
                          progress=False, checkpoint_dir=tmp_path / "b")
    path = other.save_checkpoint()
    with pytest.raises(ck.CheckpointError, match=r"epoch-0000-step-000000000.pt does not fit this trainer"):
        trainer.resume(path)
    state = ck.load_checkpoint(path)
    state["version"] = 99
    ck.atomic_save(state, tmp_path / "future.pt")
    with pytest.raises(ck.CheckpointError, match="future.pt.*version 99"):
        trainer.resume(tmp_path / "future.pt")


# ------------------------------------------------------------------------------------------ real SIGKILLs
RUNNER = """
import sys
import torch
sys.path.insert(0, {tests!r})
from conftest import TinyNet
import ardir
from ardir.checkpoint import atomic_save
from ardir.data import get_loaders

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
out = sys.argv[1]
torch.manual_seed(0)
loaders = get_loaders("fashion-mnist", fake_data=True, limit=256, batch_size=8, val_size=0, seed=0)
trainer = ardir.Trainer(TinyNet(num_classes=10), loaders.train, method="at", epochs=4, lr=0.05, progress=False,
                        eps=0.1, step_size=0.03, steps=3, checkpoint_dir=out + "/checkpoints",
                        checkpoint_every_steps=5, keep_last=2)
trainer.resume(out + "/checkpoints", missing_ok=True)
trainer.fit()
atomic_save(trainer.student.state_dict(), out + "/final.pt")
"""


def newest_step(directory):
    found = ck.list_checkpoints(directory)
    return int(found[0].name.split("-")[-1][:-3]) if found else -1


def run_to_end(command, env, timeout=120):
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


def run_to_end_timed(command, env, progress, timeout=600):
    """Run to the end while watching ``progress()`` (a count that grows as training goes); returns the shortest
    time between two of its steps, so that the kills below land inside a step on a fast or a slow machine."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, seen, times = time.monotonic() + timeout, progress(), []
    try:
        while process.poll() is None:
            assert time.monotonic() < deadline, "the reference run did not finish"
            now = progress()
            if now != seen:
                seen, times = now, times + [time.monotonic()]
            time.sleep(0.002)
        assert process.returncode == 0, process.stderr.read()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps, "the reference run showed fewer than two progress steps"
    return min(gaps)


def kill_at_random_point(command, env, checkpoints, rng, max_delay, timeout=120):
    """Start the run, wait until it has written a checkpoint newer than the one it resumed from, then SIGKILL
    it after a random delay. Returns False when the run finished before the kill landed."""
    start_step = newest_step(checkpoints)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while newest_step(checkpoints) <= start_step and process.poll() is None:
            assert time.monotonic() < deadline, "the training run wrote no checkpoint"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, max_delay))
        if process.poll() is not None:
            return False
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL
        return True
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_sigkill_twice_and_resume_is_bit_identical(tmp_path):
    """Mid-epoch checkpoints every 5 steps through the Trainer API (what ``ardir train --resume`` builds on)."""
    seed = int(os.environ.get("ARDIR_KILL_SEED", random.randrange(10 ** 6)))
    rng = random.Random(seed)
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(tests=str(TESTS)))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    step = run_to_end_timed([sys.executable, str(script), str(reference)], env,
                            lambda: newest_step(reference / "checkpoints"))
    kills = 0
    while kills < 2:
        if not kill_at_random_point([sys.executable, str(script), str(killed)], env, killed / "checkpoints", rng,
                                    max_delay=0.8 * step):
            pytest.fail(f"the run ended before kill {kills + 1} (ARDIR_KILL_SEED={seed})")
        kills += 1
    assert not (killed / "final.pt").exists()
    run_to_end([sys.executable, str(script), str(killed)], env)
    expected, got = ck.load_checkpoint(reference / "final.pt"), ck.load_checkpoint(killed / "final.pt")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after 2 kills (ARDIR_KILL_SEED={seed})"


CLI = ["-m", "ardir", "train", "--dataset", "fashion-mnist", "--fake-data", "--train-size", "48", "--batch-size", "8",
       "--val-size", "0", "--model", "cnn_small", "--method", "at", "--epochs", "5", "--steps", "1", "--eps", "0.1",
       "--step-size", "0.03", "--device", "cpu", "--quiet"]


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "ardir" / "cli.py").exists(), reason="no CLI")
def test_cli_sigkill_twice_and_resume_is_bit_identical(tmp_path):
    """``ardir train`` killed twice at random points, continued with ``--resume``: the final weights equal the
    uninterrupted run's bit for bit."""
    seed = int(os.environ.get("ARDIR_KILL_SEED", random.randrange(10 ** 6)))
    rng = random.Random(seed)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    reference, killed = tmp_path / "reference", tmp_path / "killed"

    def epochs_done(run=killed):
        path = run / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    epoch = run_to_end_timed([sys.executable, *CLI, "--output-dir", str(reference)], env,
                             lambda: epochs_done(reference))

    for kill in range(2):
        command = [sys.executable, *CLI, "--output-dir", str(killed)] + (["--resume"] if kill else [])
        before = epochs_done()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 600
            while epochs_done() <= before and process.poll() is None:  # a new epoch is logged: training runs
                assert time.monotonic() < deadline
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.8 * epoch))  # within the next epoch, however fast this machine is
            if process.poll() is not None:
                pytest.fail(f"the run ended before kill {kill + 1} (ARDIR_KILL_SEED={seed}): "
                            f"{process.stderr.read()[-2000:]!r}")
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    run_to_end([sys.executable, *CLI, "--output-dir", str(killed), "--resume"], env, timeout=600)
    expected = ck.load_checkpoint(reference / "last.pt")["model"]
    got = ck.load_checkpoint(killed / "last.pt")["model"]
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after 2 kills (ARDIR_KILL_SEED={seed})"
