"""The ``imagefolder`` dataset of :mod:`ardir.data`: torchvision's ``ImageFolder``, resized and augmented as the
built-in datasets are. Its own module so that :mod:`ardir.data` imports torchvision only when a folder is read."""
from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

from torchvision import datasets
from torchvision import transforms as T

from .data import DatasetSpec, _crop_flip


class ResizedImageFolder(datasets.ImageFolder):
    """``ImageFolder`` resized to ``size`` x ``size`` RGB, with the same crop/flip as the built-ins."""

    def __init__(self, root: Path, size: int, spec: DatasetSpec, augment: bool) -> None:
        self.eval_transform = T.Compose([T.Resize((size, size)), T.ToTensor()])
        transform = self.eval_transform
        if augment:
            transform = T.Compose([self.eval_transform,
                                   partial(_crop_flip, padding=spec.crop_padding, hflip=spec.hflip)])
        super().__init__(str(root), transform=transform)

    def without_augmentation(self) -> "ResizedImageFolder":
        """The same images with the training-time crop and flip off."""
        clone = copy.copy(self)
        clone.transform = clone.eval_transform
        return clone
