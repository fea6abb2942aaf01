"""benchmarks/reproduce.py: the CIFAR suites' dry runs (the papers' models, fake data, one batch), the Fashion-MNIST
suite's dry run with resuming, and the results-table writer (mean ± std over seeds)."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ardir.evaluate import parse_attack

ROOT = Path(__file__).resolve().parent.parent


def _table(path: Path):
    return path.read_text(), json.loads(path.with_suffix(".json").read_text())


# ------------------------------------------------------------------------------------------ the table writer
def test_mean_std_over_seeds(reproduce):
    records = [{"student": "s", "method": "ard", "seed": seed, "accuracy": {"natural": nat, "pgd20": pgd},
                "train_seconds": 1.0, "eval_seconds": 1.0}
               for seed, nat, pgd in [(0, 80.0, 40.0), (1, 82.0, 43.0), (2, 84.0, 46.0)]]
    records.append({"student": "s", "method": "at", "seed": 0, "accuracy": {"natural": 70.125, "pgd20": 35.0},
                    "train_seconds": 1.0, "eval_seconds": 1.0})
    rows = {r["method"]: r for r in reproduce.summarize(records, ["natural", "pgd20"])}
    assert rows["ard"]["cells"] == {"natural": "82.00 ± 2.00", "pgd20": "43.00 ± 3.00"}  # sample std (n - 1)
    assert rows["ard"]["mean"]["pgd20"] == pytest.approx(43.0) and rows["ard"]["std"]["pgd20"] == pytest.approx(3.0)
    assert rows["ard"]["seeds"] == [0, 1, 2] and rows["ard"]["per_seed"]["natural"] == [80.0, 82.0, 84.0]
    assert rows["at"]["cells"]["natural"] == "70.12" and rows["at"]["std"]["natural"] is None  # one seed: mean only
    assert reproduce.format_cell([]) == ""


def test_write_table_markdown_and_json(reproduce, tmp_path):
    records = [{"student": "resnet18", "method": "rslad", "seed": s, "accuracy": {"natural": v, "autoattack": v / 2},
                "train_seconds": 10.0, "eval_seconds": 5.0, "command": f"python x --seeds {s}"}
               for s, v in [(0, 83.0), (1, 84.0)]]
    rows = reproduce.summarize(records, ["natural", "autoattack"])
    meta = {"command": "python benchmarks/reproduce.py cifar10", "commit": "abc", "reduced": ["epochs = 1"]}
    reproduce.write_table(tmp_path / "t", "T", meta, rows, ["natural", "autoattack"],
                          published=reproduce.PUBLISHED["cifar10"])
    md, record = _table(tmp_path / "t.md")
    assert "**REDUCED run**" in md and "- epochs = 1" in md
    line = next(l for l in md.splitlines() if l.startswith("| resnet18 | rslad"))
    assert "83.50 ± 0.71" in line and "83.38" in line and "41.75 ± 0.35" in line and "51.49" in line
    assert record["rows"][0]["per_seed"]["natural"] == [83.0, 84.0]
    assert record["published"]["resnet18/rslad"]["autoattack"] == 51.49


def test_suites_registry_and_departures(reproduce):
    assert set(reproduce.SUITES) == {"cifar10", "cifar100", "cifar10-l2", "fashion-mnist", "fashion-mnist-same-data",
                                     "fashion-mnist-l2"}
    assert reproduce.SUITES["fashion-mnist-l2"].norm == "l2" and reproduce.SUITES["fashion-mnist"].norm == "linf"
    fm = reproduce.SUITES["fashion-mnist"]
    assert fm.eps == 0.1 and len(fm.seeds) >= 3 and set(fm.methods) == set(reproduce.ROW_NAMES) - {"ardir-ce0"}
    assert fm.teacher_spec == "fashion-mnist:cnn_xlarge-at"  # the teacher knows more: the shipped one
    same = reproduce.SUITES["fashion-mnist-same-data"]
    assert same.teacher_spec is None and same.teacher_model == "cnn_large" and same.train_size == fm.train_size
    c10 = reproduce.SUITES["cifar10"]
    assert c10.teacher_model == "wrn34_10" and c10.teacher_method == "trades"
    assert c10.students == ("resnet18", "mobilenet_v2") and c10.eval_size is None and c10.aa_size is None
    settings = reproduce.resolve(fm, reproduce.parse_args(["fashion-mnist"]))
    assert reproduce.departures(fm, settings) == []
    # sized for 2 h: no sanity checks, the teacher without CW/AutoAttack; --no-checks then departs from nothing
    assert settings["checks"] is False and settings["teacher_attacks"] == ["natural", "fgsm", "pgd20"]
    no_checks = reproduce.resolve(fm, reproduce.parse_args(["fashion-mnist", "--no-checks"]))
    assert reproduce.departures(fm, no_checks) == []
    assert reproduce.resolve(c10, reproduce.parse_args(["cifar10"]))["checks"] is True
    args = reproduce.parse_args(["fashion-mnist", "--epochs", "2", "--aa-size", "0"])
    reduced = reproduce.departures(fm, reproduce.resolve(fm, args))
    assert any(d.startswith("epochs = 2") for d in reduced) and any(d.startswith("aa_size = 0") for d in reduced)
    # IAD's warm-up scales with the epochs (60 of 200)
    assert reproduce.method_arguments(reproduce.resolve(fm, args), "iad")["warmup_epochs"] == 1
    c10_args = reproduce.resolve(c10, reproduce.parse_args(["cifar10"]))
    assert reproduce.method_arguments(c10_args, "iad")["warmup_epochs"] == 60


def test_template_has_published_numbers(reproduce, tmp_path):
    assert reproduce.main(["cifar10", "--template", "--output", str(tmp_path)]) == 0
    md, record = _table(tmp_path / "cifar10.md")
    assert "Not run here: needs a GPU and the real data" in md
    line = next(l for l in md.splitlines() if l.startswith("| resnet18 | rslad"))
    assert "83.38" in line and "51.49" in line
    assert any(l.startswith("| mobilenet_v2 | ardir") for l in md.splitlines())


def test_template_of_a_suite_without_published_numbers_is_one_sentence(reproduce, tmp_path, capsys):
    for suite in ("fashion-mnist", "fashion-mnist-l2", "fashion-mnist-same-data"):
        with pytest.raises(SystemExit) as exit_:
            reproduce.main([suite, "--template", "--output", str(tmp_path)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"--template: the {suite} suite quotes no published numbers" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_l2_template_states_its_threat_model_and_robustbench_anchors(reproduce, tmp_path):
    suite = reproduce.SUITES["cifar10-l2"]
    assert suite.norm == "l2" and suite.eps == 0.5 and suite.step_size == 2.5 * suite.eps / suite.steps
    assert suite.aa_size is None and suite.teacher_method == "at"
    assert reproduce.main(["cifar10-l2", "--template", "--output", str(tmp_path)]) == 0
    md, record = _table(tmp_path / "cifar10_l2.md")
    assert md.startswith("# Robust distillation, cifar10-l2 (L2, ε = 0.5)")
    header = next(l for l in md.splitlines() if l.startswith("| Student"))
    assert "FGM" in header and "CW₂-20" in header and "CW∞" not in header
    line = next(l for l in md.splitlines() if l.startswith("| resnet18 | at "))
    assert "88.67" in line and "67.68" in line
    assert "Rice2020Overfitting" in md and "Rice2020Overfitting" in record["published_source"]
    assert "Zi et al." not in md  # the L∞ tables' source is not this one's
    assert reproduce.main(["cifar10", "--template", "--output", str(tmp_path)]) == 0
    assert _table(tmp_path / "cifar10.md")[1]["published_source"].startswith("Zi et al. 2021")


def test_autoattack_subset_plumbing(reproduce):
    class Constant(nn.Module):  # always class 0: every sample is wrong, so every attack returns at once
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.zeros(x.shape[0], 10) + torch.eye(10)[0] + 0 * self.w

    data = torch.utils.data.TensorDataset(torch.rand(10, 1, 4, 4), torch.ones(10, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=5)
    settings = {"eps": 0.1, "eval_step_size": 0.025, "eval_seed": 0, "checks": False, "dataset": None,
                "eval_size": None, "aa_size": 4, "attacks": ["natural", "pgd20"]}
    out = reproduce.evaluate_model(Constant(), settings, loader, progress=False)
    assert out["accuracy"]["autoattack"] == 0.0 and out["accuracy"]["pgd20"] == 0.0
    assert out["subsets"]["autoattack"].startswith("random 4 of 10")


# ------------------------------------------------------------------------------------------ dry runs
DRY = ["--fake-data", "--limit-batches", "1", "--epochs", "1", "--batch-size", "2", "--train-steps", "1",
       "--eval-size", "2", "--aa-size", "0", "--no-checks"]


def _dry_run(reproduce, tmp_path, suite, *extra):
    out, runs = tmp_path / "results", tmp_path / "runs"
    assert reproduce.main([suite, *DRY, "--output", str(out), "--run-dir", str(runs), *extra]) == 0
    return out, runs


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["cifar10", "cifar100"])
def test_cifar_dry_run(reproduce, tmp_path, suite):
    """The papers' protocol end to end on one fake batch of 2: every method, ResNet-18 and MobileNetV2 students,
    a WRN-34-10 teacher (trained with TRADES for one step on cifar10; freshly built by name on cifar100)."""
    # PGD/CW with 2 steps: the same code paths as the suite's PGD-20 / CW-20 / CW-30 (whose names are checked
    # below), at a cost a CPU test can pay on a WRN-34-10 / ResNet-18.
    extra = ["--no-teacher-eval", "--attacks", "natural", "fgsm", "pgd2", "cw2"]
    extra += ["--teacher", "wrn34_10"] if suite == "cifar100" else []
    extra += ["--natural-teacher", "resnet18"]  # MTARD's second teacher, built by name (the CIFAR suites ship none)
    out, runs = _dry_run(reproduce, tmp_path, suite, *extra)
    md, record = _table(out / f"{suite}.md")
    suite_cfg = reproduce.SUITES[suite]
    for student in suite_cfg.students:
        for method in suite_cfg.methods:
            assert (runs / f"{student}__{method}__seed0.json").exists()
            assert any(l.startswith(f"| {student} | {method} | 0 |") for l in md.splitlines()), (student, method)
    assert "**REDUCED run**" in md and "--methods" in md
    if suite == "cifar10":
        assert (runs / "teacher.pt").exists()
        assert json.loads((runs / "teacher.json").read_text())["settings"]["teacher_model"] == "wrn34_10"
    for attack in suite_cfg.attacks + ("autoattack",):
        parse_attack(attack)  # the full suite's attacks exist
    assert set(json.loads((runs / "resnet18__ardir__seed0.json").read_text())["accuracy"]) >= {"pgd2", "cw2"}
    rslad = json.loads((runs / "resnet18__rslad__seed0.json").read_text())
    assert rslad["method_kwargs"].get("kl_scale", 1.0) == (10.0 if suite == "cifar100" else 1.0)
    mtard = json.loads((runs / "resnet18__mtard__seed0.json").read_text())
    assert mtard["method_config"]["natural_teacher"] == "resnet18"


def test_mtard_rows_need_a_natural_teacher(reproduce, capsys):
    """Asked for by --methods, MTARD without a natural teacher stops the run in one sentence; among a suite's
    default methods it is left out with a note; the Fashion-MNIST suite names its shipped one."""
    with pytest.raises(SystemExit, match="--natural-teacher SPEC"):
        reproduce.main(["cifar10", "--methods", "mtard", "--fake-data"])
    settings = reproduce.resolve(reproduce.SUITES["cifar10"], reproduce.parse_args(["cifar10"]))
    notes = []
    assert reproduce.with_natural_teacher(settings, ["at", "mtard"], False, notes.append) == ["at"]
    assert "no MTARD row" in notes[0]
    fm = reproduce.resolve(reproduce.SUITES["fashion-mnist"], reproduce.parse_args(["fashion-mnist"]))
    assert reproduce.method_arguments(fm, "mtard")["natural_teacher"] == "fashion-mnist:cnn_xlarge-natural"
    assert "natural_teacher" not in reproduce.row_key(fm)  # only MTARD's rows use it (their method_config has it)


@pytest.mark.slow
def test_fashion_mnist_dry_run_resumes(reproduce, tmp_path, capsys):
    out, runs = _dry_run(reproduce, tmp_path, "fashion-mnist-same-data", "--seeds", "0", "1",
                         "--methods", "natural", "ardir")
    md, record = _table(out / "fashion_mnist_same_data.md")
    rows = {(r["student"], r["method"]): r for r in record["rows"]}
    assert rows[("cnn_small", "ardir")]["seeds"] == [0, 1]
    assert ("cnn_large (teacher)", "teacher") in rows
    assert set(json.loads((runs / "teacher_eval.json").read_text())["accuracy"]) == {"natural", "fgsm", "pgd20"}
    assert rows[("cnn_small", "ardir")]["std"]["natural"] is not None
    line = next(l for l in md.splitlines() if l.startswith("| cnn_small | ardir | 0,1 |"))
    assert " ± " in line and "--methods ardir" in md
    before = (runs / "cnn_small__ardir__seed1.json").read_text()
    capsys.readouterr()
    _dry_run(reproduce, tmp_path, "fashion-mnist-same-data", "--seeds", "0", "1", "--methods", "natural", "ardir")
    log = capsys.readouterr().out
    # nothing left to run: the teacher is neither trained nor loaded
    assert log.count("done before") == 4 and "training" not in log and "teacher:" not in log
    assert (runs / "cnn_small__ardir__seed1.json").read_text() == before
    # a row trained when the library built the method differently (a default since changed) is stale: rerun
    row = runs / "cnn_small__ardir__seed1.json"
    stale = json.loads(before)
    assert stale["method_config"]["kl_reduction"] == "batchmean"
    stale["method_config"]["kl_reduction"] = "mean"
    row.write_text(json.dumps(stale))
    # the table this suite wrote still holds the row as it was: the stale file gives way to it, nothing retrains
    _dry_run(reproduce, tmp_path, "fashion-mnist-same-data", "--seeds", "1", "--methods", "ardir")
    log = capsys.readouterr().out
    assert "1 of them over row files that did not hold for this run" in log and ": training" not in log
    assert json.loads(row.read_text())["method_config"]["kl_reduction"] == "batchmean"
    # without that table, the stale row is retrained
    row.write_text(json.dumps(stale))
    (out / "fashion_mnist_same_data.json").unlink()
    _dry_run(reproduce, tmp_path, "fashion-mnist-same-data", "--seeds", "1", "--methods", "ardir")
    log = capsys.readouterr().out
    assert "has other method settings (this ardir builds the method differently); rerunning" in log
    assert json.loads(row.read_text())["method_config"]["kl_reduction"] == "batchmean"


@pytest.mark.slow
def test_rows_of_a_teacher_trained_anew_are_not_mixed_with_the_old_ones(reproduce, tmp_path, capsys):
    """A suite that trains its own teacher records the teacher's sha256 in the rows distilled from it and in the
    teacher's row; when another teacher is cached, those rows and the teacher's evaluation are made again with it.
    With none cached (a clean clone) the rows hold, --table-only included, until a run trains one: then the rows
    it leaves stale are made again in that same run."""
    args = ("fashion-mnist-same-data", "--seeds", "0", "--methods", "natural", "ardir")
    out, runs = _dry_run(reproduce, tmp_path, *args)
    sha = json.loads((runs / "teacher.json").read_text())["weights_sha256"]
    assert sha == reproduce.zoo.file_sha256(runs / "teacher.pt")
    ardir_row, natural_row = runs / "cnn_small__ardir__seed0.json", runs / "cnn_small__natural__seed0.json"
    teacher_row = runs / "teacher_eval.json"
    assert json.loads(ardir_row.read_text())["teacher_sha256"] == sha
    assert json.loads(teacher_row.read_text())["teacher_sha256"] == sha
    assert json.loads(natural_row.read_text())["teacher_sha256"] is None  # no teacher: nothing to tie it to
    natural_before = natural_row.read_text()
    # another teacher cached (its record vouching for it): the rows of the first are made again
    state = torch.load(runs / "teacher.pt", weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, runs / "teacher.pt")
    other = reproduce.zoo.file_sha256(runs / "teacher.pt")
    meta = json.loads((runs / "teacher.json").read_text())
    (runs / "teacher.json").write_text(json.dumps(dict(meta, weights_sha256=other)))
    capsys.readouterr()
    _dry_run(reproduce, tmp_path, *args)
    log = capsys.readouterr().out
    why = f"was made with another trained teacher (sha256 {sha[:12]}; the cached one is {other[:12]})"
    assert f"cnn_small__ardir__seed0.json {why}; rerunning" in log and f"teacher_eval: {why}; evaluating it again" in log
    assert "teacher: reusing" in log and "cnn_small__natural__seed0: done before" in log
    assert json.loads(ardir_row.read_text())["teacher_sha256"] == other
    assert json.loads(teacher_row.read_text())["teacher_sha256"] == other
    assert natural_row.read_text() == natural_before
    # no teacher cached: the rows hold (the table is rewritten from them) until one is trained
    (runs / "teacher.pt").unlink()
    _dry_run(reproduce, tmp_path, *args, "--table-only")
    md, _ = _table(out / "fashion_mnist_same_data.md")
    assert "| cnn_small | ardir | 0 |" in md and "| cnn_large (teacher) | teacher | 0 |" in md
    ardir_row.unlink()
    (out / "fashion_mnist_same_data.json").unlink()  # no committed copy of the row to restore
    capsys.readouterr()
    _dry_run(reproduce, tmp_path, *args)
    log = capsys.readouterr().out
    new = json.loads((runs / "teacher.json").read_text())["weights_sha256"]
    assert new != other and "teacher: training" in log
    assert f"teacher_eval: was made with another trained teacher (sha256 {other[:12]}; the cached one is " \
        f"{new[:12]}); evaluating it again" in log
    assert json.loads(teacher_row.read_text())["teacher_sha256"] == new
    assert json.loads(ardir_row.read_text())["teacher_sha256"] == new


def test_a_record_of_another_trained_teacher_does_not_hold(reproduce, tmp_path):
    settings = reproduce.resolve(reproduce.SUITES["fashion-mnist-same-data"],
                                 reproduce.parse_args(["fashion-mnist-same-data"]))
    (tmp_path / "teacher.pt").write_bytes(b"weights")
    meta = {"settings": reproduce._teacher_key(settings)}
    (tmp_path / "teacher.json").write_text(json.dumps(meta))  # cached before the sha256 was recorded: hashed now
    sha = reproduce.zoo.file_sha256(tmp_path / "teacher.pt")
    assert reproduce.trained_teacher_sha256(settings, tmp_path) == sha
    assert reproduce.other_teacher({"teacher_sha256": sha}, settings, tmp_path) is None
    assert reproduce.other_teacher({}, settings, tmp_path) is None  # a record older than the field: cannot tell
    assert "the cached one is " + sha[:12] in reproduce.other_teacher({"teacher_sha256": "ab" * 32}, settings, tmp_path)
    (tmp_path / "teacher.pt").write_bytes(b"other weights")  # rewritten in place: hashed afresh
    assert reproduce.other_teacher({"teacher_sha256": sha}, settings, tmp_path) is not None
    # a file its record does not vouch for is no cached teacher (a run trains a new one); meanwhile: cannot tell
    (tmp_path / "teacher.json").write_text(json.dumps(dict(meta, weights_sha256=sha)))
    assert reproduce.cached_teacher(settings, tmp_path) is None
    assert reproduce.other_teacher({"teacher_sha256": "ab" * 32}, settings, tmp_path) is None
    loaded = dict(settings, teacher="some/checkpoint.pt")  # a loaded teacher: its spec is in the row's settings
    assert reproduce.other_teacher({"teacher_sha256": "ab" * 32}, loaded, tmp_path) is None


def test_rows_record_the_methods_library_defaults(reproduce):
    settings = reproduce.resolve(reproduce.SUITES["fashion-mnist"], reproduce.parse_args(["fashion-mnist"]))
    iad = reproduce.method_config(settings, "iad")
    assert iad["kl_reduction"] == "batchmean" and iad["warmup_epochs"] == 3 and iad["eps"] == 0.1
    assert reproduce.method_config(settings, "ard")["tau"] == 30.0
    assert reproduce.method_config(settings, "teacher") is None


@pytest.mark.slow
def test_fashion_mnist_ablation_dry_run(reproduce, tmp_path):
    variants = ["w_ir 0 (no IR term: ARD with tau 1)", "layers block3 (conv map, 1x1 adapter)",
                "reference: AT, no teacher"]
    out, runs = _dry_run(reproduce, tmp_path, "fashion-mnist", "--seeds", "0", "--ablation", "--variants", *variants)
    md, record = _table(out / "ablation_fashion_mnist.md")
    assert sorted(r["variant"] for r in record["rows"]) == sorted(variants)
    # the bar a variant must clear: plain AT of the same student, scored on the same held-out images
    block3 = json.loads((runs / "cnn_small__layers-block3--conv-map--1x1-adapter__seed0.json").read_text())
    assert block3["method_kwargs"]["layers"] == ["block3"]
    # the ablation chooses defaults, so it is scored on images held out of the training set, never the test set
    assert block3["evaluated_on"].startswith("validation") and "scored on a validation split" in md
    # the bar a variant must clear: plain AT of the same student, scored on the same held-out images
    at = json.loads((runs / "cnn_small__reference--at--no-teacher__seed0.json").read_text())
    assert at["method"] == "at" and at["evaluated_on"] == block3["evaluated_on"]
    assert "never on the test set" in md
    # a variant not run yet is listed as such, even where another variant of the same student and seed ran
    _dry_run(reproduce, tmp_path, "fashion-mnist", "--seeds", "0", "--ablation", "--table-only",
             "--variants", *variants, "w_ir 3")
    md, _ = _table(out / "ablation_fashion_mnist.md")
    assert "**PARTIAL run** — 1 rows" in md and "cnn_small__w-ir-3__seed0" in md and "Without AutoAttack" not in md


@pytest.mark.slow
def test_fashion_mnist_suite_uses_the_shipped_teacher(reproduce, tmp_path):
    """The default protocol: the shipped teacher (its row from its manifest, stated in the header), ARD at both
    settings, and each row's AutoAttack difference to AT paired by seed."""
    out, runs = _dry_run(reproduce, tmp_path, "fashion-mnist", "--seeds", "0", "1",
                         "--methods", "at", "ard", "ard-tau1", "--aa-size", "2")
    md, record = _table(out / "fashion_mnist.md")
    rows = {r["method"]: r for r in record["rows"]}
    manifest = reproduce.zoo.manifest("fashion-mnist:cnn_xlarge-at")
    assert rows["teacher"]["mean"]["pgd20"] == manifest["evaluation"]["accuracy"]["pgd20"]
    assert "fashion-mnist:cnn_xlarge-at (cnn_xlarge" in md and "Δ AA vs AT" in md
    tau1 = json.loads((runs / "cnn_small__ard-tau1__seed0.json").read_text())
    assert tau1["method_kwargs"]["tau"] == 1.0 and tau1["method_kwargs"]["kl_reduction"] == "batchmean"
    assert json.loads((runs / "cnn_small__ard__seed0.json").read_text())["method_kwargs"].get("tau", 30.0) == 30.0
    at, ard = rows["at"], rows["ard"]
    paired = [a - b for a, b in zip(ard["per_seed"]["autoattack"], at["per_seed"]["autoattack"])]
    assert ard["delta"]["per_seed"] == paired and at["delta"]["mean"] == 0.0


