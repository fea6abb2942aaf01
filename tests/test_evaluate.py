"""Tests of ardir.evaluate and ardir.autoattack: numbers, agreement with reference tools, sanity checks, I/O.

A small cnn_small (width 8) is adversarially trained once per module on 4000 Fashion-MNIST images (eps 0.1,
about 20-30 s on one CPU thread) and evaluated on the first 200 test images. The full AutoAttack agreement
between the two engines is marked slow (minutes on CPU): run it with ``pytest -m slow tests/test_evaluate.py``.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchattacks
from torch.utils.data import DataLoader, Subset, TensorDataset

import ardir
from ardir import autoattack as aa
from ardir.evaluate import EvaluationWarning, Report, evaluate, list_attacks, parse_attack
from ardir.evaluation import attacks, checks
from ardir.evaluation._helpers import _fmt_eps

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
EPS = 0.1
needs_fashion = pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                   reason="Fashion-MNIST not found in /usr/share/datasets/fashion-mnist")
needs_official = pytest.mark.skipif(not aa.official_available(),
                                    reason="official AutoAttack not installed (pip install pyautoattack)")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads per process thrash (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fashion():
    from ardir.data import get_dataset
    return get_dataset("fashion-mnist", "train", augment=False), get_dataset("fashion-mnist", "test")


@pytest.fixture(scope="module")
def robust_model(fashion):
    """cnn_small width 8, PGD-3 adversarial training at eps 0.1 on 4000 images for 3 epochs."""
    train, _ = fashion
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ardir.models.create("cnn_small", in_chans=1, width=8)
        loader = DataLoader(Subset(train, range(4000)), batch_size=100, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        ardir.ATTrainer(model, loader, epochs=3, eps=EPS, step_size=EPS / 2.4, steps=3, lr=0.1, milestones=[],
                        progress=False).fit()
    return model.eval()


@pytest.fixture(scope="module")
def test_loader(fashion):
    return DataLoader(Subset(fashion[1], range(200)), batch_size=100, shuffle=False)


@pytest.fixture(scope="module")
def report(robust_model, test_loader):
    return evaluate(robust_model, test_loader, eps=EPS, attacks=("natural", "fgsm", "pgd20", "cw30"),
                    eps_sweep=[0.05, 0.2], progress=False, dataset="fashion-mnist")


def synthetic_loader(n=40, batch_size=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 8, 8, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


class Quantize(nn.Module):
    """Input quantisation to ``levels`` grey levels: torch.round has zero gradient, so gradients are masked."""

    def __init__(self, levels: int = 8):
        super().__init__()
        self.levels = levels

    def forward(self, x):
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)


# --------------------------------------------------------------------------------- the robust model
@needs_fashion
def test_robust_accuracy_never_exceeds_natural(report):
    assert report.n_examples == 200
    assert 40 < report.accuracy["natural"] < 100
    natural = report.correct["natural"]
    for key, mask in report.correct.items():
        assert mask.dtype == torch.bool and mask.shape == (200,)
        assert not (mask & ~natural).any(), f"{key} counts a naturally misclassified sample as robust"
        assert report.accuracy[key] <= report.accuracy["natural"]
    assert report.accuracy["pgd20"] < report.accuracy["natural"]


@needs_fashion
def test_worst_case_is_the_per_sample_and(report):
    expected = report.correct["natural"] & report.correct["fgsm"] & report.correct["pgd20"] & report.correct["cw30"]
    assert torch.equal(report.worst_case_correct, expected)
    assert report.worst_case == pytest.approx(100 * expected.float().mean().item())
    assert report.worst_case <= min(report.accuracy.values())


@needs_fashion
def test_robust_model_raises_no_masking_flag(report):
    assert report.flags == [] and report.warnings == [] and not report.masking_suspected
    assert report.gradient_check["checked"] > 0 and report.gradient_check["zero"] == 0
    sweep = [report.sweep[e] for e in sorted(report.sweep)]
    assert sorted(report.sweep) == [0.05, EPS, 0.2, 0.5]
    assert sweep[-1] <= 10.0  # chance at eps 0.5
    assert all(a >= b - 2.0 for a, b in zip(sweep, sweep[1:]))


@needs_fashion
def test_pgd20_agrees_with_torchattacks(robust_model, test_loader, report):
    attack = torchattacks.PGD(robust_model, eps=EPS, alpha=EPS / 4, steps=20, random_start=True)
    correct = total = 0
    for images, labels in test_loader:
        adv = attack(images, labels)
        with torch.no_grad():
            correct += (robust_model(adv).argmax(1) == labels).sum().item()
        total += len(labels)
    assert report.settings["pgd20"]["step_size"] == pytest.approx(EPS / 4)
    assert abs(100 * correct / total - report.accuracy["pgd20"]) <= 1.0


@needs_fashion
def test_masked_gradients_are_flagged(robust_model, test_loader):
    masked = nn.Sequential(Quantize(8), robust_model).eval()
    with pytest.warns(EvaluationWarning, match="gradient"):
        result = evaluate(masked, test_loader, eps=EPS, attacks=("natural", "fgsm", "pgd20"), progress=False)
    codes = {flag.code for flag in result.flags}
    assert "zero_gradients" in codes and result.masking_suspected
    assert result.gradient_check["zero"] == result.gradient_check["checked"]
    assert "Warning (zero_gradients)" in result.to_markdown()


@needs_fashion
@needs_official
def test_engines_agree_on_apgd_ce(robust_model, test_loader):
    ours = evaluate(robust_model, test_loader, eps=EPS, attacks=("apgd-ce",), engine="ardir", progress=False,
                    large_eps=None)
    official = evaluate(robust_model, test_loader, eps=EPS, attacks=("apgd-ce",), engine="official",
                        progress=False, large_eps=None)
    assert abs(ours.accuracy["apgd-ce"] - official.accuracy["apgd-ce"]) <= 0.5
    assert official.settings["apgd-ce"]["engine"].startswith("official")


@pytest.mark.slow
@needs_fashion
@needs_official
def test_full_autoattack_engines_agree(robust_model, test_loader, report):
    """Standard AutoAttack, torchattacks components (ardir engine) vs the authors' code: within 0.5 points."""
    ours = evaluate(robust_model, test_loader, eps=EPS, attacks=("autoattack",), engine="ardir", progress=False,
                    large_eps=None)
    official = evaluate(robust_model, test_loader, eps=EPS, attacks=("autoattack",), engine="official",
                        progress=False, large_eps=None)
    print("\n" + ours.to_markdown() + "\n" + official.to_markdown())
    print(ours.components, official.components, ours.seconds, official.seconds)
    assert abs(ours.accuracy["autoattack"] - official.accuracy["autoattack"]) <= 0.5
    assert list(ours.components["autoattack"]) == list(aa.STANDARD)
    assert ours.accuracy["autoattack"] <= report.accuracy["pgd20"] + 1.0
    assert not ours.masking_suspected and not official.masking_suspected


