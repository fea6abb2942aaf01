"""ardir's own AutoAttack engine under the L2 threat model (ardir.apgd, ardir.fab, ardir.square_l2 with
norm="l2"): the projections by hand, each component against the official code (``pyautoattack``) per sample on a
tiny model with the same seed, the whole standard version against ``engine="official"``, and ardir.evaluate under
L2 with the default engine. Seconds, synthetic data only."""
from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ardir
from ardir import apgd, autoattack as aa, fab, square, square_l2
from test_autoattack_fast import _official, _one_thread, setup  # noqa: F401  (the L-inf tests' fixtures)


def _fooled(model, x, adv, y, eps):
    return ~aa.still_correct(model, x, adv, y, eps, norm="l2")


def _in_ball_and_box(x, adv, eps):
    return bool(((adv - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all() and adv.min() >= 0 and adv.max() <= 1)


# ------------------------------------------------------------------------------------------ by hand
def test_apgd_l2_projection_by_hand():
    x = torch.full((3, 1, 2, 2), 0.5)
    delta = torch.tensor([0.3, 0.4, 0.0, 0.0]).view(1, 1, 2, 2)  # length 0.5
    outside, inside = x[:1] + delta, x[1:2] + 0.2 * delta
    assert torch.allclose(apgd.project_l2(x[:1], outside, 0.25), x[:1] + delta / 2)  # scaled onto the sphere
    assert torch.equal(apgd.project_l2(x[1:2], inside, 0.25), inside)  # inside the ball: unchanged
    # scaled to length 0.45 ((0.27, 0.36) added), then clipped to [0, 1]: the box only shortens it
    edge = torch.tensor([0.9, 0.8, 0.5, 0.5]).view(1, 1, 2, 2)
    got = apgd.project_l2(edge, edge + 2 * delta, 0.45)
    assert torch.allclose(got.flatten(), torch.tensor([1.0, 1.0, 0.5, 0.5]))
    assert apgd.l2_norm(got - edge).item() <= 0.45


def test_apgd_l2_random_start_lies_on_the_sphere():
    x = torch.full((5, 3, 4, 4), 0.5)
    torch.manual_seed(0)
    start = apgd._random_start(x, 0.3, "l2")
    assert torch.allclose((start - x).flatten(1).norm(dim=1), torch.full((5,), 0.3))  # no clipping at 0.5 +- 0.3
    torch.manual_seed(0)
    noise = torch.randn(x.shape)  # the official draw
    assert torch.allclose(start - x, 0.3 * noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1), atol=1e-7)


def test_fab_l2_projection_by_hand():
    t = torch.tensor([[0.0, 0.0], [0.95, 0.0], [0.2, 0.3], [0.5, 0.5]])
    w = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([1.0, 1.5, 1.0, 5.0])
    d = fab.project_l2(t, w, b)
    assert torch.allclose(d[0], torch.tensor([0.5, 0.5]))        # the closest point of the hyperplane
    assert torch.allclose(d[1], torch.tensor([0.05, 0.5]))       # the first coordinate stops at the box
    assert torch.allclose(d[2], torch.tensor([0.0, 0.2]))        # a zero weight never moves
    assert torch.allclose(d[3], torch.tensor([0.5, 0.5]))        # out of reach: the box corner towards it
    hit = ((t + d) * w).sum(1)
    assert torch.allclose(hit[:3], b[:3])


def test_square_l2_window_and_start():
    torch.manual_seed(0)
    for side in (1, 3, 4, 5):
        pattern = square_l2.window(side)
        assert pattern.shape == (side, side) and torch.allclose(pattern.norm(), torch.tensor(1.0))
    for seed in range(4):  # transposed or not
        torch.manual_seed(seed)
        pattern = square_l2.window(5)
        halves = [(p[:2] > 0).all() and (p[2:] < 0).all() for p in (pattern, pattern.T)]
        assert any(halves)  # one half up, the other down, the peak in the middle of each
        upright = pattern if halves[0] else pattern.T
        assert upright[1, 2] == upright[:2].max() and upright[3, 2] == upright[2:].min()
    x = torch.full((4, 3, 10, 10), 0.5)
    start = square_l2._start(x, 0.4)
    assert torch.allclose((start - x).flatten(1).norm(dim=1), torch.full((4,), 0.4))


def test_l2_dropping_changes_no_verdict(setup):
    norm = "l2"
    model, x, y = setup
    for loss in ("ce", "dlr"):
        fast = apgd.apgd(model, x, y, 0.8, seed=3, loss=loss, norm=norm)
        plain = apgd.apgd(model, x, y, 0.8, seed=3, loss=loss, drop=False, norm=norm)
        assert torch.equal(_fooled(model, x, fast, y, 0.8), _fooled(model, x, plain, y, 0.8))
    fast = fab.fab_targeted(model, x, y, 0.6, n_target_classes=3, n_iter=30, norm=norm)
    plain = fab.fab_targeted(model, x, y, 0.6, n_target_classes=3, n_iter=30, drop=False, norm=norm)
    assert torch.equal(_fooled(model, x, fast, y, 0.6), _fooled(model, x, plain, y, 0.6))
    assert 0 < int(_fooled(model, x, plain, y, 0.6).sum()) < len(x)


def test_l2_adversarial_examples_lie_in_the_ball_and_the_box(setup):
    model, x, y = setup
    eps = 1.5
    for adv in (apgd.apgd(model, x, y, eps, n_iter=20, norm="l2"),
                apgd.apgd_targeted(model, x, y, eps, n_target_classes=2, n_iter=20, norm="l2"),
                fab.fab_targeted(model, x, y, eps, n_target_classes=2, n_iter=20, norm="l2"),
                square.square(model, x, y, eps, n_queries=100, norm="l2")):
        assert _in_ball_and_box(x, adv, eps) and int(_fooled(model, x, adv, y, eps).sum()) > 0


def test_validation_checks_the_l2_distance_under_l2(setup):
    model, x, y = setup
    adv = apgd.apgd(model, x, y, 1.5, n_iter=20, norm="l2")
    fooled = _fooled(model, x, adv, y, 1.5)
    assert int(fooled.sum()) > 0
    # at L2 eps 1 those points lie outside the ball (but inside the L-inf ball of radius 1): rejected under L2 only
    assert not _fooled(model, x, adv, y, 1.0)[fooled].any()
    assert torch.equal(~aa.still_correct(model, x, adv, y, 1.0, norm="linf"), fooled)


# ------------------------------------------------------------------------------ against the official code
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_l2_matches_the_official_code_per_sample(setup, loss):
    module = _official()
    model, x, y = setup
    ref = module.autopgd_base.APGDAttack(model, n_iter=100, norm="L2", n_restarts=1, eps=0.8, seed=7, loss=loss,
                                         rho=0.75, device="cpu", logger=logging.getLogger("test"))
    theirs = ref.perturb(x.clone(), y.clone())
    ours = apgd.apgd(model, x, y, 0.8, seed=7, loss=loss, norm="l2")
    assert torch.equal(_fooled(model, x, ours, y, 0.8), _fooled(model, x, theirs, y, 0.8))
    assert 0 < int(_fooled(model, x, theirs, y, 0.8).sum()) < len(x)
    plain = apgd.apgd(model, x, y, 0.8, seed=7, loss=loss, drop=False, norm="l2")
    assert torch.allclose(plain, theirs, atol=1e-6)  # the same iterates, not only the same verdicts


def test_apgd_targeted_l2_matches_the_official_code_per_sample(setup):
    module = _official()
    model, x, y = setup
    ref = module.autopgd_base.APGDAttack_targeted(model, n_iter=100, norm="L2", n_restarts=1, eps=0.6, seed=0,
                                                  n_target_classes=3, device="cpu", logger=logging.getLogger("test"))
    theirs = ref.perturb(x.clone(), y.clone())
    ours = apgd.apgd_targeted(model, x, y, 0.6, seed=0, n_target_classes=3, norm="l2")
    assert torch.equal(_fooled(model, x, ours, y, 0.6), _fooled(model, x, theirs, y, 0.6))
    assert 0 < int(_fooled(model, x, theirs, y, 0.6).sum()) < len(x)


def test_fab_l2_projection_and_run_match_the_official_code(setup):
    module = _official()
    model, x, y = setup
    g = torch.Generator().manual_seed(0)
    t, w, b = torch.rand(40, 64, generator=g), torch.randn(40, 64, generator=g), 3 * torch.randn(40, generator=g)
    w[0, :10] = 0
    w[1, 5] = 1e-9
    b[2], b[3] = 1000.0, -1000.0  # out of reach both ways: the box corners
    assert torch.allclose(fab.project_l2(t, w, b), module.fab_projections.projection_l2(t, w.clone(), b), atol=1e-6)
    ref = module.fab_pt.FABAttack_PT(model, norm="L2", n_restarts=1, n_iter=30, eps=0.6, seed=0, targeted=True,
                                     device="cpu", n_target_classes=3)
    theirs = ref.perturb(x.clone(), y.clone())
    ours = fab.fab_targeted(model, x, y, 0.6, n_target_classes=3, n_iter=30, drop=False, norm="l2")
    assert torch.equal(_fooled(model, x, ours, y, 0.6), _fooled(model, x, theirs, y, 0.6))
    assert torch.allclose(ours, theirs, atol=1e-5)
    dropped = fab.fab_targeted(model, x, y, 0.6, n_target_classes=3, n_iter=30, norm="l2")
    assert torch.equal(_fooled(model, x, dropped, y, 0.6), _fooled(model, x, theirs, y, 0.6))


@pytest.mark.parametrize("channels, size, eps", [(1, 8, 0.3), (3, 16, 0.5)])
def test_square_l2_matches_the_official_code_per_sample(channels, size, eps):
    """The active samples are the official ones in the same order, so the signs drawn for them agree too: the
    same points, bit for bit."""
    module = _official()
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(channels, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * (size - 2) ** 2, 10)).eval()
    x = torch.rand(24, channels, size, size)
    with torch.no_grad():
        y = model(x).argmax(1)
    ref = module.square.SquareAttack(model, p_init=0.8, n_queries=300, eps=eps, norm="L2", n_restarts=1, seed=4,
                                     device="cpu", resc_schedule=False)
    theirs = ref.perturb(x.clone(), y.clone())
    ours = square.square(model, x, y, eps, seed=4, n_queries=300, norm="l2")
    assert torch.equal(_fooled(model, x, ours, y, eps), _fooled(model, x, theirs, y, eps))
    assert 0 < int(_fooled(model, x, theirs, y, eps).sum()) < len(x)
    assert torch.equal(ours, theirs)


