"""Images/s of a full robust-distillation training step: ardir's Trainer against a plain reference loop.

The reference loop (:func:`reference_steps`) is written the way ARD's and RSLAD's public ``main`` scripts are:
fp32, NCHW, PGD by ``torch.autograd.grad`` with respect to the input, the teacher in eval mode under ``no_grad``,
a ``DataLoader`` over a dataset of PIL images with torchvision transforms (RandomCrop + flip + ToTensor); for ARDIR
the same loop plus forward hooks for the features (registered once). Both sides train copies of the same models, on
the same synthetic images, batch and attack; the runs alternate (reference, ardir, reference, ...) and the median of
``--repeats`` timed runs of ``--steps`` steps each is reported, after one untimed warm-up run per side.

Also printed: FLOPs per image (``torch.utils.flop_counter`` on one step), achieved FLOP/s, the fraction of the
device's matmul peak measured in the same run, peak memory, and the seconds a 50,000-image epoch takes at that
rate. A Markdown row goes to ``--results`` (default ``benchmarks/results/throughput.md``). The last line of output is
``speedup_vs_reference=<x.xx>``.

    python benchmarks/throughput.py                                  # ARDIR, cnn_large -> cnn_small, 28x28, CPU
    python benchmarks/throughput.py --pair paper --device cuda --batch-size 512 --precision bf16
    python benchmarks/throughput.py --pair paper --device cuda --epochs-check 3 --epoch-images 10000

``--epochs-check N`` instead trains N full epochs of ``--epoch-images`` images with the trainer (no reference)
and prints seconds and peak memory per epoch (the memory-growth check).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ardir  # noqa: E402
from ardir import models  # noqa: E402
from ardir.attacks import _ATTACK_MODULES, compile_for_attack  # noqa: E402
from ardir import cli  # noqa: E402
from ardir.gpu_data import GPULoader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {  # name: (teacher, student, channels, size, crop padding, hflip, eps)
    "fmnist": ("cnn_large", "cnn_small", 1, 28, 2, True, 0.1),
    "paper": ("wrn34_10", "resnet18", 3, 32, 4, True, 8 / 255),
}


# ------------------------------------------------------------------------------------------ the reference loop
class PILDataset(Dataset):
    """A torchvision-style dataset: uint8 HWC arrays turned into PIL images, then the transform (as CIFAR10)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.data, self.targets, self.transform = images, labels, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        img = self.data[index]
        img = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        return self.transform(img), int(self.targets[index])


def reference_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, size: int, padding: int,
                     hflip: bool, workers: int, pin: bool) -> DataLoader:
    import torchvision.transforms as T
    ops = [T.RandomCrop(size, padding=padding)] if padding else []
    ops += [T.RandomHorizontalFlip()] if hflip else []
    dataset = PILDataset(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), T.Compose(ops + [T.ToTensor()]))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=pin,
                      drop_last=True, persistent_workers=workers > 0)


