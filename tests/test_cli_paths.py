"""Runs resolve from anywhere: a run records its paths absolute (config.toml, last.pt), so `ardir train --resume`
works from another directory; a recorded path that is gone is one sentence naming config.toml and the flag."""
import os
import tomllib

import pytest

from ardir import cli
from ardir import config as cfg

TINY = ["--dataset", "fashion-mnist", "--fake-data", "--model", "cnn_small", "--train-size", "64", "--val-size",
        "32", "--batch-size", "32", "--limit-batches", "1", "--steps", "1", "--val-attack-steps", "1", "--eps", "0.1",
        "--step-size", "0.05", "--quiet"]


def run(*args):
    return cli.main([str(a) for a in args])


@pytest.fixture
def distilled(tmp_path, monkeypatch):
    """From tmp_path/here: a teacher run, then a one-epoch ARD run distilling from it, both with relative paths."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert run("train", *TINY, "--method", "natural", "--epochs", 1, "--output-dir", "runs/teacher") == 0
    assert run("train", *TINY, "--method", "ard", "--teacher", "runs/teacher/best.pt", "--epochs", 1,
               "--data-dir", "data", "--output-dir", "runs/student") == 0
    return here / "runs" / "student"


def test_a_run_records_its_paths_absolute_and_resumes_from_another_directory(distilled, tmp_path, monkeypatch):
    saved = tomllib.loads((distilled / "config.toml").read_text())
    assert saved["teacher"] == str(distilled.parent / "teacher" / "best.pt")
    assert saved["output_dir"] == str(distilled) and saved["data_dir"] == str(distilled.parent.parent / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run("train", "--output-dir", os.path.relpath(distilled), "--resume", "--epochs", 2, "--quiet") == 0
    again = tomllib.loads((distilled / "config.toml").read_text())
    assert again["epochs"] == 2 and again["teacher"] == saved["teacher"]
    assert not (elsewhere / "runs").exists()


def test_a_recorded_path_that_is_gone_names_config_toml_and_the_flag(distilled, tmp_path, capsys):
    teacher = distilled.parent / "teacher" / "best.pt"
    moved = tmp_path / "moved.pt"
    teacher.rename(moved)
    assert run("train", "--output-dir", distilled, "--resume", "--epochs", 2, "--quiet") == 2
    err = capsys.readouterr().err
    assert err == (f"ardir train: error: --resume: the teacher {teacher} recorded in {distilled / 'config.toml'} "
                   "does not exist; pass --teacher PATH to resume with it where it is now\n")
    assert run("train", "--output-dir", distilled, "--resume", "--epochs", 2, "--teacher", moved, "--quiet") == 0


def test_a_recorded_data_dir_that_is_gone_names_data_dir(tmp_path):
    out = tmp_path / "run"
    config = cfg.resolve({"dataset": "mnist", "data_dir": str(tmp_path / "gone"), "method": "at",
                          "output_dir": str(out)})
    with pytest.raises(cli.CLIError, match=r"the data_dir .*gone recorded in .*config.toml does not exist; pass "
                                           r"--data-dir DIR"):
        cli._check_saved_paths(config, {}, out)
    cli._check_saved_paths(config, {"data_dir": "elsewhere"}, out)  # given again: that one is used
    cli._check_saved_paths({**config, "fake_data": True}, {}, out)  # fake data reads no folder


def test_absolute_paths_leaves_names_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.pt").write_bytes(b"")
    monkeypatch.setenv("ARDIR_ROBUSTBENCH_DIR", "rb")
    config = cfg.absolute_paths({"teacher": "t.pt", "natural_teacher": "fashion-mnist:cnn_xlarge-at",
                                 "data_dir": "~/d", "output_dir": "runs/x", "robustbench_dir": None})
    assert config == {"teacher": str(tmp_path / "t.pt"), "natural_teacher": "fashion-mnist:cnn_xlarge-at",
                      "data_dir": os.path.expanduser("~/d"), "output_dir": str(tmp_path / "runs" / "x"),
                      "robustbench_dir": None}
    rb = cfg.absolute_paths({"teacher": "robustbench:Zhang2019Theoretically", "robustbench_dir": None})
    assert rb == {"teacher": "robustbench:Zhang2019Theoretically", "robustbench_dir": str(tmp_path / "rb")}
    assert cfg.absolute_paths({"teacher": "resnet18"}) == {"teacher": "resnet18"}
    assert cfg.looks_like_path("runs/t/best.pt") and cfg.looks_like_path("best.pt")
    assert not cfg.looks_like_path("resnet18") and not cfg.looks_like_path("robustbench:Zhang2019Theoretically")
    assert not cfg.looks_like_path("fashion-mnist:cnn_xlarge-at")
