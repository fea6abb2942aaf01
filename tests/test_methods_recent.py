"""AdaAD and MTARD against the reference facts (../shared/reference/methods.md), recomputed here independently on
fixed tensors; PGD on a callable loss and its guarantees; MTARD's adaptive weights as run state (exact resume)."""
import math

import pytest
import torch

import ardir
from ardir import cli
from ardir.data import get_loaders
from conftest import TinyNet
from test_methods import C, kl_rows, log_softmax, softmax  # the reference math, written once


def ce_sum(z, y):
    return -log_softmax(z)[torch.arange(len(y)), y].sum()


def frozen(model):
    return model.eval().requires_grad_(False)


@pytest.fixture
def data():
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, C, (8,))
    adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    return x, y, adv


def modes(model):
    return {name: m.training for name, m in model.named_modules()}


# ------------------------------------------------------------------------------------ PGD on a callable loss
def test_pgd_on_a_callable_loss_keeps_its_guarantees(data):
    x, y, _ = data
    student, teacher = TinyNet().train(), TinyNet(width=12).train()  # teacher NOT frozen: its params need grad
    student.bn.eval()  # mixed states must come back exactly
    before_s, before_t = modes(student), modes(teacher)
    seen = []
    teacher.bn.register_forward_hook(lambda m, i, o: seen.append(m.training))

    def discrepancy(adv, labels):
        return ardir.attacks.kl_to(torch.softmax(teacher(adv), 1), student(adv))
    for mode in ("eval", "train"):
        attack = ardir.PGD(student, eps=0.05, step_size=0.02, steps=4, loss=discrepancy, random_start="normal",
                           mode=mode, loss_models=[teacher])
        adv = attack(x, y)
        assert adv.shape == x.shape and not adv.requires_grad
        assert (adv - x).abs().max() <= 0.05 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        assert modes(student) == before_s and modes(teacher) == before_t
        assert all(p.grad is None for p in (*student.parameters(), *teacher.parameters()))
    assert seen and not any(seen)  # the teacher ran in eval mode (its BatchNorm did not move), whatever `mode`
    assert "discrepancy" in repr(attack)


def test_pgd_callable_step_is_the_textbook_update_bit_for_bit(data):
    x, y, _ = data
    student, teacher = TinyNet().eval(), frozen(TinyNet(width=12))

    def discrepancy(adv, labels):
        return ardir.attacks.kl_to(torch.softmax(teacher(adv), 1), student(adv))
    torch.manual_seed(5)
    adv = ardir.PGD(student, eps=0.1, step_size=0.03, steps=2, loss=discrepancy, random_start="normal",
                    loss_models=[teacher])(x, y)
    torch.manual_seed(5)
    ref = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    for _ in range(2):
        ref.requires_grad_(True)
        t = teacher(ref)
        loss = (softmax(t) * (log_softmax(t) - log_softmax(student(ref)))).sum()
        grad, = torch.autograd.grad(loss, ref)
        ref = torch.min(torch.max(ref.detach() + 0.03 * grad.sign(), x - 0.1), x + 0.1).clamp(0, 1)
    assert torch.allclose(adv, ref, atol=1e-6)
    assert ((adv - ref).abs() > 1e-6).sum() == 0


def test_pgd_callable_raises_the_climbed_loss(data):
    x, y, _ = data
    student, teacher = TinyNet().eval(), frozen(TinyNet(width=12))

    def discrepancy(adv, labels):
        return ardir.attacks.kl_to(torch.softmax(teacher(adv), 1), student(adv))
    adv = ardir.PGD(student, eps=0.1, step_size=0.02, steps=10, loss=discrepancy, random_start="none")(x, y)
    with torch.no_grad():
        assert discrepancy(adv, y).sum() > discrepancy(x, y).sum()


@pytest.mark.parametrize("loss, message", [
    (lambda adv, y: torch.zeros(len(adv), 4, requires_grad=True), r"must return the per-sample loss, a tensor of "
                                                                   r"shape \(8,\), got \(8, 4\)"),
    (lambda adv, y: adv.flatten(1).sum(1).detach(), "does not depend on adv_images"),
    (lambda adv, y: 1.0, "got float"),
])
def test_pgd_callable_loss_that_cannot_be_climbed_is_one_sentence(data, loss, message):
    x, y, _ = data
    with pytest.raises(ValueError, match=message) as err:
        ardir.PGD(TinyNet(), steps=1, loss=loss)(x, y)
    assert "\n" not in str(err.value)


