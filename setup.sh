#!/usr/bin/env bash
# Set-up in ./.venv, for a CPU: PyTorch 2.14.1 / torchvision 0.29.1 (the pair this project is tested with on CPU;
# PyPI's Linux wheel is the CUDA build, which runs on a CPU too: install the CPU-only wheel into .venv first to keep
# it, see the README), ardir's dependencies, ardir itself (editable, with the test extra), and Fashion-MNIST from
# Debian when possible. Safe to run again: what is already there is kept. On a GPU machine, bring your own torch.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }

.venv/bin/python -c "import torch, torchvision" 2>/dev/null || pip install torch==2.14.1 torchvision==0.29.1
pip install "timm>=0.9" "numpy>=1.22" "scipy>=1.8" "tqdm>=4.60"
# Tests, docs build, plots, the official AutoAttack code (the optional engine the tests compare against) and
# TensorBoard (the optional --tensorboard logging, tested for real).
pip install "pytest>=7" "matplotlib>=3.5" "mkdocs>=1.5" "mkdocstrings[python]>=0.24" "pyautoattack>=0.2" \
  "tensorboard>=2.10"
# torchattacks pins requests~=2.25.1 (it never imports requests); installing it without its pins leaves requests as
# the environment has it (here: not installed, so `pip check` names it, harmlessly) instead of downgrading requests,
# urllib3 and idna. Its real needs (torch, torchvision, scipy, tqdm, numpy) are above.
pip install --no-deps "torchattacks==3.5.1"
pip install --no-deps -e .
.venv/bin/python -c "import ardir, torchattacks, timm, mkdocs, matplotlib" || { echo "set-up failed: ardir does not import" >&2; exit 1; }

# Real Fashion-MNIST for the CPU-scale runs (Debian's package; elsewhere torchvision downloads it).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST will be downloaded by torchvision" >&2
fi
