r"""ARDIR (Takahashi et al. 2022): ARD plus the teacher's internal representations as labels.

Registered in :data:`ardir.methods.METHODS` like the others (``method="ardir"``) and importable from
:mod:`ardir.methods`. Notation as in docs/methods.md.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import non_negative, one_of
from .attacks import model_device, model_mode
from .hooks import FeatureHooks, check_layers
from .losses import DISTANCES, FeatureAdapter, feature_distance
from .methods import ARD, Terms, register_method, teacher_logits

LayerSpec = Union[str, Tuple[str, str]]


@register_method
class ARDIR(ARD):
    r"""ARDIR (Takahashi et al. 2022, https://arxiv.org/abs/2211.00239): ARD plus the teacher's internal
    representation as a label for adversarial training.

    ``L = w_ce CE(S(x'), y) + w_kl tau^2 KL(p(T(x)/tau) || p(S(x')/tau)) + w_ir sum_l lambda_l D(A_l(h_S,l(x')), h_T,l(x))``

    Arguments:
        layers: the matched layers: a name used in both models, or a ``(teacher_layer, student_layer)`` pair;
            default: the models' ``default_ir_layers`` (the pooled penultimate ``features`` of bundled models).
        layer_weights: lambda_l per layer (default 1 each).
        distance: D, ``"nmse"`` (MSE of per-sample L2-normalised features, default), ``"mse"`` or ``"cosine"``.
        w_ce: weight of the cross-entropy on the adversarial batch (1: chosen by the Fashion-MNIST ablation on a
            validation split, +2.7 points of PGD-20 and CW-30 over 0 on two seeds; see docs/reproducing.md).
        w_kl: weight of the KL to the teacher's output (1).
        w_ir: weight of the internal-representation term (1).
        tau: temperature of the KL term (1).
        teacher_input: the teacher's features on the ``"natural"`` batch (default: the representation as a label)
            or the ``"adversarial"`` one.
        attack_loss: the inner maximisation, ``"ce"`` (as ARD, default) or ``"kl"`` to the teacher (as RSLAD).
        kl_reduction: ``"batchmean"`` (the KL averaged over the batch) or ``"mean"`` (ARD's reference code,
            also divided by C).

    A layer pair whose shapes differ gets a :class:`~ardir.losses.FeatureAdapter`, created by :meth:`setup`,
    trained with the student and saved with the trainer, never part of the student.
    """
    name = "ardir"

    def __init__(self, layers: Optional[Sequence[LayerSpec]] = None, layer_weights: Optional[Sequence[float]] = None,
                 distance: str = "nmse", w_ce: float = 1.0, w_kl: float = 1.0, w_ir: float = 1.0,
                 tau: float = 1.0, teacher_input: str = "natural", attack_loss: str = "ce",
                 kl_reduction: str = "batchmean", **attack):
        super().__init__(tau=tau, alpha=1.0, kl_reduction=kl_reduction, **attack)
        self.attack_loss = one_of("attack_loss", attack_loss, ("ce", "kl"), "ARDIR attack loss")
        if isinstance(layers, str):  # one layer name, not its letters
            layers = [layers]
        self.layers = None if layers is None else [self._pair(spec) for spec in layers]
        if self.layers is not None and not self.layers:
            raise ValueError("layers is empty: name at least one layer to match, or pass None for the default")
        self.layer_weights = (None if layer_weights is None else
                              [non_negative("layer_weights", w) for w in layer_weights])
        if self.layers is not None and self.layer_weights is not None and len(self.layer_weights) != len(self.layers):
            raise ValueError(f"layer_weights has {len(self.layer_weights)} entries for {len(self.layers)} layers")
        self.distance = one_of("distance", distance, DISTANCES, "feature distance")
        self.w_ce, self.w_kl, self.w_ir = (non_negative("w_ce", w_ce), non_negative("w_kl", w_kl),
                                           non_negative("w_ir", w_ir))
        self.teacher_input = one_of("teacher_input", teacher_input, ("natural", "adversarial"), "teacher input")
        self.adapters = nn.ModuleList()

    @staticmethod
    def _pair(spec: LayerSpec) -> Tuple[str, str]:
        if isinstance(spec, str):
            return spec, spec
        if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(isinstance(s, str) for s in spec):
            return tuple(spec)
        raise ValueError(f"layers entry {spec!r} must be a layer name or a (teacher_layer, student_layer) pair")

    def setup(self, student, teacher, images) -> None:
        """Resolve the layers and create an adapter for every pair whose feature shapes differ."""
        if self.layers is None:
            t_default = getattr(teacher, "default_ir_layers", None)
            s_default = getattr(student, "default_ir_layers", None)
            if not t_default or not s_default or len(t_default) != len(s_default):
                raise ValueError("layers: these models name no default layers to match; pass layers=[...] with module "
                                 "names, or (teacher_layer, student_layer) pairs (see ardir.hooks.layer_names(model))")
            self.layers = list(zip(t_default, s_default))
        check_layers(teacher, [t for t, _ in self.layers], "layers (teacher)")
        check_layers(student, [s for _, s in self.layers], "layers (student)")
        if self.layer_weights is None:
            self.layer_weights = [1.0] * len(self.layers)
        sample = images[:2]
        with torch.no_grad(), model_mode(student, "eval"), model_mode(teacher, "eval"), \
                FeatureHooks(teacher, [t for t, _ in self.layers]) as t_feats, \
                FeatureHooks(student, [s for _, s in self.layers]) as s_feats:
            teacher(sample)
            student(sample)
            for name, model, feats, names in (("teacher", teacher, t_feats, [t for t, _ in self.layers]),
                                              ("student", student, s_feats, [s for _, s in self.layers])):
                silent = [n for n in names if n not in feats]
                if silent:
                    raise ValueError(f"layers ({name}): {type(model).__name__}'s {silent} did not run in its forward "
                                     "pass (the module exists but forward never calls it); pick layers that run")
                odd = [n for n in names if not isinstance(feats[n], torch.Tensor)]
                if odd:
                    raise ValueError(f"layers ({name}): {odd} return {type(feats[odd[0]]).__name__}, not a tensor; "
                                     "match a layer whose output is a feature tensor")
            shapes = [(tuple(s_feats[s].shape), tuple(t_feats[t].shape)) for t, s in self.layers]
        adapters = []
        for (t_name, s_name), (s_shape, t_shape) in zip(self.layers, shapes):
            try:
                adapters.append(FeatureAdapter(s_shape, t_shape))
            except ValueError as err:
                raise ValueError(f"layers ({t_name!r}, {s_name!r}): {err}") from None
        self.adapters = nn.ModuleList(adapters).to(model_device(student, images.device))

    def forward(self, student, images, labels, teacher=None) -> Terms:
        """The weighted terms of one batch: ``kl``, ``ir`` and, when ``w_ce`` > 0, ``ce_adv``."""
        if self.layers is None or len(self.adapters) != len(self.layers):
            raise RuntimeError("ARDIR.setup(student, teacher, images) must run before the first batch (the Trainer "
                               "calls it); it resolves the layers and builds the adapters")
        t_layers, s_layers = [t for t, _ in self.layers], [s for _, s in self.layers]
        with FeatureHooks(teacher, t_layers) as t_feats:
            t_logits = teacher_logits(teacher, images)
            t_probs = F.softmax(t_logits, 1) if self.attack_loss == "kl" else None
            adv = self.attack(student, images, labels, target_probs=t_probs)
            if self.teacher_input == "adversarial":
                teacher_logits(teacher, adv)
            targets = [t_feats[t] for t in t_layers]
        with FeatureHooks(student, s_layers) as s_feats:
            s_logits = student(adv)
            features = [s_feats[s] for s in s_layers]
        ir = sum(lam * feature_distance(*adapter(f, t), self.distance)
                 for lam, adapter, f, t in zip(self.layer_weights, self.adapters, features, targets))
        terms = {"kl": self.w_kl * self.distillation(t_logits, s_logits), "ir": self.w_ir * ir}
        if self.w_ce:
            terms["ce_adv"] = self.w_ce * F.cross_entropy(s_logits, labels)
        return terms
