"""The L2 threat model for training: PGD(norm="l2"), every method's ``norm``, the Trainer's validation attack,
``ardir train --norm l2`` and the errors of bad combinations."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ardir
from ardir import cli
from ardir import config as cfg
from ardir.attacks import l2_direction, project_l2, uniform_l2_ball
from ardir.checkpoint import load_checkpoint
from ardir.methods import create_method, list_methods
from conftest import TinyNet

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

TINY = ["--dataset", "fashion-mnist", "--fake-data", "--model", "cnn_small", "--train-size", "64", "--val-size",
        "32", "--batch-size", "32", "--limit-batches", "1", "--steps", "1", "--val-attack-steps", "1", "--quiet"]


def batch(n=16):
    return torch.rand(n, 1, 8, 8), torch.randint(0, 4, (n,))


def l2_of(delta):
    return delta.reshape(len(delta), -1).norm(dim=1)


def linear_loss(weights):
    """A loss linear in the input, so its gradient is ``weights`` wherever the attack is (labels unused)."""
    def loss(adv, labels):
        return (adv * weights).reshape(len(adv), -1).sum(1)
    return loss


# ------------------------------------------------------------------------------------- the step, by hand
def test_projection_onto_the_l2_ball_by_hand():
    delta = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]).view(3, 1, 1, 2)  # norms 5, 0.5, 0
    projected = project_l2(delta, 1.0)
    expected = torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]).view(3, 1, 1, 2)
    assert torch.allclose(projected, expected, atol=1e-7) and projected.shape == delta.shape


def test_l2_direction_by_hand_and_a_zero_gradient_stays_zero():
    grad = torch.tensor([[3.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    direction = l2_direction(grad)
    assert torch.allclose(direction[0].flatten(), torch.tensor([0.6, 0.0, 0.8, 0.0]))
    assert torch.equal(direction[1], torch.zeros(1, 2, 2))  # no 0 / 0


@pytest.mark.parametrize("x0, step, expected", [
    (0.5, 0.25, [0.65, 0.70, 0.5, 0.5]),   # |delta| = 0.25 < eps: inside the ball, no projection
    (0.5, 1.0, [0.80, 0.90, 0.5, 0.5]),    # |delta| = 1 > eps = 0.5: scaled by 0.5 onto the sphere
    (0.9, 1.0, [1.00, 1.00, 0.9, 0.9]),    # projected to (0.3, 0.4), then clipped to [0, 1]
])
def test_one_l2_step_by_hand(x0, step, expected):
    """Gradient (3, 4, 0, 0) -> direction (0.6, 0.8, 0, 0); step, projection onto the 0.5-ball, clip."""
    x, y = torch.full((1, 1, 2, 2), x0), torch.zeros(1, dtype=torch.long)
    weights = torch.tensor([3.0, 4.0, 0.0, 0.0]).view(1, 1, 2, 2)
    attack = ardir.PGD(TinyNet(num_classes=4), eps=0.5, step_size=step, steps=1, loss=linear_loss(weights),
                       random_start="none", norm="l2")
    adv = attack(x, y)
    assert torch.allclose(adv.flatten(), torch.tensor(expected), atol=1e-6)


def test_l2_pgd_is_the_textbook_update_written_independently():
    """Several steps against a reference loop (flattened norms, torch.where projection) from the same start."""
    model = TinyNet().eval()
    x, y = batch(32)
    x[:8] = x[:8].round()  # pixels at 0 and 1, where the clip matters
    eps, step = 0.8, 0.3
    torch.manual_seed(5)
    adv = ardir.PGD(model, eps=eps, step_size=step, steps=6, norm="l2")(x, y)
    torch.manual_seed(5)
    ref = (x + uniform_l2_ball(x, eps)).clamp(0, 1)
    for _ in range(6):
        ref.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(ref), y, reduction="sum"), ref)
        norms = grad.reshape(len(x), -1).norm(dim=1).view(-1, 1, 1, 1)
        ref = ref.detach() + step * grad / norms
        delta = ref - x
        length = delta.reshape(len(x), -1).norm(dim=1).view(-1, 1, 1, 1)
        ref = (x + torch.where(length > eps, delta * eps / length, delta)).clamp(0, 1)
    assert torch.allclose(adv, ref, atol=1e-6)


# ---------------------------------------------------------------------------------- against torchattacks
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("eps, step, steps", [(0.5, 0.1, 10), (2.0, 0.5, 7)])
def test_l2_pgd_matches_torchattacks_pgdl2_from_the_clean_image(dtype, tolerance, eps, step, steps):
    torchattacks = pytest.importorskip("torchattacks")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 16), nn.Tanh(), nn.Linear(16, 5)).to(dtype).eval()
    x, y = torch.rand(12, 3, 6, 6, dtype=dtype), torch.randint(0, 5, (12,))
    x[:3] = x[:3].round()
    theirs = torchattacks.PGDL2(model, eps=eps, alpha=step, steps=steps, random_start=False)(x, y)
    ours = ardir.PGD(model, eps=eps, step_size=step, steps=steps, loss="ce", random_start="none", norm="l2")(x, y)
    assert ours.dtype == dtype
    assert (ours - x).abs().max() > 0.01  # the attack moved
    assert torch.allclose(ours, theirs, atol=tolerance, rtol=0)


# --------------------------------------------------------------------------------------- the guarantees
def discrepancy_to(teacher, student):
    def discrepancy(adv, labels):
        return ardir.attacks.kl_to(F.softmax(teacher(adv), 1), student(adv))
    return discrepancy


@pytest.mark.parametrize("loss", ["ce", "kl", "cw", "callable"])
@pytest.mark.parametrize("start", ["uniform", "normal", "none"])
def test_l2_pgd_stays_in_the_ball_and_the_box(loss, start):
    model, teacher = TinyNet(), TinyNet(width=6)
    x, y = batch()
    chosen = discrepancy_to(teacher, model) if loss == "callable" else loss
    attack = ardir.PGD(model, eps=0.7, step_size=0.3, steps=5, loss=chosen, random_start=start, norm="l2",
                       loss_models=[teacher] if loss == "callable" else ())
    adv = attack(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert torch.isfinite(adv).all() and adv.min() >= 0 and adv.max() <= 1
    assert l2_of(adv - x).max() <= 0.7 + 1e-5
    assert l2_of(adv - x).max() > 0.3  # it moved by at least a step


def test_l2_starts_lie_in_the_ball_and_the_box():
    x, y = batch(256)
    x[:64] = x[:64].round()  # pixels at 0 and 1, where the start is clipped
    uniform = ardir.PGD(TinyNet(), eps=0.5, steps=0, random_start="uniform", norm="l2")(x, y)
    normal = ardir.PGD(TinyNet(), eps=0.004, steps=0, random_start="normal", norm="l2")(x, y)
    none = ardir.PGD(TinyNet(), eps=0.5, steps=0, random_start="none", norm="l2")(x, y)
    for start, eps in ((uniform, 0.5), (normal, 0.004)):
        assert l2_of(start - x).max() <= eps + 1e-6 and start.min() >= 0 and start.max() <= 1
    assert l2_of(uniform - x)[64:].min() > 0.3  # d = 64: a uniform point of the ball lies near its sphere
    # x + 0.001 N(0, I) has norm ~ 0.008 in d = 64: projected onto the 0.004-ball, it lies on its sphere (unless a
    # pixel within 0.001 of 0 or 1 is clipped)
    assert (l2_of(normal - x)[64:] - 0.004).abs().median() < 1e-6
    assert torch.equal(none, x)


def test_the_uniform_l2_start_is_uniform_in_the_ball():
    """In d dimensions the radius r of a uniform point has (r / eps) ** d ~ U(0, 1); the direction is isotropic."""
    torch.manual_seed(0)
    for dim in (2, 5):
        delta = uniform_l2_ball(torch.zeros(40000, dim), 3.0)
        u = (delta.norm(dim=1) / 3.0) ** dim
        assert u.max() <= 1 + 1e-5
        assert abs(u.mean() - 0.5) < 0.01 and abs((u < 0.25).float().mean() - 0.25) < 0.01
        assert delta.mean(0).abs().max() < 0.03


def test_a_zero_gradient_makes_no_step_and_no_nan():
    x, y = batch(4)
    adv = ardir.PGD(TinyNet(), eps=0.5, step_size=0.2, steps=3, loss=linear_loss(torch.zeros(1, 1, 8, 8)),
                    random_start="none", norm="l2")(x, y)
    assert torch.equal(adv, x)


def test_l2_pgd_leaves_no_parameter_gradient_and_restores_modes():
    model, teacher = TinyNet(), TinyNet(width=6)
    model.train()
    model.bn.eval()  # a mixed state must come back exactly
    teacher.train()
    before = {name: m.training for name, m in model.named_modules()}
    for loss, loss_models in (("ce", ()), (discrepancy_to(teacher, model), [teacher])):
        for mode in ("eval", "train", "keep"):
            ardir.PGD(model, eps=0.5, step_size=0.2, steps=2, loss=loss, mode=mode, norm="l2",
                      loss_models=loss_models)(*batch())
    assert {name: m.training for name, m in model.named_modules()} == before
    assert teacher.training
    assert all(p.grad is None for p in [*model.parameters(), *teacher.parameters()])


def test_l2_pgd_under_bf16_autocast_and_channels_last():
    model = TinyNet().eval()
    x, y = batch(8)
    attack = ardir.PGD(model, eps=0.5, step_size=0.2, steps=3, random_start="none", norm="l2")
    plain = attack(x, y)
    assert torch.allclose(attack(x.contiguous(memory_format=torch.channels_last), y), plain, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attack(x, y)
    assert low.dtype == x.dtype and torch.isfinite(low).all() and l2_of(low - x).max() <= 0.5 + 1e-5


def test_linf_stays_the_default_bit_for_bit():
    model = TinyNet().eval()
    x, y = batch()
    torch.manual_seed(4)
    default = ardir.PGD(model, eps=0.1, step_size=0.03, steps=4)(x, y)
    torch.manual_seed(4)
    explicit = ardir.PGD(model, eps=0.1, step_size=0.03, steps=4, norm="linf")(x, y)
    assert torch.equal(default, explicit) and (default - x).abs().max() <= 0.1 + 1e-6
    assert "norm='linf'" in repr(ardir.PGD(model)) and "norm='l2'" in repr(ardir.PGD(model, eps=1, norm="l2"))


# ----------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("name", list_methods())
def test_every_method_takes_norm(name):
    extra = {"natural_teacher": TinyNet()} if name == "mtard" else {}
    method = create_method(name, norm="l2", eps=1.5, step_size=0.4, **extra)
    assert method.norm == "l2" and method.eps == 1.5 and "norm='l2'" in repr(method)
    assert create_method(name, **extra).norm == "linf"


@pytest.mark.parametrize("name, start", [("at", "uniform"), ("trades", "normal"), ("ard", "uniform")])
def test_a_methods_attack_is_l2_pgd_with_its_settings(name, start):
    student = TinyNet()
    x, y = batch()
    method = create_method(name, norm="l2", eps=0.9, step_size=0.3, steps=3)
    torch.manual_seed(6)
    adv = method.attack(student, x, y)
    torch.manual_seed(6)
    ref = ardir.PGD(student, eps=0.9, step_size=0.3, steps=3, loss=method.attack_loss, random_start=start,
                    mode=method.attack_mode, norm="l2").forward(x, y)
    assert torch.equal(adv, ref) and l2_of(adv - x).max() <= 0.9 + 1e-5


def test_adaad_climbs_its_discrepancy_under_l2():
    student, teacher = TinyNet(), TinyNet(width=6).eval().requires_grad_(False)
    x, y = batch()
    method = create_method("adaad", norm="l2", eps=0.9, step_size=0.3, steps=3)
    adv = method.adversarial(student, teacher, x, y)
    assert l2_of(adv - x).max() <= 0.9 + 1e-5 and (adv - x).abs().max() > 0.1  # L-inf would stay <= 8/255


def test_the_trainers_validation_pgd_uses_the_runs_norm(monkeypatch):
    import ardir.trainer as trainer_module
    made = []

    class Spy(ardir.PGD):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr(trainer_module, "PGD", Spy)
    loader = [batch(8)]
    trainer = ardir.Trainer(TinyNet(), loader, method="at", val_loader=loader, epochs=1, progress=False,
                            norm="l2", eps=1.5, step_size=0.5, steps=1, val_attack_steps=2)
    record = trainer.validate()
    assert [(a.norm, a.eps, a.step_size, a.steps) for a in made] == [("l2", 1.5, 0.5, 2)]
    assert 0 <= record["val_pgd"] <= record["val_natural"]


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, error, words", [
    (dict(norm="l1"), ValueError, r"norm='l1' is not a known norm.*'linf', 'l2'"),
    (dict(norm="L2"), ValueError, r"norm='L2'.*did you mean 'l2'"),
    (dict(norm=2), TypeError, r"norm=2 must be the name of a norm"),
    (dict(norm="l2", eps=0), ValueError, r"eps=0.0 must be > 0"),
    (dict(norm="l2", eps=-0.5), ValueError, r"eps=-0.5 must be > 0"),
    (dict(norm="l2", eps=float("inf")), ValueError, r"eps=inf must be a finite number"),
    (dict(norm="linf", eps=1.5), ValueError, r"eps=1.5 is outside \(0, 1\]"),
    (dict(norm="l2", eps=1.0, step_size=0), ValueError, r"step_size=0.0 must be > 0"),
])
def test_bad_threat_models_are_one_sentence_naming_the_argument(kwargs, error, words):
    with pytest.raises(error, match=words):
        ardir.PGD(TinyNet(), **kwargs)
    with pytest.raises(error, match=words):
        create_method("at", **kwargs)


def test_l2_accepts_radii_above_one():
    assert ardir.PGD(TinyNet(), eps=2.0, norm="l2").eps == 2.0
    assert ardir.ATTrainer(TinyNet(), [batch(4)], norm="l2", eps=2.0, progress=False).method.eps == 2.0


def test_the_configuration_checks_eps_against_the_norm():
    assert cfg.resolve({"eps": 1.5, "norm": "l2"})["norm"] == "l2"
    assert cfg.parse_toml('norm = "l2"\neps = 2.0') == {"norm": "l2", "eps": 2.0}
    with pytest.raises(cfg.ConfigError, match=r'eps: 1.5 must be <= 1 under norm = "linf".*--norm l2'):
        cfg.resolve({"eps": 1.5})
    with pytest.raises(cfg.ConfigError, match=r"norm: 'l3' is not one of 'linf', 'l2'"):
        cfg.parse_toml('norm = "l3"')
    with pytest.raises(cfg.ConfigError, match=r"eps: 0.0 must be > 0"):
        cfg.parse_toml('norm = "l2"\neps = 0.0')
    assert "norm" in cfg.schema() and cfg.schema()["norm"].group == "method"


def test_cli_norm_flag_is_checked_and_a_large_linf_eps_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--norm", "l3"])
    assert info.value.code == 2 and "argument --norm: 'l3' is not one of 'linf', 'l2'" in capsys.readouterr().err
    assert cli.main(["train", "--eps", "8"]) == 2  # refused before any data is looked for
    err = capsys.readouterr().err.strip()
    assert err.startswith("ardir train: error: eps: 8.0 must be <= 1") and "--norm l2" in err
    assert len(err.splitlines()) == 1
    assert cli.main(["train", "--eval-eps", "8"]) == 2  # the evaluation's radius obeys the same norm
    assert capsys.readouterr().err.strip().startswith("ardir train: error: eval_eps: 8.0 must be <= 1")
    assert cfg.resolve({"norm": "l2", "eps": 1.5, "eval_eps": 2.0})["eval_eps"] == 2.0  # an L2 radius may pass 1


# ------------------------------------------------------------------------------------------- ardir train
def test_ardir_train_norm_l2_records_it(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *TINY, "--method", "at", "--norm", "l2", "--eps", "1.5", "--step-size", "0.5", "--epochs", "1",
            "--output-dir", str(out)]
    assert cli.main(args) == 0
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["norm"] == "l2" and config["eps"] == 1.5 and config["step_size"] == 0.5
    assert load_checkpoint(out / "last.pt")["config"]["norm"] == "l2"
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(record["loss"]) and 0 <= record["val_pgd"] <= record["val_natural"] <= 100
    # ardir eval of this run evaluates it under L2 at its eps: tests/test_l2_eval.py
