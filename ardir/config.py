"""Run configuration: one schema gives the TOML keys, the command-line flags and their checks.

A run is described by flat ``key = value`` pairs (TOML), e.g.::

    dataset = "cifar10"
    model = "resnet18"
    teacher = "robustbench:Zhang2019Theoretically"
    method = "ardir"
    epochs = 200
    layers = ["features"]
    eps = "8/255"          # floats may be written as fractions

The keys come from three places, so no option is listed twice:

* run options (:data:`RUN_OPTIONS`): data, models, teacher, output, seed, evaluation;
* every argument of :class:`ardir.Trainer` with a plain type (``epochs``, ``lr``, ``milestones``, ...), read from
  its signature;
* every argument of every method (``tau``, ``layers``, ``beta``, ...), read from the methods' signatures
  (:func:`ardir.methods.method_arguments`). A method argument left unset takes the method's own default.

Unknown keys are errors naming the key and its closest matches; a wrong type is an error naming the key, the
expected type and what was given. :func:`dump_toml` writes the resolved configuration back as TOML.

Paths (:data:`PATH_KEYS`) are read relative to the current directory, as typed; :func:`absolute_paths` makes them
absolute, which is how a run records them (``config.toml``, ``last.pt``), so a saved run resolves from anywhere.
"""
from __future__ import annotations

import collections.abc
import difflib
import inspect
import os
import re
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

# The values' kinds and checks, the paths and the TOML text live in their own modules; re-exported here.
from ._config_paths import PATH_KEYS, absolute_paths, looks_like_path  # noqa: F401
from ._config_toml import dump_toml, read_toml  # noqa: F401
from ._config_values import (KINDS, LIMITS, SCALARS, ConfigError, Option, _float, check_range,  # noqa: F401
                             check_value)

__all__ = ["ConfigError", "Option", "RUN_OPTIONS", "LIMITS", "schema", "load_toml", "parse_toml", "check",
           "check_value", "check_range", "check_threat_model",
           "resolve", "dump_toml", "dump_config", "method_keys", "trainer_keys", "method_kwargs", "trainer_kwargs",
           "layer_specs", "PATH_KEYS", "looks_like_path", "absolute_paths"]

ATTACKS_DEFAULT = ["natural", "fgsm", "pgd20", "cw30"]

RUN_OPTIONS: Tuple[Option, ...] = (
    Option("dataset", "str", "cifar10", "dataset name (ardir.data.DATASETS)", "run"),
    Option("data_dir", "str", None, "an existing copy of the dataset (default: $ARDIR_DATA_DIR or ~/.cache/ardir/data)",
           "run"),
    Option("fake_data", "bool", False, "seeded random images of the dataset's shape (dry runs, no disk)", "run"),
    Option("download", "bool", True, "download the dataset when it is not found and the machine is online", "run"),
    Option("val_size", "int", 1000, "validation images held out of the training set (best.pt is chosen on them)",
           "run"),
    Option("train_size", "int", None, "use only this many training images (default: all)", "run"),
    Option("batch_size", "int", 128, "training batch size", "run"),
    Option("num_workers", "int", 0, "data-loader worker processes", "run"),
    Option("seed", "int", 0, "seed of the model initialisation, the data split and the data order", "run"),
    Option("model", "str", "resnet18", "the trained model: a name of ardir.models.list_models() or timm/<name>",
           "run"),
    Option("normalize", "bool", False, "put the dataset's mean/std normalisation inside the model", "run"),
    Option("teacher", "str", None, "the teacher: a checkpoint path, a model name, or robustbench:NAME", "run"),
    Option("teacher_model", "str", None, "architecture of a teacher checkpoint that does not record it "
           "(a plain state_dict)", "run"),
    Option("robustbench_dir", "str", None, "RobustBench's model directory (default: $ARDIR_ROBUSTBENCH_DIR or "
           "./models)", "run"),
    Option("method", "str", "ardir", "training method (ardir.list_methods())", "run"),
    Option("output_dir", "str", "runs/run", "where last.pt, best.pt, metrics.jsonl and config.toml are written",
           "run"),
    Option("device", "str", "auto", "auto, cpu, cuda, cuda:1, ...", "run"),
    Option("quiet", "bool", False, "no progress bars (they are off anyway when the output is not a terminal)",
           "run"),
    Option("tensorboard", "bool", False, "also write every epoch's metrics to OUTPUT_DIR/tensorboard (needs "
           "pip install 'ardir[tensorboard]')", "run"),
    Option("attacks", "list[str]", ATTACKS_DEFAULT, "attacks `ardir eval` runs on this run's checkpoints "
           "(ardir.evaluate names; add autoattack for a paper's table)", "eval"),
    Option("eval_eps", "float", None, "radius of the evaluation, in the run's norm (default: the method's eps)",
           "eval"),
    Option("n_examples", "int", None, "test images evaluated (default: the whole test set)", "eval"),
)
"""The options of a run that are neither Trainer nor method arguments."""

