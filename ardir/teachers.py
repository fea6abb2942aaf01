"""Teachers: load a robust model from a checkpoint, the model zoo, or RobustBench's model zoo.

A teacher ``spec`` is one of:

* a path to a checkpoint: an ardir run's ``best.pt``/``last.pt`` (it records its architecture), or a plain
  ``state_dict`` file, whose architecture is then given as ``model_name`` (``--teacher-model``);
* a model name of :func:`ardir.models.list_models` (freshly initialised: for dry runs and tests only);
* ``robustbench:NAME``, a RobustBench model-zoo entry, e.g. ``robustbench:Zhang2019Theoretically``, the TRADES
  WRN-34-10 that ARD and RSLAD distil from; ``robustbench:L2/NAME`` takes it from the L2 leaderboard
  (``robustbench:Linf/NAME`` is the same as ``robustbench:NAME``; RobustBench's own threat-model names).
* ``DATASET:NAME``, a teacher shipped inside ardir (:mod:`ardir.zoo`), e.g. ``fashion-mnist:cnn_xlarge-at``,
  a robust CNN trained on all of Fashion-MNIST's training images; its file's sha256 is checked on load.

RobustBench models: with the ``robustbench`` package importable, :func:`robustbench.utils.load_model` loads the
model (downloading it into ``model_dir`` when missing and online). Without the package, the file
``<model_dir>/<dataset>/<Linf|L2>/<NAME>.pt`` is read directly and, for the architectures in :data:`ROBUSTBENCH_ZOO`,
its weights are mapped onto ardir's own network, whose layer names (``block1..block3``, ``features``) ARDIR
matches by default. Models of known architecture are mapped onto ardir's network in both cases.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn

from . import models, zoo
from ._safety import check_model_info

__all__ = ["TeacherNotFoundError", "ROBUSTBENCH_ZOO", "load_teacher", "load_robustbench", "robustbench_path",
           "robustbench_spec",
           "robustbench_wrn_state_dict", "model_from_checkpoint", "default_robustbench_dir", "load_weights"]

PathLike = Union[str, os.PathLike]
PREFIX = "robustbench:"
THREAT_MODELS = ("Linf", "L2")
"""RobustBench's threat models a ``robustbench:THREAT/NAME`` spec may name (its leaderboards' directory names)."""

ROBUSTBENCH_ZOO: Dict[str, Dict[str, Any]] = {
    "Zhang2019Theoretically": {"dataset": "cifar10", "threat_model": "Linf", "model": "wrn34_10", "num_classes": 10,
                               "note": "TRADES WRN-34-10 (clean 84.92 %, AutoAttack 53.08 %), the teacher of ARD "
                                       "and RSLAD"},
}
"""RobustBench entries whose weights ardir maps onto its own architecture (``model``), with no normalisation
(RobustBench's CIFAR models take [0, 1] pixels). Others load through the ``robustbench`` package as they are."""


class TeacherNotFoundError(FileNotFoundError):
    """A teacher cannot be found or loaded; the message says what to provide and where."""


def default_robustbench_dir() -> Path:
    """``$ARDIR_ROBUSTBENCH_DIR``, or ``./models`` (RobustBench's own default ``model_dir``)."""
    return Path(os.environ.get("ARDIR_ROBUSTBENCH_DIR") or "models").expanduser()


def robustbench_path(name: str, dataset: str = "cifar10", model_dir: Optional[PathLike] = None,
                     threat_model: str = "Linf") -> Path:
    """Where RobustBench keeps a model's weights: ``<model_dir>/<dataset>/<threat_model>/<name>.pt``."""
    root = Path(model_dir).expanduser() if model_dir is not None else default_robustbench_dir()
    return root / dataset / threat_model / f"{name}.pt"


_RB_BLOCK = re.compile(r"^(block[123])\.layer\.(\d+)\.(.+)$")


def robustbench_wrn_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map the TRADES/RobustBench WideResNet's keys onto :class:`ardir.models.WideResNet`'s.

    RobustBench's WRN (from TRADES' ``wideresnet.py``) names its blocks ``block1.layer.0.bn1.weight``, its
    projection shortcut ``convShortcut`` and carries an unused ``sub_block1``; ardir's are ``block1.0.bn1.weight``
    and ``shortcut``. A ``module.`` prefix (DataParallel) and a ``state_dict``/``model`` wrapper are removed.
    ``conv1``, ``bn1`` and ``fc`` keep their names.
    """
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    mapped: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("sub_block1."):
            continue  # defined but never used in TRADES' forward
        match = _RB_BLOCK.match(key)
        if match:
            block, index, rest = match.groups()
            rest = rest.replace("convShortcut.", "shortcut.")
            key = f"{block}.{index}.{rest}"
        mapped[key] = value
    return mapped


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = str(err).splitlines()
        raise TeacherNotFoundError(f"{source} does not fit {type(model).__name__}: "
                                   f"{detail[1].strip() if len(detail) > 1 else detail[0]}") from None
    if missing or unexpected:
        raise TeacherNotFoundError(
            f"{source} does not fit {type(model).__name__}: missing keys {list(missing)[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected keys {list(unexpected)[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''}")
    return model


_WRAPPERS = ("state_dict", "model", "model_state_dict")


def _own_buffer(key: str) -> bool:
    """A buffer the model sets itself, which weights trained elsewhere may lack: BatchNorm's step count, the
    normalisation ardir puts inside a model (``normalize.mean``/``.std``, :func:`ardir.models.create`)."""
    return key.endswith("num_batches_tracked") or key in ("normalize.mean", "normalize.std")


def _differences(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list:
    """What keeps ``given`` from loading into a model with state ``expected``, one phrase per key, model order first."""
    found = []
    for key, value in expected.items():
        if key not in given:
            found.append(f"the model's key {key!r} is missing from the file")
        elif tuple(given[key].shape) != tuple(value.shape):
            found.append(f"key {key!r} is {tuple(given[key].shape)} in the file and {tuple(value.shape)} in the model")
    found += [f"the file's key {key!r} is not in the model" for key in given if key not in expected]
    return found


def load_weights(model: nn.Module, path: PathLike, model_name: Optional[str] = None) -> nn.Module:
    """Load the weights file ``path`` into ``model`` (a model trained elsewhere) and return ``model``.

    The file holds a plain ``state_dict``, or a dict with one under ``state_dict``, ``model`` or
    ``model_state_dict`` (an ardir checkpoint too); a ``module.`` prefix on every key (DataParallel,
    DistributedDataParallel) is removed. It loads with :func:`ardir.checkpoint.load_checkpoint`
    (``weights_only=True``: a file that would run code is refused, never run). BatchNorm's
    ``num_batches_tracked`` and ardir's ``normalize.mean``/``.std`` may be missing: the model keeps its own.

    Arguments:
        model: the architecture, built (e.g. by :func:`ardir.models.create`).
        path: the weights file.
        model_name: how errors name the model (default: its class name).

    Raises:
        FileNotFoundError, OSError: the path is missing or not a file.
        ardir.checkpoint.CheckpointError: the file is refused, corrupt or non-finite, holds no ``state_dict``, or
            does not fit ``model``, named with the file, the model and the first key that differs.
    """
    from .checkpoint import CheckpointError, load_checkpoint
    state = load_checkpoint(path)
    name = model_name or type(model).__name__
    for wrapper in _WRAPPERS:
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, Mapping) else {}
    if not tensors:
        if not isinstance(state, Mapping):
            what = f"a {type(state).__name__}"
        else:
            what = f"keys {', '.join(map(repr, list(state)[:6]))}" if state else "an empty dict"
        raise CheckpointError(f"weights {path} hold no state_dict ({what}): save model.state_dict(), or a dict with "
                              f"it under one of {', '.join(map(repr, _WRAPPERS))}")
    if all(key.startswith("module.") for key in tensors):
        tensors = {key[len("module."):]: value for key, value in tensors.items()}
    expected = model.state_dict()
    tensors.update({key: value for key, value in expected.items() if key not in tensors and _own_buffer(key)})
    differences = _differences(expected, tensors)
    if differences:
        more = f" ({len(differences)} keys differ)" if len(differences) > 1 else ""
        raise CheckpointError(f"weights {path} do not fit model {name}: {differences[0]}{more}")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:  # what the key and shape check cannot see (a module's own loading rules)
        raise CheckpointError(f"weights {path} do not fit model {name}: {str(err).splitlines()[-1].strip()}") \
            from None
    return model


ROBUSTBENCH_INSTALL = "pip install 'ardir[robustbench]'"
"""How the ``robustbench`` package is installed (the extra of pyproject.toml, from PyPI), as the README says."""


def _download_hint(name: str, path: Path) -> str:
    return (f"RobustBench model {name!r} is not at {path}. Either `{ROBUSTBENCH_INSTALL}` and run once online "
            f"(it downloads the file there), or download {name}.pt from the RobustBench model zoo (the link is in "
            f"RobustBench's model_info/{path.parent.parent.name}/{path.parent.name}/{name}.json / the leaderboard) "
            f"and put it at {path}; another directory is chosen with --robustbench-dir or $ARDIR_ROBUSTBENCH_DIR.")


def robustbench_spec(spec: str) -> "tuple[str, str]":
    """``(threat_model, name)`` of ``robustbench:NAME`` (L-inf) or ``robustbench:L2/NAME``; ValueError otherwise."""
    rest = spec[len(PREFIX):]
    threat_model, _, name = rest.rpartition("/")
    threat_model = threat_model or "Linf"
    if threat_model not in THREAT_MODELS or not name:
        raise ValueError(f"teacher={spec!r}: expected robustbench:NAME or robustbench:THREAT/NAME with THREAT one of "
                         f"{', '.join(THREAT_MODELS)} (RobustBench's leaderboards), e.g. robustbench:L2/Rice2020Overfitting")
    return threat_model, name


def load_robustbench(name: str, dataset: str = "cifar10", model_dir: Optional[PathLike] = None,
                     device: Union[str, torch.device] = "cpu", threat_model: str = "Linf") -> nn.Module:
    """A RobustBench model-zoo model, as an ardir network when its architecture is in :data:`ROBUSTBENCH_ZOO`.

    Raises :class:`TeacherNotFoundError` saying what to download and where when neither the package nor the
    local file can provide it.
    """
    if threat_model not in THREAT_MODELS:
        raise ValueError(f"threat_model={threat_model!r}: one of {', '.join(THREAT_MODELS)} (RobustBench's names)")
    path = robustbench_path(name, dataset, model_dir, threat_model)
    known = ROBUSTBENCH_ZOO.get(name)
    if known is not None and known.get("threat_model", "Linf") != threat_model:
        known = None  # the same name on another leaderboard is another network
    try:
        from robustbench.utils import load_model as rb_load_model  # type: ignore[import-not-found]
    except ImportError:
        rb_load_model = None
    if rb_load_model is not None and (known is None or not path.is_file()):
        try:
            rb_model = rb_load_model(model_name=name, dataset=dataset, threat_model=threat_model,
                                     model_dir=str(path.parent.parent.parent))
        except Exception as err:  # network errors, unknown names: one sentence with the way out
            raise TeacherNotFoundError(f"robustbench could not load {name!r} ({type(err).__name__}: {err}). "
                                       + _download_hint(name, path)) from err
        if known is None:
            return rb_model.to(device).eval()
        state = rb_model.state_dict()
    else:
        if not path.is_file():
            raise TeacherNotFoundError(_download_hint(name, path))
        if known is None:
            raise TeacherNotFoundError(
                f"{path} exists, but ardir maps only {', '.join(sorted(ROBUSTBENCH_ZOO))} onto its own networks; "
                f"for {name!r} install robustbench ({ROBUSTBENCH_INSTALL})")
        from .checkpoint import load_checkpoint
        state = load_checkpoint(path)  # the one safe loader: a file that would run code is refused, never run
    model = models.create(known["model"], num_classes=known["num_classes"], in_chans=3)
    _load_into(model, robustbench_wrn_state_dict(state), f"RobustBench {name} ({path})")
    return model.to(device).eval()


def model_from_checkpoint(state: Mapping[str, Any], model_name: Optional[str] = None,
                          num_classes: Optional[int] = None, in_chans: Optional[int] = None,
                          source: str = "the checkpoint") -> nn.Module:
    """Rebuild a model from an ardir checkpoint (``state["model_info"]`` and ``state["model"]``) or from a plain
    state dict with ``model_name``, ``num_classes`` and ``in_chans`` given."""
    info = state.get("model_info") if isinstance(state, Mapping) else None
    if isinstance(info, Mapping):
        check_model_info(info, source)  # before building: num_classes=2**40 is a damaged file, not a petabyte
        model = models.create(info["name"], num_classes=int(info["num_classes"]), in_chans=int(info["in_chans"]),
                              mean=info.get("mean"), std=info.get("std"))
        weights = state.get("model", state.get("student"))
        return _load_into(model, weights, source)
    if model_name is None:
        raise TeacherNotFoundError(
            f"{source} is a plain state_dict that does not record its architecture; name it with --teacher-model "
            f"(one of {', '.join(models.list_models())})")
    model = models.create(model_name, num_classes=num_classes or 10, in_chans=in_chans or 3)
    for wrapper in ("state_dict", "model", "student"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    return _load_into(model, {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}, source)


def _check_data(source: str, model: str, recorded_classes: int, recorded_chans: int,
                num_classes: Optional[int], in_chans: Optional[int]) -> None:
    """A teacher recorded for other data than the caller's is refused in one sentence (None: no claim)."""
    if (num_classes or recorded_classes, in_chans or recorded_chans) != (recorded_classes, recorded_chans):
        raise ValueError(f"teacher {source} is a {model} for {recorded_classes} classes of {recorded_chans}-channel "
                         f"images, but the data has {num_classes or recorded_classes} classes of "
                         f"{in_chans or recorded_chans}-channel images: pass a teacher trained on this data set")


