"""Multi-process data-parallel training (``torchrun --nproc_per_node=N script.py``).

How ardir runs data parallel, and why not through the ``DistributedDataParallel`` wrapper:

- Each process holds a full copy of the student (and teacher) and trains on its own shard of every global batch:
  the trainer replaces a plain ``DataLoader`` of batch B by a ``DistributedSampler`` one of batch B / N
  (:func:`shard_loader`, ``keep_global_batch=True``), so the global batch, and the meaning of the learning rate,
  are those of the one-process run. After ``loss.backward()`` the :class:`~ardir.Trainer`
  averages the gradients of *all* trained parameters over the processes in one flat all-reduce
  (:func:`all_reduce_gradients`), then every process takes the same optimiser step. This is the update DDP makes.
  ardir does it itself, without wrapping the student, because
  (1) the attack's forward/backward passes must not all-reduce anything: PGD takes ``torch.autograd.grad`` with
  respect to the input only, on the bare module, so no communication happens during the 10 attack steps;
  (2) forward hooks (ARDIR's :class:`~ardir.hooks.FeatureHooks`) keep the student's own module names
  (``"layer4"``, not ``"module.layer4"``); (3) a method's own trained parameters (ARDIR's feature adapters) are
  averaged with the student's. A student already wrapped in DDP is unwrapped by :class:`~ardir.PGD`.
- Start: :class:`~ardir.Trainer` broadcasts rank 0's student, teacher and method parameters and buffers, so all
  processes start identical.
- BatchNorm: as with DDP, batch statistics are per process (each normalises its own shard, so results depend on the
  per-process batch). The running statistics are averaged over the processes at the end of every epoch, so the
  evaluated and saved model is the same everywhere. ``prepare(model, sync_bn=True)`` converts BatchNorm to
  ``SyncBatchNorm`` (statistics of the global batch; CUDA only, a PyTorch restriction).
- Only rank 0 shows progress bars and runs callbacks (logging, checkpoints); :func:`is_main_process` tells the
  others. Evaluation in the trainer shards the validation set without padding (:func:`shard_loader` with
  ``training=False``) and sums the counts over the processes; :func:`ardir.evaluate` splits the test batches
  over the processes and gathers the per-sample results (:func:`all_gather_object`), so every process gets the
  one-process report.
- Random streams: after the start broadcast each process reseeds its own (rank r adds r to torch's seed; rank 0
  keeps the user's), so the attacks' random starts differ between processes as between the images of one batch.
  The checkpoints ``fit`` and rank 0's callbacks write carry every process's random states and BatchNorm
  statistics, and a resume with as many processes hands each its own (see docs/guarantees.md). Every process
  follows rank 0's checkpoint settings, so ``checkpoint_dir`` and callbacks may be given to rank 0 alone.

Example (``torchrun --nproc_per_node=2 train.py``)::

    device = ardir.distributed.init()                    # reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
    student = ardir.distributed.prepare(ardir.models.create("resnet18"), sync_bn=True).to(device)
    ardir.Trainer(student, loaders.train, teacher=teacher.to(device)).fit()  # shards the loaders itself
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import (DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler, Subset,
                              SubsetRandomSampler)


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes training together (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's index in the group, 0 .. world_size() - 1 (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that logs and writes files."""
    return rank() == 0


