"""MkDocs hook: replaces ``<!-- ardir:config-keys -->`` with the table of every configuration key, generated from
:func:`ardir.config.schema`, so the documented keys are always the ones ``ardir train`` accepts."""
from ardir import config as cfg

MARKER = "<!-- ardir:config-keys -->"
TITLES = {"run": "Run", "trainer": "Trainer (`ardir.Trainer` arguments)",
          "method": "Method arguments (unset: the chosen method's own default)", "eval": "Evaluation (`ardir eval`)"}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table() -> str:
    options = cfg.schema().values()
    parts = []
    for group, title in TITLES.items():
        parts += [f"#### {title}", "", "| key | flag | type | default | meaning |", "|---|---|---|---|---|"]
        for o in options:
            if o.group == group:
                default = "" if o.default is None else f"`{o.default}`"
                parts.append(f"| `{o.name}` | `{o.flag}` | {o.kind} | {_cell(default)} | {_cell(o.help)} |")
        parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    return markdown.replace(MARKER, table()) if MARKER in markdown else markdown
