"""Nothing poisoned: a skipped batch leaves every buffer as it was, no checkpoint holds a NaN or an Inf, every
loading path refuses a non-finite or code-carrying file with the same true sentence, and paths that are not
files are named as what they are."""
import json
import os
import pickle
import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ardir
from ardir import checkpoint as ck
from ardir import cli
from ardir.checkpoint import CheckpointError
from ardir.teachers import TeacherNotFoundError, load_robustbench, load_teacher
from conftest import TinyNet

FAST = dict(eps=0.1, step_size=0.03, steps=1)
REFUSED = "refused: it would run code when loaded"


def loader(n=16, batch_size=4):
    return DataLoader(TensorDataset(torch.rand(n, 1, 8, 8), torch.randint(0, 4, (n,))), batch_size=batch_size,
                      shuffle=True, generator=torch.Generator().manual_seed(0))


def nan_forward(trainer, steps):
    """The student's training forward of the batches after optimiser steps ``steps`` writes NaN into its
    BatchNorm statistics (the first convolution outputs NaN), as a diverging batch does."""
    def hook(module, inputs, output):
        return output * float("nan") if module.training and trainer.step in steps else output
    trainer.student.conv.register_forward_hook(hook)


def buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("host_checks", [True, False], ids=["cpu-path", "device-path"])
def test_a_skipped_batch_leaves_every_buffer_as_it_was(tmp_path, host_checks):
    trainer = ardir.ATTrainer(TinyNet(), loader(), epochs=2, progress=False, nan_policy="skip",
                              checkpoint_dir=tmp_path, checkpoint_every_steps=1, **FAST)
    trainer._host_checks = host_checks  # False: the accelerator's device-side flags, exercised on CPU tensors
    nan_forward(trainer, {1})
    seen = {}
    forward = trainer.method.forward

    def watch(*args, **kwargs):
        seen[trainer.step] = buffers(trainer.student)
        return forward(*args, **kwargs)
    trainer.method.forward = watch
    history = trainer.fit()
    assert history[0]["skipped_batches"] == 1
    for name in seen[1]:  # batch 2 (after step 1) was skipped: running stats and num_batches_tracked untouched
        assert torch.equal(seen[1][name], seen[2][name]), name
    assert not torch.equal(seen[2]["bn.running_mean"], seen[3]["bn.running_mean"])  # a kept batch moves them
    assert all(torch.isfinite(v).all() for v in trainer.student.state_dict().values() if v.is_floating_point())
    for path in ck.list_checkpoints(tmp_path):
        ck.load_checkpoint(path)  # every one finite (load_checkpoint refuses non-finite ones)


def test_cli_skip_policy_keeps_finite_buffers_and_a_finite_best(tmp_path, monkeypatch):
    from ardir.trainer import Trainer
    original = Trainer._guard_step

    def nan_on_second_step(self, loss, terms, batch, size):
        if self.step == 1:  # the forward of this batch already ran; poison what it wrote, then say it failed
            self.student.get_submodule(next(n for n, m in self.student.named_modules()
                                            if isinstance(m, torch.nn.BatchNorm2d))).running_var.fill_(float("nan"))
            loss = loss * float("nan")
        return original(self, loss, terms, batch, size)
    monkeypatch.setattr(Trainer, "_guard_step", nan_on_second_step)
    out = tmp_path / "run"
    assert cli.main([str(a) for a in ["train", "--dataset", "fashion-mnist", "--fake-data", "--model", "cnn_small",
                                      "--train-size", "96", "--val-size", "32", "--batch-size", "32", "--steps", "1",
                                      "--val-attack-steps", "1", "--eps", "0.1", "--step-size", "0.05", "--quiet",
                                      "--method", "at", "--epochs", "2", "--nan-policy", "skip",
                                      "--output-dir", out]]) == 0
    for name in ("best.pt", "last.pt"):
        assert ck.first_non_finite(ck.load_checkpoint(out / name)) is None
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_batches"] for r in records] == [1, 0]
    # the epoch's log line says so (not only metrics.jsonl); an epoch that skipped none says nothing of it
    assert cli._format_record(records[0], 2).endswith("SKIPPED 1 non-finite batches")
    assert "SKIPPED" not in cli._format_record(records[1], 2)