@pytest.mark.slow
@needs_fashion
def test_square_beating_pgd_on_masked_gradients_is_flagged(robust_model, test_loader):
    masked = nn.Sequential(Quantize(8), robust_model).eval()
    loader = DataLoader(Subset(test_loader.dataset, range(100)), batch_size=100)
    result = evaluate(masked, loader, eps=EPS, attacks=("natural", "pgd20", "square"), progress=False, warn=False)
    print("\n" + result.to_markdown())
    assert {"black_box", "zero_gradients", "large_eps"} <= {flag.code for flag in result.flags}
    assert result.accuracy["square"] < result.accuracy["pgd20"]


# ------------------------------------------------------------------------------------------ AutoAttack
def test_autoattack_components_use_the_official_settings(tiny):
    model = tiny(num_classes=10)
    apgd = aa._torchattacks_component("apgd-ce", model, 8 / 255, 10, 0)
    apgdt = aa._torchattacks_component("apgd-t", model, 8 / 255, 10, 0)
    fab = aa._torchattacks_component("fab-t", model, 8 / 255, 10, 0)
    square = aa._torchattacks_component("square", model, 8 / 255, 10, 0)
    assert (apgd.steps, apgd.n_restarts, apgd.loss, apgd.thr_decr) == (100, 1, "ce", 0.75)
    assert (apgdt.steps, apgdt.n_restarts, apgdt.n_target_classes) == (100, 1, 9)
    assert (fab.steps, fab.n_restarts, fab.multi_targeted, fab.n_target_classes) == (100, 1, True, 9)
    assert (square.n_queries, square.p_init, square.loss, square.rescale_schedule) == (5000, 0.8, "margin", False)
    # fewer classes: num_classes - 1 targets
    assert aa._torchattacks_component("apgd-t", tiny(num_classes=5), 0.1, 5, 0).n_target_classes == 4
    assert aa.AutoAttack(model, num_classes=10).settings["components"]["apgd-t"]["target_classes"] == 9
    with pytest.raises(ValueError, match="at least 4 classes"):
        aa.AutoAttack(tiny(num_classes=3), num_classes=3)


