"""ardir's own AutoAttack components (ardir.apgd, ardir.fab, ardir.square): the fast paths (points dropped once
their verdict is settled) give the verdicts of plain runs, and the components agree with the official code
(``pyautoattack``) per sample on tiny models with the same seed. Seconds, synthetic data only."""
from __future__ import annotations

import logging

import pytest
import torch

from ardir import apgd, autoattack as aa, fab, square

EPS = 0.1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is fastest (and immune to a busy machine's oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _official():
    try:
        return aa.official_module()
    except ImportError:
        pytest.skip("official AutoAttack not installed (pip install pyautoattack)")


@pytest.fixture
def setup(tiny):
    """A tiny model (10 classes) and 24 points it classifies correctly."""
    torch.manual_seed(1)
    model = tiny(width=8, num_classes=10).eval()
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x[:24], y[:24]


def _fooled(model, x, adv, y):
    return ~aa.still_correct(model, x, adv, y, EPS)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_dropping_changes_no_verdict(setup, loss):
    model, x, y = setup
    fast = apgd.apgd(model, x, y, EPS, seed=3, loss=loss, drop=True)
    plain = apgd.apgd(model, x, y, EPS, seed=3, loss=loss, drop=False)
    assert torch.equal(_fooled(model, x, fast, y), _fooled(model, x, plain, y))
    assert 0 < int(_fooled(model, x, plain, y).sum()) < len(x)  # the test means something


def test_apgd_targeted_dropping_changes_no_verdict(setup):
    model, x, y = setup
    fast = apgd.apgd_targeted(model, x, y, 0.05, seed=0, n_target_classes=3, drop=True)
    plain = apgd.apgd_targeted(model, x, y, 0.05, seed=0, n_target_classes=3, drop=False)
    assert torch.equal(_fooled(model, x, fast, y), _fooled(model, x, plain, y))


def test_fab_dropping_changes_no_verdict(setup):
    model, x, y = setup
    fast = fab.fab_targeted(model, x, y, 0.05, n_target_classes=3, n_iter=30, drop=True)
    plain = fab.fab_targeted(model, x, y, 0.05, n_target_classes=3, n_iter=30, drop=False)
    assert torch.equal(~aa.still_correct(model, x, fast, y, 0.05), ~aa.still_correct(model, x, plain, y, 0.05))


def test_attacks_leave_the_global_rng_alone(setup):
    model, x, y = setup
    state = torch.get_rng_state()
    apgd.apgd(model, x, y, EPS, seed=5, n_iter=5)
    square.square(model, x, y, EPS, seed=5, n_queries=20)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_matches_the_official_code_per_sample(setup, loss):
    module = _official()
    model, x, y = setup
    ref = module.autopgd_base.APGDAttack(model, n_iter=100, norm="Linf", n_restarts=1, eps=EPS, seed=7, loss=loss,
                                         rho=0.75, device="cpu", logger=logging.getLogger("test"))
    theirs = ref.perturb(x.clone(), y.clone())
    ours = apgd.apgd(model, x, y, EPS, seed=7, loss=loss)
    assert torch.equal(_fooled(model, x, ours, y), _fooled(model, x, theirs, y))
    plain = apgd.apgd(model, x, y, EPS, seed=7, loss=loss, drop=False)
    assert torch.allclose(plain, theirs, atol=1e-6)  # the same iterates, not only the same verdicts


def test_apgd_targeted_matches_the_official_code_per_sample(setup):
    module = _official()
    model, x, y = setup
    ref = module.autopgd_base.APGDAttack_targeted(model, n_iter=100, norm="Linf", n_restarts=1, eps=0.05, seed=0,
                                                  n_target_classes=3, device="cpu", logger=logging.getLogger("test"))
    theirs = ref.perturb(x.clone(), y.clone())
    ours = apgd.apgd_targeted(model, x, y, 0.05, seed=0, n_target_classes=3)
    assert torch.equal(~aa.still_correct(model, x, ours, y, 0.05), ~aa.still_correct(model, x, theirs, y, 0.05))


def test_fab_projection_and_run_match_the_official_code(setup):
    module = _official()
    model, x, y = setup
    g = torch.Generator().manual_seed(0)
    t, w, b = torch.rand(40, 64, generator=g), torch.randn(40, 64, generator=g), torch.randn(40, generator=g)
    w[0, :10] = 0
    assert torch.allclose(fab.project_linf(t, w, b), module.fab_projections.projection_linf(t, w, b), atol=1e-6)
    ref = module.fab_pt.FABAttack_PT(model, norm="Linf", n_restarts=1, n_iter=30, eps=0.05, seed=0, targeted=True,
                                     device="cpu", n_target_classes=3)
    theirs = ref.perturb(x.clone(), y.clone())
    ours = fab.fab_targeted(model, x, y, 0.05, n_target_classes=3, n_iter=30, drop=False)
    assert torch.equal(~aa.still_correct(model, x, ours, y, 0.05), ~aa.still_correct(model, x, theirs, y, 0.05))
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("share", [0.0, 1 / 3, float("inf")])
def test_fab_in_either_order_takes_the_official_steps(setup, monkeypatch, share):
    """Testing first (official order) or taking the gradient first and recomputing it for the points pulled
    back: the same iterates as the official code, whichever the share of pulled-back points chooses."""
    module = _official()
    model, x, y = setup
    ref = module.fab_pt.FABAttack_PT(model, norm="Linf", n_restarts=1, n_iter=30, eps=0.05, seed=0, targeted=True,
                                     device="cpu", n_target_classes=3)
    theirs = ref.perturb(x.clone(), y.clone())
    monkeypatch.setattr(fab, "TEST_FIRST_ABOVE", share)
    ours = fab.fab_targeted(model, x, y, 0.05, n_target_classes=3, n_iter=30, drop=False)
    assert torch.allclose(ours, theirs, atol=1e-5)
    dropped = fab.fab_targeted(model, x, y, 0.05, n_target_classes=3, n_iter=30, drop=True)
    assert torch.equal(~aa.still_correct(model, x, dropped, y, 0.05), ~aa.still_correct(model, x, theirs, y, 0.05))


def test_square_matches_the_official_code_per_sample(setup):
    """Square's draws do not depend on the batch, so the random streams agree: the same points."""
    module = _official()
    model, x, y = setup
    ref = module.square.SquareAttack(model, p_init=0.8, n_queries=300, eps=0.05, norm="Linf", n_restarts=1, seed=4,
                                     device="cpu", resc_schedule=False)
    theirs = ref.perturb(x.clone(), y.clone())
    ours = square.square(model, x, y, 0.05, seed=4, n_queries=300)
    assert torch.equal(~aa.still_correct(model, x, ours, y, 0.05), ~aa.still_correct(model, x, theirs, y, 0.05))
    assert torch.equal(ours, theirs)


def test_square_skips_only_the_queries_that_move_nothing(setup, monkeypatch):
    """Half the pixels at 0 or 1, as a Fashion-MNIST background: many proposals leave a point where it was. Those
    rows are not sent to the model, and the points are still the official code's, query for query."""
    module = _official()
    model, x, y = setup
    x = x.clone()
    x[:, :, :4] = (x[:, :, :4] > 0.5).float()
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    ref = module.square.SquareAttack(model, p_init=0.8, n_queries=300, eps=0.05, norm="Linf", n_restarts=1, seed=4,
                                     device="cpu", resc_schedule=False)
    theirs = ref.perturb(x.clone(), y.clone())
    queried, moved, active = [], [], []
    real_margin, real_accept = square.margin, square.accept

    def accept(m_new, m_min, x_new, best):
        moved.append(int((x_new != best).flatten(1).any(1).sum()))
        active.append(len(x_new))
        return real_accept(m_new, m_min, x_new, best)
    monkeypatch.setattr(square, "margin", lambda m, xs, ys: queried.append(len(xs)) or real_margin(m, xs, ys))
    monkeypatch.setattr(square, "accept", accept)
    ours = square.square(model, x, y, 0.05, seed=4, n_queries=300)
    assert torch.equal(ours, theirs)
    assert sum(queried[1:]) == sum(moved) < sum(active)  # queried[0]: the margin of the start


def test_square_schedule_is_the_official_one():
    assert [square.p_selection(0.8, it) for it in (0, 10, 11, 50, 51, 4999)] == \
        [0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 128]


def test_ardir_components_use_the_official_settings(tiny):
    model = tiny(num_classes=10)
    ce = aa._ardir_component("apgd-ce", model, EPS, 10, 0)
    t = aa._ardir_component("apgd-t", model, EPS, 5, 0)
    f = aa._ardir_component("fab-t", model, EPS, 10, 0)
    s = aa._ardir_component("square", model, EPS, 10, 0)
    assert ce.func is apgd.apgd and (ce.keywords["n_iter"], ce.keywords["rho"], ce.keywords["loss"]) == (100, 0.75, "ce")
    assert t.keywords["n_target_classes"] == 4 and t.keywords["n_iter"] == 100
    assert (f.keywords["n_iter"], f.keywords["alpha_max"], f.keywords["eta"], f.keywords["beta"]) == (100, 0.1, 1.05, 0.9)
    assert (s.keywords["n_queries"], s.keywords["p_init"]) == (5000, 0.8)
    assert "ardir" in aa.AutoAttack(model, num_classes=10).settings["engine"]


def test_fast_model_folds_batchnorm_in_eval_mode_only():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    fast = aa.fast_model(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is left alone
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in aa.fast_model(model.train()).modules())


@pytest.mark.parametrize("name", ["cnn_small", "resnet18", "preact_resnet18", "mobilenet_v2"])
def test_fast_model_of_zoo_networks_computes_the_same_function(name):
    from ardir import models
    in_chans, size = (1, 28) if name.startswith("cnn") else (3, 32)
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, in_chans=in_chans).eval()
    for module in model.modules():  # statistics away from (0, 1), so a wrong fold would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    fast = aa.fast_model(model)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules()) < \
        sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.rand(3, in_chans, size, size)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)


