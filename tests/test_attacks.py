import pytest
import torch
import torch.nn.functional as F

import ardir
from ardir.attacks import cw_margin, model_mode
from conftest import TinyNet


def batch(n=16):
    return torch.rand(n, 1, 8, 8), torch.randint(0, 4, (n,))


@pytest.mark.parametrize("loss", ["ce", "kl", "cw"])
@pytest.mark.parametrize("start", ["uniform", "normal", "none"])
def test_pgd_stays_in_ball_and_box(loss, start):
    model = TinyNet()
    x, y = batch()
    adv = ardir.PGD(model, eps=0.05, step_size=0.02, steps=5, loss=loss, random_start=start)(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert (adv - x).abs().max() <= 0.05 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("loss", ["ce", "kl", "cw"])
def test_pgd_raises_the_climbed_loss(loss):
    model = TinyNet().eval()
    x, y = batch(64)
    attack = ardir.PGD(model, eps=0.1, step_size=0.02, steps=10, loss=loss, random_start="none")
    target = F.softmax(torch.randn(64, 4), 1)
    with torch.no_grad():
        before = attack.objective(model(x), y, target if loss == "kl" else F.softmax(model(x), 1))
    adv = attack(x, y, target if loss == "kl" else None)
    with torch.no_grad():
        after = attack.objective(model(adv), y, target if loss == "kl" else F.softmax(model(x), 1))
    assert after > before


def test_pgd_step_is_the_textbook_update_bit_for_bit():
    """One clamp to the ball-and-box intersection gives exactly Madry's step, ball projection then [0, 1] clip."""
    model = TinyNet().eval()
    x, y = batch(32)
    x[:8] = x[:8].round()  # pixels at 0 and 1, where the ball leaves the box
    torch.manual_seed(3)
    adv = ardir.PGD(model, eps=0.1, step_size=0.03, steps=6)(x, y)
    torch.manual_seed(3)
    ref = (x + torch.empty_like(x).uniform_(-0.1, 0.1)).clamp(0, 1)
    for _ in range(6):
        ref.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(ref), y, reduction="sum"), ref)
        ref = ref.detach() + 0.03 * grad.sign()
        ref = torch.min(torch.max(ref, x - 0.1), x + 0.1).clamp(0, 1)
    assert torch.equal(adv, ref)


def test_pgd_leaves_no_parameter_gradient_and_restores_modes():
    model = TinyNet()
    model.train()
    model.bn.eval()  # a mixed state must come back exactly
    before = {name: m.training for name, m in model.named_modules()}
    x, y = batch()
    for mode in ["eval", "train", "keep"]:
        ardir.PGD(model, steps=3, mode=mode)(x, y)
        assert {name: m.training for name, m in model.named_modules()} == before
        assert all(p.grad is None for p in model.parameters())


def test_pgd_uses_the_requested_mode():
    model = TinyNet().train()
    seen = []
    model.bn.register_forward_hook(lambda m, i, o: seen.append(m.training))
    ardir.PGD(model, steps=2, mode="eval")(*batch())
    assert seen and not any(seen)
    seen.clear()
    ardir.PGD(model, steps=2, mode="train")(*batch())
    assert seen[0] is False  # the first call's input check probes the model in eval mode (no BatchNorm update)
    assert len(seen) == 3 and all(seen[1:])


def test_pgd_zero_steps_returns_start_point():
    model = TinyNet()
    x, y = batch()
    assert torch.equal(ardir.PGD(model, steps=0, random_start="none")(x, y), x)


def test_cw_margin():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    assert torch.allclose(cw_margin(logits, torch.tensor([0, 0])), torch.tensor([-1.0, 3.0]))


@pytest.mark.parametrize("kwargs, word", [
    (dict(eps=0), "eps"), (dict(eps=1.5), "eps"), (dict(eps=-0.1), "eps"), (dict(step_size=0), "step_size"),
    (dict(steps=-1), "steps"), (dict(loss="xent"), "loss"), (dict(random_start="gauss"), "random_start"),
    (dict(mode="training"), "mode")])
def test_pgd_bad_arguments_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ardir.PGD(TinyNet(), **kwargs)


def test_model_mode_restores_on_error():
    model = TinyNet().train()
    with pytest.raises(RuntimeError):
        with model_mode(model, "eval"):
            assert not model.training
            raise RuntimeError("boom")
    assert model.training
