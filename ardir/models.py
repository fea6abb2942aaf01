"""Model zoo: CIFAR-style networks (32x32 inputs, 3x3 stem), small CNNs for 28x28 data, and any timm model.

Every model takes images in [0, 1]. Mean/std normalisation, when wanted, is a layer inside the model
(``create(..., mean=..., std=...)``), so attacks always work in pixel space.

Each bundled model names its pooled penultimate features ``features`` (shape (N, D)), the default layer that
ARDIR matches, and exposes ``default_ir_layers``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import one_of
from .registry import Registry

MODELS = Registry("model")
"""The bundled model constructors ``fn(num_classes, in_chans, **kwargs)`` by name (a :class:`~ardir.registry.Registry`);
``timm/<name>`` is resolved by :func:`create` outside it."""
_REGISTRY = MODELS  # the name older code and tests use
register_model = MODELS.register
"""Decorator adding a model constructor ``fn(num_classes, in_chans, **kwargs)``: ``@register_model("name")``."""
list_models = MODELS.list
"""Names accepted by :func:`create` (plus any ``"timm/<name>"``)."""


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the first layer of a model whose weights expect normalised inputs."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _normalize_input(model: nn.Module, args):
    return (model.normalize(args[0]),) + tuple(args[1:])


def add_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Make ``model`` normalise its [0, 1] input itself; module names (and so hook names) stay unchanged."""
    model.add_module("normalize", Normalize(mean, std))
    model.register_forward_pre_hook(_normalize_input)
    return model


def check_name(name: str) -> str:
    """Return ``name`` if :func:`create` builds it (one of :func:`list_models` or ``"timm/<timm name>"``); otherwise
    raise a ``TypeError``/``ValueError`` that lists the closest names. Builds nothing."""
    if not isinstance(name, str):
        raise TypeError(f"name={name!r} must be a model name ({', '.join(list_models())} or 'timm/<name>')")
    if name.startswith("timm/"):
        import timm
        one_of("name", name[len("timm/"):], timm.list_models(), "timm model")
    else:
        MODELS.match(name)
    return name


def create(name: str, num_classes: int = 10, in_chans: int = 3, mean: Optional[Sequence[float]] = None,
           std: Optional[Sequence[float]] = None, **kwargs) -> nn.Module:
    """Build a model by name.

    Arguments:
        name: one of :func:`list_models` (``"resnet18"``, ``"preact_resnet18"``, ``"wrn34_10"``, ``"wrn"`` with
            ``depth``/``widen_factor``, ``"mobilenet_v2"``, ``"cnn_small"``, ``"cnn_large"``) or ``"timm/<name>"``
            for any timm model (built from scratch, no download).
        num_classes: classifier outputs.
        in_chans: input channels (1 for MNIST-like data).
        mean, std: per-channel normalisation applied inside the model; ``None`` feeds [0, 1] pixels directly
            (the convention of ARD, RSLAD and IAD).
        kwargs: passed to the constructor.

    Returns:
        an ``nn.Module`` mapping (N, in_chans, H, W) images in [0, 1] to (N, num_classes) logits.
    """
    check_name(name)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans={in_chans!r} must be a positive integer")
    if name.startswith("timm/"):
        import timm
        model = timm.create_model(name[len("timm/"):], pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                  **kwargs)
    else:
        model = MODELS.create(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (normalisation inside the model) or neither")
    if mean is not None:
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean and std need one value per input channel (in_chans={in_chans}), got "
                             f"{len(mean)} and {len(std)}")
        if not all(s > 0 for s in std) or not all(-1 <= m <= 2 for m in mean):
            raise ValueError(f"mean={list(mean)}, std={list(std)}: give them in [0, 1] pixel units (std > 0), "
                             "e.g. CIFAR-10's mean (0.4914, 0.4822, 0.4465), not 0-255 values")
        add_normalization(model, mean, std)
    model.ardir_name = name  # what a report calls it (two names can share a class: cnn_small, cnn_large)
    return model


# ---------------------------------------------------------------------------------------------------- ResNets
class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs with BN, projection shortcut when the shape changes."""
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings")."""
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem (no max-pool), four stages ``layer1..layer4``, global pool, ``fc``.

    Hookable stages for a 32x32 input: layer1 (N,64,32,32), layer2 (N,128,16,16), layer3 (N,256,8,8),
    layer4 (N,512,4,4), features (N,512).
    """
    default_ir_layers = ("features",)

    def __init__(self, block, num_blocks: Sequence[int], num_classes: int = 10, in_chans: int = 3,
                 preact: bool = False):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.Identity() if preact else nn.BatchNorm2d(64)
        self.layer1 = self._stage(block, 64, num_blocks[0], 1)
        self.layer2 = self._stage(block, 128, num_blocks[1], 2)
        self.layer3 = self._stage(block, 256, num_blocks[2], 2)
        self.layer4 = self._stage(block, 512, num_blocks[3], 2)
        self.final_bn = nn.BatchNorm2d(512) if preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.features = nn.Flatten()
        self.fc = nn.Linear(512, num_classes)
        self.preact = preact

    def _stage(self, block, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        out = out if self.preact else F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.final_bn(out))
        return self.fc(self.features(self.pool(out)))


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    """CIFAR ResNet-18 (11.2 M parameters), the usual student of ARD, IAD and RSLAD."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_chans)


