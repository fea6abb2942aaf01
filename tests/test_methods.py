"""Each method's outer loss against its formula in methods.md, computed here independently on fixed tensors."""
import math

import pytest
import torch
import torch.nn as nn

import ardir
from ardir.losses import FeatureAdapter, feature_distance
from conftest import TinyNet

C = 4


def log_softmax(z):
    return z - torch.logsumexp(z, 1, keepdim=True)


def softmax(z):
    return log_softmax(z).exp()


def kl_rows(p, log_q):
    """KL(P || Q) per row, from probabilities P and log-probabilities of Q."""
    return (p * (p.clamp_min(1e-30).log() - log_q)).sum(1)


def ce(z, y):
    return -log_softmax(z)[torch.arange(len(y)), y].mean()


@pytest.fixture
def setup(monkeypatch):
    torch.manual_seed(0)
    student, teacher = TinyNet().train(), TinyNet(width=12).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, C, (8,))
    adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)

    def fixed(method):
        monkeypatch.setattr(method, "attack", lambda *a, **k: adv)
        return method
    return student, teacher, x, y, adv, fixed


def forward_pair(student, x, adv):
    """Student logits on x and x' in train mode, the way the method computes them (BN batch statistics)."""
    return student(x), student(adv)


def test_at(setup):
    student, _, x, y, adv, fixed = setup
    terms = fixed(ardir.AT())(student, x, y)
    assert torch.allclose(sum(terms.values()), ce(student(adv), y), atol=1e-6)


def test_trades(setup):
    student, _, x, y, adv, fixed = setup
    terms = fixed(ardir.TRADES(beta=6.0))(student, x, y)
    nat, rob = forward_pair(student, x, adv)
    expected = ce(nat, y) + 6.0 * kl_rows(softmax(nat), log_softmax(rob)).mean()
    assert torch.allclose(sum(terms.values()), expected, atol=1e-6)


