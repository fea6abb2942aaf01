"""`ardir plot`'s pictures: the training curves' epoch axis has whole-number ticks only."""
import json

import pytest

pytest.importorskip("matplotlib")

from ardir import plot  # noqa: E402


def _records(epochs):
    return [{"epoch": e, "step": 10 * e, "loss": 2.0 / e, "ce_adv": 1.5 / e, "val_natural": 50.0 + e,
             "val_pgd": 20.0 + e, "lr": 0.1, "images_per_s": 100.0, "seconds": 1.0} for e in range(1, epochs + 1)]


def _tick_labels(axis):
    axis.figure.canvas.draw()  # the Agg canvas fills the labels in
    return [label.get_text().replace("\N{MINUS SIGN}", "-") for label in axis.get_xticklabels()]


@pytest.mark.parametrize("epochs", [2, 3, 7])
def test_the_epoch_axes_have_integer_ticks(epochs):
    fig = plot._curves_figure(_records(epochs))
    try:
        assert len(fig.axes) == 2  # losses, validation accuracy
        for axis in fig.axes:
            labels = [text for text in _tick_labels(axis) if text]
            assert labels, "no tick labels drawn"
            for text in labels:
                assert float(text).is_integer() and "." not in text, f"fractional epoch tick {text!r}"
    finally:
        plot._pyplot().close(fig)


def test_plot_run_writes_the_training_curves(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(3)))
    assert plot.plot_run(tmp_path) == [tmp_path / "training_curves.png"]
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_epochs_is_one_sentence():
    with pytest.raises(ValueError, match="no epochs to plot: metrics.jsonl is empty"):
        plot._curves_figure([])