def test_differences_to_at_are_paired_by_seed(reproduce):
    rows = [{"student": "s", "method": "at", "variant": None, "seeds": [0, 1], "per_seed": {"autoattack": [50, 52]}},
            {"student": "s", "method": "ardir", "variant": None, "seeds": [0, 1],
             "per_seed": {"autoattack": [53, 53]}}]
    reproduce.add_differences(rows)
    assert rows[1]["delta"]["per_seed"] == [3, 1] and rows[1]["cells"]["delta"] == "+2.00 ± 1.41"


def test_jobs_dispatch_order(reproduce):
    """Rows trained under attack go first, the teacher's evaluation and the attack-free rows last; each kind
    keeps its order, and only distillation rows and the teacher's evaluation wait for a teacher."""
    jobs = [(Path(f"{m}{s}"), "cnn_small", m, s, None) for s in (0, 1) for m in ("natural", "at", "ardir")]
    jobs.insert(0, (Path("t"), "cnn_large (teacher)", "teacher", 0, None))
    order = [(j[2], j[3]) for j in sorted(jobs, key=reproduce._cost_rank)]
    assert order == [("at", 0), ("ardir", 0), ("at", 1), ("ardir", 1), ("teacher", 0), ("natural", 0), ("natural", 1)]
    assert [reproduce._needs_teacher(j) for j in jobs[:4]] == [True, False, False, True]