@pytest.mark.parametrize("reduction, divisor", [("mean", C), ("batchmean", 1)])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_ard(setup, reduction, divisor, alpha):
    student, teacher, x, y, adv, fixed = setup
    tau = 4.0  # float32 KL at tau=30 loses digits to cancellation, in any implementation
    terms = fixed(ardir.ARD(tau=tau, alpha=alpha, kl_reduction=reduction))(student, x, y, teacher)
    t = teacher(x)
    s_adv = student(adv)
    kl = kl_rows(softmax(t / tau), log_softmax(s_adv / tau)).mean() / divisor
    expected = alpha * tau ** 2 * kl
    if alpha < 1:
        expected = expected + (1 - alpha) * ce(student(x), y)
    assert torch.allclose(sum(terms.values()), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_rslad(setup, scale):
    student, teacher, x, y, adv, fixed = setup
    terms = fixed(ardir.RSLAD(kl_scale=scale))(student, x, y, teacher)
    p_t = softmax(teacher(x))
    s_adv = student(adv)
    s_nat = student(x)
    expected = scale * (5 / 6 * kl_rows(p_t, log_softmax(s_adv)).mean() / C
                        + 1 / 6 * kl_rows(p_t, log_softmax(s_nat)).mean() / C)
    assert torch.allclose(sum(terms.values()), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("epoch", [0, 60])
def test_iad(setup, epoch):
    student, teacher, x, y, adv, fixed = setup
    method = fixed(ardir.IAD(beta=0.1, warmup_epochs=60))
    method.epoch = epoch
    terms = method(student, x, y, teacher)
    s_adv = student(adv)
    ard = kl_rows(softmax(teacher(x)), log_softmax(s_adv)).mean()  # IAD-I.py: (1/N) sum_i KL_i, not /C as ARD
    expected = ard
    if epoch >= 60:
        s_nat = student(x)
        a = softmax(teacher(adv))[torch.arange(8), y] ** 0.1
        expected = ard + ((1 - a) * kl_rows(softmax(s_nat), log_softmax(s_adv))).mean()
    assert torch.allclose(sum(terms.values()), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("distance", ["nmse", "mse", "cosine"])
@pytest.mark.parametrize("teacher_input", ["natural", "adversarial"])
def test_ardir(setup, distance, teacher_input):
    student, teacher, x, y, adv, fixed = setup
    method = fixed(ardir.ARDIR(layers=[("body", "body"), ("features", "features")], layer_weights=[0.5, 2.0],
                               distance=distance, w_ce=0.3, w_kl=0.8, w_ir=1.5, tau=2.0, teacher_input=teacher_input))
    method.setup(student, teacher, x)
    terms = method(student, x, y, teacher)

    def feats(model, inp):
        body = model.body(model.bn(model.conv(inp)))
        return body, model.features(model.pool(body)), model.fc(model.features(model.pool(body)))
    t_body, t_feat, t_logits = feats(teacher, x if teacher_input == "natural" else adv)
    t_logits = teacher(x)
    s_body, s_feat, s_logits = feats(student, adv)
    a_body, a_feat = method.adapters
    s_body, s_feat = a_body.map(s_body), a_feat.map(s_feat)

    def dist(s, t):
        s, t = s.flatten(1), t.flatten(1)
        if distance == "mse":
            return ((s - t) ** 2).mean()
        if distance == "cosine":
            return (1 - (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))).mean()
        return ((s / s.norm(dim=1, keepdim=True) - t / t.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    expected = (0.3 * ce(s_logits, y)
                + 0.8 * 4.0 * kl_rows(softmax(t_logits / 2), log_softmax(s_logits / 2)).mean()
                + 1.5 * (0.5 * dist(s_body, t_body) + 2.0 * dist(s_feat, t_feat)))
    assert torch.allclose(sum(terms.values()), expected, rtol=1e-5, atol=1e-6)


def test_ardir_adapter_only_when_shapes_differ():
    x = torch.rand(4, 1, 8, 8)
    same = ardir.ARDIR(layers=["features"])
    same.setup(TinyNet(), TinyNet().eval(), x)
    assert same.adapters[0].is_identity and not list(same.parameters())
    other = ardir.ARDIR(layers=["features", "body"])
    other.setup(TinyNet(width=8), TinyNet(width=12).eval(), x)
    assert [type(a.map) for a in other.adapters] == [nn.Linear, nn.Conv2d]
    assert other.adapters[0].map.weight.shape == (48, 32)


def test_adapter_trains_with_student_and_is_saved_but_not_exported(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset
    loader = DataLoader(TensorDataset(torch.rand(32, 1, 8, 8), torch.randint(0, C, (32,))), batch_size=16)
    student, teacher = TinyNet(width=8), TinyNet(width=12).eval().requires_grad_(False)
    trainer = ardir.Trainer(student, loader, teacher=teacher, epochs=1, progress=False, eps=0.1, step_size=0.05,
                            steps=2)
    adapter = trainer.method.adapters[0].map
    before = adapter.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(before, adapter.weight)
    assert any(k.startswith("adapters.") for k in trainer.state_dict()["method"])
    assert not any("adapter" in k for k in student.state_dict())


def test_feature_adapter_refuses_unadaptable_shapes():
    with pytest.raises(ValueError, match="cannot adapt"):
        FeatureAdapter((2, 3, 4), (2, 5))


def test_ardir_unknown_layer_names_close_match():
    method = ardir.ARDIR(layers=[("featurs", "features")])
    with pytest.raises(ValueError, match="features"):
        method.setup(TinyNet(), TinyNet(), torch.rand(2, 1, 8, 8))


def test_feature_distance_values():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert math.isclose(feature_distance(s, t, "nmse").item(), 2.0, rel_tol=1e-6)
    assert math.isclose(feature_distance(s, t, "cosine").item(), 1.0, rel_tol=1e-6)
    assert math.isclose(feature_distance(s, t, "mse").item(), 2.5, rel_tol=1e-6)


def test_unknown_method_and_argument():
    from torch.utils.data import DataLoader, TensorDataset
    loader = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.randint(0, C, (8,))), batch_size=4)
    with pytest.raises(ValueError, match="rslad"):
        ardir.Trainer(TinyNet(), loader, teacher=TinyNet(), method="rsald")
    with pytest.raises(TypeError, match="tau"):
        ardir.ARDTrainer(TinyNet(), loader, teacher=TinyNet(), temperature=3)


def test_iad_weights_both_terms_by_alpha(setup):
    """IAD-I.py: alpha * (teacher KL + introspection) + (1 - alpha) * CE on the natural batch."""
    student, teacher, x, y, adv, fixed = setup
    full, half = fixed(ardir.IAD(warmup_epochs=0)), fixed(ardir.IAD(alpha=0.5, warmup_epochs=0))
    a, b = full(student, x, y, teacher), half(student, x, y, teacher)
    assert torch.allclose(b["introspection"], 0.5 * a["introspection"]) and torch.allclose(b["kl"], 0.5 * a["kl"])
    assert torch.allclose(b["ce"], 0.5 * torch.nn.functional.cross_entropy(student(x), y))


def test_iad_warmup_scales_with_the_runs_epochs():
    """IAD's 60-of-200 warm-up is a proportion: a 10-epoch run warms up for 3; an explicit one that outlasts the
    run warns, since the introspection term would never run."""
    from conftest import TinyNet
    loader = [(torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,)))]
    teacher = TinyNet().eval().requires_grad_(False)
    trainer = ardir.Trainer(TinyNet(), loader, teacher=teacher, method="iad", epochs=10, progress=False, steps=1)
    assert trainer.method.warmup == 3 and ardir.IAD().warmup == 60
    trainer.epochs = 4
    trainer.train_epoch()
    assert trainer.method.warmup == 1
    with pytest.warns(UserWarning, match="warmup_epochs=60 >= epochs=3: the introspection term never runs"):
        ardir.Trainer(TinyNet(), loader, teacher=teacher, method="iad", epochs=3, warmup_epochs=60, progress=False)


def test_a_resumed_iad_run_keeps_its_warmup_when_extended(tmp_path):
    """The warm-up a run started with is in its checkpoints: resuming with more epochs does not move it."""
    from conftest import TinyNet
    loader = [(torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,)))]
    teacher = TinyNet().eval().requires_grad_(False)
    first = ardir.Trainer(TinyNet(), loader, teacher=teacher, method="iad", epochs=4, progress=False, steps=1,
                          checkpoint_dir=tmp_path)
    first.fit()
    assert first.method.warmup == 1
    longer = ardir.Trainer(TinyNet(), loader, teacher=teacher, method="iad", epochs=10, progress=False, steps=1,
                           checkpoint_dir=tmp_path)
    assert longer.method.warmup == 3
    longer.resume(tmp_path)
    assert longer.method.warmup == 1
