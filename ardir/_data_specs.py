"""What is known about each dataset before loading it: :class:`DatasetSpec` and the :data:`DATASETS` registry.

Part of :mod:`ardir.data` (which re-exports every public name here); reading the data is :mod:`ardir.data`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from .registry import Registry

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

class DatasetNotFoundError(FileNotFoundError):
    """A dataset is neither on disk nor downloadable; the message lists where it looked and how to provide it."""


@dataclass(frozen=True)
class DatasetSpec:
    """What is known about a dataset before loading it.

    ``image_size`` is the side of the square (H = W) images; ``mean``/``std`` are per-channel
    statistics of the [0, 1] training images, for information (models normalise themselves).
    ``crop_padding`` > 0 means train-time random crop after zero-padding by that many pixels;
    ``hflip`` means train-time random horizontal flip. ``num_classes`` is None for ``imagefolder``,
    where the class folders decide it.
    """

    name: str
    num_classes: Optional[int]
    in_chans: int
    image_size: int
    # The class's name in ``torchvision.datasets``, imported when the dataset is read (:attr:`torchvision_cls`),
    # so that ``import ardir`` (and ``ardir --help``) does not pay for importing torchvision.
    torchvision_name: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_padding: int
    hflip: bool
    # How the torchvision class selects its split: "train" (a bool) or "split" (a string).
    split_arg: str = "train"
    # Where torchvision keeps its copy under the root; also where idx files are looked for.
    torchvision_subdir: str = ""
    # MNIST-style datasets ship as idx files that can be read without torchvision.
    idx_files: bool = False
    system_dirs: Tuple[Path, ...] = ()
    install_hint: str = ""
    # The L-inf radius robustness papers use on it: what `ardir train` and `ardir eval` take when no eps is given.
    eps: float = 8 / 255

    @property
    def torchvision_cls(self) -> type:
        """The ``torchvision.datasets`` class that reads or downloads this dataset (imports torchvision)."""
        from torchvision import datasets
        return getattr(datasets, self.torchvision_name)


ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "fmnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "image-folder": "imagefolder",
}
"""Other spellings of the dataset names (also registered in :data:`DATASETS`)."""

DATASETS = Registry("dataset", normalize=lambda name: name.strip().lower().replace("_", "-"))
"""The supported datasets, canonical name -> :class:`DatasetSpec` (a :class:`~ardir.registry.Registry`)."""
for _spec in (
    # Random crop + flip: the standard CIFAR recipe of every robust-distillation paper
    # (ARD, RSLAD, IAD, AdaAD ...).
    DatasetSpec(
        "cifar10", 10, 3, 32, "CIFAR10",
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), crop_padding=4, hflip=True,
        torchvision_subdir="cifar-10-batches-py"),
    DatasetSpec(
        "cifar100", 100, 3, 32, "CIFAR100",
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), crop_padding=4, hflip=True,
        torchvision_subdir="cifar-100-python"),
    # No flip: a mirrored digit is a different (or no) digit.
    DatasetSpec(
        "svhn", 10, 3, 32, "SVHN",
        (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), crop_padding=4, hflip=False,
        split_arg="split"),
    # No augmentation, as in Madry et al.'s and TRADES' MNIST setups: digits are centred and
    # small shifts add nothing but training time.
    DatasetSpec(
        "mnist", 10, 1, 28, "MNIST",
        (0.1307,), (0.3081,), crop_padding=0, hflip=False,
        torchvision_subdir="MNIST/raw", idx_files=True, eps=0.3),  # Madry et al.'s and TRADES' MNIST radius
    # Crop + flip: clothes are left-right symmetric classes (a mirrored shoe is still a shoe),
    # and Fashion-MNIST overfits quickly without augmentation; padding 2 keeps 28x28 items in view.
    DatasetSpec(
        "fashion-mnist", 10, 1, 28, "FashionMNIST",
        (0.2860,), (0.3530,), crop_padding=2, hflip=True,
        torchvision_subdir="FashionMNIST/raw", idx_files=True,
        system_dirs=(FASHION_MNIST_SYSTEM_DIR,),
        install_hint="apt-get install dataset-fashion-mnist", eps=0.1),  # the radius of ardir's suites
    # A folder of natural images: data_dir/{train,test}/<class>/<image>; ImageNet statistics for info.
    DatasetSpec(
        "imagefolder", None, 3, 32, "ImageFolder",
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_padding=4, hflip=True),
):
    DATASETS.register(_spec, aliases=[alias for alias, name in ALIASES.items() if name == _spec.name])


def get_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name`` (case-insensitive; ``_`` and ``-`` are interchangeable).

    Raises ``ValueError`` naming the argument and the closest known names for an unknown ``name``.
    """
    return DATASETS.lookup(name)
