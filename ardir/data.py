"""Datasets and data loaders for robust distillation experiments.

Every dataset yields ``(image, label)`` with ``image`` a float tensor of shape (C, H, W) in [0, 1]
and ``label`` an int in [0, num_classes). Nothing is mean/std-normalised here: adversarial attacks
work in [0, 1] pixel space, so normalisation belongs inside the model.

Where the data comes from, in order:

1. ``data_dir`` (default ``$ARDIR_DATA_DIR`` or ``~/.cache/ardir/data``), an existing copy;
2. for Fashion-MNIST, ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``);
3. torchvision's download into ``data_dir`` when ``download=True`` and the machine is online.

If none of them works, :class:`DatasetNotFoundError` says every place that was looked at and how
to provide the data. MNIST and Fashion-MNIST idx files (``.gz`` or plain) are read directly into
one uint8 tensor, and every built-in dataset is kept in memory (:class:`InMemoryImageDataset`), so
CPU runs do not pay for PIL decoding per sample.
"""
from __future__ import annotations

import copy
import gzip
import os
import struct
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ._checks import non_negative_int, one_of
# The datasets' specs and registry live in their own module; re-exported here.
from ._data_specs import (ALIASES, DATASETS, FASHION_MNIST_SYSTEM_DIR, DatasetNotFoundError,  # noqa: F401
                          DatasetSpec, get_spec)

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "DatasetSpec",
    "FAKE_SIZES",
    "InMemoryImageDataset",
    "Loaders",
    "get_dataset",
    "get_loaders",
    "get_spec",
    "read_idx",
    "split_train_val",
]

PathLike = Union[str, os.PathLike]

FAKE_SIZES = {"train": 512, "test": 256}
"""Default number of images of ``fake=True`` datasets per split."""

SPLITS = ("train", "test")


