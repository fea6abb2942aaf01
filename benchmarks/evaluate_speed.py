"""Seconds of AutoAttack (standard version) per component: ardir's engine against the official code.

The same model and points are attacked by both engines in one run, alternated per batch and component (ardir
first on even steps, the official code first on odd ones), so a busy machine slows both alike. Each engine
keeps its own mask of points still robust and attacks only those, as AutoAttack does. Printed and written as
Markdown rows to ``--results`` (default ``benchmarks/results/evaluate_speed.md``): seconds per component, the
robust accuracy of each engine, and the number of samples whose final verdict differs; it also prints how many
images the ardir engine passed through the model per component (forward passes, and those with a gradient),
and the floor those calls set: each model call the ardir engine made priced at what a call of its size and kind
costs the model alone (a forward-only pass, or a forward with the input gradient of the cross-entropy), timed in
the same run at a grid of batch sizes and interpolated, so ``ardir s / floor s`` is what the engine adds beyond
the model calls the official settings prescribe. The file's (and the output's) last line is
``autoattack_speedup_vs_official=<x.xx>`` (official seconds / ardir seconds, all components).

    python benchmarks/evaluate_speed.py --checkpoint /tmp/at_small/last.pt --n-examples 1000 --threads 1
    python benchmarks/evaluate_speed.py --checkpoint benchmarks/runs/fashion-mnist/cnn_small__at__seed0.pt \
        --model cnn_small --threads 1        # a suite row's student (its weights-only file)
    python benchmarks/evaluate_speed.py --checkpoint benchmarks/runs/fashion-mnist-l2/cnn_small__at__seed0.pt \
        --model cnn_small --norm l2 --threads 1     # under L2 (eps 1.5, the fashion-mnist-l2 suite's)

The points: a seeded random subset of the dataset's test split (seed 0, sorted, as ``evaluate(...,
subset="random")``), Fashion-MNIST by default.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ardir import autoattack as aa, cli  # noqa: E402
from ardir.attacks import model_mode  # noqa: E402
from throughput import commit, device_name, matmul_peak, sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("| date (UTC) | device | threads | n | batch | norm, eps | engine | " + " | ".join(f"{c} s" for c in aa.STANDARD)
          + " | total s | pass floor s | robust acc % | verdicts differing | commit | command |\n"
          + "|" + "---|" * (13 + len(aa.STANDARD)) + "\n")
LAST = "autoattack_speedup_vs_official="


def points(dataset: str, n: int, seed: int):
    """A seeded random subset of the test split (sorted indices, as the evaluation suite draws it)."""
    from ardir.data import get_loaders
    test = get_loaders(dataset, val_size=0).test.dataset
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
    idx = sorted(order[:min(n, len(test))].tolist())
    items = [test[i] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def counts_of(calls: Dict[bool, Dict[int, int]]) -> List[int]:
    """``[images through the model, those with a gradient, forward-only calls, gradient calls]`` of a histogram
    ``calls[gradient][batch size] = number of calls``."""
    images = {kind: sum(batch * n for batch, n in calls[kind].items()) for kind in (False, True)}
    return [images[False] + images[True], images[True], sum(calls[False].values()), sum(calls[True].values())]


class Counted(torch.nn.Module):
    """``model``, counting its calls by kind and size: ``calls[gradient][batch size]``, ``gradient`` when autograd
    records the call (each followed by one backward pass in these attacks)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.calls: Dict[bool, collections.Counter] = {False: collections.Counter(), True: collections.Counter()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls[torch.is_grad_enabled() and x.requires_grad][len(x)] += 1
        return self.model(x)

    def counts(self) -> List[int]:
        """:func:`counts_of` its calls."""
        return counts_of(self.calls)


def pass_cost(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int, gradient: bool,
              repeats: int = 3) -> float:
    """Seconds per image of ``model`` (best of ``repeats`` sweeps over ``images`` in chunks of ``batch``): a
    forward-only pass under ``no_grad`` (Square's queries, the engines' tests), or with ``gradient`` a forward with
    the input gradient of the cross-entropy (an APGD or FAB step's model call)."""
    def forward_only(x, y):
        with torch.no_grad():
            model(x)

    def with_gradient(x, y):
        x = x.clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), x)

    fn = with_gradient if gradient else forward_only
    best = float("inf")
    with model_mode(model, "eval"):
        fn(images[:batch], labels[:batch])  # warm-up
        for _ in range(repeats):
            sync(images.device)
            t0 = time.perf_counter()
            for start in range(0, len(images), batch):
                fn(images[start:start + batch], labels[start:start + batch])
            sync(images.device)
            best = min(best, time.perf_counter() - t0)
    return best / len(images)