@pytest.mark.slow
def test_fashion_mnist_workers_and_precision(reproduce, tmp_path, capsys, monkeypatch):
    """Rows trained in two worker processes give the same table as one process; a bf16 run is a separate table
    whose rows do not overwrite the fp32 ones."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the spawned workers import the script as a module
    args = ["--seeds", "0", "--methods", "natural", "ardir", "--no-teacher-eval"]
    out, runs = _dry_run(reproduce, tmp_path, "fashion-mnist-same-data", *args)
    one = {n: json.loads((runs / f"cnn_small__{n}__seed0.json").read_text())["accuracy"] for n in ("natural", "ardir")}
    out2, runs2 = _dry_run(reproduce, tmp_path / "two", "fashion-mnist-same-data", *args, "--workers", "2")
    log = capsys.readouterr().out
    assert "2 jobs on 2 worker processes" in log
    # the teacher is trained in a worker while the natural row runs in the other; ardir waits for it
    assert "teacher: training in a worker" in log and (runs2 / "teacher.pt").exists()
    assert log.index("teacher: trained in") < log.index("cnn_small__ardir__seed0: train")
    for n in ("natural", "ardir"):
        rec = json.loads((runs2 / f"cnn_small__{n}__seed0.json").read_text())
        assert rec["accuracy"] == one[n] and "--workers" not in rec["command"]
    md, _ = _table(out2 / "fashion_mnist_same_data.md")
    assert "--workers 2" in md and "2 worker processes" in md
    out, runs = _dry_run(reproduce, tmp_path, "fashion-mnist-same-data", *args, "--precision", "bf16")
    md, record = _table(out / "fashion_mnist_same_data_bf16.md")
    assert "precision = 'bf16'" in md and {r["method"] for r in record["rows"]} == {"natural", "ardir"}
    assert (runs / "cnn_small__ardir__seed0__bf16.json").exists()
    assert json.loads((runs / "cnn_small__ardir__seed0.json").read_text())["accuracy"] == one["ardir"]
    with pytest.raises(SystemExit):
        reproduce.parse_args(["fashion-mnist-same-data", "--workers", "0"])
    out, runs = _dry_run(reproduce, tmp_path, "fashion-mnist-same-data", *args, "--seeds", "0", "1", "--table-only")
    md, _ = _table(out / "fashion_mnist_same_data.md")
    assert "**PARTIAL run** — 2 rows" in md and "cnn_small__ardir__seed1" in md
    assert not (runs / "cnn_small__ardir__seed1.json").exists()


@pytest.mark.parametrize("flags, words", [
    (["--epochs", "0"], "argument --epochs: 0 must be >= 1"),
    (["--batch-size", "x"], "argument --batch-size: expected a whole number"),
    (["--aa-size", "-1"], "argument --aa-size: -1 must be >= 0"),
    (["--seeds", "-1"], "argument --seeds: -1 must be >= 0"),
    (["--attacks", "pdg5"], "did you mean 'pgd20'"),
    (["--students", "resnet81"], "--students resnet81: name='resnet81' is not a known model"),
    (["--ablation", "--variants", "w_ir 9"], "--variants: unknown ['w_ir 9']"),
    (["--train-size", "64", "--batch-size", "65"], "--batch-size 65 is larger than the 64 training images"),
    (["--workers", "0"], "argument --workers: 0 must be >= 1"),
])
def test_bad_flags_stop_before_any_work(reproduce, capsys, flags, words):
    """A typo is a one-line usage error at once, not a traceback after the teacher has trained."""
    with pytest.raises(SystemExit) as info:
        reproduce.parse_args(["fashion-mnist", *flags])
    assert info.value.code == 2 and words in capsys.readouterr().err


def test_ardir_layers_are_checked_before_the_teacher_trains(reproduce, tmp_path):
    settings = reproduce.resolve(reproduce.SUITES["fashion-mnist"], reproduce.parse_args(["fashion-mnist"]))
    job = lambda student, variant=None: (tmp_path / "x.json", student, "ardir", 0, variant)  # noqa: E731
    reproduce.check_ardir_layers(settings, [job("cnn_small"), job("cnn_small", "layers block3 (conv map, 1x1 adapter)")])
    with pytest.raises(SystemExit, match="ARDIR with student timm/resnet18: layers: these models name no default"):
        reproduce.check_ardir_layers(settings, [job("timm/resnet18")])


def test_rows_survive_a_new_argument_at_its_default(reproduce):
    """A row recorded before the library gained an argument (its config lacks it) still counts while the argument
    is at its default; a changed value or a dropped argument makes it stale."""
    settings = reproduce.resolve(reproduce.SUITES["fashion-mnist"], reproduce.parse_args(["fashion-mnist"]))
    current = reproduce.method_config(settings, "ardir")
    older = {k: v for k, v in current.items() if k != "distance"}  # as if distance were new
    assert reproduce.same_method(older, current, "ardir")
    assert not reproduce.same_method(dict(older, w_ce=0.0), current, "ardir")
    assert reproduce.same_method(dict(older, w_ce=0.0), reproduce.method_config(settings, "ardir-ce0"), "ardir-ce0")
    assert not reproduce.same_method(dict(current, gone=1), current, "ardir")
    assert not reproduce.same_method({k: v for k, v in current.items() if k != "eps"}, current, "ardir")


def test_differences_use_the_strongest_attack_measured(reproduce):
    """Without AutoAttack (--aa-size 0) the Δ column pairs CW∞-30 by seed, and says so."""
    rows = [{"student": "s", "method": m, "seeds": [0, 1], "variant": None, "cells": {},
             "per_seed": {"pgd20": v, "cw30": [x - 1 for x in v]}} for m, v in (("at", [50, 52]), ("ardir", [51, 54]))]
    assert reproduce.strongest_metric(rows) == "cw30"
    reproduce.add_differences(rows, reproduce.strongest_metric(rows))
    assert rows[1]["delta"]["metric"] == "cw30" and rows[1]["delta"]["per_seed"] == [1, 2]
    rows[0]["per_seed"]["autoattack"] = [40, 41]
    assert reproduce.strongest_metric(rows) == "autoattack"


def test_train_teacher_trains_the_robust_or_the_natural_teacher(tmp_path):
    """benchmarks/train_teacher.py: AT with its PGD-3 attack, or natural training without attack flags."""
    spec = importlib.util.spec_from_file_location("train_teacher", ROOT / "benchmarks" / "train_teacher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(model="cnn_xlarge", steps=3, epochs=4, run_dir=tmp_path, method="at")
    at = module.training_command(args)
    assert at[:3] == ["train", "--method", "at"] and "--eps" in at and at[at.index("--steps") + 1] == "3"
    natural = module.training_command(argparse.Namespace(**{**vars(args), "method": "natural"}))
    assert natural[:3] == ["train", "--method", "natural"] and "--eps" not in natural and "--steps" not in natural
    assert natural[natural.index("--val-size") + 1] == "1000"  # the same held-out split chooses its checkpoint


def test_a_finished_row_gains_autoattack_from_its_saved_weights(reproduce, tmp_path, capsys):
    """A row run without AutoAttack keeps its student's weights; a later run that asks for AutoAttack adds it to
    the row from them (no retraining, its other numbers kept), reuses it afterwards, and retrains a row whose
    weights are gone."""
    args = ("--seeds", "0", "--methods", "natural")
    _, runs = _dry_run(reproduce, tmp_path, "fashion-mnist", *args)
    row, weights = runs / "cnn_small__natural__seed0.json", runs / "cnn_small__natural__seed0.pt"
    before = json.loads(row.read_text())
    assert weights.exists() and "autoattack" not in before["accuracy"] and before["aa_size"] == 0
    capsys.readouterr()
    out, _ = _dry_run(reproduce, tmp_path, "fashion-mnist", *args, "--aa-size", "2")
    log = capsys.readouterr().out
    assert ("has no AutoAttack on 2 images; its weights cnn_small__natural__seed0.pt are kept; adding it from them "
            "(no retraining)") in log
    after = json.loads(row.read_text())
    assert after["aa_size"] == 2 and "autoattack" in after["accuracy"]
    assert after["subsets"]["autoattack"].startswith("random 2 of")
    assert after["train_seconds"] == before["train_seconds"] and after["commit"] == before["commit"]
    assert {k: after["accuracy"][k] for k in before["accuracy"]} == before["accuracy"]
    _, record = _table(out / "fashion_mnist.md")
    natural = next(r for r in record["rows"] if r["method"] == "natural")
    assert natural["per_seed"]["autoattack"] == [after["accuracy"]["autoattack"]]
    _dry_run(reproduce, tmp_path, "fashion-mnist", *args, "--aa-size", "2")
    assert "cnn_small__natural__seed0: done before" in capsys.readouterr().out
    weights.unlink()
    out, _ = _dry_run(reproduce, tmp_path, "fashion-mnist", *args, "--aa-size", "3", "--table-only")
    md, _ = _table(out / "fashion_mnist.md")  # the row is shown, and said to lack this AutoAttack, not to be unrun
    assert "**Without AutoAttack** — 1 rows below" in md and "PARTIAL" not in md and "| natural | 0 |" in md
    _dry_run(reproduce, tmp_path, "fashion-mnist", *args, "--aa-size", "3")
    assert "no saved weights to add it from; rerunning" in capsys.readouterr().out
    assert json.loads(row.read_text())["aa_size"] == 3 and weights.exists()
    # weights another run wrote over the row's (another setting, same file name) are never attacked for it
    state = torch.load(weights, weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, weights)
    _dry_run(reproduce, tmp_path, "fashion-mnist", *args, "--aa-size", "4")
    assert "is not the student cnn_small__natural__seed0.json recorded (another run wrote it); rerunning" in \
        capsys.readouterr().out


def test_cells_and_differences_follow_the_seeds_each_attack_has(reproduce):
    """Rows measured with AutoAttack on some seeds only: the AA cell names its seeds, the AA difference pairs
    those seeds, and a second Δ column pairs CW∞-30 for every row."""
    def rec(method, seed, cw, aa=None):
        return {"student": "s", "method": method, "seed": seed, "train_seconds": 1, "eval_seconds": 1,
                "accuracy": {"cw30": cw, **({} if aa is None else {"autoattack": aa})}}
    records = [rec("at", 0, 50, 48), rec("at", 1, 52, 49), rec("at", 2, 51),
               rec("ardir", 0, 53, 50), rec("ardir", 1, 54), rec("ardir", 2, 52), rec("trades", 0, 49)]
    rows = {r["method"]: r for r in reproduce.summarize(records, ["cw30", "autoattack"])}
    assert rows["at"]["cells"]["autoattack"] == "48.50 ± 0.71 (seeds 0,1)"
    assert rows["ardir"]["cells"]["autoattack"] == "50.00 (seed 0)" and rows["ardir"]["cells"]["cw30"] == "53.00 ± 1.00"
    metrics = reproduce.difference_metrics(list(rows.values()))
    assert metrics == ["autoattack", "cw30"]
    for m in metrics:
        reproduce.add_differences(list(rows.values()), m)
    assert rows["ardir"]["deltas"]["autoattack"]["per_seed"] == [2]  # seed 0 only: 50 - 48
    assert rows["ardir"]["deltas"]["cw30"]["per_seed"] == [3, 2, 1]
    assert "autoattack" not in rows["trades"].get("deltas", {}) and rows["trades"]["cells"]["delta:cw30"] == "-1.00"


def test_train_teacher_adds_autoattack_to_the_shipped_manifest(tmp_path, monkeypatch):
    """--autoattack-only trains nothing and leaves the weights as they are: it loads the shipped teacher by name
    (hash checked), attacks it on the seeded subset and adds that to its manifest, with the command that did it."""
    import shutil
    spec = importlib.util.spec_from_file_location("train_teacher", ROOT / "benchmarks" / "train_teacher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = ROOT / "ardir" / "weights" / "fashion-mnist"
    (tmp_path / "fashion-mnist").mkdir()
    for name in ("cnn_xlarge-at.pt", "cnn_xlarge-at.json"):
        shutil.copy(shipped / name, tmp_path / "fashion-mnist" / name)
    monkeypatch.setattr(module.zoo, "WEIGHTS_DIR", tmp_path)
    fake = torch.utils.data.TensorDataset(torch.rand(6, 1, 28, 28), torch.arange(6) % 10)
    monkeypatch.setattr(module.data, "get_loaders", lambda *a, **k: argparse.Namespace(
        test=torch.utils.data.DataLoader(fake, batch_size=3)))
    monkeypatch.setattr(module, "ROOT", tmp_path)  # the resume state goes under ROOT/benchmarks/results
    before = json.loads((tmp_path / "fashion-mnist" / "cnn_xlarge-at.json").read_text())
    state = tmp_path / "benchmarks" / "results" / "teacher_autoattack" / \
        f"cnn_xlarge-at-{before['sha256'][:12]}-aa4.json"
    module.main(["--autoattack-only", "--aa-size", "4", "--threads", "1"])
    after = json.loads((tmp_path / "fashion-mnist" / "cnn_xlarge-at.json").read_text())
    assert state.exists()  # the resume state, batch by batch
    assert after["sha256"] == before["sha256"] == module.zoo.file_sha256(tmp_path / "fashion-mnist" / "cnn_xlarge-at.pt")
    ev = after["evaluation"]
    assert 0 <= ev["accuracy"]["autoattack"] <= ev["accuracy"]["natural_aa_subset"] <= 100
    assert ev["subsets"]["autoattack"].startswith("random 4 of 6")
    assert ev["accuracy"]["pgd20"] == before["evaluation"]["accuracy"]["pgd20"]  # the rest is kept
    assert "--autoattack-only --aa-size 4" in ev["autoattack_made_by"]["command"]
    earlier_total = before["evaluation"]["seconds_total"] - before["evaluation"]["seconds"]["autoattack"]
    assert ev["seconds_total"] == pytest.approx(earlier_total + ev["seconds"]["autoattack"], abs=0.1)
    module.main(["--autoattack-only", "--aa-size", "4", "--threads", "1"])  # resumes: every batch is done
    again = json.loads((tmp_path / "fashion-mnist" / "cnn_xlarge-at.json").read_text())["evaluation"]
    assert again["accuracy"] == ev["accuracy"] and again["seconds"]["autoattack"] == ev["seconds"]["autoattack"]
    assert again["seconds_total"] == ev["seconds_total"]  # the replaced AutoAttack's seconds are not added twice
    with pytest.raises(SystemExit):
        module.main(["--autoattack-only", "--aa-size", "0"])


def test_the_l2_suite_trains_and_evaluates_under_l2(reproduce, tmp_path):
    """fashion-mnist-l2: the rows' methods and attacks run under L2 (FGM, L2 PGD, CW₂), the table says so, and
    the shipped (L-inf) teacher's row is measured under L2 instead of copied from its manifest."""
    out, runs = _dry_run(reproduce, tmp_path, "fashion-mnist-l2", "--methods", "at")
    md, record = _table(out / "fashion_mnist_l2.md")
    assert md.startswith("# Robust distillation, fashion-mnist-l2 (L2, ε = 1.5)")
    assert "| FGM | PGD-20 | CW₂-30 | Δ CW₂-30 vs AT |" in md and "measured here under L2" in md
    at = json.loads((runs / "cnn_small__at__seed0.json").read_text())
    assert at["method_kwargs"]["norm"] == "l2" and at["method_config"]["norm"] == "l2"
    teacher = json.loads((runs / "teacher_eval.json").read_text())
    assert teacher["command"] == "(evaluated by the suite's command; the shipped teacher)"  # not the manifest's