def read_idx(path: PathLike) -> np.ndarray:
    """Read an idx file (MNIST format, ``.gz`` or plain) of unsigned bytes into a uint8 array.

    Images come back as (N, H, W), labels as (N,).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path} is not an idx file: {len(raw)} bytes (truncated or empty); download it again")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim]) if len(raw) >= 4 + 4 * ndim else None
    expected = None if shape is None else 4 + 4 * ndim + int(np.prod(shape))
    if shape is None or len(raw) != expected:
        raise ValueError(f"{path} is truncated or corrupt: {len(raw)} bytes where its header announces "
                         f"{expected if expected is not None else 'more'}; download it again")
    # Copied so the array is writable: torch warns about (and cannot protect) read-only buffers.
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _crop_flip(image: torch.Tensor, padding: int, hflip: bool) -> torch.Tensor:
    """Random crop after zero padding, then random horizontal flip, drawing from torch's global RNG.

    The global RNG (seeded per worker by DataLoader) makes ``torch.manual_seed`` reproduce it.
    """
    if padding > 0:
        height, width = image.shape[-2:]
        padded = F.pad(image, (padding, padding, padding, padding))
        top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
        image = padded[..., top:top + height, left:left + width]
    if hflip and torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image


class InMemoryImageDataset(TensorDataset):
    """A whole dataset held as ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,) tensors.

    Items are ``(image, label)``: image float32 (C, H, W) in [0, 1], label an int. With ``augment``
    each item gets a random crop (zero padding ``crop_padding``) and, if ``hflip``, a random
    horizontal flip, both from torch's global RNG.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, crop_padding: int = 0,
                 hflip: bool = False, augment: bool = True,
                 classes: Optional[Sequence[str]] = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 of shape (N, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        super().__init__(images, labels.long())
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.augment = augment
        self.classes = list(classes) if classes is not None else None

    @property
    def images(self) -> torch.Tensor:
        """uint8 (N, C, H, W)."""
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        """int64 (N,)."""
        return self.tensors[1]

    targets = labels  # torchvision's name, for code that expects it

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image = self.images[index].float().div_(255)
        if self.augment:
            image = _crop_flip(image, self.crop_padding, self.hflip)
        return image, int(self.labels[index])

    def without_augmentation(self) -> "InMemoryImageDataset":
        """The same images (shared, not copied) with augmentation off."""
        clone = copy.copy(self)
        clone.augment = False
        return clone


def _default_data_dir() -> Path:
    return Path(os.environ.get("ARDIR_DATA_DIR") or "~/.cache/ardir/data").expanduser()


def _remove_empty_dirs(root: Path) -> None:
    """Remove ``root`` and the folders under it, deepest first, as far as they are empty (never a file)."""
    if not root.is_dir():
        return
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    if not any(root.iterdir()):
        root.rmdir()


def _not_found(spec: DatasetSpec, split: str, looked: Sequence[Path],
               download_error: Optional[BaseException], how: str = "") -> DatasetNotFoundError:
    paths = ", ".join(str(p) for p in dict.fromkeys(looked))  # ordered, without repeats
    if download_error is not None:
        reason = (str(download_error).strip().splitlines() or [""])[0][:200]
        tried = f"and downloading failed ({type(download_error).__name__}: {reason})"
        elsewhere = "download it on a machine that is online"
    else:
        tried, elsewhere = "and download=False", "run once online with download=True"
    how = how or f"pass --data-dir pointing to an existing copy, or {elsewhere}"
    if spec.install_hint:
        how += f", or `{spec.install_hint}`"
    return DatasetNotFoundError(
        f"{spec.name} {split} split not found: looked in {paths} {tried}; to provide it, {how}.")


def _find_idx(directory: Path, split: str) -> Optional[Tuple[Path, Path]]:
    prefix = "train" if split == "train" else "t10k"
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [directory / f"{prefix}-{kind}-ubyte{ext}" for ext in ("", ".gz")]
        existing = [p for p in candidates if p.is_file()]
        if not existing:
            return None
        found.append(existing[0])
    return found[0], found[1]


def _to_nchw(images: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    images = torch.as_tensor(np.asarray(images), dtype=torch.uint8)
    if images.dim() == 3:  # (N, H, W) grey
        images = images.unsqueeze(1)
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):  # (N, H, W, C)
        images = images.permute(0, 3, 1, 2)
    return images.contiguous()


def _load_tensors(spec: DatasetSpec, split: str, root: Path, download: bool,
                  system: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, H, W) and int64 labels (N,) of a built-in dataset; ``system``: also look in the system
    copies (:attr:`DatasetSpec.system_dirs`)."""
    looked: List[Path] = []
    if spec.idx_files:
        for directory in (root, root / spec.torchvision_subdir, *(spec.system_dirs if system else ())):
            looked.append(directory)
            files = _find_idx(directory, split)
            if files is not None:
                images, labels = (read_idx(f) for f in files)
                return _to_nchw(images), torch.from_numpy(labels.astype(np.int64))
    looked.append(root / spec.torchvision_subdir)
    split_kwargs = {"split": split} if spec.split_arg == "split" else {"train": split == "train"}
    made = None if root.exists() else next(p for p in (root, *root.parents) if p.parent.exists())
    try:
        dataset = spec.torchvision_cls(str(root), download=download, **split_kwargs)
    except (urllib.error.URLError, RuntimeError, OSError) as error:
        if made is not None:  # a mistyped --data-dir: leave no empty folders made for the failed download behind
            _remove_empty_dirs(made)
        raise _not_found(spec, split, looked, error if download else None) from error
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = dataset.labels  # SVHN's name
    return _to_nchw(dataset.data), torch.as_tensor(np.asarray(labels), dtype=torch.int64)


def _fake_dataset(spec: DatasetSpec, split: str, size: int, augment: bool,
                  image_size: int) -> InMemoryImageDataset:
    """Seeded random images whose classes are learnable: each class is noise around a prototype."""
    if spec.num_classes is None:
        raise ValueError(f"fake data needs a known number of classes; {spec.name!r} takes it "
                         f"from its folders, pick a built-in dataset name instead")
    generator = torch.Generator().manual_seed(SPLITS.index(split))
    shape = (spec.in_chans, image_size, image_size)
    prototypes = torch.randint(0, 256, (spec.num_classes, *shape), generator=generator)
    # Balanced labels so that even a few hundred images contain every class.
    labels = (torch.arange(size) % spec.num_classes)[torch.randperm(size, generator=generator)]
    noise = torch.randint(0, 256, (size, *shape), generator=generator)
    images = ((prototypes[labels] + noise) // 2).to(torch.uint8)
    return InMemoryImageDataset(images, labels, spec.crop_padding, spec.hflip, augment)


def _image_size(spec: DatasetSpec, image_size: Optional[int]) -> int:
    if image_size is None or image_size == spec.image_size:
        return spec.image_size
    if spec.name != "imagefolder":
        raise ValueError(f"image_size={image_size} only applies to 'imagefolder'; "
                         f"{spec.name} images are {spec.image_size}x{spec.image_size}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a whole number >= 1")
    return image_size


def get_dataset(name: str, split: str = "train", data_dir: Optional[PathLike] = None,
                download: bool = True, augment: bool = True, fake: bool = False, *,
                image_size: Optional[int] = None) -> Dataset:
    """One split of a dataset, yielding ``(image, label)``.

    ``image`` is float32 (C, H, W) in [0, 1], never normalised; ``label`` an int in
    [0, num_classes). ``split`` is "train" or "test"; the test split is never augmented, the
    train split gets the dataset's crop/flip (see :data:`DATASETS`) unless ``augment=False``.
    ``fake=True`` gives seeded random images of the right shape and class count
    (:data:`FAKE_SIZES`) without touching the disk. For ``name="imagefolder"``, ``data_dir``
    holds ``train/<class>/*`` and ``test/<class>/*`` (or ``val/``), resized to ``image_size``
    (default 32). Raises :class:`DatasetNotFoundError` when the data can be neither found nor
    downloaded.
    """
    spec = get_spec(name)
    one_of("split", split, SPLITS, what="split")
    augment = augment and split == "train"
    size = _image_size(spec, image_size)
    if fake:
        return _fake_dataset(spec, split, FAKE_SIZES[split], augment, size)
    if spec.name == "imagefolder":
        return _get_image_folder(spec, split, data_dir, size, augment)
    root = Path(data_dir).expanduser() if data_dir is not None else _default_data_dir()
    # an explicit data_dir is where the data must be: no silent fall-back to a system copy when it is wrong
    images, labels = _load_tensors(spec, split, root, download, system=data_dir is None)
    return InMemoryImageDataset(images, labels, spec.crop_padding, spec.hflip, augment)


def _get_image_folder(spec: DatasetSpec, split: str, data_dir: Optional[PathLike], size: int,
                      augment: bool) -> Dataset:
    how = "pass --data-dir pointing to a folder with train/<class>/<image> and test/<class>/<image>"
    if data_dir is None:
        raise DatasetNotFoundError(f"imagefolder needs a folder of images; {how}.")
    root = Path(data_dir).expanduser()
    candidates = [root / "train"] if split == "train" else [root / "test", root / "val"]
    for folder in candidates:
        if folder.is_dir():
            from ._image_folder import ResizedImageFolder  # torchvision, imported when a folder is read
            return ResizedImageFolder(folder, size, spec, augment)
    raise _not_found(spec, split, candidates, None, how=how)


def split_train_val(n: int, val_size: int, seed: int = 0) -> Tuple[List[int], List[int]]:
    """Split indices ``range(n)`` into (train, val), both sorted; ``val`` is a seeded random draw.

    The same ``(n, val_size, seed)`` always gives the same split; ``val_size=0`` gives no val.
    """
    non_negative_int("val_size", val_size)
    if val_size >= n:
        raise ValueError(f"val_size={val_size} leaves no training images out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val = sorted(order[:val_size].tolist())
    train = sorted(order[val_size:].tolist())
    return train, val


@dataclass
class Loaders:
    """Train/val/test loaders of one dataset plus what a model needs to know about its images.

    Batches are ``(images, labels)``: images float32 (B, in_chans, image_size, image_size) in
    [0, 1], labels int64 (B,). ``val`` is None when no validation split was held out.
    """

    train: DataLoader
    val: Optional[DataLoader]
    test: DataLoader
    num_classes: int
    in_chans: int
    image_size: int
    name: str = ""


def get_loaders(name: str, data_dir: Optional[PathLike] = None, batch_size: int = 128,
                val_size: int = 1000, fake_data: bool = False, num_workers: int = 0, seed: int = 0,
                limit: Optional[int] = None, download: bool = True, *,
                image_size: Optional[int] = None) -> Loaders:
    """Train, validation and test loaders of a dataset (see :func:`get_dataset` for the items).

    The validation split is ``val_size`` images held out of the *training* set by a seeded draw
    (:func:`split_train_val`), never augmented; ``val_size=0`` disables it. ``limit`` keeps only
    the first ``limit`` remaining training images, for small CPU runs (with ``fake_data`` it
    sets the fake training set's size, default ``FAKE_SIZES["train"]``). The training loader
    shuffles with a ``torch.Generator`` seeded by ``seed`` and drops the last partial batch.
    """
    spec = get_spec(name)
    non_negative_int("batch_size", batch_size)
    non_negative_int("num_workers", num_workers)
    non_negative_int("val_size", val_size)
    if batch_size == 0:
        raise ValueError("batch_size=0 must be at least 1")
    if limit is not None and non_negative_int("limit", limit) == 0:
        raise ValueError("limit=0 leaves no training images; use None for the whole set")

    if fake_data:
        size = _image_size(spec, image_size)
        train_size = (limit or FAKE_SIZES["train"]) + val_size
        pool = _fake_dataset(spec, "train", train_size, True, size)
        test = _fake_dataset(spec, "test", FAKE_SIZES["test"], False, size)
    else:
        pool = get_dataset(name, "train", data_dir, download, augment=True, image_size=image_size)
        test = get_dataset(name, "test", data_dir, download, augment=False, image_size=image_size)

    num_classes = spec.num_classes
    if num_classes is None:  # imagefolder: the folders define the classes
        if test.classes != pool.classes:
            raise ValueError(f"train classes {pool.classes} differ from test classes {test.classes}")
        num_classes = len(pool.classes)

    train_idx, val_idx = split_train_val(len(pool), val_size, seed)
    train_idx = train_idx[:limit]
    if len(train_idx) < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the {len(train_idx)} training "
                         f"images, so no full batch is left; lower batch_size (ardir train: --batch-size) or raise "
                         "limit (--train-size)")

    common = dict(batch_size=batch_size, num_workers=num_workers,
                  pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
    train_loader = DataLoader(Subset(pool, train_idx), shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(seed), **common)
    val_loader = None
    if val_idx:
        val_loader = DataLoader(Subset(pool.without_augmentation(), val_idx), shuffle=False, **common)
    test_loader = DataLoader(test, shuffle=False, **common)
    return Loaders(train_loader, val_loader, test_loader, num_classes, spec.in_chans,
                   _image_size(spec, image_size), spec.name)