# Trainer arguments that are objects, or set by the run itself, not configuration values.
_TRAINER_SKIP = {"self", "student", "train_loader", "teacher", "method", "optimizer", "scheduler", "val_loader",
                 "progress", "callbacks", "method_kwargs", "checkpoint_dir"}


def _is_module_type(hint: Any) -> bool:
    import torch.nn as nn
    return isinstance(hint, type) and issubclass(hint, nn.Module)


def _kind(hint: Any) -> Optional[Tuple[str, bool]]:
    """(kind, nullable) of a type hint, or None when the hint is not a plain configuration type."""
    nullable = False
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        # a model given from Python (MTARD's natural_teacher: a model or its path) is a str in the configuration
        args = [a for a in typing.get_args(hint) if a is not type(None) and not _is_module_type(a)]
        nullable = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            return None
        hint = args[0]
        origin = typing.get_origin(hint)
    if hint in (str, int, float, bool):
        return hint.__name__, nullable
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        args = typing.get_args(hint)
        item = args[0] if args else str
        if typing.get_origin(item) is typing.Union:  # ARDIR's layers: str or (teacher, student) pairs
            item = str
        if item in (str, int, float):
            return f"list[{item.__name__}]", nullable
    return None


def _first_line(doc: Optional[str], name: str) -> str:
    """The first sentence of ``name``'s entry (``name:`` or ``a, name, b:``) in a docstring's argument list; the
    entry's continuation lines (indented deeper) are part of it."""
    lines = (doc or "").splitlines()
    for i, line in enumerate(lines):
        head, sep, tail = line.strip().partition(":")
        if not (sep and name in [n.strip() for n in head.split(",")]):
            continue
        indent = len(line) - len(line.lstrip())
        text = [tail.strip()]
        for more in lines[i + 1:]:
            if not more.strip() or len(more) - len(more.lstrip()) <= indent:
                break
            text.append(more.strip())
        entry = " ".join(text).replace("``", "")  # reST literals read as plain text in --help
        end = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", entry)
        return entry[:end.start() + 1] if end else entry
    return ""


def trainer_keys() -> List[Option]:
    """Options from :class:`ardir.Trainer`'s signature (every argument with a plain type)."""
    from .trainer import Trainer

    hints = typing.get_type_hints(Trainer.__init__)
    options = []
    for p in inspect.signature(Trainer.__init__).parameters.values():
        if p.name in _TRAINER_SKIP or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name not in hints:
            continue
        kind = _kind(hints[p.name])
        if kind is None:
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        options.append(Option(p.name, kind[0], default, _first_line(Trainer.__doc__, p.name) or f"Trainer({p.name}=...)",
                              "trainer"))
    return options


def method_keys() -> List[Option]:
    """Options from every method's signature; unset (``None``) means the chosen method's own default."""
    from .methods import METHODS
    from .methods import method_arguments

    seen: Dict[str, Option] = {}
    for name in sorted(METHODS):
        for cls in METHODS[name].__mro__:
            if "__init__" not in vars(cls) or not cls.__module__.startswith("ardir"):
                continue
            hints = typing.get_type_hints(cls.__init__)
            for arg in method_arguments(name):
                if arg in seen or arg not in hints:
                    continue
                kind = _kind(hints[arg])
                if kind is None:
                    continue
                users = [m for m in sorted(METHODS) if arg in method_arguments(m)]
                helps = {m: next(filter(None, (_first_line(c.__doc__, arg) for c in METHODS[m].__mro__)), "")
                         for m in users}
                groups: Dict[str, List[str]] = {}
                for m, h in helps.items():
                    if h:
                        groups.setdefault(h, []).append(m)
                help_ = next(iter(groups), "") if len(groups) == 1 else \
                    "; ".join(f"{', '.join(ms)}: {h.rstrip('.')}" for h, ms in groups.items())
                default = "the data set's usual L-inf radius: 8/255, 0.1 on fashion-mnist, 0.3 on mnist" \
                    if arg == "eps" else "eps/4 when eps is the data set's" if arg == "step_size" else "the method's own"
                seen[arg] = Option(arg, kind[0], None, (help_ + " " if help_ else "") +
                                   f"[{', '.join(users)}; default: {default}]", "method")
    return list(seen.values())


def schema() -> Dict[str, Option]:
    """Every configuration key: run options, Trainer arguments, method arguments, in that order."""
    options: Dict[str, Option] = {}
    for option in (*RUN_OPTIONS, *trainer_keys(), *method_keys()):
        options.setdefault(option.name, option)
    return options


