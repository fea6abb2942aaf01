"""The `ardir` command: train -> files, eval -> report, plot -> PNGs, exact --resume, one-sentence errors.

Runs are tiny (fake Fashion-MNIST-shaped data, cnn_small, one batch per epoch, PGD-1) so the module takes seconds.
"""
import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import re

import pytest
import torch

import ardir
from ardir import cli
from ardir import config as cfg
from ardir.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "fashion-mnist", "--fake-data", "--model", "cnn_small", "--train-size", "64", "--val-size",
        "32", "--batch-size", "32", "--limit-batches", "1", "--steps", "1", "--val-attack-steps", "1", "--eps", "0.1",
        "--step-size", "0.05", "--quiet"]


def run(*args):
    return cli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A PGD-AT "teacher" run of two epochs."""
    out = tmp_path_factory.mktemp("runs") / "teacher"
    torch.manual_seed(0)
    assert run("train", *TINY, "--method", "at", "--epochs", "2", "--output-dir", out) == 0
    return out


def test_train_writes_last_best_metrics_and_config(teacher_run):
    out = teacher_run
    assert {p.name for p in out.iterdir()} >= {"last.pt", "best.pt", "metrics.jsonl", "config.toml"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"epoch", "step", "loss", "ce_adv", "val_natural", "val_pgd", "lr", "images_per_s",
                "seconds"} <= set(r)
        assert 0 <= r["val_pgd"] <= r["val_natural"] <= 100
    assert [r["step"] for r in records] == [1, 2]

    config = tomllib.loads((out / "config.toml").read_text())
    assert config["method"] == "at" and config["epochs"] == 2 and config["eps"] == 0.1
    assert config["output_dir"] == str(out) and config["fake_data"] is True
    assert cfg.check(config) == config  # the resolved file is itself a valid configuration

    last = load_checkpoint(out / "last.pt")
    assert last["format"] == "ardir-run" and last["version"] == 2 and last["epoch"] == 2 and last["step"] == 2
    assert {"model", "trainer", "config", "model_info", "best", "record"} <= set(last)
    assert {"optimizer", "scheduler", "method", "student", "rng"} <= set(last["trainer"])
    assert "rng" not in last  # one capture of the random states: the trainer's, the loader's generator included
    assert {"torch", "python", "numpy", "generators"} <= set(last["trainer"]["rng"])
    assert len(last["trainer"]["rng"]["generators"]) == 1
    assert last["model_info"] == {"name": "cnn_small", "num_classes": 10, "in_chans": 1, "image_size": 28,
                                  "dataset": "fashion-mnist"}

    best = load_checkpoint(out / "best.pt")
    best_epoch = max(records, key=lambda r: r["val_pgd"])  # the first of equal ones: strict improvement
    assert best["epoch"] == best_epoch["epoch"] and best["val_pgd"] == best_epoch["val_pgd"]
    assert best["config"]["method"] == "at" and "trainer" not in best


def test_eval_writes_report_beside_the_checkpoint_and_plot_draws(teacher_run, capsys):
    assert run("eval", "--checkpoint", teacher_run / "best.pt", "--attacks", "natural", "pgd2", "--n-examples", 32,
               "--eps-sweep", "0.05", "0.2", "--sweep-attack", "pgd2", "--quiet") == 0
    report = json.loads((teacher_run / "best_report.json").read_text())
    assert report["eps_value"] == pytest.approx(0.1)  # the run's training eps, from the checkpoint's config
    assert report["n_examples"] == 32 and set(report["attacks"]) == {"natural", "pgd2"}
    assert report["dataset"] == "fashion-mnist"
    # the report names what it measured: the model by its ardir name (cnn_small, not its class), the file
    assert report["name"] == "cnn_small" and report["source"] == str(teacher_run / "best.pt")
    md = (teacher_run / "best_report.md").read_text()
    assert "| Natural |" in md
    assert md.splitlines()[0].endswith(f". Model cnn_small, data set fashion-mnist, weights {teacher_run / 'best.pt'}.")
    from ardir import Report
    assert Report.from_dict(report).source == report["source"]
    assert "wrote" in capsys.readouterr().out

    assert run("plot", teacher_run) == 0
    for name in ("training_curves.png", "best_report_eps_sweep.png"):
        assert (teacher_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _interrupt_on_epoch(monkeypatch, n):
    from ardir.trainer import Trainer
    original, calls = Trainer.train_epoch, []

    def train_epoch(self):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return original(self)
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


def test_resume_after_an_interruption_continues_exactly(teacher_run, tmp_path, monkeypatch, capsys):
    args = ["train", *TINY, "--teacher", teacher_run / "best.pt", "--epochs", 3, "--milestones", 2]
    assert run(*args, "--output-dir", tmp_path / "a") == 0

    with monkeypatch.context() as m:
        _interrupt_on_epoch(m, 2)
        assert run(*args, "--output-dir", tmp_path / "b") == 130
    # the message names what --resume continues from, as it is on disk
    assert (f"interrupted during epoch 2; `ardir train --output-dir {tmp_path / 'b'} --resume` continues from "
            f"{tmp_path / 'b' / 'last.pt'} (after epoch 1, step ") in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    torch.manual_seed(123)  # the resumed run must not depend on the process's RNG
    assert run("train", "--output-dir", tmp_path / "b", "--resume", "--quiet") == 0

    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    assert b["epoch"] == 3 and b["step"] == a["step"]
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=0, atol=0, msg=key)
    lines = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    timing = {"seconds", "images_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in lines[0]] == \
           [{k: v for k, v in r.items() if k not in timing} for r in lines[1]]
    assert (tmp_path / "b" / "config.toml").read_text() == (tmp_path / "a" / "config.toml").read_text().replace(
        str(tmp_path / "a"), str(tmp_path / "b"))


def test_a_config_file_describes_the_run_and_flags_override_it(teacher_run, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(cfg.dump_config(cfg.resolve(cfg.load_toml(teacher_run / "config.toml"),
                                                {"output_dir": str(tmp_path / "x"), "epochs": 5})))
    assert run("train", "--config", toml, "--epochs", 1, "--output-dir", tmp_path / "y") == 0
    assert not (tmp_path / "x").exists()
    assert tomllib.loads((tmp_path / "y" / "config.toml").read_text())["epochs"] == 1


@pytest.mark.parametrize("extra, message", [
    (["--method", "ardir"], "method 'ardir' distils from a teacher: pass --teacher"),
    (["--method", "ard", "--teacher", "nowhere/best.pt"], "checkpoint 'nowhere/best.pt' does not exist"),
    (["--method", "at", "--tau", "3"], "tau: method 'at' does not take this argument"),
    (["--method", "at", "--resume"], "last.pt does not exist; start the run without --resume"),
])
def test_errors_are_one_sentence(tmp_path, capsys, extra, message):
    assert run("train", *TINY, "--output-dir", tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_resume_with_another_model_is_one_sentence(teacher_run, tmp_path, capsys):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(teacher_run, copy)
    assert run("train", "--output-dir", copy, "--resume", "--epochs", "3", "--model", "cnn_large") == 2
    err = capsys.readouterr().err
    assert "does not fit this run" in err and "Traceback" not in err and err.count("\n") == 1


def test_a_diverging_run_stops_naming_last_pt(tmp_path, capsys):
    out = tmp_path / "nan"
    assert run("train", *TINY, "--method", "at", "--epochs", "3", "--lr", "1e30", "--output-dir", out) == 1
    err = capsys.readouterr().err
    assert err.startswith("ardir train: stopped: ") and "Traceback" not in err
    assert f"last good checkpoint: {out / 'last.pt'}" in err and "loss is nan at epoch 2" in err


def test_bad_paths_are_one_sentence(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run("train", *TINY, "--method", "at", "--output-dir", blocker / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("ardir train: error: ") and "Traceback" not in err
    assert run("train", "--config", tmp_path) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_existing_run_needs_resume(teacher_run, capsys):
    assert run("train", *TINY, "--method", "at", "--output-dir", teacher_run) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_unknown_key_in_config_file(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text("epochs = 2\nlearning_rate = 0.1\n")
    assert run("train", "--config", toml) == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err


def test_missing_dataset_offline_is_one_clear_sentence(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("train", "--dataset", "mnist", "--data-dir", empty, "--no-download", "--method", "at",
               "--output-dir", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("ardir train: error: mnist train split not found: looked in ")
    assert "--data-dir" in err and err.count("\n") == 1


def test_python_dash_m_ardir():
    result = subprocess.run([sys.executable, "-m", "ardir", "eval", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0 and "--checkpoint" in result.stdout


@pytest.mark.slow
def test_examples_cifar10_dry_run(tmp_path):
    """Exactly CI's command: examples/cifar10.py --fake-data --epochs 1 --limit-batches 2 (plus an output dir)."""
    spec = importlib.util.spec_from_file_location("cifar10_example", ROOT / "examples" / "cifar10.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.main(["--fake-data", "--epochs", "1", "--limit-batches", "2", "--output-dir", str(tmp_path),
                         "--quiet"])
    assert [name for name, _ in rows] == ["teacher", "student (ResNet-18, ARDIR)"]
    assert {p.name for p in tmp_path.iterdir()} >= {"teacher.pt", "student.pt", "results.md", "student.json"}
    assert "| student (ResNet-18, ARDIR) |" in (tmp_path / "results.md").read_text()