def test_the_l2_suite_runs_the_l2_autoattack(reproduce, tmp_path):
    """AutoAttack is a column of the L2 table, run by ardir's engine under L2 on the seeded subset."""
    out, runs = _dry_run(reproduce, tmp_path, "fashion-mnist-l2", "--methods", "at", "--aa-size", "2",
                         "--no-teacher-eval")
    at = json.loads((runs / "cnn_small__at__seed0.json").read_text())
    assert "autoattack" in at["accuracy"] and at["subsets"]["autoattack"].startswith("random 2 of")
    assert reproduce.SUITES["fashion-mnist-l2"].aa_size == 1000
    assert "AutoAttack" in (out / "fashion_mnist_l2.md").read_text().split("| Student")[1].splitlines()[0]


def test_rows_recorded_before_a_setting_existed_keep_their_meaning(reproduce):
    """A row JSON written before the suites had a norm ran under L-inf: it matches an L-inf run's key, not L2's."""
    linf = reproduce.resolve(reproduce.SUITES["fashion-mnist"], reproduce.parse_args(["fashion-mnist"]))
    old = {"settings": {k: v for k, v in reproduce.row_key(linf).items() if k != "norm"}}
    assert reproduce.stored_key(old) == reproduce.row_key(linf)
    assert reproduce.stored_key(old) != reproduce.row_key(dict(linf, norm="l2"))


