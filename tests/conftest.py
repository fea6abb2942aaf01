import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class TinyNet(nn.Module):
    """A small CNN with BatchNorm (so train/eval mode matters) for fast unit tests on (N, 1, 8, 8) inputs."""
    default_ir_layers = ("features",)

    def __init__(self, width: int = 8, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)  # keeps where things are: quadrant features matter
        self.features = nn.Flatten()
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.fc(self.features(self.pool(self.body(self.bn(self.conv(x))))))


@pytest.fixture
def tiny():
    return TinyNet


@pytest.fixture(scope="module")
def reproduce():
    """benchmarks/reproduce.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        "reproduce", Path(__file__).resolve().parent.parent / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module
