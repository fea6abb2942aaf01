"""Training metrics to TensorBoard: a Trainer callback (``pip install 'ardir[tensorboard]'``).

    trainer = ardir.Trainer(student, loader, teacher=teacher, callbacks=[ardir.tensorboard.TensorBoardLogger("runs/x")])

``ardir train --tensorboard`` does the same into ``<output_dir>/tensorboard``; ``tensorboard --logdir runs`` shows
it. Any other tracker takes the same shape of callback: ``fn(trainer, record)``, called once per epoch on the main
process with the epoch's record (docs/training.md has an example).
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, Dict, Union

__all__ = ["TensorBoardLogger", "available"]

INSTALL = "pip install 'ardir[tensorboard]' (or pip install tensorboard)"


def available() -> bool:
    """Whether the ``tensorboard`` package that ``torch.utils.tensorboard`` writes with is installed."""
    import importlib.util
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLogger:
    """Every number of an epoch's record as a TensorBoard scalar, at step = the epoch.

    Tags are grouped by what they measure: ``val/…`` for the validation accuracies (``val_natural``, ``val_pgd``),
    ``time/…`` for ``seconds`` and ``images_per_s``, ``train/…`` for the rest (``loss``, the method's loss terms,
    ``lr``). A resumed run appends to the same directory; TensorBoard shows the latest value of a repeated step.

    Args:
        log_dir: the event files' directory (created if missing).
    """

    def __init__(self, log_dir: Union[str, Path]):
        if not available():
            raise ImportError(f"TensorBoardLogger needs the tensorboard package: {INSTALL}")
        from torch.utils.tensorboard import SummaryWriter
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    @staticmethod
    def tag(key: str) -> str:
        """The TensorBoard tag of a record key: ``val_pgd`` -> ``val/val_pgd``, ``loss`` -> ``train/loss``."""
        group = "val" if key.startswith("val_") else "time" if key in ("seconds", "images_per_s") else "train"
        return f"{group}/{key}"

    def __call__(self, trainer: Any, record: Dict[str, Any]) -> None:
        epoch = int(record["epoch"])
        for key, value in record.items():
            if key not in ("epoch", "step") and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(self.tag(key), float(value), epoch)
        self.writer.flush()  # each epoch's scalars on disk when it ends: a crash keeps them

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
