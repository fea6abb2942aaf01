"""Capture the outputs of named modules with forward hooks: no model surgery, any nn.Module.

:func:`layer_names` lists the names a hook can be put on; :func:`describe_layers` adds each module's type and the
shape of its output on a sample batch (``ardir layers --model NAME`` prints it as a table, :func:`format_layers`).
"""
from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["layer_names", "check_layers", "FeatureHooks", "LayerInfo", "describe_layers", "format_layers"]


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


# ------------------------------------------------------------------------------------------------- inspection
@dataclass(frozen=True)
class LayerInfo:
    """One named module of a model and what it gave on a sample batch (:func:`describe_layers`).

    Attributes:
        name: the module's name in ``model.named_modules()``: what :class:`FeatureHooks` and ARDIR's ``layers``
            take.
        type: its class name, e.g. ``"Conv2d"``.
        shape: the shape of its output on the sample, batch dimension first (the tensor :class:`FeatureHooks`
            records: the first of a tuple or list), or ``None`` when it did not run or returned no tensor.
        calls: how often it ran in one forward pass (0: not used by ``forward``; > 1: ``shape`` is of the last).
    """

    name: str
    type: str
    shape: Optional[Tuple[int, ...]]
    calls: int


def _output_shape(output) -> Optional[Tuple[int, ...]]:
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return tuple(output.shape) if isinstance(output, torch.Tensor) else None


def _sample_batch(model: nn.Module, sample: Union[torch.Tensor, Sequence[int]]) -> torch.Tensor:
    """``sample`` on the model's device, or a batch of zeros of the shape ``sample`` and the model's dtype."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    if isinstance(sample, torch.Tensor):
        return sample.to(device)
    if isinstance(sample, (str, bytes)) or not isinstance(sample, Sequence) or not sample or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sample):
        raise TypeError(f"sample={sample!r} must be an input batch (a tensor) or its shape, whole numbers >= 1 "
                        "such as (1, 3, 32, 32)")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    return torch.zeros(tuple(sample), device=device, dtype=dtype)


def describe_layers(model: nn.Module, sample: Union[torch.Tensor, Sequence[int]]) -> List[LayerInfo]:
    """Every named module of ``model`` (``named_modules`` order), its type and its output shape on ``sample``.

    One forward pass in eval mode without gradients, with a forward hook on every module; the hooks are removed and
    every module's train/eval mode is restored afterwards, also when the forward pass raises.

    Arguments:
        model: any ``nn.Module`` (bundled models, torchvision, timm).
        sample: an input batch (moved to the model's device), or its shape, e.g. ``(1, 3, 32, 32)`` for a batch
            of zeros.

    Returns:
        one :class:`LayerInfo` per name of :func:`layer_names`.

    Raises:
        ValueError: ``model`` does not run on the sample (the message gives the sample's shape and the error).

    Example::

        for layer in ardir.describe_layers(model, (1, 3, 32, 32)):
            print(layer.name, layer.type, layer.shape)      # layer4 Sequential (1, 512, 4, 4)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    batch = _sample_batch(model, sample)
    named = [(name, module) for name, module in model.named_modules() if name]
    seen: Dict[str, Tuple[Optional[Tuple[int, ...]], int]] = {name: (None, 0) for name, _ in named}

    def recorder(name: str):
        def record(module, inputs, output):
            seen[name] = (_output_shape(output), seen[name][1] + 1)
        return record

    modes = [(module, module.training) for module in model.modules()]
    handles = []
    try:
        handles = [module.register_forward_hook(recorder(name)) for name, module in named]
        model.eval()
        with torch.no_grad():
            model(batch)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as err:  # timm asserts input sizes
        detail = str(err).strip().splitlines()
        raise ValueError(f"{type(model).__name__} does not run on a batch of shape {tuple(batch.shape)}: "
                         f"{detail[0] if detail else type(err).__name__}") from err
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return [LayerInfo(name, type(module).__name__, *seen[name]) for name, module in named]


def format_layers(layers: Sequence[LayerInfo]) -> str:
    """A plain-text table of :func:`describe_layers`' rows: name, type, output shape per image (the batch
    dimension dropped; ``-`` for a module that did not run)."""
    def shape(layer: LayerInfo) -> str:
        if layer.calls == 0:
            return "- (not run)"
        if layer.shape is None:
            text = "(no tensor)"
        else:
            text = "x".join(map(str, layer.shape[1:])) or "1 (one number)"
        return text + (f" (last of {layer.calls} calls)" if layer.calls > 1 else "")
    rows = [("name", "type", "output per image")] + [(layer.name, layer.type, shape(layer)) for layer in layers]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows]
    lines.insert(1, f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * len(rows[0][2])}")
    return "\n".join(lines)
