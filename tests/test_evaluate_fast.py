"""evaluate()'s gradient attacks (FGSM, PGD, CW) climb the fast copy of the model AutoAttack's ardir engine uses
(BatchNorm folded, channels-last on the CPU): the verdicts of the plain model's attack, taken on the plain model.
Synthetic data only; the speed is measured by benchmarks/evaluate_speed.py, not here."""
from __future__ import annotations

import pytest
import torch

import ardir
from ardir.attacks import compile_for_attack
from ardir.evaluation import attacks

EPS = 0.01


@pytest.fixture
def model(tiny):
    """TinyNet with BatchNorm statistics off the identity (folding changes the weights) and a classifier spread
    over the features of random images (an untrained one predicts one class everywhere)."""
    torch.manual_seed(1)
    net = tiny(width=8, num_classes=10).eval().requires_grad_(False)
    net.bn.running_mean.uniform_(-0.05, 0.05)
    net.bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        features = net.features(net.pool(net.body(net.bn(net.conv(torch.rand(96, 1, 8, 8))))))
        net.fc.weight.copy_(torch.randn(10, features.shape[1]) / features.std(0))
        net.fc.bias.copy_(-net.fc.weight @ features.mean(0))
    return net


@pytest.mark.parametrize("name, loss, steps, start", [("fgsm", "ce", 1, "none"), ("pgd10", "ce", 10, "uniform"),
                                                       ("cw10", "cw", 10, "uniform")])
def test_gradient_attacks_on_the_fast_copy_keep_the_verdicts(model, name, loss, steps, start):
    x = torch.rand(96, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    runner = attacks._build(name, attacks.Context(model, EPS, EPS / 4, 10, "ardir"))
    fast, _ = runner.run(x, y, seed=5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in runner.attack.model.modules())  # the folded copy
    torch.manual_seed(5)
    step = EPS if name == "fgsm" else EPS / 4
    adv = ardir.PGD(model, eps=EPS, step_size=step, steps=steps, loss=loss, random_start=start)(x, y)
    with torch.no_grad():
        plain = model(adv).argmax(1) == y
    assert torch.equal(fast, plain)
    assert 0 < int(plain.sum()) < len(x)  # some points fooled, some not: the comparison means something


def test_a_model_registered_for_compilation_is_attacked_as_it_is(model, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda m, **kw: torch.nn.Sequential(m))  # a stand-in twin: no compiling
    compile_for_attack(model)
    try:
        runner = attacks._build("pgd5", attacks.Context(model, 0.1, 0.025, 10, "ardir"))
        runner.run(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), seed=0)
        assert runner.attack.model is model
    finally:
        compile_for_attack(model, enable=False)


def test_runners_share_one_copy_and_never_climb_stale_weights(model):
    """Two runners of one model attack one copy; once the model's weights change, the next batch gets a new one."""
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    ctx = attacks.Context(model, EPS, EPS / 4, 10, "ardir")
    pgd, cw = attacks._build("pgd3", ctx), attacks._build("cw3", ctx)
    pgd.run(x, y, seed=0)
    cw.run(x, y, seed=0)
    assert pgd.attack.model is cw.attack.model
    first = pgd.attack.model
    pgd.run(x, y, seed=1)
    assert pgd.attack.model is first  # nothing changed: no new copy
    with torch.no_grad():
        model.fc.weight.mul_(-1.0)
    pgd.run(x, y, seed=0)
    assert pgd.attack.model is not first
    with torch.no_grad():
        assert torch.allclose(pgd.attack.model(x), model(x), atol=1e-5)
