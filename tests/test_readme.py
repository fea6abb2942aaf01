"""The README's Python snippets run as written, in order, on real Fashion-MNIST (slow: a few minutes on CPU)."""
import re
from pathlib import Path

import pytest

from ardir import data

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(text: str):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_has_its_snippets():
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2 and any("ardir.evaluate(" in b for b in blocks)
    assert all("train_loader" not in b and "test_loader" not in b for b in blocks)  # every name is defined


@pytest.mark.slow
@pytest.mark.skipif(not data.FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_readme_python_snippets_run_as_written(capsys):
    namespace: dict = {}
    for block in python_blocks((ROOT / "README.md").read_text()):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 -- our own documentation
    assert namespace["report"].accuracy["natural"] > 50  # one real epoch of ARDIR learns something
    assert "(128, 64, 7, 7)" in capsys.readouterr().out.replace("torch.Size([", "(").replace("])", ")")
