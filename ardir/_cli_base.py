"""What every ``ardir`` subcommand shares: :class:`CLIError`, the argparse types that check a flag's value when it
is parsed (also used by examples/ and benchmarks/, through :mod:`ardir.cli`), and the ``--device`` lookup."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import signal
import threading
from typing import Iterator, Optional

import torch

from . import config as cfg
from . import data as ardir_data
from . import models


class CLIError(Exception):
    """A problem with the command line or the run directory, reported as one sentence (exit status 2)."""


def _sentence(err: BaseException) -> str:
    """An error as one sentence: an OS error without its ``[Errno N]`` prefix, naming its file once."""
    if isinstance(err, OSError) and err.strerror:
        name = os.fsdecode(err.filename) if err.filename is not None else None
        return err.strerror if name is None or name in err.strerror else f"{err.strerror}: {name}"
    return str(err)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM (how schedulers pre-empt a job) stops the run as Ctrl-C does, so it says what ``--resume``
    continues from and releases its lock, instead of dying silently. Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def unrecognized(command: argparse.ArgumentParser, extra) -> None:
    """Exit through ``command``'s own parser (its usage, exit status 2) naming the ``extra`` arguments it does not
    know and, for a mistyped flag, the closest one it does."""
    flags = [f for action in command._actions for f in action.option_strings]
    close = {x: difflib.get_close_matches(x.split("=")[0], flags, n=1) for x in extra if x.startswith("--")}
    hint = "".join(f"; did you mean {c[0]} for {x}?" for x, c in close.items() if c)
    command.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


# ---------------------------------------------------------------------------------------------- arguments
def _flag_type(kind: str, option: Optional[cfg.Option] = None):
    """The argparse type of a flag of ``kind``; with ``option``, its value is also checked (range, choices), so
    that the error names the flag (``argument --train-size: 0 must be >= 1``)."""
    parse = _parse_type(kind)
    if option is None:
        return parse

    def parse_checked(text: str):
        value = parse(text)
        try:
            item = cfg.Option(option.name, kind[5:-1], None, "", option.group) if kind.startswith("list[") else option
            return cfg.check_value(item, value)
        except cfg.ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None
    parse_checked.__name__ = parse.__name__
    return parse_checked


def _parse_type(kind: str):
    item = kind[5:-1] if kind.startswith("list[") else kind
    if item == "float":
        def parse_float(text: str) -> float:
            try:
                return cfg._float("value", text)
            except cfg.ConfigError as err:  # argparse shows an ArgumentTypeError's own words
                raise argparse.ArgumentTypeError(str(err).replace("value: ", "", 1)) from None
        parse_float.__name__ = "float"
        return parse_float
    return {"int": int, "str": str}[item]


# argparse types, shared with examples/ and benchmarks/ so that every script rejects a bad flag before any work
def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} must be >= {least}")
    return value


def count(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    return _whole_number(text, 1)


def whole(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    return _whole_number(text, 0)


def attack_name(text: str) -> str:
    """An argparse type: an attack name of :func:`ardir.evaluate` (``natural``, ``pgd20``, ``cw30``, ...)."""
    from .evaluate import parse_attack
    try:
        parse_attack(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _model_name(text: str) -> str:
    """An argparse type: a name :func:`ardir.models.create` builds."""
    try:
        return models.check_name(text)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _dataset_name(text: str) -> str:
    """An argparse type: a dataset name of :data:`ardir.data.DATASETS` (or an alias), as its canonical name."""
    try:
        return ardir_data.get_spec(text).name
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def device_name(text: str) -> str:
    """An argparse type: a device torch can use on this machine; ``"auto"`` is CUDA when present, else the CPU."""
    try:
        return str(_device(text))
    except CLIError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _device_flag(text: str) -> str:
    """An argparse type: ``text`` unchanged (``auto`` stays ``auto``) once it is a device torch can use here."""
    device_name(text)
    return text


def _device(name: str) -> torch.device:
    """The torch device ``name`` names (``auto``: CUDA when present, else the CPU); a :class:`CLIError` when this
    machine has no such device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...): {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"device {name!r} asked for, but torch sees no Apple GPU (MPS); use --device cpu")
    return device
