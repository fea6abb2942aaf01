"""Loss pieces shared by the methods: KL with the papers' reductions, feature distances, feature adapters."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import one_of

KL_REDUCTIONS = ("batchmean", "mean")
DISTANCES = ("nmse", "mse", "cosine")


def kl_div(target_probs: torch.Tensor, logits: torch.Tensor, tau: float = 1.0,
           reduction: str = "batchmean") -> torch.Tensor:
    r"""``KL(P || softmax(logits / tau))`` reduced over the batch.

    Arguments:
        target_probs: P, (N, C) probabilities (already tempered when a temperature applies).
        logits: (N, C) student logits.
        tau: temperature applied to ``logits``.
        reduction: ``"batchmean"`` = sum / N, the KL as written in the papers; ``"mean"`` = sum / (N * C), what
            ``nn.KLDivLoss()`` computes by default and what ARD's and RSLAD's reference code use (the batch-mean KL
            divided by the number of classes).
    """
    one_of("kl_reduction", reduction, KL_REDUCTIONS, "KL reduction")
    total = F.kl_div(F.log_softmax(logits / tau, 1), target_probs, reduction="sum")
    divisor = logits.shape[0] * (logits.shape[1] if reduction == "mean" else 1)
    return total / divisor


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, distance: str = "nmse") -> torch.Tensor:
    r"""Distance between two feature batches of equal shape (N, ...), averaged over the batch.

    ``"nmse"``: ``||s/|s| - t/|t|||^2`` per sample (each sample's features flattened and L2-normalised; in [0, 4]),
    independent of the layer's size and scale; ``"mse"``: mean squared error over all elements; ``"cosine"``:
    ``1 - cos(s, t)`` per sample.
    """
    one_of("distance", distance, DISTANCES, "feature distance")
    s, t = student.flatten(1).float(), teacher.flatten(1).float()
    if distance == "mse":
        return F.mse_loss(s, t)
    if distance == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=1)).mean()
    return (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum(1).mean()


class FeatureAdapter(nn.Module):
    """Maps a student feature to the teacher feature's shape so the two can be compared.

    - same shape: identity (no parameters);
    - both (N, C, H, W): student resized to the teacher's H x W by average pooling, then a 1x1 conv C_s -> C_t;
    - otherwise (either is (N, D)): both globally average-pooled to vectors, a linear map D_s -> D_t.
    Trained with the student, saved with the trainer, never part of the exported student.
    """

    def __init__(self, student_shape: Tuple[int, ...], teacher_shape: Tuple[int, ...]):
        super().__init__()
        s, t = tuple(student_shape), tuple(teacher_shape)
        if len(s) not in (2, 4) or len(t) not in (2, 4):
            raise ValueError(f"cannot adapt a student feature of shape {s} to a teacher feature of shape {t}: "
                             "only (N, D) and (N, C, H, W) features can be matched; choose other layers")
        self.spatial = len(s) == 4 and len(t) == 4
        self.teacher_hw = t[2:] if self.spatial else None
        if s[1:] == t[1:]:
            self.map = nn.Identity()
        elif self.spatial:
            self.map = nn.Conv2d(s[1], t[1], 1, bias=False)
        else:
            self.map = nn.Linear(s[1], t[1], bias=False)

    @property
    def is_identity(self) -> bool:
        """True when the shapes agreed and nothing is learned."""
        return isinstance(self.map, nn.Identity)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(adapted student, teacher)`` feature batches of equal shape."""
        if self.is_identity:
            return student, teacher
        if self.spatial:
            if student.shape[2:] != teacher.shape[2:]:
                student = F.adaptive_avg_pool2d(student, self.teacher_hw)
            return self.map(student), teacher
        return self.map(_pooled(student)), _pooled(teacher)


def _pooled(x: torch.Tensor) -> torch.Tensor:
    return x.mean((2, 3)) if x.dim() == 4 else x