@register_model("resnet34")
def resnet34(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    """CIFAR ResNet-34."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_chans)


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    """CIFAR PreAct-ResNet-18 (Rice et al. 2020's AT baseline)."""
    return ResNet(PreActBlock, [2, 2, 2, 2], num_classes, in_chans, preact=True)


# ------------------------------------------------------------------------------------------------ WideResNet
class WideBlock(nn.Module):
    """WRN block: BN-ReLU-conv twice, 1x1 projection shortcut when shapes change (Zagoruyko & Komodakis 2016)."""

    def __init__(self, in_planes: int, planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.drop_rate:
            out = F.dropout(out, self.drop_rate, self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k as in TRADES' teacher: stages ``block1..block3`` of width 16k, 32k, 64k.

    Hookable: block1 (N,16k,32,32), block2 (N,32k,16,16), block3 (N,64k,8,8), features (N,64k).
    """
    default_ir_layers = ("features",)

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth={depth} must be 6n+4 for a WideResNet (e.g. 16, 28, 34, 40, 70)")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.block1 = self._stage(widths[0], widths[1], n, 1, drop_rate)
        self.block2 = self._stage(widths[1], widths[2], n, 2, drop_rate)
        self.block3 = self._stage(widths[2], widths[3], n, 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.features = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)

    @staticmethod
    def _stage(in_planes, planes, n, stride, drop_rate):
        return nn.Sequential(*[WideBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, drop_rate)
                               for i in range(n)])

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(self.features(self.pool(out)))


@register_model("wrn")
def wrn(num_classes: int = 10, in_chans: int = 3, depth: int = 34, widen_factor: int = 10,
        drop_rate: float = 0.0) -> WideResNet:
    """WideResNet of any depth (6n+4) and width."""
    return WideResNet(depth, widen_factor, num_classes, in_chans, drop_rate)


for _depth, _width in [(34, 10), (34, 20), (28, 10), (16, 4), (70, 16)]:
    register_model(f"wrn{_depth}_{_width}")(
        lambda num_classes=10, in_chans=3, _d=_depth, _w=_width: WideResNet(_d, _w, num_classes, in_chans))


# ------------------------------------------------------------------------------------------------ MobileNetV2
class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project; residual when stride 1 and shapes agree."""

    def __init__(self, in_planes: int, planes: int, expansion: int, stride: int):
        super().__init__()
        hidden = in_planes * expansion
        self.use_residual = stride == 1 and in_planes == planes
        self.conv = nn.Sequential(
            nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, planes, 1, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs (stride 1 in the stem and the second stage), ARD's default student.

    Hookable: stage1..stage7 (the seven bottleneck groups), features (N,1280).
    """
    default_ir_layers = ("features",)
    # (expansion, out_planes, blocks, stride) per stage; strides adapted to 32x32 inputs.
    config = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_chans, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32),
                                   nn.ReLU6(inplace=True))
        in_planes = 32
        for i, (t, c, n, s) in enumerate(self.config, 1):
            blocks = []
            for stride in [s] + [1] * (n - 1):
                blocks.append(InvertedResidual(in_planes, c, t, stride))
                in_planes = c
            self.add_module(f"stage{i}", nn.Sequential(*blocks))
        self.conv2 = nn.Sequential(nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.features = nn.Flatten()
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        for i in range(1, len(self.config) + 1):
            out = getattr(self, f"stage{i}")(out)
        return self.fc(self.features(self.pool(self.conv2(out))))


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int = 10, in_chans: int = 3) -> MobileNetV2:
    """CIFAR MobileNetV2 (2.3 M parameters)."""
    return MobileNetV2(num_classes, in_chans)


# ------------------------------------------------------------------------------------------ CNNs for 28x28
class SmallCNN(nn.Module):
    """Conv-BN-ReLU CNN for 28x28 images: ``block1`` (N,w,14,14), ``block2`` (N,2w,7,7), ``block3`` (N,4w,7,7),
    ``features`` (N,16w) after pooling to 2x2 (keeping coarse position, which global pooling would lose), ``fc``.
    Cheap enough for adversarial training on two CPU cores."""
    default_ir_layers = ("features",)

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16):
        super().__init__()

        def block(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)
        self.block1 = block(in_chans, width, True)
        self.block2 = block(width, 2 * width, True)
        self.block3 = block(2 * width, 4 * width, False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.features = nn.Flatten()
        self.fc = nn.Linear(16 * width, num_classes)

    def forward(self, x):
        return self.fc(self.features(self.pool(self.block3(self.block2(self.block1(x))))))


@register_model("cnn_small")
def cnn_small(num_classes: int = 10, in_chans: int = 1, width: int = 16) -> SmallCNN:
    """Student CNN for 28x28 data (width 16: ~26 k parameters)."""
    return SmallCNN(num_classes, in_chans, width)


@register_model("cnn_large")
def cnn_large(num_classes: int = 10, in_chans: int = 1, width: int = 48) -> SmallCNN:
    """Teacher CNN for 28x28 data: the same design, three times wider (~0.2 M parameters)."""
    return SmallCNN(num_classes, in_chans, width)


@register_model("cnn_xlarge")
def cnn_xlarge(num_classes: int = 10, in_chans: int = 1, width: int = 96) -> SmallCNN:
    """Strong teacher CNN for 28x28 data: the same design, six times wider than ``cnn_small`` (~0.85 M
    parameters); the architecture of the shipped Fashion-MNIST teacher (:mod:`ardir.teachers`)."""
    return SmallCNN(num_classes, in_chans, width)
