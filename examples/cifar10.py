"""The ARDIR paper pipeline on CIFAR-10, with the public API, in one script.

1. a robust teacher: ``--teacher PATH`` (an ardir checkpoint), ``--teacher robustbench:Zhang2019Theoretically``
   (the TRADES WRN-34-10 that ARD and RSLAD distil from), or, with no ``--teacher``, a WRN-34-10 trained here
   with TRADES (beta = 6, 100 epochs, lr x0.1 at 75 and 90);
2. ARDIR distillation into a CIFAR ResNet-18 (200 epochs, lr 0.1 x0.1 at 100 and 150, PGD-10 eps 8/255 step 2/255,
   SGD momentum 0.9, weight decay 2e-4, batch 128), keeping the epoch with the best PGD accuracy on 1,000
   validation images held out of the training set;
3. evaluation of teacher and student on the 10,000 test images (natural, FGSM, PGD-20, CW-30, AutoAttack at
   eps = 8/255) and one table.

The defaults are that protocol (days on one GPU). A dry run on CPU (a minute or two), as CI runs it::

    python examples/cifar10.py --fake-data --epochs 1 --limit-batches 2

``--fake-data`` also shrinks what would take hours on a CPU, each printed and each overridable by its flag:
teacher WRN-16-4 instead of WRN-34-10, batch 16, PGD-2 during training and validation, 32 validation and test
images, attacks natural/FGSM/PGD-5 without the evaluation's sanity checks. The student is still a ResNet-18.

    python examples/cifar10.py --teacher robustbench:Zhang2019Theoretically            # the paper's setting
    python examples/cifar10.py --teacher runs/cifar10/teacher.pt --layers block3:layer4  # reuse a teacher
    torchrun --nproc_per_node=4 examples/cifar10.py --teacher robustbench:Zhang2019Theoretically  # 4 GPUs

Under ``torchrun`` every process trains on its share of each batch of 128 (the same global batch and learning
rate) and attacks its share of the test batches; rank 0 alone prints and writes files.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import ardir
from ardir import data, models
from ardir.cli import attack_name, count, device_name, whole
from ardir.hooks import check_layers
from ardir.teachers import load_teacher

PAPER = dict(teacher_model="wrn34_10", batch_size=128, steps=10, val_size=1000, n_examples=None,
             attacks=["natural", "fgsm", "pgd20", "cw30", "autoattack"], val_attack_steps=10, checks=True)
DRY_RUN = dict(teacher_model="wrn16_4", batch_size=16, steps=2, val_size=32, n_examples=32,
               attacks=["natural", "fgsm", "pgd5"], val_attack_steps=2, checks=False)
EPS, STEP = 8 / 255, 2 / 255


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked before anything trains (a typo must not cost a teacher's training)."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="an existing copy of CIFAR-10 (else torchvision downloads)")
    parser.add_argument("--fake-data", action="store_true", help="random images of CIFAR-10's shape: a dry run")
    parser.add_argument("--teacher", default=None, help="PATH | model name | robustbench:NAME; default: train one "
                        "with TRADES")
    parser.add_argument("--teacher-model", default=None, help="architecture of the teacher trained here, or of a "
                        "plain state_dict --teacher (default wrn34_10)")
    parser.add_argument("--robustbench-dir", default=None, help="RobustBench's model directory (default ./models)")
    parser.add_argument("--epochs", type=whole, default=None, help="epochs of every stage (default: each method's "
                        "paper protocol, 100 TRADES, 200 ARDIR)")
    parser.add_argument("--teacher-epochs", type=whole, default=None, help="TRADES epochs (default: --epochs or 100)")
    parser.add_argument("--limit-batches", type=count, default=None, help="batches per epoch (dry runs)")
    parser.add_argument("--batch-size", type=count, default=None)
    parser.add_argument("--steps", type=whole, default=None, help="PGD steps of the training attacks (10)")
    parser.add_argument("--val-size", type=whole, default=None, help="validation images held out of the train set")
    parser.add_argument("--n-examples", type=count, default=None, help="test images evaluated (default: all)")
    parser.add_argument("--attacks", nargs="+", type=attack_name, default=None, help="ardir.evaluate attack names")
    parser.add_argument("--checks", action=argparse.BooleanOptionalAction, default=None,
                        help="run ardir.evaluate's sanity checks (default: yes, except with --fake-data)")
    parser.add_argument("--layers", nargs="+", default=["features"],
                        help="ARDIR layers: a name in both models or teacher_layer:student_layer")
    parser.add_argument("--w-ir", type=float, default=1.0, help="weight of the internal-representation term")
    parser.add_argument("--output-dir", default="runs/cifar10", help="teacher.pt, student.pt, results.md")
    parser.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, cuda:1, ... (auto: CUDA when "
                        "present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    defaults = DRY_RUN if args.fake_data else PAPER
    chosen = []
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
            chosen.append(f"{key}={value}")
    if args.fake_data and os.environ.get("RANK", "0") == "0":
        print("dry run (--fake-data): " + ", ".join(chosen))
    return args


def best_checkpoint(history, key="val_pgd"):
    """Epoch record with the best validation PGD accuracy."""
    return max(history, key=lambda r: r.get(key, -1.0)) if history else None


def keep_best(state: dict):
    """A Trainer callback keeping a copy of the student's weights at its best validation PGD accuracy."""
    def callback(trainer, record):
        if record.get("val_pgd", -1.0) > state.get("val_pgd", -1.0):
            state.update(val_pgd=record["val_pgd"], epoch=record["epoch"],
                         weights={k: v.detach().clone() for k, v in trainer.student.state_dict().items()})
    return callback