def test_autoattack_attacks_only_the_points_still_robust(tiny, monkeypatch):
    """Each component sees only the points that survived the previous ones; robust = AND of all."""
    model = tiny(num_classes=4).eval()
    images, labels = next(iter(synthetic_loader(n=32, batch_size=32)))
    with torch.no_grad():
        labels = model(images).argmax(1)  # every point naturally correct
    seen = {}

    def fake(name, model_, eps, num_classes, seed):
        def attack(x, y):
            seen[name] = len(x)
            adv = x.clone()
            fool = torch.arange(len(x)) % 2 == 0  # fool every other point it sees, by a shift within eps
            adv[fool] = (x[fool] + eps * torch.sign(torch.randn_like(x[fool]))).clamp(0, 1)
            return adv
        return attack

    monkeypatch.setattr(aa, "_ardir_component", fake)
    robust, parts = aa.AutoAttack(model, eps=0.5, num_classes=4).run(images, labels)
    assert list(parts) == list(aa.STANDARD)
    assert seen["apgd-ce"] == 32
    previous = torch.ones(32, dtype=torch.bool)
    for name in aa.STANDARD:
        assert not (parts[name] & ~previous).any()  # cumulative
        previous = parts[name]
    for before, after in zip(aa.STANDARD, aa.STANDARD[1:]):
        if after in seen:
            assert seen[after] == int(parts[before].sum())
    assert torch.equal(robust, parts["square"])


def test_invalid_adversarial_examples_never_count():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]]))
        model[1].bias.zero_()
    x = torch.full((3, 1, 2, 2), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    adv = torch.stack([torch.zeros(1, 2, 2),                  # outside the eps ball: not a success
                       torch.full((1, 2, 2), float("nan")),   # NaN: not a success
                       torch.full((1, 2, 2), 0.5)])
    assert aa.still_correct(model, x, adv, y, eps=0.1).tolist() == [True, True, True]


def test_official_engine_missing_gives_install_hint(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    monkeypatch.setitem(sys.modules, "autoattack", None)
    with pytest.raises(ImportError, match="pip install pyautoattack"):
        evaluate(tiny(), synthetic_loader(), eps=0.1, attacks=("autoattack",), engine="official", progress=False)


# -------------------------------------------------------------------------------- grammar and checks
def test_attack_grammar():
    ctx = attacks.Context(nn.Linear(2, 2), 8 / 255, 2 / 255, 10, "ardir")
    for name, key, steps in [("pgd20", "pgd20", 20), ("PGD-100", "pgd100", 100), ("cw30", "cw30", 30),
                             ("fgsm", "fgsm", 1)]:
        spec, match = parse_attack(name)
        runner = spec.build(match, ctx)
        assert (runner.key, runner.steps) == (key, steps)
    fgsm = parse_attack("fgsm")[0].build(parse_attack("fgsm")[1], ctx)
    assert fgsm.settings["step_size"] == pytest.approx(8 / 255) and fgsm.settings["random_start"] == "none"
    cw = parse_attack("cw30")[0].build(parse_attack("cw30")[1], ctx)
    assert cw.settings["loss"] == "cw" and cw.settings["step_size"] == pytest.approx(2 / 255)
    assert {"natural", "fgsm", "pgd20", "cw30", "autoattack", "apgd-ce", "apgd-t", "fab-t", "square"} <= \
        set(list_attacks())


@pytest.mark.parametrize("name, hint", [("pdg20", "pgd20"), ("autoatack", "autoattack"), ("fab", "fab-t"),
                                        ("cw", "cw30")])
def test_unknown_attack_name_suggests_close_matches(tiny, name, hint):
    with pytest.raises(ValueError, match=f"did you mean.*'{hint}'"):
        evaluate(tiny(), synthetic_loader(), eps=0.1, attacks=("natural", name), progress=False)


def test_bad_arguments(tiny):
    model = tiny()
    with pytest.raises(ValueError, match="outside"):
        evaluate(model, synthetic_loader(), eps=0.0, progress=False)
    with pytest.raises(ValueError, match="outside"):
        evaluate(model, synthetic_loader(), eps=8, progress=False)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="no batch"):
        evaluate(model, empty, eps=0.1, attacks=("natural",), progress=False)
    normalised = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8) * 3, torch.zeros(8, dtype=torch.long)),
                            batch_size=4)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        evaluate(model, normalised, eps=0.1, attacks=("natural",), progress=False)
    with pytest.raises(ValueError, match="subset"):
        evaluate(model, synthetic_loader(), eps=0.1, subset="last", progress=False)
    with pytest.raises(ValueError, match="twice"):
        evaluate(model, synthetic_loader(), eps=0.1, attacks=("pgd20", "PGD-20"), progress=False)


