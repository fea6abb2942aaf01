"""The documentation names only what exists: every ``ardir.x.y`` in README.md and docs/ resolves after
``import ardir`` (as a user typing it would), and every flag of the reproduce script's synopsis exists."""
import importlib
import re
from pathlib import Path

import pytest

import ardir

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NAME = re.compile(r"(?<![\w/.-])ardir((?:\.[A-Za-z_]\w*)+)")


def resolve(dotted: str):
    """Attribute by attribute from the ``ardir`` package; a submodule nothing has imported yet is imported (as
    ``import ardir.x`` would), but a package attribute that shadows a submodule (``ardir.evaluate``, the function)
    is what the user gets."""
    obj, path = ardir, "ardir"
    for part in dotted.split(".")[1:]:
        path += "." + part
        if not hasattr(obj, part) and isinstance(obj, type(ardir)):
            importlib.import_module(path)
        obj = getattr(obj, part)
    return obj


def names_in(text: str):
    for line in text.splitlines():
        if line.lstrip().startswith(":::"):  # mkdocstrings directives name module paths, not attributes
            continue
        yield from (m.group(0) for m in NAME.finditer(line))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_ardir_name_in_the_docs_resolves(doc):
    missing = []
    for name in sorted(set(names_in(doc.read_text(encoding="utf-8")))):
        try:
            resolve(name)
        except (AttributeError, ImportError) as err:
            missing.append(f"{name} ({type(err).__name__}: {err})")
    assert not missing, f"{doc.name} names what does not exist: {missing}"


def test_resolve_catches_a_function_shadowing_its_module():
    assert resolve("ardir.evaluate") is ardir.evaluate
    with pytest.raises(AttributeError):
        resolve("ardir.evaluate.list_attacks")  # ardir.evaluate is the function
    assert resolve("ardir.teachers.load_teacher") and resolve("ardir.gpu_data.GPULoader")


def test_the_reproduce_synopsis_lists_every_flag():
    text = (ROOT / "docs" / "reproducing.md").read_text(encoding="utf-8")
    synopsis = text[text.index("python benchmarks/reproduce.py SUITE"):text.index("```", text.index("SUITE"))]
    source = (ROOT / "benchmarks" / "reproduce.py").read_text(encoding="utf-8")
    flags = set(re.findall(r'add_argument\("(--[\w-]+)"', source))
    missing = flags - set(re.findall(r"--[\w-]+", synopsis))
    assert flags and not missing, f"docs/reproducing.md's synopsis lacks {sorted(missing)}"


def test_sphinx_roles_render_as_code_names_and_unknown_ones_fail_the_build():
    """docs/hooks/sphinx_roles.py: `:class:`~a.B`` shows `B` (linked when its entry is on the page), `:func:`a.f``
    shows `a.f`; a role it does not know stops the build instead of reaching a reader raw."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("sphinx_roles", ROOT / "docs" / "hooks" / "sphinx_roles.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    html = ('<h2 id="ardir.attacks.PGD">PGD</h2><p>see :class:<code>~ardir.attacks.PGD</code> and '
            ':func:<code>ardir.evaluate</code>, :meth:<code>~ardir.Trainer.fit()</code></p>')
    out = hook.render(html)
    assert '<a href="#ardir.attacks.PGD"><code>PGD</code></a>' in out
    assert "<code>ardir.evaluate</code>" in out and "<code>fit()</code>" in out and ":func:" not in out
    with pytest.raises(hook.PluginError, match="unrendered role"):
        hook.render("<p>:ref:<code>somewhere</code></p>")
