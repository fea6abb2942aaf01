"""Capture the outputs of named modules with forward hooks: no model surgery, any nn.Module."""
from __future__ import annotations

import difflib
from typing import Dict, Iterator, List, Mapping, Sequence

import torch
import torch.nn as nn


def layer_names(model: nn.Module) -> List[str]:
    """Names of every sub-module of ``model`` that a hook can be put on (``named_modules`` order)."""
    return [name for name, _ in model.named_modules() if name]


def check_layers(model: nn.Module, names: Sequence[str], argument: str = "layers") -> None:
    """Raise ``ValueError`` naming the closest valid module names for every unknown name in ``names``."""
    valid = layer_names(model)
    known = set(valid)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, valid, n=5, cutoff=0.3)
            hint = f"closest valid names: {', '.join(close)}" if close else f"valid names include: {', '.join(valid[:20])}"
            raise ValueError(f"{argument}: {type(model).__name__} has no module named {name!r}; {hint}")


class FeatureHooks(Mapping[str, torch.Tensor]):
    """Context manager that records the outputs of named modules during forward passes.

    Inside the ``with`` block it is a read-only mapping ``name -> tensor``: the named modules' outputs of the
    last forward pass (with autograd history, so losses on them train the model). Hooks are removed on exit,
    also when the block raises.

    Arguments:
        model: any ``nn.Module`` (bundled models, torchvision, timm).
        names: module names as in ``model.named_modules()``, e.g. ``["layer3", "layer4"]``.

    Example::

        with ardir.FeatureHooks(model, ["layer3", "layer4"]) as feats:
            logits = model(images)
            f4 = feats["layer4"]          # (N, 512, 4, 4) for a CIFAR ResNet-18
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names):
            raise TypeError(f"names={names!r} must be module names (strings) as in model.named_modules(), "
                            "e.g. ['layer3', 'layer4']")
        check_layers(model, names, "names")
        self.model = model
        self.names = list(dict.fromkeys(names))
        self._outputs: Dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "FeatureHooks":
        if self._handles:
            raise RuntimeError("this FeatureHooks is already active: nest two FeatureHooks objects instead of "
                               "entering one twice")
        modules = dict(self.model.named_modules())
        for name in self.names:
            self._handles.append(modules[name].register_forward_hook(self._recorder(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _recorder(self, name: str):
        def record(module, inputs, output):
            if isinstance(output, (tuple, list)):  # e.g. modules returning (features, extras)
                output = output[0]
            self._outputs[name] = output
        return record

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._outputs:
            if name in self.names:
                raise KeyError(f"{name!r} has not run yet: call the model inside the 'with' block first")
            raise KeyError(f"{name!r} is not hooked; hooked layers: {self.names}")
        return self._outputs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)

    def clear(self) -> None:
        """Forget the recorded outputs (they hold autograd graphs alive)."""
        self._outputs.clear()
