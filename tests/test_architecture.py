"""The import rules of docs/architecture.md, read from the source with ``ast`` (lazy imports inside functions
included): the losses and attacks know no loop, the models no method, the evaluation no trainer, the trainer's
collaborators no trainer, and nothing below the command line imports it."""
import ast
from pathlib import Path

import pytest

ARDIR = Path(__file__).resolve().parents[1] / "ardir"


def module_name(path: Path) -> str:
    parts = path.relative_to(ARDIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path):
    """The ``ardir`` modules ``path`` imports, as dotted names (``ardir.methods``); ``from . import x`` gives
    ``ardir.x``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.split(".")[0] == "ardir")
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            if node.module is None:
                yield from (".".join(base + [alias.name]) for alias in node.names)
            else:
                yield ".".join(base + [node.module])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ardir":
            yield node.module


def forbidden(target: str, prefixes) -> bool:
    return any(target == p or target.startswith(p + ".") or (p.endswith("_") and target.startswith(p))
               for p in prefixes)


LOOP = ("ardir.trainer", "ardir.train", "ardir.cli", "ardir._cli_", "ardir.config")
# (the modules a rule covers, what they may not import, why)
RULES = [
    (["losses", "attacks", "apgd", "fab", "square", "autoattack", "hooks"], LOOP + ("ardir.methods", "ardir.evaluation"),
     "losses and attacks know no loop and no method"),
    (["models", "zoo"], LOOP + ("ardir.methods", "ardir.losses", "ardir.attacks", "ardir.evaluation"),
     "models know no method, no loss and no attack"),
    (["evaluation"], LOOP + ("ardir.methods",), "the evaluation needs no trainer and no method"),
    (["methods", "methods_ardir", "methods_recent"], LOOP + ("ardir.evaluation",),
     "methods know no loop and no evaluation"),
    (["train"], ("ardir.trainer", "ardir.cli", "ardir._cli_"), "the trainer's collaborators import no trainer"),
    (["trainer"], ("ardir.cli", "ardir._cli_", "ardir.config"), "the trainer knows no command line"),
    (["registry", "_checks", "_safety", "rng_state"], ("ardir",), "the shared helpers import nothing of ardir"),
]


def covered(names):
    for name in names:
        path = ARDIR / f"{name}.py"
        yield from [path] if path.exists() else sorted((ARDIR / name).rglob("*.py"))


@pytest.mark.parametrize("names, banned, why", RULES, ids=[rule[2] for rule in RULES])
def test_import_rules(names, banned, why):
    paths = list(covered(names))
    assert paths, names
    broken = [f"{module_name(path)} imports {target}" for path in paths for target in imported(path)
              if forbidden(target, banned) and not target.startswith(module_name(path))]
    assert not broken, f"{why}: {broken}"


def test_nothing_below_the_command_line_imports_it():
    cli = ("ardir.cli", "ardir._cli_", "ardir._run_lock", "ardir.__main__")
    broken = [f"{module_name(path)} imports {target}" for path in sorted(ARDIR.rglob("*.py"))
              if not forbidden(module_name(path), cli)
              for target in imported(path) if forbidden(target, cli)]
    assert not broken, broken


def test_the_rules_see_imports():
    """The reader finds relative, absolute and lazy imports (a rule that sees nothing passes for nothing)."""
    assert "ardir.methods" in set(imported(ARDIR / "trainer.py"))
    assert "ardir.train.checks" in set(imported(ARDIR / "trainer.py"))
    assert "ardir.methods" in set(imported(ARDIR / "config.py"))  # imported inside a function
    assert "ardir.checkpoint" in set(imported(ARDIR / "train" / "state.py"))


SPLIT = ["ardir._config_values", "ardir._config_paths", "ardir._config_toml", "ardir._data_specs",
         "ardir.methods_ardir", "ardir.train.checkpoints"]


@pytest.mark.parametrize("name", SPLIT)
def test_the_modules_split_off_document_what_they_define(name):
    """What moved out of ardir.config, ardir.data, ardir.methods and the Trainer keeps its docstrings (their own
    docstring test only looks at what a module defines itself)."""
    import importlib
    import inspect
    module = importlib.import_module(name)
    missing = [] if (module.__doc__ or "").strip() else [name]
    for attr, obj in vars(module).items():
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)) or obj.__module__ != name:
            continue
        members = [(attr, obj)] + [(f"{attr}.{m}", v) for m, v in vars(obj).items() if inspect.isclass(obj)
                                   and not m.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))]
        missing += [label for label, value in members if not (value.__doc__ or "").strip()]
    assert not missing, missing