def test_pgd_callable_loss_of_other_inputs_is_refused(data):
    x, y, _ = data
    model = TinyNet()
    with pytest.raises(ValueError, match="does not depend on adv_images"):
        ardir.PGD(model, steps=1, loss=lambda adv, labels: model(x).sum(1))(x, y)
    with pytest.raises(TypeError, match="or a function loss"):
        ardir.PGD(model, loss=3)
    with pytest.raises(TypeError, match="loss_models must be torch.nn.Modules"):
        ardir.PGD(model, loss=lambda a, b: a, loss_models=["teacher"])


# ---------------------------------------------------------------------------------------------------- AdaAD
@pytest.mark.parametrize("reduction, divisor", [("mean", C), ("batchmean", 1)])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_adaad_outer_loss(data, monkeypatch, reduction, divisor, alpha):
    x, y, adv = data
    student, teacher = TinyNet().train(), frozen(TinyNet(width=12))
    method = ardir.AdaAD(alpha=alpha, kl_reduction=reduction)
    monkeypatch.setattr(method, "adversarial", lambda *a, **k: adv)
    terms = method(student, x, y, teacher)
    expected = alpha * kl_rows(softmax(teacher(adv)), log_softmax(student(adv))).mean() / divisor  # T on x'
    if alpha < 1:
        expected = expected + (1 - alpha) * kl_rows(softmax(teacher(x)), log_softmax(student(x))).mean() / divisor
    assert set(terms) == ({"kl_adv"} if alpha == 1 else {"kl_adv", "kl_nat"})
    assert torch.allclose(sum(terms.values()), expected, rtol=1e-4, atol=1e-7)


def test_adaad_defaults_are_the_reference_codes_at_8_255():
    method = ardir.AdaAD()
    assert (method.eps, method.step_size, method.steps) == (8 / 255, 2 / 255, 10)
    assert (method.random_start, method.attack_mode, method.alpha, method.kl_reduction) == ("normal", "eval", 1.0,
                                                                                               "mean")
    assert method.epochs == 200 and method.milestones == (0.5, 0.75) and ardir.AdaAD.needs_teacher
    assert "16/255" in ardir.AdaAD.__doc__
    with pytest.raises(ValueError, match=r"alpha=1.5 must be in \[0, 1\]"):
        ardir.AdaAD(alpha=1.5)


