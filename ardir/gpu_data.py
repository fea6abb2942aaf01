"""A device-resident training loader: the whole dataset lives on the GPU as uint8, batches are cut and augmented there.

For datasets that fit in device memory (CIFAR-10/100: 150 MB, SVHN: 220 MB, Fashion-MNIST: 47 MB as uint8) this
removes the CPU data pipeline altogether: no worker processes, no host-to-device copy per batch, no host
synchronisation. The random crop (zero padding) and horizontal flip are the same as
:class:`ardir.data.InMemoryImageDataset`'s, done for the whole batch at once; the shuffle and the augmentation draw
from a ``torch.Generator`` on the device seeded by ``seed`` and the epoch (:meth:`GPULoader.set_epoch`, called by
the trainer), so a run is reproducible.

Example::

    loaders = ardir.data.get_loaders("cifar10", batch_size=128)
    train = ardir.gpu_data.GPULoader.from_loader(loaders.train, device="cuda")
    ardir.Trainer(student, train, teacher=teacher, precision="bf16").fit()
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from . import distributed
from ._checks import non_negative_int


def crop_flip_batch(images: torch.Tensor, padding: int, hflip: bool,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random crop after zero padding and random horizontal flip, per image, for a whole (N, C, H, W) batch."""
    n, _, h, w = images.shape
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        offsets = torch.randint(0, 2 * padding + 1, (2, n), device=images.device, generator=generator)
        rows = (offsets[0, :, None] + torch.arange(h, device=images.device))  # (N, H)
        cols = (offsets[1, :, None] + torch.arange(w, device=images.device))  # (N, W)
        batch = torch.arange(n, device=images.device)[:, None, None]
        # (N, H, W, C) by advanced indexing, back to (N, C, H, W)
        images = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if hflip:
        flip = torch.rand(n, device=images.device, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images


class GPULoader:
    """Iterates ``(images, labels)`` batches of a dataset held on ``device``: images float32 in [0, 1].

    Arguments:
        images: uint8 (N, C, H, W); labels: int64 (N,). Both are moved to ``device`` once.
        device: where the data live (default: CUDA when present, else the CPU).
        batch_size: images per batch of this process; in a process group of W processes the global batch is
            ``batch_size * W`` (:meth:`from_loader` divides a loader's batch by W instead).
        shuffle, drop_last: as ``DataLoader`` (defaults True, True: a training loader).
        crop_padding, hflip: the augmentation (0 / False: none).
        seed: the shuffle and augmentation seed; epoch ``e`` uses ``seed + e``.
        rank, world_size: shard of a process group (default: this process's, see :mod:`ardir.distributed`);
            each process gets ``batch_size`` images of every global batch of ``batch_size * world_size``, with the
            same shuffle and augmentation as one process reading the global batch.
        channels_last: return channels-last batches.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128, *,
                 device: Union[str, torch.device, None] = None, shuffle: bool = True, drop_last: bool = True,
                 crop_padding: int = 0, hflip: bool = False, seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None, channels_last: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = non_negative_int("batch_size", batch_size)
        if self.batch_size == 0:
            raise ValueError("batch_size=0 must be at least 1")
        self.shuffle, self.drop_last = shuffle, drop_last
        self.crop_padding, self.hflip = non_negative_int("crop_padding", crop_padding), bool(hflip)
        self.seed, self.epoch = int(seed), 0
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size
        self.channels_last = channels_last

    @classmethod
    def from_loader(cls, loader: DataLoader, device: Union[str, torch.device, None] = None,
                    **kwargs) -> "GPULoader":
        """The GPU twin of an ardir loader (``ardir.data.get_loaders(...).train``): same images, labels, subset,
        global batch and augmentation.

        As the :class:`~ardir.Trainer` does with a ``DataLoader``, the loader's batch size is the global batch: in a
        process group of W processes each gets ``loader.batch_size // W`` images per step (``ValueError`` when it
        does not divide), so the learning rate means what it means in one process."""
        dataset, indices = loader.dataset, None
        if isinstance(dataset, Subset):
            dataset, indices = dataset.dataset, torch.as_tensor(dataset.indices)
        if not hasattr(dataset, "images") or not hasattr(dataset, "labels"):
            raise TypeError(f"{type(dataset).__name__} is not held in memory as tensors (an "
                            "ardir.data.InMemoryImageDataset): keep the DataLoader for it")
        images, labels = dataset.images, dataset.labels
        if indices is not None:
            images, labels = images[indices], labels[indices]
        augment = getattr(dataset, "augment", False)
        world = kwargs.get("world_size") or distributed.world_size()
        if "batch_size" not in kwargs and loader.batch_size % world:
            raise ValueError(f"the loader's batch size {loader.batch_size} does not split over {world} processes")
        options = dict(batch_size=loader.batch_size // world, drop_last=loader.drop_last,
                       shuffle=not isinstance(loader.sampler, torch.utils.data.SequentialSampler),
                       crop_padding=getattr(dataset, "crop_padding", 0) if augment else 0,
                       hflip=getattr(dataset, "hflip", False) if augment else False)
        options.update(kwargs)
        return cls(images, labels, device=device, **options)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle and augmentation for ``epoch`` (called by the trainer)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        per_step = self.batch_size * self.world_size
        n = len(self.images)
        return n // per_step if self.drop_last else -(-n // per_step)

    def _batch_indices(self, generator: torch.Generator) -> torch.Tensor:
        n = len(self.images)
        if self.shuffle:
            return torch.randperm(n, device=self.device, generator=generator)
        return torch.arange(n, device=self.device)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed + self.epoch)
        order = self._batch_indices(generator)
        per_step = self.batch_size * self.world_size
        for step in range(len(self)):
            chunk = order[step * per_step:(step + 1) * per_step]
            images = self.images[chunk].float().div_(255)
            if self.crop_padding or self.hflip:
                # drawn for the whole global batch, so every process draws alike and each gets its own images'
                # crops: the processes together see exactly the one-process batch
                images = crop_flip_batch(images, self.crop_padding, self.hflip, generator)
            mine = slice(self.rank, None, self.world_size)  # the same split as DistributedSampler's interleave
            # the crop's gather leaves NHWC strides: hand out the layout asked for, not a mix
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            yield images[mine].contiguous(memory_format=fmt), self.labels[chunk[mine]]