def test_a_suite_trains_its_own_teacher_under_its_threat_model(reproduce, tmp_path, monkeypatch):
    """A teacher a suite trains itself is trained under the suite's norm, and its cache key names an L2 norm (an
    L-inf key is as before, so teachers cached then still match)."""
    linf = reproduce.resolve(reproduce.SUITES["fashion-mnist"], reproduce.parse_args(["fashion-mnist"]))
    l2 = reproduce.resolve(reproduce.SUITES["fashion-mnist-l2"], reproduce.parse_args(["fashion-mnist-l2"]))
    assert "norm" not in reproduce._teacher_key(linf) and reproduce._teacher_key(l2)["norm"] == "l2"
    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(model, loader, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(reproduce.ardir, "Trainer", fake_trainer)
    monkeypatch.setattr(reproduce, "loaders_for", lambda *args: argparse.Namespace(train=None))
    with pytest.raises(Stop):
        reproduce.get_teacher(dict(l2, teacher=None), tmp_path, None, torch.device("cpu"), False, lambda line: None)
    assert seen["norm"] == "l2" and seen["eps"] == 1.5


def test_same_images_takes_the_teachers_autoattack_only_from_the_same_images(tmp_path, monkeypatch):
    """benchmarks/same_images.py: the teacher's AutoAttack comes from its manifest only when the manifest measured it
    on the very subset asked for; otherwise it is measured."""
    spec = importlib.util.spec_from_file_location("same_images", ROOT / "benchmarks" / "same_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def fake_evaluate(model, n, attacks=module.ATTACKS):
        calls.append(tuple(attacks))
        return {"accuracy": {a: 50.0 for a in attacks}, "subset": f"random {n} of 10000 (seed 0)", "seconds": 1.0}

    monkeypatch.setattr(module, "evaluate", fake_evaluate)
    monkeypatch.setattr(module.zoo, "load_shipped", lambda spec: None)
    manifest = {"evaluation": {"subsets": {"autoattack": "random 100 of 10000 (seed 0)"},
                               "accuracy": {"autoattack": 57.0}, "seconds": {"autoattack": 600.0}}}
    monkeypatch.setattr(module.zoo, "manifest", lambda spec: manifest)
    same = module.evaluate_teacher("fashion-mnist:x", 100)
    assert same["accuracy"]["autoattack"] == 57.0 and calls == [("natural", "pgd20")]
    other = module.evaluate_teacher("fashion-mnist:x", 50)
    assert other["accuracy"]["autoattack"] == 50.0 and calls[-1] == module.ATTACKS


def test_a_scaled_down_run_keeps_its_rows_teacher_and_table_apart_from_the_suites(reproduce, tmp_path):
    """A dry run or quick look (fewer epochs, fake data, other attacks...) never replaces the suite's committed table
    or its row files and cached teacher; picking rows (seeds, methods, students), a teacher or the AutoAttack size
    does not scale a run down."""
    def dirs(*argv):
        args = reproduce.parse_args(["fashion-mnist-same-data", *argv])
        return reproduce.scaled_down(args), reproduce.run_dirs(args), reproduce.output_dir(args)

    runs = reproduce.ROOT / "benchmarks" / "runs"
    assert dirs("--seeds", "0", "--methods", "ardir", "--students", "cnn_small", "--aa-size", "0",
                "--teacher", "x.pt") == ([], (runs / "fashion-mnist-same-data",) * 2,
                                         reproduce.ROOT / "benchmarks" / "results")
    keys, (rows, teacher), out = dirs("--epochs", "1", "--attacks", "natural")
    assert keys == ["teacher_epochs", "epochs", "attacks"]
    assert rows == teacher == runs / "fashion-mnist-same-data-reduced" and out == rows / "tables"
    _, (rows, teacher), out = dirs("--fake-data")
    assert rows == runs / "fashion-mnist-same-data-fake" and out == rows / "tables"
    _, (rows, _), out = dirs("--fake-data", "--run-dir", str(tmp_path), "--output", "elsewhere")
    assert rows == tmp_path and out == reproduce.ROOT / "elsewhere"
