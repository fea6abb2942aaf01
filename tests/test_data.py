"""Tests of ardir.data: registry, fake data, splits, augmentation, real and missing data."""
from pathlib import Path

import numpy as np
import pytest
import torch

from ardir import data
from ardir.data import (DATASETS, DatasetNotFoundError, InMemoryImageDataset, get_dataset,
                        get_loaders, get_spec, split_train_val)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("name, canonical", [
    ("cifar10", "cifar10"), ("CIFAR-100", "cifar100"), ("svhn", "svhn"), ("mnist", "mnist"),
    ("fashion-mnist", "fashion-mnist"), ("fashion_mnist", "fashion-mnist"),
    ("fmnist", "fashion-mnist"), ("imagefolder", "imagefolder"),
])
def test_registry_lookup(name, canonical):
    assert get_spec(name) is DATASETS[canonical]


def test_registry_specs():
    assert (get_spec("cifar100").num_classes, get_spec("cifar100").in_chans) == (100, 3)
    assert (get_spec("mnist").image_size, get_spec("mnist").in_chans) == (28, 1)
    assert not get_spec("svhn").hflip and get_spec("svhn").crop_padding == 4
    assert get_spec("fashion-mnist").hflip and get_spec("fashion-mnist").crop_padding == 2


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"name='cifar1'.*cifar10"):
        get_spec("cifar1")
    with pytest.raises(ValueError, match="fashion-mnist"):
        get_dataset("fashon-mnist", fake=True)


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        get_dataset("mnist", split="validation", fake=True)


@pytest.mark.parametrize("name, shape, classes", [
    ("cifar10", (3, 32, 32), 10), ("cifar100", (3, 32, 32), 100), ("mnist", (1, 28, 28), 10),
])
def test_fake_loaders(name, shape, classes):
    loaders = get_loaders(name, fake_data=True, batch_size=32, val_size=64, limit=128)
    assert (loaders.num_classes, loaders.in_chans, loaders.image_size) == (classes, shape[0], shape[1])
    assert len(loaders.train.dataset) == 128 and len(loaders.val.dataset) == 64
    assert len(loaders.test.dataset) == data.FAKE_SIZES["test"]
    for loader in (loaders.train, loaders.val, loaders.test):
        images, labels = next(iter(loader))
        assert images.shape == (32, *shape) and images.dtype == torch.float32
        assert 0 <= images.min() and images.max() <= 1
        assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < classes


def test_fake_dataset_is_seeded_and_balanced():
    first, second = get_dataset("cifar10", fake=True), get_dataset("cifar10", fake=True)
    assert len(first) == data.FAKE_SIZES["train"]
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert torch.bincount(first.labels).min() >= len(first) // 10


def test_val_split_disjoint_and_deterministic():
    train, val = split_train_val(100, 20, seed=3)
    assert len(val) == 20 and len(train) == 80 and not set(train) & set(val)
    assert (train, val) == split_train_val(100, 20, seed=3)
    assert val != split_train_val(100, 20, seed=4)[1]

    loaders = get_loaders("mnist", fake_data=True, batch_size=8, val_size=16, limit=32, seed=1)
    train_indices = set(loaders.train.dataset.indices)
    val_indices = set(loaders.val.dataset.indices)
    assert len(train_indices) == 32 and not train_indices & val_indices
    assert loaders.train.dataset.dataset.augment and not loaders.val.dataset.dataset.augment
    assert get_loaders("mnist", fake_data=True, batch_size=8, val_size=0, limit=32).val is None


def test_train_order_reproducible():
    def first_labels(seed):
        loaders = get_loaders("cifar10", fake_data=True, batch_size=16, val_size=0, seed=seed)
        return next(iter(loaders.train))[1]

    assert torch.equal(first_labels(0), first_labels(0))
    assert not torch.equal(first_labels(0), first_labels(1))


def test_augmentation_keeps_shape_and_range():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    augmented = InMemoryImageDataset(images, torch.arange(4), crop_padding=4, hflip=True)
    plain = augmented.without_augmentation()
    torch.manual_seed(0)
    changed = False
    for i in range(4):
        x, y = augmented[i]
        assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 and y == i
        assert torch.equal(plain[i][0], images[i].float() / 255)
        changed |= not torch.equal(x, plain[i][0])
    assert changed
    torch.manual_seed(0)
    again = augmented[0][0]
    torch.manual_seed(0)
    assert torch.equal(again, augmented[0][0])


def test_test_split_never_augmented():
    assert not get_dataset("cifar10", split="test", fake=True, augment=True).augment


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_default_data_dir", lambda: tmp_path)  # nothing there: the Debian package's copy
    train = get_dataset("fashion-mnist", "train", download=False)
    test = get_dataset("fmnist", "test", download=False)
    assert (len(train), len(test)) == (60000, 10000)
    for dataset in (train, test):
        x, y = dataset[0]
        assert x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1 and 0 <= y < 10
    assert set(train.labels.tolist()) == set(range(10))


