"""Real end-to-end runs on Fashion-MNIST: a robust teacher, ARDIR distillation, evaluation (slow: run in CI)."""
import warnings

import pytest
import torch

import ardir
from ardir import data

pytestmark = pytest.mark.slow
EPS = 0.1
ATTACK = dict(eps=EPS, step_size=EPS / 4, steps=7)


@pytest.fixture(scope="module")
def loaders():
    try:
        return data.get_loaders("fashion-mnist", batch_size=64, val_size=0, limit=4096, seed=0, download=False)
    except data.DatasetNotFoundError as err:
        pytest.skip(str(err))


def train(model, loaders, method, teacher=None, epochs=3):
    kwargs = {} if method == "natural" else ATTACK
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ardir.Trainer(model, loaders.train, teacher=teacher, method=method, epochs=epochs, lr=0.05, progress=False,
                      **kwargs).fit()
    return model.eval()


def test_teacher_at_then_ardir_student_then_evaluation(loaders):
    torch.manual_seed(0)
    teacher = train(ardir.models.create("cnn_small", in_chans=1, width=24), loaders, "at")
    student = train(ardir.models.create("cnn_small", in_chans=1), loaders, "ardir", teacher=teacher)
    plain = train(ardir.models.create("cnn_small", in_chans=1), loaders, "natural")

    attacks = ("natural", "fgsm", "pgd20")
    reports = {name: ardir.evaluate(model, loaders.test, eps=EPS, attacks=attacks, n_examples=300, progress=False,
                                    checks=False)
               for name, model in [("teacher", teacher), ("ardir", student), ("natural", plain)]}
    for report in reports.values():
        print(report.to_markdown())
    ardir_acc, plain_acc = reports["ardir"].accuracy, reports["natural"].accuracy
    assert ardir_acc["natural"] > 60, ardir_acc
    assert ardir_acc["pgd20"] > plain_acc["pgd20"] + 20, (ardir_acc, plain_acc)
    assert reports["teacher"].accuracy["pgd20"] > 40
    assert reports["ardir"].worst_case <= ardir_acc["pgd20"]
