"""Train, evaluate and ship ardir's Fashion-MNIST teacher: ``ardir/weights/fashion-mnist/<name>.{pt,json}``.

    python benchmarks/train_teacher.py              # train (resumable), evaluate, write the weights and manifest
    python benchmarks/train_teacher.py --aa-size 200 --threads 1
    python benchmarks/train_teacher.py --method natural --epochs 3     # MTARD's natural teacher, cnn_xlarge-natural
    python benchmarks/train_teacher.py --autoattack-only --aa-size 1000 --threads 2  # AutoAttack added to the manifest

AutoAttack on this network takes hours on two CPU cores; it records each finished batch of 100 images (and each
finished component of a batch) in ``benchmarks/results/teacher_autoattack/``, so a killed run resumes where it
stopped, and committing that file keeps the progress across checkouts.

The teacher is trained by ``ardir train`` on all of Fashion-MNIST's training images but a validation split of
1,000 (seed 0), on which the run keeps its best checkpoint (``best.pt``, PGD-10 accuracy): the test set chooses
nothing. It is then evaluated once on the test set -- natural accuracy on all 10,000 images; PGD-20, CW∞-30 and
AutoAttack on the suite's seeded random subset (``benchmarks/reproduce.py``: seed 0) -- and its weights-only
``state_dict`` is written with a manifest: sha256, the command, the commit, the machine, the training time and
those accuracies. ``ardir.teachers.load_teacher("fashion-mnist:<name>")`` loads it and checks the hash.
A killed run resumes: the training from its ``last.pt``, and a finished training is not repeated. With
``--method natural`` (MTARD's second teacher) the checkpoint is chosen by natural accuracy on the validation
split, and only the natural accuracy is measured: a naturally trained model has next to none under attack.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

import ardir
from ardir import data, zoo
from ardir.checkpoint import atomic_save, atomic_write_text
from ardir.cli import count, whole

ROOT = Path(__file__).resolve().parent.parent
EPS, EVAL_STEP = 0.1, 0.025  # the suite's radius and evaluation step (benchmarks/reproduce.py)
AA_BATCH = 100  # the unit of AutoAttack's resume state: about 10 minutes of two CPU cores for cnn_xlarge


def training_command(args: argparse.Namespace) -> list:
    """The ``ardir train`` arguments of the teacher, on all training images but the validation split: AT with PGD-3
    (step 2.5 eps / 3), or natural training (MTARD's second teacher)."""
    attack = ["--eps", str(EPS), "--step-size", "0.0333", "--steps", str(args.steps)] if args.method == "at" else []
    return ["train", "--method", args.method, "--model", args.model, "--dataset", "fashion-mnist", *attack,
            "--epochs", str(args.epochs), "--lr", "0.05", "--val-size", "1000", "--seed", "0",
            "--output-dir", str(args.run_dir)]


def finished_epochs(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    return len([line for line in metrics.read_text().splitlines() if '"epoch"' in line])


def train(args: argparse.Namespace) -> float:
    """Run (or resume) the training; returns its wall seconds as the run logged them."""
    if finished_epochs(args.run_dir) < args.epochs:
        argv = training_command(args) + (["--resume"] if (args.run_dir / "last.pt").is_file() else [])
        print("ardir " + shlex.join(argv), flush=True)
        status = ardir.cli.main(argv)
        if status:
            raise SystemExit(f"train_teacher.py: the training failed (exit status {status})")
    records = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return round(sum(r.get("seconds", 0.0) for r in records if "epoch" in r), 1)


def evaluate(teacher: torch.nn.Module, args: argparse.Namespace, sha256: str) -> dict:
    """The teacher's accuracies on the test set (natural on all of it, the attacks on the seeded subsets), the
    AutoAttack resuming from the state named by the shipped weights' ``sha256``."""
    loaders = data.get_loaders("fashion-mnist", batch_size=500, val_size=0, seed=0)
    common = dict(eps=EPS, step_size=EVAL_STEP, seed=0, progress=False, warn=False, checks=False)
    natural = ardir.evaluate(teacher, loaders.test, attacks=("natural",), **common)
    if args.method == "natural":  # MTARD's natural teacher: what it hands down is its clean accuracy
        return {"accuracy": {"natural": natural.accuracy["natural"]}, "subsets": {"natural": natural.subset},
                "seconds": dict(natural.seconds), "settings": {"attacks": "none: a naturally trained model"}}
    attacked = ardir.evaluate(teacher, loaders.test, attacks=("pgd20", "cw30"), n_examples=args.eval_size,
                              subset="random", **common)
    result = {"accuracy": {"natural": natural.accuracy["natural"], "pgd20": attacked.accuracy["pgd20"],
                           "cw30": attacked.accuracy["cw30"], "autoattack": None,
                           "natural_attack_subset": attacked.accuracy["natural"]},
              "subsets": {"natural": natural.subset, "pgd20/cw30": attacked.subset, "autoattack": None},
              "seconds": dict(attacked.seconds),
              "settings": {"eps": EPS, "step_size": EVAL_STEP, "autoattack": "standard, ardir engine"}}
    if args.aa_size:  # hours on two CPU cores for this network (Square's 5,000 queries): --aa-size 0 skips it
        state = autoattack_state(args.name, args.aa_size, sha256)  # the shipped weights' hash
        record_autoattack(result, teacher, loaders.test, args.aa_size, state)
    return result


def autoattack_state(name: str, n: int, sha256: str) -> Path:
    """Where the teacher's AutoAttack records each finished batch of ``AA_BATCH`` images: in the repository (not in
    the ignored ``benchmarks/runs``), so that hours of it survive a killed run or a fresh checkout once committed.
    Named by the weights' hash, so a retrained teacher starts its own."""
    return ROOT / "benchmarks" / "results" / "teacher_autoattack" / f"{name}-{sha256[:12]}-aa{n}.json"


def record_autoattack(evaluation: dict, teacher: torch.nn.Module, test_loader, n: int, state: Path) -> float:
    """AutoAttack on the seeded random ``n`` test images (seed 0: nested in the suite's 1,000), written into a
    manifest's ``evaluation``; returns its seconds (those of earlier, interrupted runs included). Resumes from
    ``state``, batch by batch and component by component."""
    state.parent.mkdir(parents=True, exist_ok=True)
    aa = ardir.evaluate(teacher, test_loader, attacks=("autoattack",), n_examples=n, subset="random", eps=EPS,
                        step_size=EVAL_STEP, seed=0, batch_size=AA_BATCH, state_path=state, progress=True,
                        warn=False, checks=False)
    evaluation["accuracy"].update(autoattack=aa.accuracy["autoattack"], natural_aa_subset=aa.accuracy["natural"])
    evaluation["subsets"]["autoattack"] = aa.subset
    evaluation["seconds"]["autoattack"] = aa.seconds["autoattack"]
    return aa.seconds["autoattack"]


def add_autoattack(args: argparse.Namespace) -> None:
    """AutoAttack on the seeded random ``--aa-size`` test images (seed 0: a subset of the suite's 1,000) added to
    the shipped teacher's manifest, its weights untouched (loaded by name, so their hash is checked)."""
    name = f"fashion-mnist:{args.name}"
    loaders = data.get_loaders("fashion-mnist", batch_size=500, val_size=0, seed=0)
    info = zoo.manifest(name)
    ev = info["evaluation"]
    earlier = ev["seconds"].get("autoattack") or 0.0  # an AutoAttack on fewer images, which this one replaces
    seconds = record_autoattack(ev, zoo.load_shipped(name), loaders.test, args.aa_size,
                                autoattack_state(args.name, args.aa_size, info["sha256"]))
    ev["seconds_total"] = round(ev["seconds_total"] - earlier + seconds, 1)
    ev["autoattack_made_by"] = {
        "command": f"python {shlex.join(['benchmarks/train_teacher.py'] + args.argv)}",
        "commit": git_commit(), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads"}
    atomic_write_text(json.dumps(info, indent=2) + "\n", zoo.WEIGHTS_DIR / "fashion-mnist" / f"{args.name}.json")
    print(f"{name}: AutoAttack {ev['accuracy']['autoattack']:.2f} on {ev['subsets']['autoattack']} ({seconds:.0f} s)")


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", help="the shipped name (fashion-mnist:NAME; default MODEL-METHOD)")
    parser.add_argument("--model", default="cnn_xlarge", help="the architecture (ardir.models)")
    parser.add_argument("--method", choices=("at", "natural"), default="at",
                        help="at: the robust teacher; natural: MTARD's naturally trained one")
    parser.add_argument("--epochs", type=count, default=4)
    parser.add_argument("--steps", type=count, default=3, help="PGD steps of the training attack")
    parser.add_argument("--run-dir", type=Path, help="the training run (default benchmarks/runs/teacher-MODEL for "
                                                     "AT, teacher-NAME otherwise)")
    parser.add_argument("--eval-size", type=count, default=1000, help="test images of PGD-20 and CW∞-30")
    parser.add_argument("--aa-size", type=whole, default=1000,
                        help="test images of AutoAttack (0: skip it; on two CPU cores it takes hours for this network)")
    parser.add_argument("--threads", type=whole, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--autoattack-only", action="store_true",
                        help="train nothing: add AutoAttack on --aa-size images to the shipped teacher's manifest")
    parser.add_argument("--training-commit", help="the commit the training ran at, when it ran before this one "
                                                  "(a resumed or earlier run); default: this commit")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.name = args.name or f"{args.model}-{args.method}"
    runs = ROOT / "benchmarks" / "runs"
    args.run_dir = args.run_dir or runs / (f"teacher-{args.model}" if args.method == "at" else f"teacher-{args.name}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.autoattack_only:
        if not args.aa_size:
            parser.error("--autoattack-only needs --aa-size N (N >= 1)")
        return add_autoattack(args)

    train_seconds = train(args)
    teacher = ardir.teachers.load_teacher(str(args.run_dir / "best.pt"))
    out = zoo.WEIGHTS_DIR / "fashion-mnist"
    weights = out / f"{args.name}.pt"
    out.mkdir(parents=True, exist_ok=True)
    atomic_save({k: v.detach().clone().contiguous() for k, v in teacher.state_dict().items()}, weights)
    best_state = ardir.checkpoint.load_checkpoint(args.run_dir / "best.pt")
    manifest = {
        "name": f"fashion-mnist:{args.name}", "dataset": "fashion-mnist", "model": args.model, "num_classes": 10,
        "in_chans": 1, "parameters": sum(p.numel() for p in teacher.parameters()),
        "file": weights.name, "sha256": zoo.file_sha256(weights), "bytes": weights.stat().st_size,
        "training": {"command": "ardir " + shlex.join(training_command(args)).replace(str(ROOT) + "/", ""),
                     "method": args.method, "epochs": args.epochs,
                     "pgd_steps": args.steps if args.method == "at" else 0, "train_images": 59000,
                     "validation": "1,000 training images held out (seed 0); best.pt by "
                                   f"{'PGD-10' if args.method == 'at' else 'natural'} accuracy on them",
                     "best": {"epoch": best_state.get("epoch"), "val_pgd": best_state.get("val_pgd"),
                              "val_natural": best_state.get("val_natural")},
                     "seconds": train_seconds, "commit": args.training_commit or git_commit()},
        "made_by": f"python {shlex.join(['benchmarks/train_teacher.py'] + list(sys.argv[1:] if argv is None else argv))}",
        "commit": git_commit(), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.system()}",
    }
    path = out / f"{args.name}.json"
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", path)  # usable now; the accuracies follow
    print(f"shipped {manifest['name']}: {weights} ({manifest['bytes']} bytes, sha256 {manifest['sha256'][:12]}); "
          "evaluating", flush=True)
    evaluation = evaluate(teacher, args, manifest["sha256"])  # its AutoAttack seconds count an interrupted run's too (resumed)
    manifest["evaluation"] = {**evaluation, "seconds_total": round(sum(
        s for s in evaluation["seconds"].values() if s is not None), 1)}
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", path)
    print(json.dumps(manifest["evaluation"]["accuracy"], indent=2))


if __name__ == "__main__":
    main()