def _write_idx(path, array):
    import gzip
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_in_data_dir(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    dataset = get_dataset("mnist", "test", data_dir=tmp_path, download=False)
    assert len(dataset) == 5 and dataset[3][1] == 3
    assert torch.equal(dataset[2][0], torch.from_numpy(images[2:3]).float() / 255)


def test_missing_data_names_paths(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="--data-dir") as error:
        get_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    assert str(tmp_path / "cifar-10-batches-py") in str(error.value)
    assert isinstance(error.value, FileNotFoundError)


def test_missing_fashion_mnist_names_every_path(tmp_path, monkeypatch):
    spec = DATASETS["fashion-mnist"]
    monkeypatch.setitem(DATASETS, "fashion-mnist",
                        data.DatasetSpec(**{**spec.__dict__, "system_dirs": (tmp_path / "system",)}))
    monkeypatch.setattr(data, "_default_data_dir", lambda: tmp_path / "default")
    with pytest.raises(DatasetNotFoundError) as error:
        get_dataset("fashion-mnist", download=False)
    message = str(error.value)
    for path in (tmp_path / "default", tmp_path / "default" / "FashionMNIST" / "raw", tmp_path / "system"):
        assert str(path) in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_an_explicit_data_dir_is_not_replaced_by_a_system_copy(tmp_path, monkeypatch):
    spec = DATASETS["fashion-mnist"]
    system = tmp_path / "system"
    system.mkdir()
    _write_idx(system / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    _write_idx(system / "t10k-labels-idx1-ubyte.gz", np.arange(3))
    monkeypatch.setitem(DATASETS, "fashion-mnist", data.DatasetSpec(**{**spec.__dict__, "system_dirs": (system,)}))
    monkeypatch.setattr(data, "_default_data_dir", lambda: tmp_path / "default")
    assert len(get_dataset("fashion-mnist", "test", download=False)) == 3  # no data_dir: the system copy
    with pytest.raises(DatasetNotFoundError) as error:  # a mistyped --data-dir is an error, not the system copy
        get_dataset("fashion-mnist", "test", data_dir=tmp_path / "mine", download=False)
    assert str(tmp_path / "mine") in str(error.value) and str(system) not in str(error.value)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    loaders = get_loaders("imagefolder", data_dir=tmp_path, batch_size=2, val_size=2,
                          image_size=8, download=False)
    assert (loaders.num_classes, loaders.in_chans, loaders.image_size) == (2, 3, 8)
    assert len(loaders.train.dataset) == 6 and len(loaders.test.dataset) == 4
    for loader in (loaders.train, loaders.val, loaders.test):
        images, labels = next(iter(loader))
        assert images.shape == (2, 3, 8, 8) and 0 <= images.min() and images.max() <= 1
        assert set(labels.tolist()) <= {0, 1}


def test_every_spec_names_its_torchvision_class():
    import torchvision.datasets as tv

    expected = {"cifar10": tv.CIFAR10, "cifar100": tv.CIFAR100, "svhn": tv.SVHN, "mnist": tv.MNIST,
                "fashion-mnist": tv.FashionMNIST, "imagefolder": tv.ImageFolder}
    assert {name: spec.torchvision_cls for name, spec in DATASETS.items()} == expected


def test_image_folder_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "train")):
        get_dataset("imagefolder", data_dir=tmp_path)


def test_a_failed_download_leaves_no_folders_and_says_so_in_one_line(tmp_path, monkeypatch):
    """A mistyped data folder: the download torchvision tries fails (offline here, or a bad mirror); the folders it
    made are removed again, a file already there is kept, and the message names the failure's first line."""
    import dataclasses
    import urllib.error

    def offline(root, download, **kwargs):
        (Path(root) / "cifar-10-batches-py").mkdir(parents=True)
        raise urllib.error.URLError("no network\nsecond line")

    import torchvision.datasets
    monkeypatch.setattr(torchvision.datasets, "OfflineForTest", offline, raising=False)
    spec = dataclasses.replace(DATASETS["cifar10"], torchvision_name="OfflineForTest")
    with pytest.raises(DatasetNotFoundError) as err:
        data._load_tensors(spec, "train", tmp_path / "typo" / "data", download=True)
    assert not (tmp_path / "typo").exists()
    message = str(err.value)
    assert "downloading failed (URLError: <urlopen error no network)" in message and "second line" not in message
    assert "download it on a machine that is online" in message and "download=True" not in message
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "note.txt").write_text("mine")
    with pytest.raises(DatasetNotFoundError):
        data._load_tensors(spec, "train", tmp_path / "kept" / "data", download=True)
    assert (tmp_path / "kept" / "note.txt").read_text() == "mine" and not (tmp_path / "kept" / "data").exists()
