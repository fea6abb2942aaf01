"""ardir.teachers: checkpoint paths, model names and RobustBench's local model files (no network)."""
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ardir import models, teachers
from ardir.teachers import TeacherNotFoundError, load_teacher


# ---- a faithful copy of the layout of TRADES' / RobustBench's WideResNet (keys and forward), written for the test
class _TradesBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equal:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return (x if self.equal else self.convShortcut(x)) + out


class _NetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[_TradesBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class _TradesWRN(nn.Module):
    def __init__(self, depth=10, widen=2, num_classes=10):
        super().__init__()
        n, w = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.block1 = _NetworkBlock(n, w[0], w[1], 1)
        self.sub_block1 = _NetworkBlock(n, w[0], w[1], 1)  # present in the checkpoint, unused
        self.block2 = _NetworkBlock(n, w[1], w[2], 2)
        self.block3 = _NetworkBlock(n, w[2], w[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(w[3]), nn.ReLU()
        self.fc = nn.Linear(w[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(self.relu(self.bn1(out)), 1).flatten(1)
        return self.fc(out)


@pytest.fixture
def tiny_zoo(monkeypatch):
    """A RobustBench name mapped to a small ardir WRN (WRN-10-2), so the test file is small."""
    models.register_model("_wrn10_2")(lambda num_classes=10, in_chans=3: models.WideResNet(10, 2, num_classes,
                                                                                           in_chans))
    monkeypatch.setitem(teachers.ROBUSTBENCH_ZOO, "Tiny2019Test",
                        {"dataset": "cifar10", "model": "_wrn10_2", "num_classes": 10, "note": "test"})
    monkeypatch.setitem(sys.modules, "robustbench", None)  # the package is not installed: the local-file path
    monkeypatch.setitem(sys.modules, "robustbench.utils", None)
    yield "Tiny2019Test"
    models._REGISTRY.pop("_wrn10_2", None)


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def test_robustbench_local_file_maps_onto_ardir_wrn_with_identical_outputs(tmp_path, tiny_zoo):
    reference = _TradesWRN().eval()
    _randomise_bn(reference)
    state = {"module." + k: v for k, v in reference.state_dict().items()}  # as saved from DataParallel
    assert any(".layer.0.convShortcut." in k for k in state) and any(k.startswith("module.sub_block1") for k in state)
    path = tmp_path / "cifar10" / "Linf" / f"{tiny_zoo}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state}, path)

    teacher = load_teacher(f"robustbench:{tiny_zoo}", num_classes=10, in_chans=3, model_dir=tmp_path)
    assert isinstance(teacher, models.WideResNet) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), reference(x), rtol=1e-5, atol=1e-5)


def test_key_mapping_of_the_trades_layout():
    mapped = teachers.robustbench_wrn_state_dict({
        "module.conv1.weight": 1, "module.block1.layer.0.bn1.weight": 2, "module.block1.layer.0.convShortcut.weight": 3,
        "module.block3.layer.4.conv2.weight": 4, "module.sub_block1.layer.0.bn1.weight": 5, "module.bn1.bias": 6,
        "module.fc.weight": 7})
    assert mapped == {"conv1.weight": 1, "block1.0.bn1.weight": 2, "block1.0.shortcut.weight": 3,
                      "block3.4.conv2.weight": 4, "bn1.bias": 6, "fc.weight": 7}
    # the real Zhang2019Theoretically architecture: every mapped key of the TRADES WRN-34-10 layout fits
    trades_keys = _TradesWRN(depth=34, widen=1).state_dict()
    ardir_keys = models.WideResNet(34, 1).state_dict()
    assert set(teachers.robustbench_wrn_state_dict(trades_keys)) == set(ardir_keys)


def test_robustbench_missing_file_says_what_to_download_and_where(tmp_path, tiny_zoo):
    with pytest.raises(TeacherNotFoundError) as err:
        load_teacher("robustbench:Zhang2019Theoretically", model_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "cifar10" / "Linf" / "Zhang2019Theoretically.pt") in message
    assert "pip install 'ardir[robustbench]'" in message and "--robustbench-dir" in message
    assert "git+" not in message  # the extra of pyproject.toml, as the README says


def test_robustbench_unknown_architecture_without_the_package(tmp_path, tiny_zoo):
    path = tmp_path / "cifar10" / "Linf" / "Other2020.pt"
    path.parent.mkdir(parents=True)
    torch.save({}, path)
    with pytest.raises(TeacherNotFoundError, match=r"install robustbench \(pip install 'ardir\[robustbench\]'\)"):
        load_teacher("robustbench:Other2020", model_dir=tmp_path)


def test_the_robustbench_hint_is_the_extra_the_readme_and_pyproject_name():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "robustbench" in pyproject["project"]["optional-dependencies"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert teachers.ROBUSTBENCH_INSTALL == "pip install 'ardir[robustbench]'"
    assert teachers.ROBUSTBENCH_INSTALL in readme


def test_robustbench_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ARDIR_ROBUSTBENCH_DIR", str(tmp_path))
    assert teachers.robustbench_path("X") == tmp_path / "cifar10" / "Linf" / "X.pt"


def test_checkpoint_path_with_model_info_and_plain_state_dict(tmp_path):
    model = models.create("cnn_small", num_classes=10, in_chans=1)
    run = tmp_path / "best.pt"
    torch.save({"format": "ardir-model", "config": {}, "model": model.state_dict(),
                "model_info": {"name": "cnn_small", "num_classes": 10, "in_chans": 1}}, run)
    x = torch.rand(2, 1, 28, 28)
    loaded = load_teacher(str(run), num_classes=10, in_chans=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    with pytest.raises(ValueError, match=r"is a cnn_small for 10 classes of 1-channel images, but the data has 100 "
                                         r"classes of 3-channel images"):
        load_teacher(str(run), num_classes=100, in_chans=3)

    plain = tmp_path / "weights.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(TeacherNotFoundError, match="--teacher-model"):
        load_teacher(str(plain), num_classes=10, in_chans=1)
    loaded = load_teacher(str(plain), num_classes=10, in_chans=1, model_name="cnn_small")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(TeacherNotFoundError, match="does not fit"):
        load_teacher(str(plain), num_classes=10, in_chans=1, model_name="cnn_large")


def test_model_name_and_unknown_specs():
    with pytest.warns(UserWarning, match="freshly initialised"):
        teacher = load_teacher("cnn_small", num_classes=10, in_chans=1)
    assert isinstance(teacher, models.SmallCNN) and not teacher.training
    with pytest.raises(TeacherNotFoundError, match="checkpoint 'runs/x/best.pt' does not exist.*ardir train "
                                                   "--method trades"):
        load_teacher("runs/x/best.pt")
    with pytest.raises(TeacherNotFoundError, match="neither a file, a model name"):
        load_teacher("wrn34")


def test_robustbench_l2_spec_reads_the_l2_leaderboards_directory(tmp_path, tiny_zoo):
    with pytest.raises(TeacherNotFoundError) as err:
        load_teacher("robustbench:L2/Rice2020Overfitting", model_dir=tmp_path)
    assert str(tmp_path / "cifar10" / "L2" / "Rice2020Overfitting.pt") in str(err.value)
    assert teachers.robustbench_spec("robustbench:Linf/Zhang2019Theoretically") == \
        teachers.robustbench_spec("robustbench:Zhang2019Theoretically") == ("Linf", "Zhang2019Theoretically")


def test_a_known_linf_name_is_not_mapped_from_the_l2_directory(tmp_path, tiny_zoo):
    """The mapping of ROBUSTBENCH_ZOO is for its own leaderboard's network; an L2 file of that name is another one."""
    monkeypatch_entry = teachers.ROBUSTBENCH_ZOO[tiny_zoo]
    assert monkeypatch_entry.get("threat_model", "Linf") == "Linf"
    path = tmp_path / "cifar10" / "L2" / f"{tiny_zoo}.pt"
    path.parent.mkdir(parents=True)
    torch.save({}, path)
    with pytest.raises(TeacherNotFoundError, match="maps only"):
        load_teacher(f"robustbench:L2/{tiny_zoo}", model_dir=tmp_path)


@pytest.mark.parametrize("spec", ["robustbench:L1/Rice2020Overfitting", "robustbench:L2/", "robustbench:linf/X"])
def test_a_robustbench_spec_with_an_unknown_threat_model_is_one_sentence(spec):
    with pytest.raises(ValueError, match=r"robustbench:THREAT/NAME with THREAT one of Linf, L2"):
        load_teacher(spec)
