"""A small ARDIR distillation on real Fashion-MNIST, on a CPU, in a few minutes.

1. trains a robust teacher (``cnn_large``) with PGD adversarial training,
2. distils it into a smaller student (``cnn_small``) with ARDIR,
3. evaluates both (natural, FGSM, PGD-20, CW-30 at eps = 0.1) and prints the table.

Fashion-MNIST comes from ``--data-dir``, the Debian package ``dataset-fashion-mnist``
(/usr/share/datasets/fashion-mnist), or torchvision's download.

    python examples/fashion_mnist.py                       # the README's quick start
    python examples/fashion_mnist.py --train-size 60000 --epochs 30 --teacher-epochs 30
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="an existing copy of Fashion-MNIST")
    parser.add_argument("--train-size", type=count, default=6000, help="training images used (of 60,000)")
    parser.add_argument("--test-size", type=count, default=1000, help="test images evaluated (of 10,000)")
    parser.add_argument("--teacher-epochs", type=count, default=4)
    parser.add_argument("--epochs", type=count, default=5, help="student (ARDIR) epochs")
    parser.add_argument("--batch-size", type=count, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    loaders = data.get_loaders("fashion-mnist", data_dir=args.data_dir, batch_size=args.batch_size,
                               val_size=0, limit=args.train_size, seed=args.seed)
    attack = dict(eps=EPS, step_size=EPS / 4, steps=10)  # step 2.5 eps / steps, Madry's rule
    progress = not args.quiet
    start = time.time()

    teacher = ardir.models.create("cnn_large", num_classes=10, in_chans=1)
    ardir.ATTrainer(teacher, loaders.train, epochs=args.teacher_epochs, lr=0.05, progress=progress,
                    **attack).fit()
    teacher.eval().requires_grad_(False)  # from here on a frozen label source

    student = ardir.models.create("cnn_small", num_classes=10, in_chans=1)
    trainer = ardir.Trainer(student, loaders.train, teacher=teacher, epochs=args.epochs, lr=0.05,
                            progress=progress, **attack)
    trainer.fit()
    print(f"trained in {time.time() - start:.0f} s")

    for name, model in [("teacher (cnn_large, AT)", teacher), ("student (cnn_small, ARDIR)", student)]:
        report = ardir.evaluate(model, loaders.test, eps=EPS, attacks=("natural", "fgsm", "pgd20", "cw30"),
                                n_examples=args.test_size, progress=progress)
        print(f"\n### {name}\n")
        print(report.to_markdown())


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError, OSError) as err:  # ardir's checks name the argument: one line, no traceback
        sys.exit(f"fashion_mnist.py: error: {err}")
