"""Nothing lost: `ardir train --resume` continues from the newest good checkpoint of either kind (a kill in the
first epoch, with only mid-epoch checkpoints, included) and cleans up what a killed write left; every flag is
checked when parsed, naming the flag; a bad later batch is named."""
import json

import pytest
import torch

import ardir
from ardir import checkpoint as ck
from ardir import cli
from ardir import config as cfg
from ardir.trainer import Trainer
from conftest import TinyNet

SMALL = ["--dataset", "fashion-mnist", "--fake-data", "--model", "cnn_small", "--train-size", "96", "--val-size",
         "32", "--batch-size", "16", "--steps", "1", "--val-attack-steps", "1", "--eps", "0.1", "--step-size", "0.05",
         "--quiet", "--method", "at", "--epochs", "2", "--checkpoint-every-steps", "1"]  # 6 batches an epoch


class Killed(BaseException):
    """A SIGKILL as the process sees it: nothing after it runs, no handler catches it."""


def run(*args):
    return cli.main([str(a) for a in args])


def _records(path):
    timing = {"seconds", "images_per_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in path.read_text().splitlines()]


def test_a_kill_in_the_first_epoch_resumes_exactly_from_the_mid_epoch_checkpoint(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("train", *SMALL, "--output-dir", a) == 0
    after_step = Trainer._after_step

    def killed_after_step_3(self, *args, **kwargs):
        after_step(self, *args, **kwargs)
        if self.step == 3:
            raise Killed
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_after_step", killed_after_step_3)
        with pytest.raises(Killed):
            run("train", *SMALL, "--output-dir", b)
    assert not (b / "last.pt").exists() and ck.list_checkpoints(b / "checkpoints")[0].name == \
        "epoch-0000-step-000000003.pt"
    for name in (".last.pt.k1ll3d.tmp", ".best.pt.k1ll3d.tmp"):  # what a kill during the epoch-end write leaves
        (b / name).write_bytes(b"half a checkpoint")
    torch.manual_seed(123)  # the resumed run must not depend on the process's RNG
    assert run("train", "--output-dir", b, "--resume", "--quiet") == 0
    assert not list(b.glob(".*.tmp"))
    first, second = (ck.load_checkpoint(d / "last.pt") for d in (a, b))
    assert second["epoch"] == 2 and second["step"] == first["step"] == 12  # 6 batches an epoch
    for key in first["model"]:
        assert torch.equal(first["model"][key], second["model"][key]), key
    assert _records(a / "metrics.jsonl") == _records(b / "metrics.jsonl")
    assert ck.load_checkpoint(b / "best.pt")["epoch"] == ck.load_checkpoint(a / "best.pt")["epoch"]


def test_resume_takes_the_newest_good_checkpoint_of_either_kind(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", *SMALL, "--epochs", "1", "--output-dir", out) == 0
    assert not (out / "checkpoints" / "last.pt").exists()  # one last.pt: the run's, beside the numbered ones
    (out / "last.pt").write_bytes(b"damaged")  # last.pt unusable: the Trainer's epoch-end checkpoint carries on
    with pytest.warns(UserWarning, match="last.pt is truncated or corrupt.*continuing from .*epoch-0001-step-000000006.pt"):
        assert run("train", "--output-dir", out, "--resume", "--epochs", "2", "--quiet") == 0
    assert ck.load_checkpoint(out / "last.pt")["step"] == 12
    assert run("train", *SMALL, "--output-dir", out) == 2  # a fresh start over a run is refused
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, words", [
    ("--train-size", "0", "--train-size: 0 must be >= 1"), ("--checkpoint-every-steps", "0", "must be >= 1"),
    ("--eval-eps", "0", "--eval-eps: 0.0 must be > 0"),
    ("--keep-last", "0", "must be >= 1"), ("--batch-size", "0", "must be >= 1"), ("--val-size", "-1", ">= 0"),
    ("--lr", "0", "must be > 0"), ("--eps", "0", "must be > 0"), ("--milestones", "0", "--milestones: 0 must be >= 1"),
    ("--limit-batches", "0", ">= 1"), ("--n-examples", "0", ">= 1"), ("--precision", "fp8", "is not one of"),
    ("--nan-policy", "ignore", "is not one of"), ("--lr", "nan", "finite"), ("--device", "gpu7", "device"),
    ("--attacks", "pgdx", "pgdx"),
])
def test_every_train_flag_is_checked_when_parsed_naming_the_flag(capsys, flag, value, words):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and words in err, err


@pytest.mark.parametrize("flag, value", [("--eps", "0"), ("--eps-sweep", "0"), ("--norm", "l3"), ("--n-examples", "0"),
                                         ("--device", "gpu7"), ("--attacks", "pgdx"), ("--sweep-attack", "x")])
def test_eval_flags_are_checked_when_parsed(capsys, flag, value):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--checkpoint", "x.pt", flag, value])
    assert f"argument {flag}: " in capsys.readouterr().err


def test_configuration_files_and_the_trainer_check_the_same_ranges():
    with pytest.raises(cfg.ConfigError, match="keep_last: 0 must be >= 1"):
        cfg.resolve({"keep_last": 0})
    with pytest.raises(cfg.ConfigError, match=r'eval_eps: 8.0 must be <= 1 under norm = "linf".*--norm l2'):
        cfg.resolve(cfg.parse_toml("eval_eps = 8"))
    batches = [(torch.rand(4, 1, 8, 8), torch.randint(0, 4, (4,)))]
    with pytest.raises(ValueError, match="checkpoint_every_steps=0 must be a whole number >= 1"):
        ardir.ATTrainer(TinyNet(), batches, checkpoint_every_steps=0, eps=0.1, steps=1)
    with pytest.raises(ValueError, match="keep_last=0 must be a whole number >= 1"):
        ardir.ATTrainer(TinyNet(), batches, keep_last=0, eps=0.1, steps=1)


def test_a_bad_later_batch_stops_naming_the_batch():
    good = [(torch.rand(4, 1, 8, 8), torch.randint(0, 4, (4,))) for _ in range(3)]
    fast = dict(epochs=1, progress=False, eps=0.1, step_size=0.03, steps=1)
    numpy_batch = good[:2] + [(good[2][0].numpy(), good[2][1].numpy())]
    with pytest.raises(TypeError, match="training batch 3 of epoch 1: images and labels must be tensors, got "
                                        "ndarray and ndarray"):
        ardir.ATTrainer(TinyNet(), numpy_batch, **fast).fit()
    label_7 = good[:2] + [(good[2][0], torch.tensor([0, 1, 2, 7]))]
    with pytest.raises(ValueError, match=r"training batch 3 of epoch 1: labels range over \[0, 7\] but the student "
                                         "has 4 outputs"):
        ardir.ATTrainer(TinyNet(), label_7, **fast).fit()
    # labels already on an accelerator: flagged on the device, read with the NaN checks (no host sync per batch)
    trainer = ardir.ATTrainer(TinyNet(), good, **fast)
    trainer._host_checks = False
    trainer._fault = trainer._new_fault()
    safe = trainer._flag_bad_labels(torch.tensor([0, 9, 1, 2]), 4)
    assert safe.tolist() == [0, 0, 1, 2]  # in bounds for the loss kernels until the flag is read
    trainer._flag_bad_labels(torch.tensor([-1, 0, 1, 2]), 6)  # the first bad batch is the one named
    with pytest.raises(ValueError, match=r"training batch 5 of epoch 1: labels outside 0 .. 3"):
        trainer._check_faults()


def test_pgd_names_ardirs_spelling_of_torchattacks_alpha():
    with pytest.raises(TypeError, match=r"PGD\(alpha=0.01\): ardir calls this argument step_size; pass "
                                        r"step_size=0.01"):
        ardir.PGD(TinyNet(), eps=0.1, alpha=0.01)
    assert ardir.PGD(TinyNet(), eps=0.1, step_size=0.01).step_size == 0.01


def test_resume_refuses_a_flag_that_its_checkpoint_would_override(tmp_path, capsys):
    """The optimiser and the learning-rate schedule come back from the checkpoint: a new --lr (or momentum, weight
    decay, milestones, gamma) on --resume is refused in one sentence instead of being dropped while config.toml
    recorded it; the same value again, or a longer --epochs, resumes."""
    from ardir import cli
    out = tmp_path / "run"
    args = ["train", *map(str, SMALL), "--method", "at", "--epochs", "1", "--lr", "0.01", "--output-dir", str(out),
            "--quiet"]
    assert cli.main(args) == 0
    capsys.readouterr()
    for flag, value in (("--lr", "0.5"), ("--momentum", "0.5"), ("--milestones", "1"), ("--lr-gamma", "0.5")):
        assert cli.main(["train", "--output-dir", str(out), "--resume", "--epochs", "2", flag, value]) == 2
        err = capsys.readouterr().err
        assert f"--resume: {flag} " in err and "start a new run (another --output-dir) to change it" in err
        assert "Traceback" not in err
    assert cli.main(["train", "--output-dir", str(out), "--resume", "--epochs", "2", "--lr", "0.01", "--quiet"]) == 0


def test_an_interruption_mid_epoch_names_the_checkpoint_resume_continues_from(tmp_path, monkeypatch, capsys):
    """Stopped in epoch 2 after mid-epoch checkpoints newer than last.pt: the message names that checkpoint (as
    --resume chooses it), not last.pt."""
    original = Trainer._guard_step

    def stop_at_step_9(self, *args, **kwargs):
        if self.step == 9:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, "_guard_step", stop_at_step_9)
    out = tmp_path / "run"
    assert cli.main(["train", *SMALL, "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err
    newest = ck.list_checkpoints(out / "checkpoints")[0]
    assert f"interrupted during epoch 2; `ardir train --output-dir {out} --resume` continues from {newest} " \
           "(epoch 2, step 9)" in err