def test_model_mode_and_parameters_restored(tiny):
    model = tiny()
    model.train()
    model.bn.eval()  # a mixed state must come back exactly
    before = [(m, m.training) for m in model.modules()]
    model.conv.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    seen_training = []
    model.register_forward_hook(lambda m, i, o: seen_training.append(m.training))
    evaluate(model, synthetic_loader(), eps=0.1, attacks=("natural", "fgsm", "pgd3"), progress=False,
             large_eps=None, warn=False)
    assert not any(seen_training)
    assert all(m.training == t for m, t in before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_evaluation_leaves_the_global_rng_alone(tiny):
    model, loader = tiny(), synthetic_loader()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluate(model, loader, eps=0.1, attacks=("natural", "pgd3"), progress=False, warn=False)
    assert torch.equal(torch.rand(3), expected)


def test_subsets(tiny):
    model, loader = tiny(), synthetic_loader(n=50, batch_size=16)
    first = evaluate(model, loader, eps=0.1, attacks=("natural",), n_examples=20, progress=False, checks=False)
    assert first.n_examples == 20 and first.indices is None and first.subset == "first 20"
    rebatched = evaluate(model, loader, eps=0.1, attacks=("natural",), n_examples=20, batch_size=7,
                         progress=False, checks=False)
    assert torch.equal(rebatched.correct["natural"], first.correct["natural"])
    one = evaluate(model, loader, eps=0.1, attacks=("natural",), n_examples=20, subset="random", seed=1,
                   progress=False, checks=False)
    two = evaluate(model, loader, eps=0.1, attacks=("natural",), n_examples=20, subset="random", seed=1,
                   progress=False, checks=False)
    other = evaluate(model, loader, eps=0.1, attacks=("natural",), n_examples=20, subset="random", seed=2,
                     progress=False, checks=False)
    assert one.n_examples == 20 and one.indices == two.indices == sorted(one.indices)
    assert len(set(one.indices)) == 20 and one.indices != other.indices


def test_same_seed_same_numbers(tiny):
    model, loader = tiny(), synthetic_loader()
    a = evaluate(model, loader, eps=0.2, attacks=("natural", "pgd5"), progress=False, warn=False, seed=3)
    b = evaluate(model, loader, eps=0.2, attacks=("natural", "pgd5"), progress=False, warn=False, seed=3)
    assert torch.equal(a.correct["pgd5"], b.correct["pgd5"])


def test_excess_counts_only_beyond_noise():
    weak = torch.tensor([True] * 10 + [False] * 90)
    assert checks._excess(weak, weak) == (0, 0.0)
    strong = weak.clone()
    strong[10:40] = True  # 30 samples survive the stronger attack only
    excess, noise = checks._excess(weak, strong)
    assert excess == 30 and excess > noise


def fake_report(masks, sweep=None, num_classes=10, gradient_check=None, large_eps=None):
    """A Report with hand-made per-sample results, and the runners of its attacks, for the sanity rules."""
    ctx = attacks.Context(nn.Linear(2, 10), 0.1, 0.025, num_classes, "ardir")
    runners = {key: parse_attack(key)[0].build(parse_attack(key)[1], ctx) for key in masks}
    n = len(next(iter(masks.values())))
    report = Report(accuracy={k: 100 * m.float().mean().item() for k, m in masks.items()}, correct=masks,
                    names={k: r.display for k, r in runners.items()}, descriptions={k: "" for k in masks},
                    settings={k: {} for k in masks}, seconds={k: 0.0 for k in masks},
                    threat_model={"norm": "Linf", "eps": 0.1}, n_examples=n, num_classes=num_classes, seed=0,
                    device="cpu", engine="ardir", subset="all", gradient_check=gradient_check or {},
                    sanity={"large_eps": large_eps})
    extra, keys = {}, {}
    for e, mask in (sweep or {}).items():
        keys[e] = f"pgd20@{e}"
        extra[keys[e]] = mask
        runners[keys[e]] = parse_attack("pgd20")[0].build(parse_attack("pgd20")[1], ctx)
        report.sweep[e] = 100 * mask.float().mean().item()
    report.sweep_attack = "pgd20" if sweep else None
    return checks._sanity_flags(report, runners, extra, {}, keys, False, [])


def first(k, n=100):
    return torch.arange(n) < k


def test_sanity_rules_flag_what_they_should():
    # PGD-20 leaves 30 more samples correct than FGSM: the ordering is violated.
    codes = [f.code for f in fake_report({"natural": first(60), "fgsm": first(20), "pgd20": first(50)})]
    assert codes == ["ordering"]
    # within noise (2 samples): nothing
    assert fake_report({"natural": first(60), "fgsm": first(40), "pgd20": first(42)}) == []
    # Square, a black-box attack, beats PGD-20 by 20 samples
    flags = fake_report({"natural": first(60), "pgd20": first(40), "square": first(20)})
    assert [f.code for f in flags] == ["black_box"] and "black-box" in flags[0].message
    # accuracy rising with eps, then a flat curve, then above chance at eps 0.5
    flags = fake_report({"natural": first(60), "pgd20": first(30)},
                        sweep={0.05: first(20), 0.1: first(30), 0.5: first(25)}, large_eps=0.5)
    assert [f.code for f in flags] == ["eps_monotonic", "eps_monotonic", "large_eps"]
    assert "rises" in flags[0].message and "does not fall" in flags[1].message and "chance" in flags[2].message
    # a sound sweep: falling to zero at eps 0.5
    assert fake_report({"natural": first(60), "pgd20": first(30)},
                       sweep={0.05: first(45), 0.1: first(30), 0.5: first(0)}, large_eps=0.5) == []
    # zero gradients for 3 % of the samples checked
    flags = fake_report({"natural": first(60)}, gradient_check={"checked": 100, "zero": 3, "nonfinite": 0})
    assert [f.code for f in flags] == ["zero_gradients"] and "zero" in flags[0].message


# ----------------------------------------------------------------------------------- report and state
def test_markdown_json_and_save(report, tmp_path):
    table = report.to_markdown()
    assert "| Attack | Accuracy (%) | Settings | Time (s) |" in table
    for name in ("Natural", "FGSM", "PGD-20", "CW∞-30", "**Worst case**"):
        assert f"| {name} |" in table
    assert "ε = 0.1" in table and "200 examples" in table
    assert "Accuracy (%) under PGD-20 against ε (sanity checks): ε = 0.05: " in table and "ε = 51/255: " in table
    record = json.loads(report.to_json())
    assert record["threat_model"] == "Linf" and record["eps"] == "0.1" and record["dataset"] == "fashion-mnist"
    assert record["clean_acc"] == f"{report.accuracy['natural']:.2f}" and record["autoattack_acc"] is None
    assert set(record["per_sample"]) == set(report.correct) and len(record["per_sample"]["pgd20"]) == 200
    md, js = report.save(tmp_path / "run.json")
    assert md.read_text(encoding="utf-8") == table and (md.name, js.name) == ("run.md", "run.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.md"]  # no temporary file left
    loaded = Report.load(tmp_path / "run")
    assert loaded.accuracy == pytest.approx(report.accuracy, abs=1e-3)
    assert all(torch.equal(loaded.correct[k], report.correct[k]) for k in report.correct)
    assert loaded.worst_case == pytest.approx(report.worst_case)
    assert loaded.to_markdown().splitlines()[0] == table.splitlines()[0]


def test_eps_formatting():
    assert _fmt_eps(8 / 255) == "8/255" and _fmt_eps(0.1) == "0.1" and _fmt_eps(0.5) == "0.5"


class Interrupt(Exception):
    pass


def interrupted(loader, after):
    for i, batch in enumerate(loader):
        if i == after:
            raise Interrupt
        yield batch


def test_resume_from_state_file(tiny, tmp_path, monkeypatch):
    model, loader, state = tiny(), synthetic_loader(n=48, batch_size=16), tmp_path / "state.json"
    kwargs = dict(eps=0.2, attacks=("natural", "fgsm", "pgd5"), progress=False, warn=False, large_eps=None)
    full = evaluate(model, loader, **kwargs)
    with pytest.raises(Interrupt):
        evaluate(model, interrupted(loader, 2), state_path=state, **kwargs)
    saved = json.loads(state.read_text())
    assert len(saved["batches"]) == 2 and set(saved["batches"][1]["results"]) == {"natural", "fgsm", "pgd5"}
    resumed = evaluate(model, loader, state_path=state, **kwargs)
    for key in full.correct:
        assert torch.equal(resumed.correct[key], full.correct[key])
    # A finished state replays without attacking again.
    monkeypatch.setattr(attacks._PGDRunner, "run", lambda *a: pytest.fail("attacked a sample already done"))
    again = evaluate(model, loader, state_path=state, **kwargs)
    assert torch.equal(again.correct["pgd5"], full.correct["pgd5"])
    with pytest.raises(ValueError, match="other settings"):
        evaluate(model, loader, state_path=state, **{**kwargs, "eps": 0.3})
    with pytest.raises(ValueError, match="differs"):
        evaluate(model, synthetic_loader(n=48, batch_size=16, seed=5), state_path=state, **kwargs)


def test_autoattack_resumes_between_components(tiny, tmp_path, monkeypatch):
    """A run killed inside AutoAttack restarts at the component it was in, not at APGD-CE."""
    model, loader, state = tiny(num_classes=4), synthetic_loader(n=16, batch_size=16), tmp_path / "state.json"
    calls = []

    def fake(name, model_, eps, num_classes, seed):
        def attack(x, y):
            calls.append(name)
            if name == "fab-t" and "crash" in calls:
                raise Interrupt
            return x  # fools nothing
        return attack

    monkeypatch.setattr(aa, "_ardir_component", fake)
    kwargs = dict(eps=0.1, attacks=("autoattack",), progress=False, checks=False, state_path=state)
    calls.append("crash")
    with pytest.raises(Interrupt):
        evaluate(model, loader, **kwargs)
    saved = json.loads(state.read_text())["batches"][0]["partial"]["autoattack"]["components"]
    assert list(saved) == ["apgd-ce", "apgd-t"]
    calls.clear()
    result = evaluate(model, loader, **kwargs)
    assert calls == ["fab-t", "square"]
    assert torch.equal(result.correct["autoattack"], result.correct["natural"])
    assert list(result.components["autoattack"]) == list(aa.STANDARD)


def test_batches_with_extra_items_are_evaluated_and_other_shapes_refused():
    """An evaluation loader may yield (images, labels, index); a dict batch is refused in one sentence (the trainer,
    stricter, refuses a third item: tests/test_errors.py)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
    with_index = [(x, y, torch.arange(6))]
    report = evaluate(model, with_index, eps=0.1, attacks=("natural",), checks=False, progress=False)
    assert report.n_examples == 6 and len(report.correct["natural"]) == 6
    with pytest.raises(TypeError, match=r"the loader must yield \(images, labels\) batches, got a dict"):
        evaluate(model, [{"image": x, "label": y}], eps=0.1, attacks=("natural",), checks=False, progress=False)
