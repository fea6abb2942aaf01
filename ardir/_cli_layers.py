"""``ardir layers --model NAME``: a model's named modules with their types and output shapes, the names ARDIR's
``--layers`` and :class:`ardir.FeatureHooks` take (:func:`ardir.hooks.describe_layers`)."""
from __future__ import annotations

import argparse
from typing import Optional

from . import data as ardir_data
from . import models
from ._cli_base import CLIError, _dataset_name, _model_name, count
from .hooks import describe_layers, format_layers

DEFAULT_INPUT = (3, 32, 32)
"""Channels, height and width of the sample when neither ``--dataset`` nor ``--in-chans``/``--image-size`` say."""


def add_layers_parser(sub) -> argparse.ArgumentParser:
    """Add the ``layers`` subcommand to ``sub`` (the ``ardir`` parser's subparsers); returns its parser."""
    layers_p = sub.add_parser("layers", help="list a model's layer names with their types and output shapes (what "
                              "--layers takes)", description="Run one sample batch through the model and print "
                              "every named module, its type and its output shape per image.")
    layers_p.add_argument("--model", required=True, type=_model_name, metavar="NAME",
                          help="a name of ardir.models.list_models() or timm/<name>")
    layers_p.add_argument("--dataset", type=_dataset_name, metavar="NAME", help="the input and classes of this "
                          "dataset (default: 3-channel 32x32 images, 10 classes)")
    layers_p.add_argument("--in-chans", type=count, default=None, help="input channels, without --dataset "
                          f"(default: {DEFAULT_INPUT[0]})")
    layers_p.add_argument("--image-size", type=count, default=None, help="image height and width, without --dataset "
                          f"(default: {DEFAULT_INPUT[1]})")
    return layers_p


def show_layers(model: str, dataset: Optional[str] = None, in_chans: Optional[int] = None,
                image_size: Optional[int] = None) -> str:
    """The text ``ardir layers`` prints: a line naming the model and its input, then :func:`format_layers`' table
    of :func:`describe_layers` on one sample image (a model built by :func:`ardir.models.create`)."""
    num_classes = 10
    if dataset is not None:
        if in_chans is not None or image_size is not None:
            raise CLIError("--in-chans and --image-size describe the input when no --dataset does: pass one or the "
                           "other")
        spec = ardir_data.get_spec(dataset)
        in_chans, image_size, num_classes = spec.in_chans, spec.image_size, spec.num_classes or num_classes
    in_chans = in_chans or DEFAULT_INPUT[0]
    image_size = image_size or DEFAULT_INPUT[1]
    net = models.create(model, num_classes=num_classes, in_chans=in_chans)
    try:
        rows = describe_layers(net, (1, in_chans, image_size, image_size))
    except ValueError as err:
        raise CLIError(f"{model}: {err}; pass the --dataset it is made for, or --in-chans and --image-size") from None
    head = f"{model} on {in_chans}x{image_size}x{image_size} images, {num_classes} classes: {len(rows)} named modules"
    default = getattr(net, "default_ir_layers", None)
    if default:
        head += f"; ARDIR matches {', '.join(default)} unless --layers says otherwise"
    return head + "\n\n" + format_layers(rows)
