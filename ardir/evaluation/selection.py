"""Which samples :func:`ardir.evaluate` attacks: the loader's first N or a seeded random subset, re-batched."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterable, Iterator, List, Optional, Tuple

import torch

from .._checks import images_labels
from .report import EvaluationWarning

SUBSETS = ("first", "random")


def _as_batch(batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    images, labels = images_labels(batch, "the loader", extra_items=True)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"the loader must yield (images, labels) batches of tensors, got images of type "
                        f"{type(images).__name__}")
    return images, torch.as_tensor(labels)


def _int64(labels: torch.Tensor) -> torch.Tensor:
    """Integer labels of any width as int64; anything else (float labels) as it is, for the checks to refuse."""
    if labels.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        return labels.long()
    return labels


def _rebatch(batches: Iterable, batch_size: Optional[int],
             limit: Optional[int]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of ``batch_size`` (or as they come), stopping after ``limit`` samples."""
    seen, buffer_x, buffer_y, buffered = 0, [], [], 0
    for batch in batches:
        images, labels = _as_batch(batch)
        if limit is not None:
            images, labels = images[:limit - seen], labels[:limit - seen]
        seen += len(labels)
        if batch_size is None:
            if len(labels):
                yield images, labels
        else:
            buffer_x.append(images)
            buffer_y.append(labels)
            buffered += len(labels)
            while buffered >= batch_size:
                x, y = torch.cat(buffer_x), torch.cat(buffer_y)
                yield x[:batch_size], y[:batch_size]
                buffer_x, buffer_y, buffered = [x[batch_size:]], [y[batch_size:]], len(y) - batch_size
        if limit is not None and seen >= limit:
            break
    if batch_size is not None and buffered:
        yield torch.cat(buffer_x), torch.cat(buffer_y)


def _select(loader: Iterable, n_examples: Optional[int], subset: str, seed: int,
            batch_size: Optional[int]) -> Tuple[Iterator, Optional[int], Optional[List[int]], str]:
    """The batches to evaluate, their total count when known, the dataset indices (random subset), a label.

    Called by :func:`ardir.evaluation.run._run`, itself called by :func:`ardir.evaluate`: the shuffle warning's
    ``stacklevel`` points at the caller of ``evaluate``."""
    dataset = getattr(loader, "dataset", None)
    known = None
    with contextlib.suppress(TypeError):
        known = len(dataset) if dataset is not None else None
    if subset == "random":
        if dataset is None or known is None:
            raise ValueError("subset='random' draws indices from loader.dataset, which this loader lacks; "
                             "pass a torch DataLoader or use subset='first'")
        n = known if n_examples is None else min(n_examples, known)
        order = torch.randperm(known, generator=torch.Generator().manual_seed(seed))
        indices = sorted(order[:n].tolist())
        size = batch_size or getattr(loader, "batch_size", None) or 128
        sub = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, indices), batch_size=size, shuffle=False,
            num_workers=getattr(loader, "num_workers", 0),
            collate_fn=getattr(loader, "collate_fn", None))
        return _rebatch(sub, None, None), n, indices, f"random {n} of {known} (seed {seed})"
    if isinstance(loader, torch.utils.data.DataLoader) and isinstance(loader.sampler, torch.utils.data.RandomSampler):
        warnings.warn("the loader shuffles, so the evaluated samples (and a resumed run's) change from run to run; "
                      "evaluate with shuffle=False, or use subset='random' for a seeded random subset",
                      EvaluationWarning, stacklevel=4)
    total = None
    if known is not None:
        total = known if n_examples is None else min(n_examples, known)
    elif n_examples is not None:
        total = n_examples
    label = f"first {total}" if n_examples is not None else "all"
    return _rebatch(loader, batch_size, n_examples), total, None, label