def _unknown(key: str, known: Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown key {key!r} in {where}{hint} (`ardir train --help` lists every key)")


def parse_toml(text: str, where: str = "the configuration") -> Dict[str, Any]:
    """Parse and check TOML text: flat ``key = value`` pairs of :func:`schema`."""
    return check(read_toml(text, where), where)


def load_toml(path: "os.PathLike | str") -> Dict[str, Any]:
    """Read a TOML configuration file and check every key (see :func:`parse_toml`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"configuration file {str(path)!r} does not exist") from None
    return parse_toml(text, where=str(path))


def check(values: Mapping[str, Any], where: str = "the configuration") -> Dict[str, Any]:
    """Check a mapping of configuration values: every key known, every value of its kind."""
    options = schema()
    checked = {}
    for key, value in values.items():
        if isinstance(value, dict):
            raise ConfigError(f"table [{key}] in {where}: the configuration is flat `key = value` pairs")
        if key not in options:
            raise _unknown(key, options, where)
        checked[key] = check_value(options[key], value)
    return checked


def resolve(*layers: Mapping[str, Any]) -> Dict[str, Any]:
    """Defaults, overridden by each mapping in turn (e.g. a saved config, a file, the flags); checked.

    The method arguments are checked against the chosen method: an argument it does not take is an error.
    """
    from .methods import METHODS
    from .methods import method_arguments

    options = schema()
    config = {name: option.default for name, option in options.items()}
    for layer in layers:
        config.update(check(layer))
    method = str(config["method"]).lower()
    if method not in METHODS:
        close = difflib.get_close_matches(method, list(METHODS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise ConfigError(f"method: {method!r} is not a method; {hint}choose one of {', '.join(sorted(METHODS))}")
    config["method"] = method
    check_threat_model(config)
    accepted = set(method_arguments(method))
    for option in options.values():
        if option.group == "method" and config[option.name] is not None and option.name not in accepted:
            raise ConfigError(f"{option.name}: method {method!r} does not take this argument; it takes "
                              f"{', '.join(method_arguments(method))}")
    return config


def with_dataset_radius(config: Mapping[str, Any]) -> Dict[str, Any]:
    """``config`` with the data set's usual L-inf radius when no ``eps`` is set (:attr:`DatasetSpec.eps`: 0.1 on
    Fashion-MNIST, 0.3 on MNIST), and then a step of a quarter of it unless one is set -- the ratio of CIFAR's
    8/255 and 2/255. Under L2, or on a data set whose usual radius is 8/255, the method's defaults stand."""
    from .data import get_spec
    config = dict(config)
    if config.get("eps") is not None or (config.get("norm") or "linf") != "linf":
        return config
    usual = get_spec(config["dataset"]).eps
    if usual != 8 / 255:
        config["eps"] = usual
        if config.get("step_size") is None:
            config["step_size"] = usual / 4
    return config


def check_threat_model(config: Mapping[str, Any]) -> None:
    """``eps`` and ``eval_eps`` (when set) within their norm's range: at most 1 under L-inf (``norm`` unset or
    ``"linf"``), any positive radius under L2; else :class:`ConfigError` naming the key and the way to L2."""
    if (config.get("norm") or "linf") != "linf":
        return
    for key in ("eps", "eval_eps"):
        value = config.get(key)
        if value is not None and value > 1:
            raise ConfigError(f"{key}: {value!r} must be <= 1 under norm = \"linf\" (an L-inf radius on [0, 1] "
                              "images: 8/255, not 8); for an L2 radius pass --norm l2 (TOML: norm = \"l2\")")


def method_kwargs(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The method arguments that are set, ready for the method (``layers`` as names or (teacher, student) pairs)."""
    kwargs = {o.name: config[o.name] for o in method_keys() if config.get(o.name) is not None}
    if "layers" in kwargs:
        kwargs["layers"] = layer_specs(kwargs["layers"])
    return kwargs


def trainer_kwargs(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The Trainer arguments of a configuration (unset ones left to the Trainer's defaults)."""
    return {o.name: config[o.name] for o in trainer_keys() if config.get(o.name) is not None}


def layer_specs(layers: Iterable[str]) -> List[Any]:
    """``"name"`` stays a name; ``"teacher_layer:student_layer"`` becomes a pair."""
    return [tuple(s.split(":", 1)) if ":" in s else s for s in layers]


def dump_config(config: Mapping[str, Any]) -> str:
    """A resolved configuration as TOML, grouped by kind of option, with unset keys as comments."""
    options = schema()
    titles = {"run": "run", "trainer": "trainer (ardir.Trainer)", "method": "method arguments (unset: the method's "
              "default)", "eval": "final evaluation"}
    parts = []
    for group, title in titles.items():
        keys = {k: config.get(k) for k, o in options.items() if o.group == group}
        if group == "method":
            keys = {k: v for k, v in keys.items() if v is not None}
        parts.append(f"# --- {title}\n" + (dump_toml(keys) if keys else ""))
    return "\n".join(parts)