def init(backend: Optional[str] = None, timeout_s: float = 1800) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment and return this process's device.

    Without ``WORLD_SIZE`` in the environment (a plain ``python script.py``) nothing is initialised and the
    default device (``cuda`` when available, else ``cpu``) is returned. Backend: ``nccl`` on CUDA, ``gloo`` else;
    ``backend="gloo"`` asks for CPU processes even on a CUDA machine (device ``cpu``).
    """
    cuda = torch.cuda.is_available() and backend in (None, "nccl")
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        if dist.is_initialized() and cuda:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"),
                            timeout=datetime.timedelta(seconds=timeout_s))
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def join(device: torch.device) -> Tuple[torch.device, bool]:
    """Under ``torchrun`` (``WORLD_SIZE`` set) with no process group yet, join it (gloo when ``device`` is the CPU,
    else nccl) and return ``(this process's device, True)``: the caller then calls :func:`cleanup` when done.
    Otherwise ``(device, False)``. What ``ardir train``/``eval`` and the examples do first."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return device, False
    return init(backend="gloo" if device.type == "cpu" else None), True


def own_random_stream() -> None:
    """Reseed this process's torch generators apart from the other processes' (rank r adds r to torch's seed;
    rank 0, or a single process, keeps its stream), so their attacks' random starts differ."""
    if rank() > 0:
        torch.manual_seed((torch.initial_seed() + rank()) % 2 ** 63)


def cleanup() -> None:
    """Leave the process group (call at the end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def prepare(model: nn.Module, sync_bn: bool = False) -> nn.Module:
    """Optionally convert the model's BatchNorm layers to ``SyncBatchNorm`` (in place; returns the model)."""
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + W, rank + 2W, ...`` of ``range(n)``: every index exactly once over all ranks
    (no padding), for evaluation."""

    def __init__(self, n: int, num_replicas: Optional[int] = None, rank_: Optional[int] = None):
        self.n = n
        self.num_replicas = world_size() if num_replicas is None else num_replicas
        self.rank = rank() if rank_ is None else rank_

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


def shared_seed(seed: int) -> int:
    """Rank 0's ``seed`` in every process (a shuffle all processes must agree on); ``seed`` in a single process."""
    if not is_distributed():
        return int(seed)
    box = [int(seed) % 2 ** 63]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_loader(loader: DataLoader, training: Optional[bool] = None, seed: Optional[int] = None,
                 batch_size: Optional[int] = None, keep_global_batch: bool = False) -> DataLoader:
    """The same data loader with each process reading its own shard (the :class:`~ardir.Trainer` calls it on its
    loaders in a process group).

    The loader's own sampler says what is read: its order (sequential or shuffled) and, for a
    ``SubsetRandomSampler``, the subset; a shard never reaches beyond it. ``training`` defaults to whether the
    loader shuffles (a sequential loader is taken for evaluation).

    Training (``training=True``): a ``DistributedSampler``, so every process takes the same number of steps.
    It shuffles when ``loader`` does, every process with the same ``seed`` (default: the seed of the loader's
    ``generator``, else ``torch.initial_seed()``, rank 0's in either case); the trainer calls ``set_epoch`` every
    epoch. When the data do not split evenly, ``drop_last=True`` drops the remainder, and ``drop_last=False`` repeats a
    few examples to fill the last batch (as ``DistributedSampler`` does). ``batch_size`` is per process (default:
    the loader's, so the global batch is ``world_size`` times larger; ``keep_global_batch=True`` uses
    ``loader.batch_size // world_size()``, so the global batch and the learning rate's meaning stay those of one
    process). A training loader with any other sampler (weighted, custom) raises ``ValueError``: how to split it
    is the sampler's business; give such a loader a ``DistributedSampler`` of your own.

    Evaluation (``training=False``): a :class:`ShardSampler` over the loader's indices in their order, every example
    exactly once over all processes (no padding; processes may get one batch more or fewer).

    Returns ``loader`` unchanged in a single process, and when it is not a ``DataLoader`` (e.g. a
    :class:`~ardir.gpu_data.GPULoader`, which shards itself) or already uses a ``DistributedSampler`` or
    :class:`ShardSampler`.
    """
    if not is_distributed() or not isinstance(loader, DataLoader) or loader.batch_size is None \
            or isinstance(loader.sampler, (DistributedSampler, ShardSampler)):
        return loader
    if keep_global_batch and batch_size is None:
        if loader.batch_size % world_size():
            raise ValueError(f"batch size {loader.batch_size} does not split over {world_size()} processes")
        batch_size = loader.batch_size // world_size()
    dataset, sampler = loader.dataset, loader.sampler
    if training is None:
        training = isinstance(sampler, (RandomSampler, SubsetRandomSampler))
    if isinstance(sampler, SubsetRandomSampler):
        dataset, shuffle = Subset(dataset, list(sampler.indices)), True
    elif isinstance(sampler, RandomSampler) and not sampler.replacement and len(sampler) == len(dataset):
        shuffle = True
    elif isinstance(sampler, SequentialSampler):
        shuffle = False
    elif training:
        raise ValueError(f"the training loader's sampler ({type(sampler).__name__}) cannot be split over "
                         f"{world_size()} processes by ardir; give it a torch.utils.data.DistributedSampler of your "
                         "own (with set_epoch), or use shuffle=True / a SubsetRandomSampler")
    else:
        dataset, shuffle = Subset(dataset, list(sampler)), False
    if training:
        if seed is None:
            seed = loader.generator.initial_seed() if loader.generator is not None else torch.initial_seed()
        new: Sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle,
                                          seed=shared_seed(seed), drop_last=loader.drop_last)
    else:
        new = ShardSampler(len(dataset))
    return DataLoader(dataset, batch_size=batch_size or loader.batch_size, sampler=new,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      collate_fn=loader.collate_fn, persistent_workers=loader.num_workers > 0)


def _flat_all_reduce(tensors: List[torch.Tensor], average: bool) -> None:
    if not tensors:
        return
    # One flat buffer per dtype: a single collective instead of one per tensor.
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        if average:
            flat /= dist.get_world_size()
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the ``.grad`` of ``params`` over the processes (in place): the DDP update.

    Every process must hold gradients for the same parameters (true for ardir's methods, which run the same code
    on every rank). No-op in a single process.
    """
    if not is_distributed():
        return
    _flat_all_reduce([p.grad for p in params if p.grad is not None], average=True)


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers into every process's ``module`` (in place)."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the processes (in place)."""
    if not is_distributed():
        return
    _flat_all_reduce([b for b in module.buffers() if b.is_floating_point()], average=True)


def all_gather_object(obj: Any) -> List[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the processes (in place) and return it; identity in a single process."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor
