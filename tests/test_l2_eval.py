"""ardir.evaluate and ardir eval under the L2 threat model (norm="l2"): the attacks against hand-run ones, the
report, the resume state, AutoAttack's engines and the CLI."""
import json
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import ardir
from ardir import autoattack as aa
from ardir import cli
from ardir.evaluate import evaluate
from ardir.evaluation._helpers import _derive_seed

TINY = ["--dataset", "fashion-mnist", "--fake-data", "--model", "cnn_small", "--train-size", "64", "--val-size",
        "32", "--batch-size", "32", "--limit-batches", "1", "--steps", "1", "--val-attack-steps", "1", "--quiet"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(n=32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    images, labels = torch.rand(n, 1, 8, 8), torch.randint(0, 4, (n,))
    with torch.no_grad():  # labels the model mostly gets right, so the attacks have points to attack
        labels = torch.where(torch.rand(n) < 0.8, model(images).argmax(1), labels)
    return model, images, labels


def loader(images, labels):
    return DataLoader(TensorDataset(images, labels), batch_size=len(labels))


def hand_accuracy(model, images, labels, attack, key, eps):
    """Robust accuracy (%) of ``attack`` run as ardir.evaluate runs it: on the naturally correct points, with the
    seed of (attack, first batch)."""
    with torch.no_grad():
        natural = model(images).argmax(1) == labels
    x, y = images[natural], labels[natural]
    torch.manual_seed(_derive_seed(0, key, 0))
    adv = attack(x, y)
    assert ((adv - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()
    with torch.no_grad():
        return 100.0 * int((model(adv).argmax(1) == y).sum()) / len(labels)


def test_pgd_and_cw_under_l2_are_ardir_pgd_l2_with_step_eps_over_4():
    model, images, labels = tiny()
    report = evaluate(model, loader(images, labels), eps=2.0, norm="l2", attacks=("natural", "pgd5", "cw7"),
                      checks=False, progress=False)
    for key, steps, loss in (("pgd5", 5, "ce"), ("cw7", 7, "cw")):
        attack = ardir.PGD(model, eps=2.0, step_size=0.5, steps=steps, loss=loss, norm="l2")
        assert report.accuracy[key] == hand_accuracy(model, images, labels, attack, key, 2.0)
        assert report.settings[key]["norm"] == "l2" and report.settings[key]["step_size"] == 0.5
    assert report.accuracy["pgd5"] < report.accuracy["natural"]
    assert report.names["cw7"] == "CW2-7"


def test_fgsm_under_l2_is_fgm_one_normalised_step_of_length_eps():
    model, images, labels = tiny()
    report = evaluate(model, loader(images, labels), eps=0.3, norm="l2", attacks=("natural", "fgsm"),
                      checks=False, progress=False)

    def fgm(x, y):
        x = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        grad, = torch.autograd.grad(loss, x)
        step = 0.3 * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (x + step).clamp(0, 1).detach()
    assert report.names["fgsm"] == "FGM"
    assert report.accuracy["fgsm"] == hand_accuracy(model, images, labels, fgm, "fgsm", 0.3)
    assert report.settings["fgsm"]["random_start"] == "none" and report.settings["fgsm"]["steps"] == 1


def test_the_report_states_the_l2_threat_model_and_linf_is_unchanged(tmp_path):
    model, images, labels = tiny()
    report = evaluate(model, loader(images, labels), eps=0.5, norm="l2", attacks=("natural", "pgd3"),
                      eps_sweep=[1.0], progress=False, warn=False)
    assert report.to_markdown().startswith("Robust accuracy, L2 threat model, ε = 0.5, 32 examples")
    record = json.loads(report.to_json())
    assert record["threat_model"] == "L2" and record["eps"] == "0.5" and record["eps_value"] == 0.5
    assert ardir.Report.from_json(report.to_json()).threat_model == {"norm": "L2", "eps": 0.5}
    # the large-eps check runs at the diameter of the image cube (sqrt(64) = 8), where PGD reaches chance or below
    assert report.sanity["large_eps"] == math.sqrt(64) and report.sweep[8.0] <= 25
    assert not [f for f in report.flags if f.code == "large_eps"]
    assert sorted(report.sweep) == [0.5, 1.0, 8.0]
    linf = evaluate(model, loader(images, labels), eps=8 / 255, attacks=("natural", "fgsm"), progress=False,
                    warn=False)
    assert linf.to_markdown().startswith("Robust accuracy, L∞ threat model, ε = 8/255")
    assert linf.threat_model["norm"] == "Linf" and linf.sanity["large_eps"] == 0.5 and linf.names["fgsm"] == "FGSM"
    assert "norm" not in linf.settings["fgsm"]


def test_eps_is_checked_per_norm():
    model, images, labels = tiny(8)
    with pytest.raises(ValueError, match=r"eps=2.0 is outside \(0, 1\]"):
        evaluate(model, loader(images, labels), eps=2.0, attacks=("natural",), progress=False)
    with pytest.raises(ValueError, match=r"eps=0.0 must be > 0: an L2 radius is positive"):
        evaluate(model, loader(images, labels), eps=0.0, norm="l2", attacks=("natural",), progress=False)
    with pytest.raises(ValueError, match="norm"):
        evaluate(model, loader(images, labels), eps=0.5, norm="l1", attacks=("natural",), progress=False)
    report = evaluate(model, loader(images, labels), eps=2.0, norm="l2", attacks=("natural", "fgsm"),
                      checks=False, progress=False)  # an L2 radius may exceed 1
    assert report.threat_model == {"norm": "L2", "eps": 2.0}


def test_a_linf_state_is_never_resumed_as_l2_and_still_resumes_as_linf(tmp_path):
    model, images, labels = tiny()
    state = tmp_path / "state.json"
    first = evaluate(model, loader(images, labels), eps=0.5, attacks=("natural", "pgd2"), state_path=state,
                     checks=False, progress=False)
    config = json.loads(state.read_text())["config"]
    assert "norm" not in config and "norm" not in config["attacks"]["pgd2"]  # L-inf state files as before
    again = evaluate(model, loader(images, labels), eps=0.5, attacks=("natural", "pgd2"), state_path=state,
                     checks=False, progress=False)
    assert again.accuracy == first.accuracy
    with pytest.raises(ValueError, match=r"other settings \(differences: attacks, norm\)"):
        evaluate(model, loader(images, labels), eps=0.5, norm="l2", attacks=("natural", "pgd2"), state_path=state,
                 checks=False, progress=False)
    l2_state = tmp_path / "l2.json"
    evaluate(model, loader(images, labels), eps=0.5, norm="l2", attacks=("natural", "pgd2"), state_path=l2_state,
             checks=False, progress=False)
    assert json.loads(l2_state.read_text())["config"]["norm"] == "l2"


@pytest.mark.parametrize("attack", ["autoattack", "apgd-ce", "square"])
def test_ardirs_autoattack_engine_runs_under_l2(attack):
    """The default engine runs AutoAttack and its components under L2 (their agreement with the official code:
    tests/test_autoattack_l2.py)."""
    model, images, labels = tiny(8)
    report = evaluate(model, loader(images, labels), eps=0.5, norm="l2", attacks=("natural", attack), checks=False,
                      progress=False)
    assert report.settings[attack]["norm"] == "L2"
    assert "(ardir engine, L2)" in report.descriptions[attack]
    assert report.accuracy[attack] <= report.accuracy["natural"]
    assert aa.AutoAttack(model, eps=0.5, num_classes=4, norm="l2").engine == "ardir"


def test_official_autoattack_runs_under_l2():
    try:
        aa.official_module()
    except ImportError:
        pytest.skip("the official AutoAttack package (pyautoattack) is not installed")
    model, images, labels = tiny(6)
    report = evaluate(model, loader(images, labels), eps=0.5, norm="l2", attacks=("natural", "pgd5", "autoattack"),
                      engine="official", checks=False, progress=False)
    assert report.settings["autoattack"]["norm"] == "L2"
    assert "(official engine, L2)" in report.descriptions["autoattack"]
    assert report.accuracy["autoattack"] <= report.accuracy["natural"]
    assert list(report.components["autoattack"]) == list(aa.STANDARD)


def test_ardir_eval_of_an_l2_run_is_under_l2_and_eval_norm_flag(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--method", "at", "--norm", "l2", "--eps", "1.5", "--step-size", "0.5",
                     "--epochs", "1", "--output-dir", str(out)]) == 0
    eval_args = ["eval", "--checkpoint", str(out / "last.pt"), "--n-examples", "16", "--attacks", "natural", "fgsm",
                 "pgd2", "--no-checks", "--quiet"]
    assert cli.main(eval_args) == 0
    record = json.loads((out / "last_report.json").read_text())
    assert record["threat_model"] == "L2" and record["eps_value"] == 1.5
    assert (out / "last_report.md").read_text().startswith("Robust accuracy, L2 threat model, ε = 1.5")
    # any checkpoint under any norm, given the radius
    assert cli.main(eval_args + ["--norm", "linf", "--eps", "0.1", "--output", str(tmp_path / "linf")]) == 0
    assert json.loads((tmp_path / "linf.json").read_text())["threat_model"] == "Linf"
    capsys.readouterr()
    # an L-inf radius above 1 is one line naming the flag; another norm without a radius is refused
    assert cli.main(eval_args + ["--norm", "linf", "--eps", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--eps 8 must be > 0 and <= 1 under --norm linf" in err and len(err.splitlines()) == 1
    assert cli.main(eval_args + ["--norm", "linf"]) == 2
    assert "--norm linf:" in capsys.readouterr().err