def reference_steps(student, teacher, adapter, optimizer, loader, steps, device, method, eps, step_size,
                    attack_steps, t_layer="features", s_layer="features", natural=None):
    """``steps`` training steps the way the authors' scripts write them (ARD / RSLAD / AdaAD / MTARD main scripts;
    ARDIR = ARD + hooks).

    ARD and ARDIR: PGD on CE (summed), uniform start, the student in train mode during the attack; KL to the
    teacher's natural-image output (ARD: tau 30, KLDivLoss mean; ARDIR: tau 1, batchmean) plus, for ARDIR, the
    normalised-MSE between the student's adapted features on x' and the teacher's on x.
    RSLAD: PGD on KL to the teacher, start x + 0.001 N(0, I), student in eval mode; 5/6 KL(x') + 1/6 KL(x).
    AdaAD: PGD on KL(p(T(x')) || p(S(x'))) with the teacher queried at every step, start x + 0.001 N(0, I), both in
    eval mode; KLDivLoss (mean) of the student's x' output to the teacher's x' output.
    MTARD: PGD on CE, start x + 0.001 N(0, I), student in eval mode; w_adv KL(T_adv(x') || S(x')) + w_nat
    KL(T_nat(x) || S(x)) (KLDivLoss mean) with the weights updated from Python floats every step (``.item()``).
    """
    weights = {"nat": 0.5, "l0": None}
    feats = {}
    handles = []
    if method == "ardir":
        handles.append(dict(teacher.named_modules())[t_layer].register_forward_hook(
            lambda m, i, o: feats.__setitem__("t", o)))
        handles.append(dict(student.named_modules())[s_layer].register_forward_hook(
            lambda m, i, o: feats.__setitem__("s", o)))
    teacher.eval()
    done = 0
    for inputs, targets in loader:
        if done == steps:
            break
        inputs, targets = inputs.to(device), targets.to(device)
        with torch.no_grad():
            t_logits = teacher(inputs) if method != "adaad" else None  # AdaAD's teacher sees x' only
            if method == "mtard":
                nat_probs = F.softmax(natural(inputs), dim=1)
        t_feat = feats.get("t")
        # ---- inner maximisation
        if method in ("rslad", "adaad", "mtard"):
            student.eval()
            t_probs = F.softmax(t_logits, dim=1) if method == "rslad" else None
            x = inputs.detach() + 0.001 * torch.randn(inputs.shape, device=device)
        else:
            student.train()
            x = inputs.detach() + torch.zeros_like(inputs).uniform_(-eps, eps)
        for _ in range(attack_steps):
            x.requires_grad_()
            with torch.enable_grad():
                if method == "rslad":
                    loss = F.kl_div(F.log_softmax(student(x), dim=1), t_probs, reduction="sum")
                elif method == "adaad":
                    loss = F.kl_div(F.log_softmax(student(x), dim=1), F.softmax(teacher(x), dim=1), reduction="sum")
                else:
                    loss = F.cross_entropy(student(x), targets, reduction="sum")
            grad = torch.autograd.grad(loss, [x])[0]
            x = x.detach() + step_size * torch.sign(grad.detach())
            x = torch.min(torch.max(x, inputs - eps), inputs + eps)
            x = torch.clamp(x, 0.0, 1.0)
        # ---- outer minimisation
        student.train()
        optimizer.zero_grad()
        s_adv = student(x)
        if method == "ard":
            loss = 30.0 * 30.0 * nn.KLDivLoss()(F.log_softmax(s_adv / 30.0, dim=1), F.softmax(t_logits / 30.0, dim=1))
        elif method == "adaad":
            with torch.no_grad():
                t_adv = teacher(x)
            loss = nn.KLDivLoss()(F.log_softmax(s_adv, dim=1), F.softmax(t_adv, dim=1))
        elif method == "mtard":
            with torch.no_grad():
                t_adv = teacher(x)
            s_nat = student(inputs)
            kl_adv = nn.KLDivLoss()(F.log_softmax(s_adv, dim=1), F.softmax(t_adv, dim=1))
            kl_nat = nn.KLDivLoss()(F.log_softmax(s_nat, dim=1), nat_probs)
            if weights["l0"] is None:
                weights["l0"] = (kl_nat.item(), kl_adv.item())
            r_nat, r_adv = kl_nat.item() / weights["l0"][0], kl_adv.item() / weights["l0"][1]
            weights["nat"] -= 0.025 * (weights["nat"] - r_nat / (r_nat + r_adv))
            loss = (1 - weights["nat"]) * kl_adv + weights["nat"] * kl_nat
        elif method == "rslad":
            s_nat = student(inputs)
            kl = nn.KLDivLoss(reduction="none")
            loss = (5 / 6 * kl(F.log_softmax(s_adv, dim=1), t_probs).sum(1).mean() / t_probs.shape[1]
                    + 1 / 6 * kl(F.log_softmax(s_nat, dim=1), t_probs).sum(1).mean() / t_probs.shape[1])
        else:  # ardir
            kl = F.kl_div(F.log_softmax(s_adv, dim=1), F.softmax(t_logits, dim=1), reduction="batchmean")
            s_feat = adapter(feats["s"].flatten(1))
            ir = (F.normalize(s_feat, dim=1) - F.normalize(t_feat.flatten(1), dim=1)).pow(2).sum(1).mean()
            loss = kl + ir
        loss.backward()
        optimizer.step()
        done += 1
    for h in handles:
        h.remove()
    return done