def _example(name):
    spec = importlib.util.spec_from_file_location(f"{name}_example", ROOT / "examples" / f"{name}.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.mark.parametrize("argv, message", [
    (["--attacks", "pdg5"], r"--attacks: attacks='pdg5' is not a known attack.*did you mean 'pgd20'"),
    (["--n-examples", "0"], r"--n-examples: .*0 must be >= 1"),
    (["--epochs", "-1"], r"--epochs: .*-1 must be >= 0"),
])
def test_examples_check_arguments_before_training(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _example("cifar10").parse_args(["--fake-data", *argv])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    with pytest.raises(SystemExit):
        _example("fashion_mnist").main(["--test-size", "0"])
    assert "--test-size: " in capsys.readouterr().err


def test_cifar10_example_checks_layers_before_the_teacher_trains(tmp_path, monkeypatch):
    example = _example("cifar10")
    trained = []
    monkeypatch.setattr(example.ardir, "TRADESTrainer", lambda *a, **k: trained.append(1))
    with pytest.raises(ValueError, match=r"--layers \(teacher\): WideResNet has no module named 'layer4'"):
        example.main(["--fake-data", "--layers", "layer4:block3", "--output-dir", str(tmp_path), "--quiet"])
    assert not trained


PUBLIC_MODULES = ["ardir", "ardir.config", "ardir.cli", "ardir.teachers", "ardir.plot", "ardir.data",
                  "ardir.models", "ardir.methods", "ardir.losses", "ardir.hooks", "ardir.attacks"]


def test_every_public_name_has_a_docstring():
    import importlib
    import inspect
    missing = []
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        if not (module.__doc__ or "").strip():
            missing.append(name)
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not (obj.__doc__ or "").strip():
                missing.append(f"{name}.{attr}")
            if inspect.isclass(obj) and obj.__module__ == module.__name__:
                for member, value in vars(obj).items():
                    if not member.startswith("_") and (inspect.isfunction(value) or isinstance(value, property)) \
                            and not (value.__doc__ or "").strip():
                        missing.append(f"{name}.{attr}.{member}")
    assert not missing, missing


@pytest.mark.slow
def test_docs_build_strict_offline(tmp_path):
    """`mkdocs build --strict` (warnings are errors), as CI builds the site; needs `pip install 'ardir[docs]'`."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    cli_page = (tmp_path / "site" / "cli" / "index.html").read_text()
    for option in cfg.schema().values():  # the generated table of every key
        assert f"<code>{option.name}</code>" in cli_page, option.name


def _write_idx(path, array):
    import gzip
    import struct
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype("uint8").tobytes())


def test_data_dir_is_where_train_and_eval_read_the_dataset(tmp_path):
    import numpy as np
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for prefix, n in (("train", 96), ("t10k", 32)):
        _write_idx(data / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    out = tmp_path / "run"
    assert run("train", "--dataset", "mnist", "--data-dir", data, "--no-download", "--model", "cnn_small",
               "--method", "natural", "--epochs", 1, "--val-size", 32, "--batch-size", 32, "--val-attack-steps", 1,
               "--quiet", "--output-dir", out) == 0
    assert tomllib.loads((out / "config.toml").read_text())["data_dir"] == str(data)
    assert run("eval", "--checkpoint", out / "best.pt", "--attacks", "natural", "--no-checks", "--quiet") == 0
    report = json.loads((out / "best_report.json").read_text())
    assert report["n_examples"] == 32 and report["dataset"] == "mnist"


def test_natural_training_keeps_its_best_natural_accuracy(tmp_path):
    """A model trained without attack (MTARD's natural teacher) has next to no PGD accuracy: its best.pt is the
    epoch of the best natural accuracy on the validation split."""
    out = tmp_path / "natural"
    assert run("train", *TINY, "--method", "natural", "--epochs", "3", "--lr", "0.5", "--output-dir", out) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == max(records, key=lambda r: r["val_natural"])["epoch"]
    assert best["val_natural"] == max(r["val_natural"] for r in records)
    assert cli.RunLogger(out, {"method": "natural"}, {}).selection_metric == "val_natural"
    assert cli.RunLogger(out, {"method": "at"}, {}).selection_metric == "val_pgd"


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n{"epo')
    cli._sync_metrics(path, 2)
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


def test_resume_writes_the_log_line_a_crash_kept_from_the_log(tmp_path):
    """A kill between writing last.pt and its log line: the resumed run's log still has every epoch once."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n')
    cli._sync_metrics(path, 2, {"epoch": 2, "loss": 0.5})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"epoch": 1}, {"epoch": 2, "loss": 0.5}]
    cli._sync_metrics(path, 2, {"epoch": 2, "loss": 0.5})  # already there: not twice
    assert len(path.read_text().splitlines()) == 2
    (tmp_path / "none.jsonl").unlink(missing_ok=True)
    cli._sync_metrics(tmp_path / "none.jsonl", 1, {"epoch": 1})  # the first epoch's line, no log at all
    assert json.loads((tmp_path / "none.jsonl").read_text()) == {"epoch": 1}


