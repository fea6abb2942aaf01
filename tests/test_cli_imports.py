"""`ardir --help` and argument errors are quick: the command imports torchvision, timm and matplotlib only when a
subcommand's work needs them (reading a dataset, building a timm model, drawing), never to parse its flags."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torchvision", "timm", "matplotlib")

PARSE = """
import json, sys
from ardir.cli import main
statuses = []
for argv in json.loads(sys.argv[1]):
    try:
        statuses.append(main(argv))
    except SystemExit as exit:
        statuses.append(exit.code)
print(json.dumps({"statuses": statuses, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _imported_modules(stderr: str):
    """The modules ``python -X importtime`` reports."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_python_m_ardir_help_imports_no_torchvision_timm_or_matplotlib():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ardir", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "usage: ardir" in result.stdout
    imported = _imported_modules(result.stderr)
    assert "ardir.cli" in imported  # the report is read right
    assert not {name for name in imported if name.split(".")[0] in HEAVY}


def test_subcommand_help_and_argument_errors_import_none_of_them():
    argvs = [["train", "--help"], ["eval", "--help"], ["plot", "--help"], ["layers", "--help"],
             ["train", "--epochs", "ten"], ["eval", "--batch-size", "0"], ["layers", "--model", "no_such_net"],
             ["nonsense"]]
    result = subprocess.run([sys.executable, "-c", PARSE, json.dumps(argvs)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["statuses"] == [0, 0, 0, 0, 2, 2, 2, 2]
    assert report["heavy"] == []


def test_import_ardir_imports_no_torchvision():
    code = "import sys, ardir; print(sorted(m for m in %r if m in sys.modules))" % (HEAVY,)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