def forward_flops(model: torch.nn.Module, images: torch.Tensor) -> int:
    """FLOPs of one image's forward pass (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), model_mode(model, "eval"):
        model(images[:1])
    return counter.get_total_flops()


GRID = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 256)
"""Batch sizes at which a call's cost is timed (per-image costs fall steeply over the small sizes)."""


def call_seconds(cost: Callable[[int, bool], float], batch: int, gradient: bool, grid=GRID) -> float:
    """Seconds of one call of ``batch`` images: ``batch * cost(b, gradient)`` at the grid sizes, linear in between
    (beyond the grid: its last per-image cost)."""
    if batch >= grid[-1]:
        return batch * cost(grid[-1], gradient)
    above = next(b for b in grid if b >= batch)
    below = max([b for b in grid if b <= batch], default=above)
    if above == below:
        return batch * cost(batch, gradient)
    t_low, t_high = below * cost(below, gradient), above * cost(above, gradient)
    return t_low + (t_high - t_low) * (batch - below) / (above - below)


def floor_seconds(calls: Dict[str, Dict[bool, Dict[int, int]]], cost: Callable[[int, bool], float]
                  ) -> Dict[str, float]:
    """Per component: its model calls (``calls[component][gradient][batch] = number``) priced by
    :func:`call_seconds` (a gradient call includes its forward)."""
    return {name: sum(n * call_seconds(cost, batch, gradient) for gradient, sizes in kinds.items()
                      for batch, n in sizes.items())
            for name, kinds in calls.items()}


def run(model, images, labels, eps: float, batch: int, seed: int, classes: int = 10, norm: str = "linf") -> Dict:
    """Both engines, alternated per batch and component, in ``norm`` ("linf" or "l2"): seconds per component,
    final masks, and per component the ardir engine's model calls (``calls``, as :class:`Counted` keeps them) and
    what they passed through the model (``passes``, :func:`counts_of`)."""
    engines = ("ardir", "official")
    calls = {c: {False: collections.Counter(), True: collections.Counter()} for c in aa.STANDARD}
    seconds = {e: {c: 0.0 for c in aa.STANDARD} for e in engines}
    final = {e: [] for e in engines}
    step = 0
    with model_mode(model, "eval"):
        for start in range(0, len(images), batch):
            x, y = images[start:start + batch], labels[start:start + batch]
            with torch.no_grad():
                clean = model(x).argmax(1) == y
            robust = {e: clean.clone() for e in engines}
            fast = aa.fast_model(model)
            for name in aa.STANDARD:
                order = engines if step % 2 == 0 else engines[::-1]
                step += 1
                for engine in order:
                    todo = robust[engine].nonzero().flatten()
                    if not len(todo):
                        continue
                    t0 = time.perf_counter()
                    if engine == "ardir":
                        counted = Counted(fast)
                        attack = aa._ardir_component(name, counted, eps, classes, seed, norm)
                    else:
                        attack = aa._official_component(name, model, eps, classes, seed, [], norm)
                    with torch.enable_grad():
                        adv = attack(x[todo], y[todo])
                    seconds[engine][name] += time.perf_counter() - t0
                    if engine == "ardir":
                        for kind in (False, True):
                            calls[name][kind].update(counted.calls[kind])
                    robust[engine][todo] = aa.still_correct(model, x[todo], adv, y[todo], eps, norm)
                print(f"  batch {start // batch}: {name}: " + ", ".join(
                    f"{e} {seconds[e][name]:.1f}s robust {int(robust[e].sum())}" for e in engines), flush=True)
            for e in engines:
                final[e].append(robust[e])
    return {"seconds": seconds, "robust": {e: torch.cat(final[e]) for e in engines}, "calls": calls,
            "passes": {c: counts_of(kinds) for c, kinds in calls.items()}}