def test_autoattack_l2_ardir_engine_gives_the_official_robust_accuracy(setup):
    """The standard version under L2, both engines, the same seed: the same points robust after each component."""
    _official()
    model, x, y = setup
    x, y = x[:12], y[:12]
    runs = {engine: aa.AutoAttack(model, eps=0.9, num_classes=10, engine=engine, norm="l2").run(x, y, seed=0)
            for engine in ("ardir", "official")}
    (robust, per), (robust_official, per_official) = runs["ardir"], runs["official"]
    assert torch.equal(robust, robust_official) and 0 < int(robust.sum()) < len(x)
    assert all(torch.equal(per[name], per_official[name]) for name in aa.STANDARD)


def test_autoattack_l2_ardir_engine_settings(tiny):
    attack = aa.AutoAttack(tiny(num_classes=10), eps=0.5, num_classes=10, norm="l2")
    assert attack.engine == "ardir" and attack.settings["norm"] == "L2"
    assert attack.settings["components"] == aa.AutoAttack(tiny(num_classes=10), num_classes=10).settings["components"]
    assert aa._ardir_component("square", tiny(num_classes=10), 0.5, 10, 0, "l2").keywords["norm"] == "l2"


def test_evaluate_under_l2_with_the_default_engine(setup):
    model, x, y = setup
    x, y = x[:8], y[:8]
    report = ardir.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=8), norm="l2", eps=1.0,
                            attacks=("natural", "pgd20", "autoattack"), progress=False, warn=False)
    assert report.settings["autoattack"]["norm"] == "L2"
    assert "(ardir engine, L2)" in report.descriptions["autoattack"]
    assert report.accuracy["autoattack"] <= report.accuracy["natural"] == 100.0
    assert list(report.components["autoattack"]) == list(aa.STANDARD)