def test_an_update_that_overflows_is_never_checkpointed(tmp_path):
    trainer = ardir.ATTrainer(TinyNet(), loader(), epochs=2, progress=False, checkpoint_dir=tmp_path,
                              checkpoint_every_steps=2, **FAST)
    step = trainer.optimizer.step

    def overflowing_step(*args, **kwargs):
        out = step(*args, **kwargs)
        if trainer.step == 1:  # the second update: finite loss and gradient, infinite variance statistic
            trainer.student.bn.running_var[0] = float("inf")
        return out
    trainer.optimizer.step = overflowing_step
    with pytest.raises(FloatingPointError, match=r"student\.bn\.running_var holds non-finite values .* no "
                                                 r"checkpoint was written with it; no checkpoint was written yet"):
        trainer.fit()
    assert ck.list_checkpoints(tmp_path) == [] and not (tmp_path / "last.pt").exists()
    with pytest.raises(FloatingPointError, match=r"w holds non-finite values"):
        ck.Checkpointer(tmp_path / "direct").save({"w": torch.tensor([1.0, float("nan")])}, 0, 1)
    assert ck.list_checkpoints(tmp_path / "direct") == []


def _nan_model_checkpoint(path):
    model = TinyNet()
    state = model.state_dict()
    state["fc.weight"][0, 0] = float("nan")
    torch.save({"format": "ardir-model", "model_info": {"name": "cnn_small", "num_classes": 4, "in_chans": 1},
                "model": state, "config": {}}, path)
    return path


def test_every_loading_path_refuses_non_finite_weights_naming_the_tensor(tmp_path):
    path = _nan_model_checkpoint(tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"nan.pt holds non-finite values \(NaN or Inf\) in model.fc.weight"):
        ck.load_checkpoint(path)
    assert ck.load_checkpoint(path, allow_non_finite=True)["model"]["fc.weight"].isnan().any()
    with pytest.raises(CheckpointError, match="model.fc.weight"):
        load_teacher(str(path))
    assert cli.main(["eval", "--checkpoint", str(path), "--fake-data", "--quiet"]) == 2
    good = ardir.ATTrainer(TinyNet(), loader(), epochs=1, progress=False, checkpoint_dir=tmp_path / "ck", **FAST)
    good.fit()
    state = ck.load_checkpoint(tmp_path / "ck" / "last.pt")
    state["student"]["bn.running_var"][1] = float("inf")
    torch.save(state, tmp_path / "ck" / "epoch-0001-step-000000009.pt")  # a newer, poisoned one
    other = ardir.ATTrainer(TinyNet(), loader(), epochs=2, progress=False, **FAST)
    with pytest.raises(CheckpointError, match=r"student.bn.running_var"):
        other.resume(tmp_path / "ck" / "epoch-0001-step-000000009.pt")
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-000000009.pt.*non-finite"):
        assert other.resume(tmp_path / "ck").name == "epoch-0001-step-000000004.pt"  # the newest good one


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_files(tmp_path, marker):
    zipped, legacy = tmp_path / "evil.pt", tmp_path / "evil_legacy.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, zipped)
    legacy.write_bytes(pickle.dumps({"payload": _RunsCode(marker)}))
    return zipped, legacy


