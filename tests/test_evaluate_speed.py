"""benchmarks/evaluate_speed.py: both engines attack the same points under the chosen norm, and the results file
keeps one table per row layout with the speed-up as its last line. Synthetic data, a tiny model."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from ardir import autoattack as aa

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def speed():
    sys.path.insert(0, str(BENCH))  # the script imports its neighbour throughput.py
    try:
        spec = importlib.util.spec_from_file_location("evaluate_speed", BENCH / "evaluate_speed.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_both_engines_attack_under_l2_with_the_same_verdicts(speed, tiny):
    pytest.importorskip("pyautoattack")
    torch.manual_seed(1)
    model = tiny(width=8, num_classes=10).eval()
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = speed.run(model, x[:6], y[:6], eps=1.0, batch=6, seed=0, classes=10, norm="l2")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out["robust"]["ardir"], out["robust"]["official"])
    # at this radius some points survive APGD-CE and APGD-T fools them, in both engines: both ran two components
    assert all(out["seconds"][e][c] > 0 for e in ("ardir", "official") for c in ("apgd-ce", "apgd-t"))
    # an L-inf check of L2 points this far out would call them invalid (still robust): the norm is passed on
    assert not out["robust"]["ardir"].any()
    # the images through the model are counted: APGD-CE ran on the six with gradients, Square not at all
    forwards, gradients, forward_calls, gradient_calls = out["passes"]["apgd-ce"]
    assert forwards >= gradients >= 6 and out["passes"]["square"] == [0, 0, 0, 0]
    assert gradient_calls >= 1 and gradients / gradient_calls <= 6  # at most the six points per call


def test_rows_of_a_new_layout_start_their_own_table(speed, tmp_path):
    path = tmp_path / "speed.md"
    path.write_text("# title\n\n| date (UTC) | device | old |\n|---|---|---|\n| a | b | c |\n\n"
                    f"{speed.LAST}2.05\n")
    speed.write(path, ["| new row |"], 1.5)
    lines = path.read_text().splitlines()
    assert lines[-1] == f"{speed.LAST}1.50" and lines.count(f"{speed.LAST}2.05") == 0
    first = speed.HEADER.splitlines()[0]
    assert lines.index(first) > lines.index("| a | b | c |") and lines[lines.index(first) + 2] == "| new row |"
    speed.write(path, ["| next row |"], 1.2)  # the same layout again: no second header
    assert path.read_text().splitlines().count(first) == 1
    assert set(aa.STANDARD) <= set(speed.HEADER.replace(" s |", " |").replace("|", " ").split())


def test_the_pass_floor_prices_each_kind_of_pass_at_its_own_mean_batch(speed, tiny):
    torch.manual_seed(0)
    model = tiny(width=8, num_classes=10).eval()
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 10, (12,))
    for gradient in (False, True):  # each kind times the pass it names: 1 warm-up + 3 chunks of 4, once
        counted = speed.Counted(model)
        assert speed.pass_cost(counted, x, y, batch=4, gradient=gradient, repeats=1) > 0
        assert counted.counts() == ([16, 16, 0, 4] if gradient else [16, 0, 4, 0])
        assert counted.calls[gradient] == {4: 4} and not counted.calls[not gradient]
    assert not model.training and all(p.grad is None for p in model.parameters())  # no weight gradient left behind
    assert speed.forward_flops(model, x) > 0
    per_call = {False: lambda b: 1.0 + b, True: lambda b: 3.0 + 3 * b}  # a fixed cost per call plus one per image
    cost = (lambda batch, gradient: per_call[gradient](batch) / batch)
    assert speed.call_seconds(cost, 3, False) == 4.0  # between the grid's 2 and 4: interpolated, exact for this
    assert speed.call_seconds(cost, 300, True) == 300 * cost(256, True)  # beyond the grid: its last per-image cost
    calls = {"apgd-ce": {False: {3: 2}, True: {2: 2}}, "square": {False: {1: 7}, True: {}}, "fab-t": {False: {}, True: {}}}
    floor = speed.floor_seconds(calls, cost)
    assert floor == {"apgd-ce": 2 * 4.0 + 2 * 9.0, "square": 7 * 2.0, "fab-t": 0.0}


def test_counted_tells_forward_only_calls_from_gradient_calls(speed, tiny):
    counted = speed.Counted(tiny(width=8, num_classes=10).eval())
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        counted(x)
    counted(x[:3].clone().requires_grad_(True))
    assert counted.counts() == [8, 3, 1, 1]