# ----------------------------------------------------------------------------------------------- utilities
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype, n=None, repeats=5) -> float:
    """Measured FLOP/s of a large square matmul (the best of ``repeats``).

    On CUDA, fp32 is timed at the precision the fp32 convolutions run at: cuDNN uses TF32 by default
    (``torch.backends.cudnn.allow_tf32``) while fp32 matmuls do not, so an IEEE-fp32 matmul peak would be several
    times below what the convolutions reach and the fraction of peak would exceed 100 %.
    """
    if device.type == "cuda" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")  # TF32
        try:
            return _timed_matmul(device, dtype, n, repeats)
        finally:
            torch.set_float32_matmul_precision(previous)
    return _timed_matmul(device, dtype, n, repeats)


def _timed_matmul(device, dtype, n, repeats) -> float:
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 2
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t0) / inner)
    return 2 * n ** 3 / min(times)


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - no git on the machine
        return "unknown"


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model or platform.processor()} ({torch.get_num_threads()} threads)"


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def build_models(pair, device, seed):
    t_name, s_name, chans, *_ = PAIRS[pair]
    torch.manual_seed(seed)
    teacher = models.create(t_name, num_classes=10, in_chans=chans).to(device).eval().requires_grad_(False)
    student = models.create(s_name, num_classes=10, in_chans=chans).to(device)
    return teacher, student


def natural_teacher(args, device):
    """MTARD's second teacher: the teacher's architecture, other random weights."""
    torch.manual_seed(args.seed + 1)
    t_name, _, chans, *_ = PAIRS[args.pair]
    return models.create(t_name, num_classes=10, in_chans=chans).to(device).eval().requires_grad_(False)


def synthetic(pair, n, seed):
    _, _, chans, size, *_ = PAIRS[pair]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, chans, size, size), dtype=torch.uint8, generator=g), \
        torch.randint(0, 10, (n,), generator=g)


def make_trainer(args, device, teacher, student, loader, epochs=1000, **extra):
    eps = PAIRS[args.pair][6]
    kwargs = dict(eps=eps, step_size=args.step_size or eps / 4, steps=10)
    trainer = ardir.Trainer(student, loader, teacher=teacher, method=args.method, epochs=epochs, lr=0.01,
                            progress=False, precision=args.precision, channels_last=args.channels_last,
                            compile=args.compile, **kwargs, **extra)
    if args.compile_mode:  # a torch.compile mode for the attack's forward passes, measured before it is offered
        compile_for_attack(trainer.student, mode=args.compile_mode)
    return trainer