def test_a_logged_epoch_is_always_resumable(tmp_path, monkeypatch):
    """The epoch's checkpoint is on disk before its log line: a crash while logging leaves last.pt, which holds
    the line, and --resume puts it back in the log."""
    out = tmp_path / "run"

    def crash(self, line):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.RunLogger, "_append", crash)
    assert run("train", *TINY, "--method", "at", "--epochs", "2", "--output-dir", out) != 0
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and state["record"]["epoch"] == 1
    monkeypatch.undo()
    assert run("train", "--output-dir", out, "--resume", "--quiet") == 0
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_config_of_an_extended_run_repeats_it(tmp_path):
    """`--resume --epochs 3` on a 2-epoch run keeps the lr schedule it started with; its config.toml says so, and
    `ardir train --config DIR/config.toml` repeats that run's learning rates."""
    first, again = tmp_path / "first", tmp_path / "again"
    assert run("train", *TINY, "--method", "at", "--epochs", "2", "--output-dir", first) == 0
    assert run("train", "--output-dir", first, "--resume", "--epochs", "3", "--quiet") == 0
    config = tomllib.loads((first / "config.toml").read_text())
    assert config["epochs"] == 3 and config["milestones"] == [1, 2]
    assert run("train", "--config", first / "config.toml", "--output-dir", again) == 0
    lrs = [[json.loads(line)["lr"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (first, again)]
    assert lrs[0] == lrs[1] and len(lrs[0]) == 3


def test_a_data_set_brings_its_usual_radius(tmp_path):
    """Without --eps, `ardir train` takes the data set's usual L-inf radius (0.1 on Fashion-MNIST, with a step
    of a quarter of it) and records it; a given eps or step, another data set, or L2 keeps what was asked."""
    base = {"dataset": "fashion-mnist", "eps": None, "step_size": None, "norm": None}
    assert cfg.with_dataset_radius(base) == dict(base, eps=0.1, step_size=0.025)
    assert cfg.with_dataset_radius(dict(base, dataset="mnist"))["eps"] == 0.3
    assert cfg.with_dataset_radius(dict(base, step_size=0.02))["step_size"] == 0.02
    assert cfg.with_dataset_radius(dict(base, eps=0.2)) == dict(base, eps=0.2)
    for other in (dict(base, dataset="cifar10"), dict(base, norm="l2")):
        assert cfg.with_dataset_radius(other) == other
    flags = [a for a in TINY if a not in ("--eps", "0.1", "--step-size", "0.05")]
    assert len(flags) == len(TINY) - 4
    assert run("train", *flags, "--method", "at", "--epochs", 1, "--output-dir", tmp_path / "run") == 0
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert config["eps"] == 0.1 and config["step_size"] == 0.025
    assert "fashion-mnist" in " ".join(cfg.schema()["eps"].help.split())


def test_a_mistyped_flag_or_trainer_argument_is_named_with_the_closest(capsys, tmp_path):
    """No prefix matching: ``--epoch`` is an error naming ``--epochs`` (said by the subcommand, with its usage),
    as ``Trainer(epoch=...)`` names the Trainer's ``epochs``; ``--version`` says the version."""
    for argv, said in ((["train", "--epoch", "3", "--output-dir", str(tmp_path / "run")],
                        "ardir train: error: unrecognized arguments: --epoch 3; did you mean --epochs for --epoch?"),
                       (["eval", "--bogus"], "ardir eval: error: unrecognized arguments: --bogus")):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"ardir {ardir.__version__}"
    model = ardir.models.create("cnn_small", in_chans=1)
    loader = [(torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,)))]
    with pytest.raises(TypeError, match=r"did you mean 'epochs' \(an argument of ardir.Trainer\) for 'epoch'\?"):
        ardir.Trainer(model, loader, method="at", epoch=3)


def test_a_missing_file_is_one_sentence_without_errno(tmp_path, capsys):
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "nothere.pt")]) == 2
    err = capsys.readouterr().err
    assert f"ardir eval: error: checkpoint {tmp_path / 'nothere.pt'} does not exist" in err and "[Errno" not in err
    assert cli._sentence(PermissionError(13, "Permission denied", "/x/y")) == "Permission denied: /x/y"
