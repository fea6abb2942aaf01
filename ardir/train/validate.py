"""The Trainer's validation: natural and adversarial accuracy of the student on a held-out loader."""
from __future__ import annotations

from typing import Any, ContextManager, Dict, Iterable

import torch
import torch.nn as nn

from .. import distributed
from .._checks import check_batch
from ..attacks import model_mode
from .checks import images_labels, on_device


def accuracies(student: nn.Module, attack: Any, loader: Iterable, device: torch.device, channels_last: bool,
               num_classes: int, autocast: ContextManager) -> Dict[str, float]:
    """``val_natural`` and ``val_pgd``: accuracies (%) of ``student`` (in eval mode) on ``loader``, natural and
    under ``attack`` (a :class:`~ardir.attacks.PGD`), run inside ``autocast``; summed over a process group."""
    checked = False
    # (natural correct, adversarial correct, seen) counted on the device: no host sync per batch; summed over
    # the processes of a process group (each evaluates its shard, see ardir.distributed.shard_loader).
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    with model_mode(student, "eval"), autocast:
        for batch in loader:
            images, labels = on_device(*images_labels(batch, "val_loader"), device, channels_last)
            if not checked:  # once per validation: a normalised val_loader would give meaningless accuracies
                check_batch("the first validation batch", images, labels, num_classes, "student")
                checked = True
            with torch.no_grad():
                counts[0] += (student(images).argmax(1) == labels).sum()
            adv = attack.forward(images, labels)
            with torch.no_grad():
                counts[1] += (student(adv).argmax(1) == labels).sum()
            counts[2] += len(labels)
    natural, correct_adv, total = distributed.all_reduce_sum(counts).tolist()
    if total == 0:
        raise ValueError("val_loader yielded no batch: give it at least one (images, labels) batch, or pass "
                         "val_loader=None")
    return {"val_natural": 100 * natural / total, "val_pgd": 100 * correct_adv / total}
