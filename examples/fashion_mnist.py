"""Why distil: ARDIR from ardir's shipped robust teacher against plain adversarial training, on real Fashion-MNIST.

1. loads the shipped teacher ``fashion-mnist:cnn_xlarge-at`` (a 0.85 M-parameter CNN adversarially trained on
   all of Fashion-MNIST's training images; its hash is checked on load),
2. trains the small student ``cnn_small`` twice on the same 5,000 images, with the same epochs, lr and seed:
   distilled from the teacher with ARDIR, and alone with PGD adversarial training (AT),
3. evaluates both (natural, PGD-20, CW∞-30 at eps = 0.1) on the same test images and prints them side by side
   with the difference.

These are the settings of one seed of the benchmark suite (``benchmarks/reproduce.py fashion-mnist``), whose
table has three seeds and AutoAttack. Fashion-MNIST comes from ``--data-dir``, the Debian package
``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist), or torchvision's download.

    python examples/fashion_mnist.py                      # the README's quick start
    python examples/fashion_mnist.py --epochs 2 --test-size 200 --quiet   # a smoke run
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import ardir
from ardir import data
from ardir.cli import count

EPS = 0.1  # the usual L-inf radius for (Fashion-)MNIST
TEACHER = "fashion-mnist:cnn_xlarge-at"
ATTACKS = {"natural": "Natural", "pgd20": "PGD-20", "cw30": "CW∞-30"}


def epoch_line(name: str):
    """A callback printing one line per epoch, so that a run without a terminal (nohup, CI) is not silent."""
    def log(trainer, record):
        print(f"{name}: epoch {record['epoch']}/{trainer.epochs}  loss {record['loss']:.3f}  "
              f"{record['seconds']:.0f} s", flush=True)
    return log


def train_student(method: str, loaders, teacher, args) -> torch.nn.Module:
    torch.manual_seed(args.seed)  # both students start from the same weights
    student = ardir.models.create("cnn_small", num_classes=10, in_chans=1)
    ardir.Trainer(student, loaders.train, teacher=teacher, method=method, epochs=args.epochs, lr=0.05,
                  eps=EPS, step_size=EPS / 4, steps=10, progress=not args.quiet,  # step 2.5 eps / steps
                  callbacks=[epoch_line(method)] if args.quiet or not sys.stdout.isatty() else []).fit()
    return student


def side_by_side(reports) -> str:
    (name_a, a), (name_b, b) = reports
    lines = [f"| Attack (eps = {EPS}) | {name_a} | {name_b} | difference |", "|:--|--:|--:|--:|"]
    for attack, label in ATTACKS.items():
        lines.append(f"| {label} | {a.accuracy[attack]:.2f} | {b.accuracy[attack]:.2f} | "
                     f"{a.accuracy[attack] - b.accuracy[attack]:+.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="an existing copy of Fashion-MNIST")
    parser.add_argument("--train-size", type=count, default=5000, help="training images used (of 60,000)")
    parser.add_argument("--test-size", type=count, default=1000,
                        help="test images evaluated (a seeded random subset of the 10,000)")
    parser.add_argument("--epochs", type=count, default=10, help="epochs of each student")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars (one line per epoch instead)")
    args = parser.parse_args(argv)

    start = time.time()
    loaders = data.get_loaders("fashion-mnist", data_dir=args.data_dir, batch_size=128, val_size=0,
                               limit=args.train_size, seed=args.seed)
    teacher = ardir.teachers.load_teacher(TEACHER, num_classes=10, in_chans=1)
    students = [("ARDIR (distilled)", train_student("ardir", loaders, teacher, args)),
                ("AT (alone)", train_student("at", loaders, None, args))]
    reports = [(name, ardir.evaluate(model, loaders.test, eps=EPS, attacks=tuple(ATTACKS), subset="random",
                                     n_examples=args.test_size, seed=0, progress=not args.quiet, checks=False))
               for name, model in students]
    print(f"\ncnn_small on {args.train_size} Fashion-MNIST images, {args.epochs} epochs each; teacher {TEACHER}; "
          f"{reports[0][1].subset} test images; accuracy (%)\n")
    print(side_by_side(reports))
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError, OSError) as err:  # ardir's checks name the argument: one line, no traceback
        print(f"fashion_mnist.py: error: {err}", file=sys.stderr)
        sys.exit(2)  # a usage error, as argparse exits