def write(path: Path, rows: List[str], speedup: float) -> None:
    """Append the rows to the table, keeping ``autoattack_speedup_vs_official=`` as the file's last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if path.exists() else []
    lines = [line for line in lines if not line.startswith(LAST)]
    while lines and not lines[-1].strip():
        lines.pop()
    header = HEADER.rstrip("\n").split("\n")
    if not lines:
        lines = ["# AutoAttack speed: ardir's engine vs the official code", "",
                 "Written by `benchmarks/evaluate_speed.py`: the same model and points, both engines alternated "
                 "in one run; seconds per component (standard version), robust accuracy, samples whose verdict "
                 "differs. The last line is the speed-up of the latest run.", "", *header]
    elif header[0] not in lines:  # a table of an older layout ends the file: these rows start a new one
        lines += ["", *header]
    path.write_text("\n".join(lines + rows + ["", f"{LAST}{speedup:.2f}"]) + "\n")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="an ardir run checkpoint (or any load_teacher spec)")
    parser.add_argument("--model", help="the architecture of a weights-only file (e.g. a suite row's .pt)")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--norm", choices=("linf", "l2"), default="linf", help="the threat model (default linf)")
    parser.add_argument("--eps", type=float, default=None,
                        help="the radius in --norm (default: the Fashion-MNIST suites', 0.1 under linf, 1.5 under l2)")
    parser.add_argument("--n-examples", type=cli.count, default=1000)
    parser.add_argument("--batch-size", type=cli.count, default=250)
    parser.add_argument("--threads", type=cli.count, default=None, help="torch CPU threads")
    parser.add_argument("--device", type=cli.device_name, default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="subset and attack seed")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "evaluate_speed.md"))
    args = parser.parse_args(argv)
    if args.eps is None:
        args.eps = {"linf": 0.1, "l2": 1.5}[args.norm]
    if not (args.eps > 0 and (args.norm == "l2" or args.eps <= 1)):
        parser.error(f"--eps {args.eps}: must be > 0" + (" and <= 1 under --norm linf" if args.norm == "linf" else ""))
    if args.threads:
        torch.set_num_threads(args.threads)
    from ardir.data import get_spec
    from ardir.teachers import load_teacher
    spec = get_spec(args.dataset)
    device = torch.device(args.device)
    model = load_teacher(args.checkpoint, num_classes=spec.num_classes, in_chans=spec.in_chans, device=device,
                         model_name=args.model)
    images, labels = points(args.dataset, args.n_examples, args.seed)
    images, labels = images.to(device), labels.to(device)
    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    result = run(model, images, labels, args.eps, args.batch_size, args.seed, spec.num_classes, args.norm)
    secs, robust = result["seconds"], result["robust"]
    differ = int((robust["ardir"] != robust["official"]).sum())
    total = {e: sum(secs[e].values()) for e in secs}
    speedup = total["official"] / total["ardir"]
    when = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
    fast, costs = aa.fast_model(model), {}

    def cost(batch: int, gradient: bool) -> float:
        if (batch, gradient) not in costs:
            costs[batch, gradient] = pass_cost(fast, images[:max(256, 4 * batch)], labels[:max(256, 4 * batch)], batch,
                                               gradient)
        return costs[batch, gradient]
    floor = floor_seconds(result["calls"], cost)
    floor_cell = {"ardir": f"{sum(floor.values()):.1f}", "official": "-"}  # the passes counted are ardir's
    rows = []
    for e in ("official", "ardir"):
        acc = 100.0 * robust[e].float().mean().item()
        rows.append(f"| {when} | {device_name(device)} | {torch.get_num_threads()} | {len(images)} | "
                    f"{args.batch_size} | {args.norm}, {args.eps:g} | {e} | " + " | ".join(f"{secs[e][c]:.1f}" for c in aa.STANDARD)
                    + f" | {total[e]:.1f} | {floor_cell[e]} | {acc:.2f} | {differ} | {commit()} | `{command}` |")
        print(rows[-1])
    work = ", ".join(f"{c} {f:,} ({g:,} with a gradient; {fc:,} + {gc:,} calls)"
                     for c, (f, g, fc, gc) in result["passes"].items())
    print(f"images through the model, ardir engine: {work}")
    print("the model's seconds per image by batch size: " + ", ".join(
        f"{'gradient' if g else 'forward'} at {b}: {t * 1e6:.1f} us" for (b, g), t in sorted(costs.items())))
    flops, forward_costs = forward_flops(fast, images), [t for (_, g), t in costs.items() if not g]
    if forward_costs:
        print(f"the forward's {flops / 1e6:.2f} MFLOP per image at the best forward rate: "
              f"{flops / min(forward_costs) / 1e9:.1f} GFLOP/s (fp32 matmul peak measured: "
              f"{matmul_peak(device, torch.float32) / 1e9:.1f} GFLOP/s)")
    print("ardir s / pass floor s: " + ", ".join(f"{c} {secs['ardir'][c]:.1f} / {floor[c]:.1f} = "
                                                 f"{secs['ardir'][c] / max(floor[c], 1e-9):.2f}" for c in aa.STANDARD))
    write(Path(args.results), rows, speedup)
    print(f"{LAST}{speedup:.2f}")


if __name__ == "__main__":
    main()