def test_adaad_attack_step_climbs_the_discrepancy_through_the_teacher(data):
    """One PGD step of AdaAD's inner maximisation, recomputed: x0 = x + 0.001 N(0, I), both models in eval mode,
    the gradient of sum KL(p(T(x0)) || p(S(x0))) through teacher AND student; sign step, projection."""
    x, y, _ = data
    student, teacher = TinyNet().train(), frozen(TinyNet(width=12))
    method = ardir.AdaAD(eps=0.1, step_size=0.03, steps=1)
    torch.manual_seed(7)
    adv = method.adversarial(student, teacher, x, y)
    assert student.training and not teacher.training
    torch.manual_seed(7)
    x0 = (x + 0.001 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    student.eval()
    t = teacher(x0)
    loss = (softmax(t) * (log_softmax(t) - log_softmax(student(x0)))).sum()
    grad, = torch.autograd.grad(loss, x0)
    x0d = x0.detach()
    t_const = softmax(teacher(x0d)).detach()  # the same step with the teacher held constant
    x1 = x0d.clone().requires_grad_(True)
    grad_const, = torch.autograd.grad((t_const * (t_const.log() - log_softmax(student(x1)))).sum(), x1)
    student.train()
    expected = torch.min(torch.max(x0d + 0.03 * grad.sign(), x - 0.1), x + 0.1).clamp(0, 1)
    assert torch.allclose(adv, expected, atol=1e-6)
    assert not torch.equal(grad.sign(), grad_const.sign())  # the teacher's gradient is part of the step


# ---------------------------------------------------------------------------------------------------- MTARD
def test_mtard_outer_loss_and_weight_update_over_steps(monkeypatch):
    torch.manual_seed(0)
    student, t_adv, t_nat = TinyNet().train(), frozen(TinyNet(width=12)), frozen(TinyNet(width=10))
    method = ardir.MTARD(natural_teacher=t_nat, eta=0.3, beta=2.0, kl_scale=10.0)
    method.setup(student, t_adv, torch.rand(2, 1, 8, 8))
    batches = [(torch.rand(8, 1, 8, 8), torch.randint(0, C, (8,))) for _ in range(4)]
    w_nat, l0 = 0.5, None
    for step, (x, y) in enumerate(batches):
        adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
        monkeypatch.setattr(method, "attack", lambda *a, **k: adv)
        method.lr_scale = 0.1 if step == 3 else 1.0  # eta follows the lr: x0.1 after a milestone
        terms = method(student, x, y, t_adv)
        with torch.no_grad():
            l_adv = 10 * kl_rows(softmax(t_adv(adv)), log_softmax(student(adv))).mean().item() / C  # T_adv on x'
            l_nat = 10 * kl_rows(softmax(t_nat(x)), log_softmax(student(x))).mean().item() / C
        if l0 is None:
            l0 = (l_nat, l_adv)  # the very first batch's losses, never reset
        r_nat, r_adv = (l_nat / l0[0]) ** 2.0, (l_adv / l0[1]) ** 2.0
        eta = 0.3 * (0.1 if step == 3 else 1.0)
        w_nat = w_nat - eta * (w_nat - r_nat / (r_nat + r_adv))
        assert math.isclose(method.nat_weight.item(), w_nat, rel_tol=1e-5)
        assert math.isclose(terms["kl_adv"].item(), (1 - w_nat) * l_adv, rel_tol=1e-4)
        assert math.isclose(terms["kl_nat"].item(), w_nat * l_nat, rel_tol=1e-4)
        assert terms["kl_adv"].requires_grad
    assert method.initial_losses.tolist() == pytest.approx(list(l0), rel=1e-5)
    assert w_nat != 0.5  # the weights moved


def test_mtard_attack_is_ce_from_a_normal_start_in_eval_mode(data):
    x, y, _ = data
    student, t_adv = TinyNet().train(), frozen(TinyNet(width=12))
    method = ardir.MTARD(natural_teacher=frozen(TinyNet()), eps=0.1, step_size=0.03, steps=1)
    assert method.epochs == 300 and method.kl_reduction == "mean" and method.eta == 0.025 and method.beta == 1
    torch.manual_seed(3)
    adv = method.attack(student, x, y)
    torch.manual_seed(3)
    x0 = (x + 0.001 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    student.eval()
    grad, = torch.autograd.grad(ce_sum(student(x0), y), x0)
    student.train()
    assert torch.allclose(adv, torch.min(torch.max(x0.detach() + 0.03 * grad.sign(), x - 0.1), x + 0.1).clamp(0, 1),
                          atol=1e-6)


def test_mtard_bad_arguments_are_one_sentence_each():
    loader = [(torch.rand(8, 1, 8, 8), torch.randint(0, C, (8,)))]
    with pytest.raises(ValueError, match="MTARD distils from two teachers: pass natural_teacher=") as err:
        ardir.Trainer(TinyNet(), loader, teacher=frozen(TinyNet()), method="mtard", progress=False)
    with pytest.raises(ValueError, match="natural_teacher predicts 3 classes but the student 4") as err2:
        ardir.Trainer(TinyNet(), loader, teacher=frozen(TinyNet()), method="mtard",
                      natural_teacher=frozen(TinyNet(num_classes=3)), progress=False)
    with pytest.raises(TypeError, match="natural_teacher must be a torch.nn.Module"):
        ardir.MTARD(natural_teacher=3)
    for e in (err, err2):
        assert "\n" not in str(e.value) and str(e.value).count(". ") == 0


def test_mtard_natural_teacher_that_cannot_be_loaded_is_named(tmp_path):
    method = ardir.MTARD(natural_teacher=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match=r"^natural_teacher: checkpoint .*missing.pt' does not exist") as err:
        method.setup(TinyNet(), frozen(TinyNet()), torch.rand(2, 1, 8, 8))
    assert "\n" not in str(err.value)


def test_mtard_natural_teacher_from_a_name_is_kept_out_of_the_method_state():
    method = ardir.MTARD(natural_teacher="cnn_small")
    student = ardir.models.create("cnn_small", num_classes=10, in_chans=1)
    with pytest.warns(UserWarning, match="freshly initialised"):
        method.setup(student, student, torch.rand(2, 1, 28, 28))
    assert isinstance(method.natural_model, torch.nn.Module) and not method.natural_model.training
    assert method.natural_teacher == "cnn_small" and "natural_teacher='cnn_small'" in repr(method)
    assert set(method.state_dict()) == {"nat_weight", "initial_losses"} and not list(method.parameters())


def test_mtard_eta_follows_the_trainers_lr_schedule():
    loader = [(torch.rand(8, 1, 8, 8), torch.randint(0, C, (8,)))]
    trainer = ardir.Trainer(TinyNet(), loader, teacher=frozen(TinyNet()), method="mtard", epochs=3,
                            milestones=[1, 2], natural_teacher=frozen(TinyNet(width=4)), progress=False, steps=1)
    scales = []
    for _ in range(3):
        trainer.train_epoch()
        scales.append(trainer.method.lr_scale)
    assert scales == pytest.approx([1.0, 0.1, 0.01])


# ------------------------------------------------------------------------------------------- exact resume
def mtard_trainer(directory, epochs=2):
    torch.manual_seed(0)
    loaders = get_loaders("fashion-mnist", fake_data=True, limit=48, batch_size=8, val_size=0, seed=0)
    torch.manual_seed(1)
    teacher, natural = frozen(TinyNet(width=12, num_classes=10)), frozen(TinyNet(width=6, num_classes=10))
    torch.manual_seed(0)
    return ardir.Trainer(TinyNet(num_classes=10), loaders.train, teacher=teacher, method="mtard", epochs=epochs,
                         milestones=[1], lr=0.05, progress=False, eps=0.1, step_size=0.03, steps=2, eta=0.3,
                         natural_teacher=natural, checkpoint_dir=directory, checkpoint_every_steps=4)


def snapshot(trainer):
    opt = trainer.optimizer.state_dict()["state"]
    return ({k: v.clone() for k, v in trainer.student.state_dict().items()},
            {k: v.clone() for k, v in trainer.method.state_dict().items()},
            {i: s["momentum_buffer"].clone() for i, s in opt.items()})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = mtard_trainer(tmp_path_factory.mktemp("mtard-reference"))
    trainer.fit()
    return snapshot(trainer), [r["loss"] for r in trainer.history]


def test_mtard_weights_are_run_state_and_resume_bit_for_bit(tmp_path, uninterrupted):
    """Killed after step 11 (6 batches per epoch, checkpoints every 4 steps and at epoch ends: the last one is step
    8, mid-epoch 2, after the lr drop), resumed: the adaptive weights, their first-batch normalisers and the student
    end exactly as in the uninterrupted run."""
    expected, losses = uninterrupted
    assert expected[1]["nat_weight"].item() != 0.5

    trainer = mtard_trainer(tmp_path / "run")
    forward = trainer.method.forward
    weights = []

    def dying(*args, **kwargs):
        if trainer.step == 11:
            raise KeyboardInterrupt("simulated kill after step 11")
        weights.append(trainer.method.nat_weight.item())
        return forward(*args, **kwargs)
    trainer.method.forward = dying
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    torch.manual_seed(12345)  # the killed process's random state is lost
    resumed = mtard_trainer(tmp_path / "run")
    path = resumed.resume(tmp_path / "run")
    assert resumed.step == 8 and "step-000000008" in path.name and resumed._pending is not None  # mid-epoch
    assert resumed.method.nat_weight.item() == weights[8] and weights[8] != weights[7] != weights[10]
    assert not torch.isnan(resumed.method.initial_losses).any()
    resumed.fit()
    got = snapshot(resumed)
    for part_a, part_b in zip(got, expected):
        assert part_a.keys() == part_b.keys()
        for key in part_a:
            assert torch.equal(part_a[key], part_b[key]), f"{key} differs"
    assert [r["loss"] for r in resumed.history] == losses


def test_mtard_resume_needs_its_state_the_comparison_is_sensitive(tmp_path, uninterrupted):
    """Resetting the restored weights to their start breaks bit identity: the comparison above would notice."""
    first = mtard_trainer(tmp_path / "run", epochs=1)
    first.fit()
    resumed = mtard_trainer(tmp_path / "run")
    resumed.resume(tmp_path / "run")
    resumed.method.nat_weight.fill_(0.5)
    resumed.fit()
    assert not torch.equal(resumed.method.nat_weight, uninterrupted[0][1]["nat_weight"])
    assert any(not torch.equal(v, uninterrupted[0][0][k]) for k, v in resumed.student.state_dict().items())


# ------------------------------------------------------------------------------------------------ the CLI
TINY = ["--dataset", "fashion-mnist", "--fake-data", "--model", "cnn_small", "--train-size", "32", "--val-size",
        "16", "--batch-size", "16", "--limit-batches", "1", "--steps", "1", "--val-attack-steps", "1", "--eps", "0.1",
        "--step-size", "0.05", "--epochs", "1", "--quiet", "--teacher", "cnn_small"]


@pytest.mark.filterwarnings("ignore:teacher=")
def test_ardir_train_runs_adaad_and_mtard(tmp_path):
    assert cli.main(["train", *TINY, "--method", "adaad", "--output-dir", str(tmp_path / "adaad")]) == 0
    assert cli.main(["train", *TINY, "--method", "mtard", "--natural-teacher", "cnn_small", "--eta", "0.1",
                     "--output-dir", str(tmp_path / "mtard")]) == 0
    config = (tmp_path / "mtard" / "config.toml").read_text()
    assert 'natural_teacher = "cnn_small"' in config and "eta = 0.1" in config
    state = torch.load(tmp_path / "mtard" / "last.pt", weights_only=True)
    assert set(state["trainer"]["method"]) == {"nat_weight", "initial_losses"}


def test_ardir_train_mtard_without_natural_teacher_is_one_sentence(tmp_path, capsys):
    code = cli.main(["train", *TINY, "--method", "mtard", "--output-dir", str(tmp_path / "m")])
    assert code != 0
    err = capsys.readouterr().err
    assert "MTARD distils from two teachers" in err and "--natural-teacher" in err


@pytest.mark.parametrize("method", ["adaad", "mtard"])
def test_throughput_reference_loop_and_flag_cover_them(method):
    """benchmarks/throughput.py --method adaad|mtard: its plain reference loop runs (one tiny step here)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    student, teacher, natural = TinyNet(), frozen(TinyNet(width=12)), frozen(TinyNet(width=6))
    before = [p.detach().clone() for p in student.parameters()]
    loader = [(torch.rand(4, 1, 8, 8), torch.randint(0, C, (4,)))]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    done = bench.reference_steps(student, teacher, torch.nn.Identity(), optimizer, loader, 1, torch.device("cpu"),
                                 method, 0.1, 0.03, 2, natural=natural)
    assert done == 1 and any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert f"\"{method}\"" in path.read_text().split("add_argument(\"--method\"")[1].split("\n")[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_in_adaad_or_mtard_steps_on_cuda():
    """The callable-loss attack and MTARD's weight update stay on the device: no host sync in a batch's method call."""
    student, teacher = TinyNet().cuda(), frozen(TinyNet(width=12)).cuda()
    x, y = torch.rand(8, 1, 8, 8, device="cuda"), torch.randint(0, C, (8,), device="cuda")
    methods = [ardir.AdaAD(eps=0.1, step_size=0.03, steps=3),
               ardir.MTARD(natural_teacher=frozen(TinyNet(width=6)).cuda(), eps=0.1, step_size=0.03, steps=3)]
    for method in methods:
        method.setup(student, teacher, x)
        sum(method(student, x, y, teacher).values()).backward()  # warm-up (cuDNN, allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for method in methods:
            sum(method(student, x, y, teacher).values()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