def load_teacher(spec: str, num_classes: Optional[int] = None, in_chans: Optional[int] = None,
                 device: Union[str, torch.device] = "cpu", *, model_name: Optional[str] = None,
                 model_dir: Optional[PathLike] = None, dataset: Optional[str] = None) -> nn.Module:
    """Load a teacher from ``spec`` (see the module docstring), in eval mode, on ``device``.

    Arguments:
        spec: a checkpoint path, a model name, ``robustbench:NAME`` (``robustbench:L2/NAME``), or a shipped teacher ``DATASET:NAME``
            (:func:`ardir.zoo.list_shipped`, e.g. ``fashion-mnist:cnn_xlarge-at``; its sha256 is checked).
        num_classes, in_chans: the data's, checked against what the teacher records (a checkpoint, a shipped
            teacher); ``None`` takes the recorded values (10 classes, 3 channels for a bare model name).
        device: where the teacher goes.
        model_name: the architecture of a plain ``state_dict`` checkpoint.
        model_dir: RobustBench's model directory (default :func:`default_robustbench_dir`).
        dataset: RobustBench's dataset name (default: ``cifar100`` for 100 classes, else ``cifar10``).

    Raises:
        TeacherNotFoundError: a missing file, an unknown name, or weights that do not fit; the message says what
            to provide.
        ardir.zoo.TeacherIntegrityError: a shipped teacher's file does not match its manifest's sha256.
    """
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"teacher={spec!r} must be a checkpoint path, a model name, DATASET:NAME (shipped) or "
                        "robustbench:NAME")
    if spec.startswith(PREFIX):
        threat_model, name = robustbench_spec(spec)
        dataset = dataset or ("cifar100" if num_classes == 100 else "cifar10")
        teacher = load_robustbench(name, dataset, model_dir, device, threat_model)
    elif zoo.is_shipped(spec) and not Path(spec).expanduser().exists():
        if spec not in zoo.list_shipped():
            raise TeacherNotFoundError(f"no shipped teacher {spec!r}; shipped: {', '.join(zoo.list_shipped())}")
        info = zoo.manifest(spec)
        _check_data(spec, info["model"], int(info["num_classes"]), int(info["in_chans"]), num_classes, in_chans)
        teacher = zoo.load_shipped(spec).to(device)
    elif os.path.lexists(Path(spec).expanduser()):  # a file, or a directory or link that load_checkpoint names
        path = Path(spec).expanduser()
        from .checkpoint import load_checkpoint
        try:
            state = load_checkpoint(path)
        except OSError as error:  # a directory, a dangling link, a link loop: said as what it is
            raise TeacherNotFoundError(f"teacher {error.strerror or error}") from None
        info = state.get("model_info") if isinstance(state, Mapping) else None
        if isinstance(info, Mapping):
            check_model_info(info, str(path))
            _check_data(str(path), info["name"], int(info["num_classes"]), int(info["in_chans"]), num_classes,
                        in_chans)
        teacher = model_from_checkpoint(state, model_name, num_classes, in_chans, source=str(path)).to(device)
    elif spec in models.list_models() or spec.startswith("timm/"):
        warnings.warn(f"teacher={spec!r} is a freshly initialised {spec}, not a robust model: fine for a dry run, "
                      "useless for distillation (pass a checkpoint path or robustbench:NAME)", stacklevel=2)
        teacher = models.create(spec, num_classes=num_classes or 10, in_chans=in_chans or 3).to(device)
    else:
        looks_like_path = os.sep in spec or spec.endswith((".pt", ".pth", ".tar"))
        what = f"checkpoint {spec!r} does not exist" if looks_like_path else \
            f"teacher {spec!r} is neither a file, a model name ({', '.join(models.list_models())}), " \
            f"a shipped teacher ({', '.join(zoo.list_shipped()) or 'none'}) nor robustbench:NAME"
        raise TeacherNotFoundError(f"{what}; train one with `ardir train --method trades --output-dir DIR` and pass "
                                   "--teacher DIR/best.pt")
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher.eval()