def test_fast_model_keeps_the_input_normalisation_hook():
    """models.create(..., mean=, std=) normalises in a forward pre-hook, which a traced copy would lose."""
    from ardir import models
    model = models.create("cnn_small", num_classes=10, in_chans=1, mean=[0.5], std=[0.1]).eval()
    fast = aa.fast_model(model, torch.rand(4, 1, 28, 28))
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)


def test_fast_model_does_not_fold_a_module_called_twice():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 1)
            self.bn1, self.bn2 = torch.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn2(self.conv(self.bn1(self.conv(x)))).flatten(1)

    torch.manual_seed(0)
    model = Shared()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.rand(3, 2, 4, 4)
    for sample in (None, x):
        with torch.no_grad():
            assert torch.allclose(aa.fast_model(model, sample)(x), model(x), atol=1e-5)


def test_fast_model_copies_a_model_fx_cannot_trace():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)

        def forward(self, x):
            out = self.bn(self.conv(x))
            return out.flatten(1) if out.sum() > 0 else -out.flatten(1)  # data-dependent: fx cannot trace it

    model = Branchy().eval()
    fast = aa.fast_model(model)
    assert fast is not model and isinstance(fast, Branchy)
    x = torch.rand(3, 1, 5, 5)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-6)


def test_fast_model_is_a_channels_last_copy(tiny):
    model = tiny(num_classes=4).eval()
    fast = aa.fast_model(model)
    assert fast is not model and fast.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.conv.weight.is_contiguous()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)


def test_cached_fast_model_is_made_again_when_the_model_changes(tiny):
    """One copy while nothing changes; a new one once a weight, a train/eval flag or a hook changes."""
    model = tiny().eval()
    first = aa.cached_fast_model(model)
    assert aa.cached_fast_model(model) is first
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    second = aa.cached_fast_model(model)
    assert second is not first and torch.equal(second.fc.bias, model.fc.bias)
    third = aa.cached_fast_model(model.train())
    assert third is not second and any(isinstance(m, torch.nn.BatchNorm2d) for m in third.modules())
    model.eval()
    handle = model.fc.register_forward_hook(lambda m, i, o: o * 2)
    try:
        hooked = aa.cached_fast_model(model)
        x = torch.rand(4, 1, 8, 8)
        with torch.no_grad():
            assert torch.allclose(hooked(x), model(x), atol=1e-5)  # the hook's doubling is kept
    finally:
        handle.remove()
