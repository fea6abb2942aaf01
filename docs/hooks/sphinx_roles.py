"""MkDocs hook: ardir's docstrings cross-reference with Sphinx roles (:class:`~ardir.trainer.Trainer`), which
mkdocstrings leaves as raw text. Each becomes the code name it stands for -- the last part after ``~``, as Sphinx
shows it -- linked to its entry when that is on the same page; a role this hook does not know fails the build."""
import re

from mkdocs.exceptions import PluginError

ROLES = ("class", "func", "meth", "attr", "mod", "data", "exc", "obj")
ROLE = re.compile(r":(?:py:)?(" + "|".join(ROLES) + r"):<code>(~?)([\w.]+)(\(\))?</code>")
LEFTOVER = re.compile(r":[\w:]+:<code>")


def render(html: str) -> str:
    """``html`` with every known role rendered; :class:`PluginError` naming any other one."""
    anchors = set(re.findall(r'id="([\w.]+)"', html))

    def name(match: "re.Match[str]") -> str:
        _, short, target, call = match.groups()
        shown = (target.rsplit(".", 1)[-1] if short else target) + (call or "")
        code = f"<code>{shown}</code>"
        return f'<a href="#{target}">{code}</a>' if target in anchors else code

    html = ROLE.sub(name, html)
    left = LEFTOVER.search(html)
    if left:
        raise PluginError(f"an unrendered role is left in the docs: {html[left.start():left.start() + 80]!r}")
    return html


def on_page_content(html, page, config, files):
    return render(html)