def ardir_loader(args, device, images, labels):
    _, _, _, size, pad, hflip, _ = PAIRS[args.pair]
    if args.loader == "gpu" or (args.loader == "auto"):
        return GPULoader(images, labels, args.batch_size, device=device, crop_padding=pad, hflip=hflip,
                         seed=args.seed)
    dataset = ardir.data.InMemoryImageDataset(images, labels, pad, hflip, augment=True)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
                      pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks break ``autograd.grad`` on a leaf input
    (the attack's); every FLOP is counted under "Global"."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def step_flops(trainer, loader) -> int:
    """FLOPs of one full training step (attack + teacher + student forward/backward), counted."""
    images, labels = next(iter(loader))
    images, labels = images.to(trainer.device), labels.to(trainer.device)
    if images.dim() == 4 and trainer.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    compiled = _ATTACK_MODULES.pop(trainer.student, None)  # count on the eager module (same FLOPs)
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    try:
        with counter:
            with trainer.autocast():
                loss = sum(trainer.method(trainer.student, images, labels, trainer.teacher).values())
            loss.backward()
    finally:
        if compiled is not None:
            _ATTACK_MODULES[trainer.student] = compiled
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------- main modes
def run_throughput(args, device) -> Dict:
    t_name, s_name, chans, size, pad, hflip, eps = PAIRS[args.pair]
    step_size = args.step_size or eps / 4
    images, labels = synthetic(args.pair, args.batch_size * (args.steps + 1), args.seed)
    teacher, student = build_models(args.pair, device, args.seed)
    ref_teacher, ref_student = copy.deepcopy(teacher), copy.deepcopy(student)
    extra = {"natural_teacher": natural_teacher(args, device)} if args.method == "mtard" else {}
    ref_natural = copy.deepcopy(extra["natural_teacher"]) if extra else None

    loader = ardir_loader(args, device, images, labels)
    trainer = make_trainer(args, device, teacher, student, loader, limit_batches=args.steps, **extra)
    adapter = copy.deepcopy(trainer.method.adapters[0].map) if args.method == "ardir" else nn.Identity()
    ref_params = list(ref_student.parameters()) + list(adapter.parameters())
    ref_opt = torch.optim.SGD(ref_params, lr=0.01, momentum=0.9, weight_decay=2e-4)
    workers = args.ref_workers if args.ref_workers is not None else (2 if device.type == "cuda" else 0)
    ref_loader = reference_loader(images, labels, args.batch_size, size, pad, hflip, workers,
                                  pin=False)

    flops = step_flops(trainer, loader) / args.batch_size
    peak_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    peak = matmul_peak(device, peak_dtype)
    peak_fp32 = peak if peak_dtype == torch.float32 else matmul_peak(device, torch.float32)
    fp32_name = "fp32 as TF32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"
    peak_name = fp32_name if peak_dtype == torch.float32 else args.precision
    print(f"device: {device_name(device)}; matmul peak {peak / 1e12:.2f} TFLOP/s ({peak_name})"
          + (f", {peak_fp32 / 1e12:.2f} TFLOP/s ({fp32_name})" if peak_dtype != torch.float32 else ""), flush=True)
    print(f"{args.method}: {t_name} -> {s_name}, batch {args.batch_size}, {args.steps} steps x {args.repeats} "
          f"repeats, PGD-10; {flops / 1e9:.3f} GFLOP/image per step (counted)", flush=True)

    def run_ref():
        return reference_steps(ref_student, ref_teacher, adapter, ref_opt, ref_loader, args.steps, device,
                               args.method, eps, step_size, 10, natural=ref_natural)

    def run_ardir():
        trainer.train_epoch()
        return args.steps

    times = {"reference": [], "ardir": []}
    mem = {"reference": 0.0, "ardir": 0.0}
    for rep in range(args.repeats + 1):  # repeat 0: warm-up (compilation, allocator, workers)
        for name, fn in (("reference", run_ref), ("ardir", run_ardir)):
            if args.no_reference and name == "reference":
                continue
            reset_memory(device)
            sync(device)
            t0 = time.perf_counter()
            done = fn()
            sync(device)
            dt = time.perf_counter() - t0
            mem[name] = max(mem[name], peak_memory_mb(device))
            rate = done * args.batch_size / dt
            if rep > 0:
                times[name].append(rate)
            print(f"  {'warm-up' if rep == 0 else f'repeat {rep}'} {name:9s} {rate:9.4g} images/s", flush=True)
    ard = statistics.median(times["ardir"])
    ref = statistics.median(times["reference"]) if times["reference"] else float("nan")
    achieved = ard * flops
    result = dict(device=device_name(device), method=args.method, pair=f"{t_name} -> {s_name}",
                  batch=args.batch_size, precision=args.precision, channels_last=trainer.channels_last,
                  compile=args.compile_mode or args.compile, loader=type(loader).__name__,
                  reference_images_per_s=ref,
                  ardir_images_per_s=ard, speedup=ard / ref if ref == ref else float("nan"),
                  gflop_per_image=flops / 1e9, achieved_tflops=achieved / 1e12,
                  reference_tflops=ref * flops / 1e12, peak_tflops=peak / 1e12,
                  fraction_of_peak=achieved / peak, reference_fraction_of_fp32_peak=ref * flops / peak_fp32,
                  peak_memory_mb_ardir=mem["ardir"], peak_memory_mb_reference=mem["reference"],
                  epoch_seconds_50k=50000 / ard, commit=commit(),
                  command="python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]))
    print(f"reference: {ref:.4g} images/s ({result['reference_tflops']:.3f} TFLOP/s, "
          f"{100 * result['reference_fraction_of_fp32_peak']:.1f} % of {fp32_name} matmul peak), "
          f"peak memory {mem['reference']:.0f} MiB")
    print(f"ardir:     {ard:.4g} images/s ({achieved / 1e12:.3f} TFLOP/s, {100 * result['fraction_of_peak']:.1f} % of "
          f"{peak_name} matmul peak), peak memory {mem['ardir']:.0f} MiB, "
          f"{result['epoch_seconds_50k']:.4g} s per 50,000-image epoch at this rate")
    return result


HEADER = ("| date (UTC) | device | method | teacher -> student | batch | precision | channels_last | compile | loader "
          "| reference img/s | ardir img/s | speedup | GFLOP/img | ardir TFLOP/s | % of matmul peak "
          "| peak mem ardir / ref (MiB) | s per 50k epoch | commit | command |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def write_row(path: Path, r: Dict) -> None:
    row = (f"| {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} | {r['device']} | {r['method']} "
           f"| {r['pair']} | {r['batch']} | {r['precision']} | {r['channels_last']} | {r['compile']} | {r['loader']} "
           f"| {r['reference_images_per_s']:.4g} | {r['ardir_images_per_s']:.4g} | {r['speedup']:.2f} "
           f"| {r['gflop_per_image']:.4g} | {r['achieved_tflops']:.3g} | {100 * r['fraction_of_peak']:.1f} "
           f"| {r['peak_memory_mb_ardir']:.0f} / {r['peak_memory_mb_reference']:.0f} "
           f"| {r['epoch_seconds_50k']:.4g} | {r['commit']} | `{r['command']}` |\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    with open(path, "a") as f:
        if not text.strip():
            f.write("# Throughput: ardir's Trainer vs the plain reference loop\n\n"
                    "Written by `benchmarks/throughput.py` (one row per run). Images/s of full training steps "
                    "(PGD-10 attack, teacher, student forward/backward, optimiser step, data loading), median of "
                    "the repeats, reference and ardir alternated in one run on the same models, batch and synthetic "
                    "data. CPU rows: process peak RSS for both sides (not separable).\n\n" + HEADER)
        elif not text.rstrip("\n").splitlines()[-1].startswith("|"):  # prose after the table: start a new one
            f.write(("" if text.endswith("\n") else "\n") + "\n" + HEADER)
        f.write(row)


def run_epochs(args, device) -> Dict:
    """Train ``--epochs-check`` full epochs; seconds and peak memory per epoch (memory growth)."""
    images, labels = synthetic(args.pair, args.epoch_images, args.seed)
    teacher, student = build_models(args.pair, device, args.seed)
    loader = ardir_loader(args, device, images, labels)
    extra = {"natural_teacher": natural_teacher(args, device)} if args.method == "mtard" else {}
    trainer = make_trainer(args, device, teacher, student, loader, epochs=args.epochs_check, **extra)
    records = []
    for epoch in range(args.epochs_check):
        reset_memory(device)
        record = trainer.train_epoch()
        sync(device)
        mem = record.get("peak_memory_mb", peak_memory_mb(device))
        records.append(dict(epoch=epoch + 1, seconds=record["seconds"], images_per_s=record["images_per_s"],
                            peak_memory_mb=mem))
        print(f"  epoch {epoch + 1}: {record['seconds']:.1f} s, {record['images_per_s']:.0f} images/s, "
              f"peak memory {mem:.0f} MiB, loss {record['loss']:.4f}", flush=True)
    first, last = records[0]["peak_memory_mb"], records[-1]["peak_memory_mb"]
    growth = (last - first) / max(first, 1e-9)
    print(f"peak memory epoch 1 -> {len(records)}: {first:.0f} -> {last:.0f} MiB ({100 * growth:+.2f} %); "
          f"{'OK' if abs(growth) <= 0.05 else 'FAIL'} (limit 5 %)")
    print(f"seconds per {args.epoch_images}-image epoch (after epoch 1): "
          f"{statistics.median([r['seconds'] for r in records[1:]] or [records[0]['seconds']]):.1f}")
    return dict(records=records, memory_growth=growth, device=device_name(device), precision=args.precision,
                batch=args.batch_size, pair=args.pair, compile=args.compile)


def _true_or_false(text: str) -> bool:
    """An argparse type: true/false (also 1/0, yes/no)."""
    word = text.lower()
    if word in ("1", "true", "yes"):
        return True
    if word in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="ardir", choices=["ardir", "ard", "rslad", "adaad", "mtard"])
    parser.add_argument("--pair", default="fmnist", choices=sorted(PAIRS),
                        help="fmnist: cnn_large -> cnn_small on 1x28x28; paper: wrn34_10 -> resnet18 on 3x32x32")
    parser.add_argument("--device", type=cli.device_name, default="auto",
                        help="cpu, cuda, cuda:1, ... (auto: CUDA when present)")
    parser.add_argument("--batch-size", type=cli.count, default=128)
    parser.add_argument("--steps", type=cli.count, default=3, help="training steps per timed run")
    parser.add_argument("--repeats", type=cli.count, default=3, help="timed runs per side (median), after a warm-up")
    parser.add_argument("--step-size", type=float, default=None, help="PGD step (default eps/4)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", default=None, type=_true_or_false,
                        help="true/false; default: the trainer's (True on CUDA)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune",
                                                                 "max-autotune-no-cudagraphs"],
                        help="torch.compile mode of the attack's forward passes (implies --compile): "
                             "reduce-overhead adds CUDA graphs, max-autotune searches kernels")
    parser.add_argument("--loader", default="auto", choices=["auto", "gpu", "dataloader"],
                        help="ardir's loader: device-resident GPULoader (auto) or a DataLoader")
    parser.add_argument("--workers", type=cli.whole, default=0, help="ardir DataLoader workers (--loader dataloader)")
    parser.add_argument("--ref-workers", type=cli.whole, default=None,
                        help="reference DataLoader workers (default 2 on CUDA as ARD's script, 0 on CPU)")
    parser.add_argument("--threads", type=cli.count, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true", help="time ardir only (no speedup)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "throughput.md"),
                        help="Markdown file the row is appended to ('' for none)")
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    parser.add_argument("--epochs-check", type=cli.whole, default=0,
                        help="train this many full epochs instead (seconds and peak memory per epoch)")
    parser.add_argument("--epoch-images", type=cli.count, default=50000)
    args = parser.parse_args(argv)
    if args.step_size is not None and not 0 < args.step_size < float("inf"):
        parser.error(f"argument --step-size: {args.step_size} must be a positive number")
    if args.epochs_check and args.epoch_images < args.batch_size:
        parser.error(f"--epoch-images {args.epoch_images} is smaller than --batch-size {args.batch_size}: an epoch "
                     "would have no full batch")
    args.compile = args.compile or args.compile_mode is not None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.epochs_check:
        result = run_epochs(args, device)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    result = run_throughput(args, device)
    if args.results:
        write_row(Path(args.results), result)
        print(f"row appended to {args.results}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"speedup_vs_reference={result['speedup']:.2f}")


if __name__ == "__main__":
    main()