def main(argv=None):
    args = parse_args(argv)
    # `torchrun --nproc_per_node=N examples/cifar10.py`: each process trains on its shard of every batch and
    # attacks its share of the test batches; rank 0 alone prints and writes files
    distributed = ardir.distributed
    device, joined = distributed.join(torch.device(args.device))
    main_process = distributed.is_main_process()
    say = print if main_process else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    loaders = data.get_loaders("cifar10", data_dir=args.data_dir, batch_size=args.batch_size,
                               val_size=args.val_size, fake_data=args.fake_data, seed=args.seed)
    attack = dict(eps=EPS, step_size=STEP, steps=args.steps)
    common = dict(val_loader=loaders.val, val_attack_steps=args.val_attack_steps,
                  limit_batches=args.limit_batches, progress=progress)
    start = time.time()
    say(f"CIFAR-10: {len(loaders.train.dataset)} training, {len(loaders.val.dataset) if loaders.val else 0} "
          f"validation images; device {device}")

    # 1. The teacher: loaded, or trained with TRADES (the best validation-PGD epoch is kept).
    student = models.create("resnet18", num_classes=loaders.num_classes).to(device)
    layers = [tuple(s.split(":", 1)) if ":" in s else s for s in args.layers]
    if args.teacher:
        teacher = load_teacher(args.teacher, loaders.num_classes, loaders.in_chans, device,
                               model_name=args.teacher_model, model_dir=args.robustbench_dir)
        say(f"teacher: {args.teacher}")
    else:
        teacher = models.create(args.teacher_model, num_classes=loaders.num_classes).to(device)
    pairs = [(spec, spec) if isinstance(spec, str) else spec for spec in layers]
    check_layers(teacher, [t for t, _ in pairs], "--layers (teacher)")  # before the teacher's training
    check_layers(student, [s for _, s in pairs], "--layers (student)")
    if not args.teacher:
        best: dict = {}
        ardir.TRADESTrainer(teacher, loaders.train, epochs=args.teacher_epochs or args.epochs,
                            callbacks=[keep_best(best)], **common, **attack).fit()
        if "weights" in best:  # rank 0's callback; the ARDIR trainer below hands rank 0's teacher to every process
            teacher.load_state_dict(best["weights"])
        teacher.eval().requires_grad_(False)  # frozen from now on
        if main_process:
            torch.save({"format": "ardir-model", "config": {"method": "trades", "dataset": "cifar10"},
                        "model_info": {"name": args.teacher_model, "num_classes": loaders.num_classes, "in_chans": 3},
                        "model": teacher.state_dict()}, out / "teacher.pt")
        say(f"teacher: {args.teacher_model} trained with TRADES -> {out / 'teacher.pt'}")

    # 2. ARDIR: a ResNet-18 student matches the teacher's outputs and internal representations.
    best = {}
    ardir.Trainer(student, loaders.train, teacher=teacher, epochs=args.epochs, layers=layers, w_ir=args.w_ir,
                  callbacks=[keep_best(best)], **common, **attack).fit()
    if "weights" in best:  # rank 0's callback kept them; every process evaluates the same student
        student.load_state_dict(best["weights"])
        say(f"student: best validation PGD accuracy {best['val_pgd']:.2f}% at epoch {best['epoch']}")
    distributed.broadcast_module(student)
    if main_process:
        torch.save({"format": "ardir-model", "config": {"method": "ardir", "dataset": "cifar10"},
                    "model_info": {"name": "resnet18", "num_classes": loaders.num_classes, "in_chans": 3},
                    "model": student.state_dict()}, out / "student.pt")
    say(f"trained in {time.time() - start:.0f} s")
    start = time.time()

    # 3. Evaluation on the test set, one table (under torchrun each process attacks its share of the batches).
    rows = []
    for name, model in [("teacher", teacher), ("student (ResNet-18, ARDIR)", student)]:
        report = ardir.evaluate(model, loaders.test, eps=EPS, attacks=args.attacks, n_examples=args.n_examples,
                                progress=progress, dataset="cifar10", checks=args.checks)
        if main_process:
            report.save(out / ("teacher" if name == "teacher" else "student"))
        rows.append((name, report))
    if joined:
        distributed.cleanup()
    if not main_process:
        return None
    keys = list(rows[0][1].accuracy)
    table = ["| model | " + " | ".join(rows[0][1].names[k] for k in keys) + " | worst case |",
             "|:--|" + "--:|" * (len(keys) + 1)]
    for name, report in rows:
        table.append(f"| {name} | " + " | ".join(f"{report.accuracy[k]:.2f}" for k in keys)
                     + f" | {report.worst_case:.2f} |")
    text = (f"CIFAR-10, L-inf eps = 8/255, {rows[0][1].n_examples} test images"
            f"{' (FAKE DATA: a dry run, the numbers mean nothing)' if args.fake_data else ''}\n\n" + "\n".join(table))
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
    print(f"evaluated in {time.time() - start:.0f} s\n\n" + text)
    return rows


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError, OSError) as err:  # ardir's checks name the argument: one line, no traceback
        print(f"cifar10.py: error: {err}", file=sys.stderr)
        sys.exit(2)  # a usage error, as argparse exits
