"""The wheel a `pip install ardir` builds ships every module of the package and the shipped teachers, and imports
on its own (not through the editable install this checkout uses)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    # built from a copy of the sources: a build/ folder left in the checkout would fill in what the config leaves out
    shutil.copytree(ROOT / "ardir", source / "ardir", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(source)], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip()[-300:]}")
    return next(out.glob("ardir-*.whl"))


def test_the_wheel_ships_every_module_and_the_shipped_teachers(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "ardir"
    wanted = {p.relative_to(ROOT).as_posix() for p in package.rglob("*.py")}
    wanted |= {p.relative_to(ROOT).as_posix() for p in (package / "weights").rglob("*") if p.suffix in (".pt", ".json")}
    assert wanted and not wanted - names, sorted(wanted - names)


def test_the_wheel_imports_without_this_checkout(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    # -S: no site-packages, so neither the editable install's finder nor this checkout can fill in a module; torch
    # and the other dependencies come from the running interpreter's paths, after the unpacked wheel
    deps = [p for p in sys.path if p and "site-packages" in p]
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; sys.path += sys.argv[2:]; import ardir, ardir.evaluation, "
            "ardir.train; assert ardir.__file__.startswith(sys.argv[1]), ardir.__file__; "
            "ardir.zoo.load_shipped('fashion-mnist:cnn_xlarge-at')")  # its weights, checked against its sha256
    run = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path / "site"), *deps], capture_output=True,
                         text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
