"""ardir.zoo: the shipped teachers load by name, their hash is checked, a modified copy is refused."""
import json
import shutil

import pytest
import torch

from ardir import models, zoo
from ardir.teachers import TeacherNotFoundError, load_teacher

SHIPPED = "fashion-mnist:cnn_xlarge-at"


def test_the_shipped_fashion_mnist_teacher_loads_by_name_and_matches_its_hash():
    assert SHIPPED in zoo.list_shipped()
    info = zoo.manifest(SHIPPED)
    assert zoo.file_sha256(zoo.WEIGHTS_DIR / "fashion-mnist" / info["file"]) == info["sha256"]
    teacher = load_teacher(SHIPPED)  # the recorded 1-channel, 10-class settings; no data needed
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert isinstance(teacher, type(models.create(info["model"], in_chans=1)))
    with torch.no_grad():
        assert teacher(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    for key in ("natural", "pgd20", "cw30"):  # the manifest states what it measured
        assert 0 <= info["evaluation"]["accuracy"][key] <= 100
    aa = info["evaluation"]["accuracy"]["autoattack"]  # None: not measured (hours on two CPU cores)
    assert aa is None or 0 <= aa <= 100
    assert info["training"]["command"].startswith("ardir train") and info["commit"]


def _fake_zoo(tmp_path, monkeypatch):
    """A zoo in tmp_path with one tiny shipped teacher, ``toy:small``."""
    model = models.create("cnn_small", num_classes=10, in_chans=1)
    (tmp_path / "toy").mkdir()
    weights = tmp_path / "toy" / "small.pt"
    torch.save(model.state_dict(), weights)
    manifest = {"name": "toy:small", "model": "cnn_small", "num_classes": 10, "in_chans": 1, "file": "small.pt",
                "sha256": zoo.file_sha256(weights)}
    (tmp_path / "toy" / "small.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    return model, weights


def test_a_shipped_teacher_is_rebuilt_with_its_weights(tmp_path, monkeypatch):
    model, _ = _fake_zoo(tmp_path, monkeypatch)
    loaded = load_teacher("toy:small", num_classes=10, in_chans=1)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_a_modified_copy_is_refused_in_one_sentence(tmp_path, monkeypatch):
    _, weights = _fake_zoo(tmp_path, monkeypatch)
    state = torch.load(weights, weights_only=True)
    state["fc.bias"] += 1.0  # a valid checkpoint, but not the one the manifest vouches for
    torch.save(state, weights)
    with pytest.raises(zoo.TeacherIntegrityError, match=r"^refused: .*small\.pt does not match the sha256"):
        load_teacher("toy:small")


def test_a_missing_weights_file_is_refused(tmp_path, monkeypatch):
    _, weights = _fake_zoo(tmp_path, monkeypatch)
    weights.unlink()
    with pytest.raises(zoo.TeacherIntegrityError, match="does not match"):
        load_teacher("toy:small")


def test_unknown_shipped_name_and_other_data_are_one_sentence(tmp_path, monkeypatch):
    _fake_zoo(tmp_path, monkeypatch)
    with pytest.raises(TeacherNotFoundError, match=r"no shipped teacher 'toy:large'; shipped: toy:small"):
        load_teacher("toy:large")
    with pytest.raises(ValueError, match="1-channel images, but the data has 10 classes of 3-channel"):
        load_teacher("toy:small", num_classes=10, in_chans=3)


def test_the_shipped_copy_in_the_repository_is_the_one_the_manifest_names(tmp_path, monkeypatch):
    """A user's edited copy of the real file is refused too (not only the toy)."""
    src = zoo.WEIGHTS_DIR / "fashion-mnist"
    shutil.copytree(src, tmp_path / "fashion-mnist")
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    weights = tmp_path / "fashion-mnist" / zoo.manifest(SHIPPED)["file"]
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(zoo.TeacherIntegrityError, match="refused"):
        load_teacher(SHIPPED)
