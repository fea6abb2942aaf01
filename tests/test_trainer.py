import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ardir
from conftest import TinyNet

EPS = 0.1
ATTACK = dict(eps=EPS, step_size=0.03, steps=5)


def robustness_problem(n, seed):
    """4 classes on 1x8x8 images with a robust feature and a non-robust one (Tsipras et al. 2019).

    Robust: the class's quadrant is 0.4 brighter, but only for 70 % of the images (a random quadrant otherwise).
    Non-robust: a fixed +-0.08 pattern per class, perfectly predictive but erased by eps = 0.1.
    Natural training leans on the pattern; adversarial training must use the quadrant.
    """
    g = torch.Generator().manual_seed(seed)
    patterns = torch.where(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(99)) > 0.5, 0.08, -0.08)
    y = torch.randint(0, 4, (n,), generator=g)
    quadrant = torch.where(torch.rand(n, generator=g) < 0.7, y, torch.randint(0, 4, (n,), generator=g))
    x = 0.3 + 0.1 * torch.rand(n, 1, 8, 8, generator=g)
    for q in range(4):
        r, c = divmod(q, 2)
        x[quadrant == q, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 0.4
    return (x + patterns[y]).clamp(0, 1), y


@pytest.fixture(scope="module")
def problem():
    x, y = robustness_problem(2048, 0)
    xt, yt = robustness_problem(512, 1)
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    return train, DataLoader(TensorDataset(xt, yt), batch_size=256)


def pgd_accuracy(model, loader):
    model.eval()
    attack = ardir.PGD(model, eps=EPS, step_size=0.02, steps=20)
    correct = total = 0
    for x, y in loader:
        correct += (model(attack(x, y)).argmax(1) == y).sum().item()
        total += len(y)
    return 100 * correct / total


def train(method, loader, teacher=None, width=8, epochs=6, **method_kwargs):
    torch.manual_seed(1)
    student = TinyNet(width=width)
    kwargs = {} if method == "natural" else dict(ATTACK, **method_kwargs)
    ardir.Trainer(student, loader, teacher=teacher, method=method, epochs=epochs, lr=0.05, progress=False,
                  **kwargs).fit()
    return student


@pytest.fixture(scope="module")
def baseline(problem):
    train_loader, test_loader = problem
    model = train("natural", train_loader)
    return pgd_accuracy(model, test_loader)


@pytest.fixture(scope="module")
def teacher(problem):
    return train("at", problem[0], width=16).eval()


@pytest.mark.parametrize("method", ["at", "trades", "ard", "iad", "rslad", "ardir"])
def test_every_method_ends_more_robust_than_natural_training(problem, baseline, teacher, method):
    train_loader, test_loader = problem
    extra = {"warmup_epochs": 3} if method == "iad" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = train(method, train_loader, teacher=teacher if method not in ("at", "trades") else None, **extra)
    robust = pgd_accuracy(student, test_loader)
    assert robust > baseline + 15, f"{method}: PGD accuracy {robust:.1f} vs natural training {baseline:.1f}"


def test_history_and_schedule(problem):
    train_loader, test_loader = problem
    student = TinyNet()
    trainer = ardir.ATTrainer(student, train_loader, epochs=4, milestones=[2], progress=False, val_loader=test_loader,
                              limit_batches=3, **ATTACK)
    history = trainer.fit()
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert [r["lr"] for r in history] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert {"loss", "ce_adv", "val_natural", "val_pgd", "images_per_s", "seconds"} <= set(history[0])
    assert 0 <= history[-1]["val_pgd"] <= 100


def test_default_schedule_follows_the_paper():
    loader = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,))), batch_size=4)
    trainer = ardir.RSLADTrainer(TinyNet(), loader, teacher=TinyNet().eval().requires_grad_(False))
    assert trainer.epochs == 300 and trainer.scheduler.milestones == {215: 1, 260: 1, 285: 1}
    assert ardir.Trainer is ardir.ARDIRTrainer


def test_state_dict_round_trip(problem):
    trainer = ardir.ATTrainer(TinyNet(), problem[0], epochs=2, limit_batches=2, progress=False, **ATTACK)
    trainer.fit()
    state = trainer.state_dict()
    other = ardir.ATTrainer(TinyNet(), problem[0], epochs=2, progress=False, **ATTACK)
    other.load_state_dict(state)
    assert other.epoch == 2 and other.step == 4
    for a, b in zip(trainer.student.state_dict().values(), other.student.state_dict().values()):
        assert torch.equal(a, b)


def small_loader(x=None, y=None):
    x = torch.rand(8, 1, 8, 8) if x is None else x
    y = torch.randint(0, 4, (8,)) if y is None else y
    return DataLoader(TensorDataset(x, y), batch_size=4)


def test_teacher_is_frozen_and_put_in_eval_mode_with_warnings():
    teacher = TinyNet().train()
    with pytest.warns(UserWarning) as record:
        ardir.ARDTrainer(TinyNet(), small_loader(), teacher=teacher)
    text = " ".join(str(w.message) for w in record)
    assert "eval mode" in text and "froze" in text
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_clear_errors():
    frozen = TinyNet().eval().requires_grad_(False)
    with pytest.raises(ValueError, match="teacher"):
        ardir.ARDTrainer(TinyNet(), small_loader())
    with pytest.raises(ValueError, match="classes"):
        ardir.ARDTrainer(TinyNet(), small_loader(), teacher=TinyNet(num_classes=5).eval().requires_grad_(False))
    with pytest.raises(ValueError, match="inside the model"):
        ardir.ATTrainer(TinyNet(), small_loader(x=torch.randn(8, 1, 8, 8) * 3), progress=False).fit()
    with pytest.raises(ValueError, match="labels"):
        ardir.ATTrainer(TinyNet(), small_loader(y=torch.full((8,), 7)), progress=False).fit()
    with pytest.raises(ValueError, match="empty"):
        ardir.ATTrainer(TinyNet(), DataLoader(TensorDataset(torch.rand(0, 1, 8, 8), torch.zeros(0).long())))
    with pytest.raises(ValueError, match="eps"):
        ardir.Trainer(TinyNet(), small_loader(), teacher=frozen, eps=2.0)
