"""The shipped teacher and suite students attacked on the same seeded test images, so their AutoAttack accuracies
compare like with like (the suite attacks the students on 1,000 images; the teacher's AutoAttack, 20 times the cost
per image, was measured on a nested subset of fewer).

    python benchmarks/same_images.py --n 100 --rows fashion-mnist/cnn_small__at__seed0 fashion-mnist/cnn_small__ardir__seed0

Each row is a suite row's saved student (``benchmarks/runs/<suite>/<row>.pt``, written by reproduce.py); the
subset is the seeded random ``--n`` of the test set (seed 0: nested in the suite's 1,000). Writes
``benchmarks/results/same_images_<n>.md`` and ``.json`` with the command, commit and machine.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import ardir
from ardir import data, zoo
from ardir.checkpoint import atomic_write_text, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ATTACKS = ("natural", "pgd20", "autoattack")


def evaluate(model: torch.nn.Module, n: int, attacks=ATTACKS) -> dict:
    tic = time.time()
    report = ardir.evaluate(model, test_set(), attacks=attacks, n_examples=n, subset="random", eps=0.1,
                            step_size=0.025, seed=0, progress=False, warn=False, checks=False)
    return {"accuracy": dict(report.accuracy), "subset": report.subset, "seconds": round(time.time() - tic, 1)}


@functools.lru_cache(maxsize=1)
def test_set():
    """Fashion-MNIST's test loader, read once for every model."""
    return data.get_loaders("fashion-mnist", batch_size=500, val_size=0, seed=0).test


def evaluate_teacher(spec: str, n: int) -> dict:
    """The teacher's natural and PGD-20 accuracy here; its AutoAttack from its manifest when that was measured on
    these very images (it costs about 6 s per image on two cores), else measured here."""
    manifest = zoo.manifest(spec)["evaluation"]
    teacher = zoo.load_shipped(spec)
    if manifest["subsets"].get("autoattack") != f"random {n} of 10000 (seed 0)":  # ardir.evaluate's subset label
        return evaluate(teacher, n)
    result = evaluate(teacher, n, ATTACKS[:-1])
    result["accuracy"]["autoattack"] = manifest["accuracy"]["autoattack"]
    result["autoattack_from"] = "its manifest (the same images)"
    result["seconds"] += manifest["seconds"]["autoattack"]
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="seeded random test images (seed 0)")
    parser.add_argument("--teacher", default="fashion-mnist:cnn_xlarge-at")
    parser.add_argument("--rows", nargs="+", default=[], help="SUITE/ROW names under benchmarks/runs")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {args.teacher + " (teacher)": evaluate_teacher(args.teacher, args.n)}
    for row in args.rows:
        record = json.loads((ROOT / "benchmarks" / "runs" / f"{row}.json").read_text())
        student = ardir.models.create(record["student"], num_classes=10, in_chans=1)
        student.load_state_dict(load_checkpoint(ROOT / "benchmarks" / "runs" / f"{row}.pt"))
        results[row] = evaluate(student.eval(), args.n)
        print(row, results[row]["accuracy"], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    command = "python " + shlex.join(["benchmarks/same_images.py"] + list(sys.argv[1:] if argv is None else argv))
    lines = [f"# The teacher and the students on the same {args.n} test images (L∞, ε = 0.1)", "",
             f"- Command: `{command}`", f"- Git commit: `{commit.stdout.strip()}`",
             f"- Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
             f"- Images: {next(iter(results.values()))['subset']} (nested in the suite's seeded 1,000)", "",
             "| model | natural | PGD-20 | AutoAttack | seconds |", "|:--|--:|--:|--:|--:|"]
    for name, r in results.items():
        a = r["accuracy"]
        lines.append(f"| {name} | {a['natural']:.2f} | {a['pgd20']:.2f} | {a['autoattack']:.2f} | {r['seconds']:.0f} |")
    out = ROOT / "benchmarks" / "results" / f"same_images_{args.n}"
    atomic_write_text("\n".join(lines) + "\n", out.with_suffix(".md"))
    atomic_write_text(json.dumps({"command": command, "commit": commit.stdout.strip(), "rows": results}, indent=2)
                      + "\n", out.with_suffix(".json"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
