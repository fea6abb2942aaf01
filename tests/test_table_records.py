"""benchmarks/table_records.py: a suite resumes from its committed table when its run directory is gone (a clean
clone), with every row's numbers as the table states them, and never from rows made with other settings."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "benchmarks" / "results" / "fashion_mnist.json"


def _rows(path: Path):
    """The table's Markdown rows, without the header lines (command, date, commit differ per invocation)."""
    return [line for line in path.read_text().splitlines() if line.startswith("| ")]


def _table_only(reproduce, out: Path, runs: Path, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert reproduce.main(["fashion-mnist", "--table-only", "--output", str(out), "--run-dir", str(runs), *extra]) == 0
    return capsys.readouterr().out


def _student_rows(table: dict):
    return {(r["student"], r["method"], r.get("variant")): (r["seeds"], r["per_seed"])
            for r in table["rows"] if r["method"] != "teacher" and r["seeds"]}


def test_a_clean_clone_rewrites_the_committed_table_from_its_records(reproduce, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(TABLE, out / TABLE.name)
    committed = json.loads(TABLE.read_text())
    log = _table_only(reproduce, out, tmp_path / "runs", capsys)
    assert "restored from the table fashion_mnist.json" in log
    written = json.loads((out / TABLE.name).read_text())
    # the same rows and per-seed numbers as the committed table, with nothing in the run directory before
    assert _student_rows(written) == _student_rows(committed) and _student_rows(written)
    assert {(r["student"], r["method"], r["seed"]) for r in written["records"]} >= \
        {(s, m, seed) for (s, m, _), (seeds, _) in _student_rows(committed).items() for seed in seeds}
    # a second clean clone resumes from the records this table now keeps: the same table again
    rows = _rows(out / "fashion_mnist.md")
    _table_only(reproduce, out, tmp_path / "runs2", capsys)
    assert _rows(out / "fashion_mnist.md") == rows


def test_an_older_table_is_rebuilt_one_record_per_seed(reproduce, tmp_path, capsys):
    """A table written before ``records`` (and before ``metric_seeds``) still resumes: its per-seed numbers give
    one record per seed, and a row's time total is split evenly over its seeds, flagged as such."""
    table = json.loads(TABLE.read_text())
    table.pop("records", None)
    for row in table["rows"]:
        if all(len(v) == len(row["seeds"]) for v in row.get("per_seed", {}).values()):
            row.pop("metric_seeds", None)
    out = tmp_path / "results"
    out.mkdir()
    (out / TABLE.name).write_text(json.dumps(table))
    _table_only(reproduce, out, tmp_path / "runs", capsys)
    written = json.loads((out / TABLE.name).read_text())
    assert _student_rows(written) == _student_rows(table)
    several = next(r for r in table["rows"] if len(r["seeds"]) > 1 and r["method"] != "teacher")
    mine = [r for r in written["records"] if (r["student"], r["method"]) == (several["student"], several["method"])
            and r.get("variant") == several.get("variant")]
    assert len(mine) == len(several["seeds"]) and all(r["seconds_split_evenly"] for r in mine)
    assert sum(r["train_seconds"] for r in mine) == pytest.approx(several["train_seconds"], abs=0.1 * len(mine))
    assert all("rebuilt from its per-seed numbers" in r["restored_from"] for r in mine)


def test_rows_made_with_other_settings_are_not_restored(reproduce, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(TABLE, out / TABLE.name)
    _table_only(reproduce, out, tmp_path / "runs", capsys)  # now the table keeps its records
    table = json.loads((out / TABLE.name).read_text())
    stale = next(r for r in table["records"] if r["method"] == "ardir")
    stale["settings"] = dict(stale["settings"], eps=0.2)
    stale_config = next(r for r in table["records"] if r["method"] == "iad")
    stale_config["method_config"] = dict(stale_config["method_config"], kl_reduction="mean")
    (out / TABLE.name).write_text(json.dumps(table))
    runs = tmp_path / "runs2"
    with pytest.raises(SystemExit) as exc:  # --table-only would drop them: it refuses (a run would rerun them)
        _table_only(reproduce, out, runs, capsys)
    assert "--table-only would drop 2 rows of the table" in str(exc.value)
    assert "31 rows restored" in capsys.readouterr().out
    assert not (runs / f"{stale['student']}__ardir__seed{stale['seed']}.json").exists()
    assert not (runs / f"{stale_config['student']}__iad__seed{stale_config['seed']}.json").exists()
    assert (runs / "cnn_small__at__seed0.json").exists()


def test_a_row_file_that_no_longer_holds_gives_way_to_the_committed_record(reproduce, tmp_path, capsys):
    """A run directory left by a dry run (other epochs) or by an older library: its file is replaced by the
    committed record where that one holds, so the row is neither lost from the table nor retrained."""
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(TABLE, out / TABLE.name)
    runs = tmp_path / "runs"
    runs.mkdir()
    committed = reproduce.table_records.committed_records(TABLE, lambda m, v: None)
    at0 = dict(committed[("cnn_small", "at", 0, None)])
    at0["settings"] = dict(at0["settings"], epochs=1)
    (runs / "cnn_small__at__seed0.json").write_text(json.dumps(at0))
    (runs / "cnn_small__iad__seed0.json").write_text("{ half-written")
    log = _table_only(reproduce, out, runs, capsys)
    assert "(2 of them over row files that did not hold for this run)" in log
    row = json.loads((runs / "cnn_small__at__seed0.json").read_text())
    assert row["settings"]["epochs"] == 10 and row["accuracy"] == committed[("cnn_small", "at", 0, None)]["accuracy"]
    written = json.loads((out / TABLE.name).read_text())
    at = next(r for r in written["rows"] if r["method"] == "at")
    assert at["seeds"] == [0, 1, 2] and "cnn_small__at__seed0" not in written["meta"].get("partial", [])


def test_records_keep_what_the_table_leaves_out(reproduce, tmp_path, capsys):
    """A run on another AutoAttack subset size shows no AutoAttack cell, but the records it writes keep each row
    as its file has it; and the teacher's record is kept too."""
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(TABLE, out / TABLE.name)
    _table_only(reproduce, out, tmp_path / "runs", capsys, "--aa-size", "500")
    written = json.loads((out / TABLE.name).read_text())
    at = next(r for r in written["rows"] if r["method"] == "at")
    assert not at["per_seed"].get("autoattack")
    kept = [r for r in written["records"] if r["method"] == "at"]
    assert len(kept) == 3 and all("autoattack" in r["accuracy"] and r["aa_size"] == 1000 for r in kept)
    assert any(r["method"] == "teacher" for r in written["records"])


def test_an_unreadable_table_is_one_sentence_and_left_alone(reproduce, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    conflicted = "<<<<<<< HEAD\n" + TABLE.read_text() + "=======\n{}\n>>>>>>> other\n"
    (out / TABLE.name).write_text(conflicted)
    with pytest.raises(SystemExit) as exit_:
        _table_only(reproduce, out, tmp_path / "runs", capsys)
    assert "cannot read the table" in str(exit_.value) and "git checkout --" in str(exit_.value)
    assert (out / TABLE.name).read_text() == conflicted  # never overwritten


def test_force_with_table_only_is_refused(reproduce, capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args(["fashion-mnist", "--force", "--table-only"])
    assert "--force with --table-only" in capsys.readouterr().err


def test_the_teacher_row_marks_attacks_on_other_subsets(reproduce):
    settings = reproduce.resolve(reproduce.SUITES["fashion-mnist"], reproduce.parse_args(["fashion-mnist"]))
    rec = {"subsets": {"natural": "all", "pgd20/cw30": "random 1000 of 10000 (seed 0)",
                       "autoattack": "random 100 of 10000 (seed 0)"}}
    assert reproduce.other_subsets(rec, settings) == {"pgd20": 1000, "cw30": 1000, "autoattack": 100}
    same = {"subsets": {"autoattack": "random 1000 of 10000 (seed 0)", "pgd20": "all"}}
    assert reproduce.other_subsets(same, settings) == {}
    on_subset = reproduce.resolve(reproduce.SUITES["fashion-mnist"],
                                  reproduce.parse_args(["fashion-mnist", "--eval-size", "500"]))
    assert reproduce.other_subsets(rec, on_subset) == {"natural": "all", "pgd20": 1000, "cw30": 1000,
                                                       "autoattack": 100}  # the whole set, where the rows see 500


def test_a_restored_trained_teacher_states_its_training_time(reproduce, tmp_path):
    """A suite whose teacher it trains itself (the 'same data' protocol), rewritten on a checkout without the
    cached teacher: the header takes the teacher's training time from its restored row, and says it is not cached."""
    name = "fashion_mnist_same_data.json"
    table = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
    teacher = next(r for r in table["rows"] if r["method"] == "teacher")  # an old-format table: no records
    table["meta"]["settings"]["suite"] = "fashion-mnist-same-data"  # made before the suite had this name
    table["rows"] = [r for r in table["rows"] if r["method"] in ("teacher", "at")]
    out = tmp_path / "results"
    out.mkdir()
    (out / name).write_text(json.dumps(table))
    assert reproduce.main(["fashion-mnist-same-data", "--table-only", "--output", str(out),
                           "--run-dir", str(tmp_path / "runs")]) == 0
    header = next(line for line in (out / name.replace(".json", ".md")).read_text().splitlines()
                  if line.startswith("- Teacher:"))
    assert f"({teacher['train_seconds']} s), not cached here" in header and "?" not in header
    wall = next(line for line in (out / name.replace(".json", ".md")).read_text().splitlines()
                if line.startswith("- Wall time:"))
    assert wall.endswith("(teacher training and evaluation included)")  # rebuilt rows recorded no CPU time


def test_table_only_refuses_to_drop_rows_that_no_longer_hold(reproduce, tmp_path, capsys):
    """--table-only runs nothing, so a committed row that does not hold for this ardir (here: the table was made
    under another suite name) would vanish from the rewritten table: it refuses, and the table is left as it was."""
    name = "fashion_mnist_same_data.json"
    table = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
    table["meta"]["settings"]["suite"] = "fashion-mnist-earlier"
    out = tmp_path / "results"
    out.mkdir()
    (out / name).write_text(json.dumps(table))
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["fashion-mnist-same-data", "--table-only", "--output", str(out),
                        "--run-dir", str(tmp_path / "runs")])
    assert "--table-only would drop 22 rows" in str(exc.value) and json.loads((out / name).read_text()) == table
    assert not (out / name.replace(".json", ".md")).exists()


def test_the_evaluation_line_follows_the_run_not_the_suite_defaults(reproduce):
    """The header's sentence on what the attacks ran on comes from the run's settings: an ablation is scored on the
    validation split, --aa-size 0 has no AutoAttack, --eval-size a subset; the method table's Δ note is not an
    ablation's."""
    def meta(*argv):
        args = reproduce.parse_args(["fashion-mnist", *argv])
        suite = reproduce.SUITES["fashion-mnist"]
        return reproduce.table_meta(args, suite, reproduce.resolve(suite, args), reproduce.torch.device("cpu"))
    default = meta()["notes"]
    assert default[-1] == ("AutoAttack (standard, ardir engine) on a fixed random 1000 images of the test set (seed 0, "
                           "the same for every row); the other attacks on the whole test set.")
    assert any(n.startswith("Δ vs AT") for n in default)
    ablation = meta("--ablation", "--aa-size", "0", "--eval-size", "500")["notes"]
    assert ablation[-1] == ("No AutoAttack in this run (--aa-size 0); the other attacks on a fixed random 500 images "
                            "of the validation split (seed 0, the same for every row).")
    assert not any(n.startswith("Δ vs AT") or "test images" in n for n in ablation)


def test_the_header_counts_the_commits_the_rows_ran_at(reproduce):
    records = [{"commit": "31f3049c78"}, {"commit": "31f3049c78"}, {"commit": "abcdef123 (+ uncommitted changes)"},
               {"table_commit": "6635d8b977"}, {}]
    assert reproduce.row_commits(records) == (
        "2 at 31f3049, 1 at abcdef1 with uncommitted changes, "
        "1 at 6635d8b or earlier (rebuilt from the table of that commit), 1 not recorded")
    rebuilt = reproduce.table_records.rebuilt_records(
        {"meta": {"commit": "6635d8b977", "settings": {}}, "rows": [
            {"student": "s", "method": "at", "seeds": [0], "per_seed": {"natural": [50.0]}}]}, lambda m, v: None)
    assert rebuilt[0]["table_commit"] == "6635d8b977" and "commit" not in rebuilt[0]


def test_table_only_refuses_to_drop_rows_of_students_or_a_teacher_it_does_not_show(reproduce, tmp_path, capsys):
    """Rows that hold but that this invocation would not show (another student, the teacher under
    --no-teacher-eval) would vanish from the rewritten table just the same: refused."""
    out = tmp_path / "results"
    out.mkdir()
    table = json.loads(TABLE.read_text())
    other = dict(next(r for r in table["records"] if r["method"] == "at"), student="cnn_tiny")
    table["records"].append(other)
    (out / TABLE.name).write_text(json.dumps(table))
    with pytest.raises(SystemExit) as exc:
        _table_only(reproduce, out, tmp_path / "runs", capsys)
    assert "would drop 1 rows" in str(exc.value) and "cnn_tiny__at__seed" in str(exc.value)
    shutil.copy(TABLE, out / TABLE.name)
    with pytest.raises(SystemExit) as exc:
        _table_only(reproduce, out, tmp_path / "runs2", capsys, "--no-teacher-eval")
    assert "would drop 1 rows" in str(exc.value) and "teacher" in str(exc.value)
    assert json.loads((out / TABLE.name).read_text()) == json.loads(TABLE.read_text())


def test_the_header_states_the_teachers_lead_over_the_at_student(reproduce):
    rows = [{"method": "teacher", "mean": {"natural": 80.0, "pgd20": 63.7, "autoattack": 62.1}},
            {"method": "at", "variant": None, "mean": {"natural": 74.25, "pgd20": 57.94, "autoattack": 56.0}},
            {"method": "ardir", "mean": {"natural": 74.0, "pgd20": 58.7, "autoattack": 57.0}}]
    lead = reproduce.teacher_lead(rows, reproduce.HEADERS)
    assert lead.startswith("AutoAttack +6.10 (62.10 against 56.00), PGD-20 +5.76 (63.70 against 57.94), "
                           "Natural +5.75 (80.00 against 74.25)")
    assert reproduce.teacher_lead(rows[1:], reproduce.HEADERS) == ""  # no teacher row: no line
    assert json.loads(TABLE.read_text())["meta"]["teacher_lead"].startswith("AutoAttack ")  # the committed table


def test_an_added_autoattack_replaces_the_seconds_of_the_one_it_replaces(reproduce, monkeypatch, tmp_path):
    """A row's evaluation time keeps its other attacks' seconds and the new AutoAttack's, not the replaced one's."""
    import argparse
    monkeypatch.setattr(reproduce, "loaders_for", lambda *a: argparse.Namespace(test=None, val=None))
    monkeypatch.setattr(reproduce, "suite_model", lambda *a: reproduce.torch.nn.Linear(1, 1))
    monkeypatch.setattr(reproduce.ardir.checkpoint, "load_checkpoint", lambda path: {
        "weight": reproduce.torch.zeros(1, 1), "bias": reproduce.torch.zeros(1)})
    monkeypatch.setattr(reproduce, "evaluate_autoattack", lambda *a: {
        "accuracy": {"autoattack": 40.0, "natural_aa_subset": 70.0}, "seconds": {"autoattack": 0.0},
        "flags": [], "subsets": {"autoattack": "random 5 of 10 (seed 0)"}})
    rec = {"student": "cnn_small", "seed": 0, "accuracy": {"natural": 70.0, "autoattack": 50.0},
           "attack_seconds": {"natural": 1.0, "autoattack": 100.0}, "eval_seconds": 101.0, "eval_cpu_seconds": 0.0}
    settings = {"aa_size": 5}
    after = reproduce.add_autoattack(rec, tmp_path / "w.pt", settings, None, "cpu", False)
    assert after["accuracy"]["autoattack"] == 40.0 and after["aa_size"] == 5
    assert after["eval_seconds"] < 5  # the 100 s of the replaced AutoAttack are gone, the natural 1 s kept
    assert after["eval_seconds"] >= 1.0 and rec["eval_seconds"] == 101.0  # the caller's record is untouched


def test_a_record_missing_its_keys_stops_the_run_with_one_sentence(reproduce, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    table = json.loads(TABLE.read_text())
    del table["records"][3]["seed"]
    (out / TABLE.name).write_text(json.dumps(table))
    with pytest.raises(SystemExit) as exc:
        _table_only(reproduce, out, tmp_path / "runs", capsys)
    assert "cannot read the table" in str(exc.value) and "a row record lacks seed" in str(exc.value)
