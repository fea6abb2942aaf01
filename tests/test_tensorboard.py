"""Training metrics to TensorBoard: the callback writes every number of a record, `ardir train --tensorboard`
writes one event file per run, and without the package both say how to install it."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ardir
from ardir import cli, tensorboard

from conftest import TinyNet

needs_tensorboard = pytest.mark.skipif(not tensorboard.available(), reason="pip install 'ardir[tensorboard]'")


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@needs_tensorboard
def test_every_number_of_an_epoch_record_becomes_a_scalar(tmp_path):
    batches = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,))), batch_size=4)
    logger = tensorboard.TensorBoardLogger(tmp_path / "tb")
    trainer = ardir.ATTrainer(TinyNet(), batches, epochs=2, eps=0.1, step_size=0.025, steps=1, callbacks=[logger],
                              progress=False)
    history = trainer.fit()
    logger.close()
    scalars = _scalars(tmp_path / "tb")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]
    assert scalars["train/loss"][1][1] == pytest.approx(history[1]["loss"], rel=1e-6)
    assert "train/lr" in scalars and "time/seconds" in scalars and "train/epoch" not in scalars
    assert tensorboard.TensorBoardLogger.tag("val_pgd") == "val/val_pgd"


@needs_tensorboard
def test_ardir_train_tensorboard_writes_beside_the_run(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dataset", "fashion-mnist", "--fake-data", "--model", "cnn_small", "--train-size", "32",
            "--val-size", "16", "--batch-size", "16", "--limit-batches", "1", "--steps", "1", "--val-attack-steps",
            "1", "--method", "at", "--epochs", "1", "--quiet", "--tensorboard", "--output-dir", str(out)]
    assert cli.main(args) == 0
    scalars = _scalars(out / "tensorboard")
    assert scalars["val/val_pgd"][0][0] == 1 and "train/loss" in scalars
    assert "tensorboard = true" in (out / "config.toml").read_text()


def test_without_the_package_it_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tensorboard, "available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'ardir\[tensorboard\]'"):
        tensorboard.TensorBoardLogger(tmp_path)
    assert cli.main(["train", "--dataset", "fashion-mnist", "--fake-data", "--tensorboard",
                     "--output-dir", str(tmp_path / "run")]) == 2
    assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