def test_every_loading_path_refuses_code_with_one_true_sentence(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    for path in _evil_files(tmp_path, marker):
        for load in (ck.load_checkpoint, lambda p: load_teacher(str(p)),
                     lambda p: ardir.ATTrainer(TinyNet(), loader(), epochs=1, progress=False, **FAST).resume(p)):
            with pytest.raises(CheckpointError) as info:
                load(path)
            assert REFUSED in str(info.value) and "weights_only=False" not in str(info.value), str(info.value)
        assert cli.main(["eval", "--checkpoint", str(path), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert REFUSED in err and "weights_only=False" not in err and "Traceback" not in err
    rb = tmp_path / "rb" / "cifar10" / "Linf" / "Zhang2019Theoretically.pt"
    rb.parent.mkdir(parents=True)
    rb.write_bytes((tmp_path / "evil.pt").read_bytes())
    monkeypatch.setitem(__import__("sys").modules, "robustbench", None)  # the local-file path
    with pytest.raises(CheckpointError, match=REFUSED) as info:
        load_robustbench("Zhang2019Theoretically", model_dir=tmp_path / "rb")
    assert "weights_only=False" not in str(info.value)
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes((tmp_path / "evil.pt").read_bytes())
    assert cli.main(["train", "--output-dir", str(run), "--resume", "--quiet"]) == 2
    assert REFUSED in capsys.readouterr().err
    assert not marker.exists(), "loading ran the file's code"


def test_a_corrupt_file_is_not_called_refused(tmp_path):
    good = ck.atomic_save({"w": torch.randn(100)}, tmp_path / "good.pt").read_bytes()
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02\xffnot a pickle" * 5)
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    for name in ("garbage.pt", "cut.pt"):
        with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
            ck.load_checkpoint(tmp_path / name)
        assert "refused" not in str(info.value)


def test_absurd_recorded_model_settings_are_refused_before_building(tmp_path, capsys):
    path = tmp_path / "huge.pt"
    torch.save({"format": "ardir-model", "model_info": {"name": "cnn_small", "num_classes": 2 ** 40, "in_chans": 1},
                "model": {}, "config": {"dataset": "fashion-mnist"}}, path)
    with pytest.raises(ValueError, match=r"records num_classes=1099511627776, which no model has"):
        load_teacher(str(path))
    assert cli.main(["eval", "--checkpoint", str(path), "--fake-data", "--quiet"]) == 2
    assert "num_classes=1099511627776" in capsys.readouterr().err
    torch.save({"model_info": {"name": "cnn_small", "num_classes": 10, "in_chans": 1, "std": [0.0]}, "model": {}},
               path)
    with pytest.raises(ValueError, match=r"std=\[0.0\]"):
        load_teacher(str(path))


def test_paths_that_are_not_files_are_named_as_what_they_are(tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "gone.pt", tmp_path / "dangling.pt")
    os.symlink(tmp_path / "loop_b.pt", tmp_path / "loop_a.pt")
    os.symlink(tmp_path / "loop_a.pt", tmp_path / "loop_b.pt")
    cases = {"dir": "is a directory, not a file", "dangling.pt": "is a dangling symbolic link (to ",
             "loop_a.pt": "is a symbolic link loop", "missing.pt": "does not exist"}
    for name, words in cases.items():
        with pytest.raises(OSError, match=re.escape(words)):
            ck.load_checkpoint(tmp_path / name)
        with pytest.raises(TeacherNotFoundError, match=re.escape(words)):
            load_teacher(str(tmp_path / name))
        assert cli.main(["eval", "--checkpoint", str(tmp_path / name), "--quiet"]) == 2
        assert words in capsys.readouterr().err


def test_a_linked_metrics_log_is_never_written_through(tmp_path, capsys):
    out, outside = tmp_path / "run", tmp_path / "elsewhere.jsonl"
    args = ["train", "--dataset", "fashion-mnist", "--fake-data", "--model", "cnn_small", "--train-size", "32",
            "--val-size", "0", "--batch-size", "32", "--steps", "1", "--eps", "0.1", "--step-size", "0.05",
            "--quiet", "--method", "at", "--epochs", "1", "--output-dir", str(out)]
    assert cli.main(args) == 0
    (out / "metrics.jsonl").unlink()
    outside.write_text("precious\n")
    os.symlink(outside, out / "metrics.jsonl")
    assert cli.main(["train", "--output-dir", str(out), "--resume", "--epochs", "2", "--quiet"]) == 2
    assert "metrics.jsonl is a symbolic link" in capsys.readouterr().err
    assert outside.read_text() == "precious\n"
