"""A suite's table: rows aggregated over seeds (mean ± sample std), each row's difference to AT paired by seed,
and the Markdown + JSON files ``reproduce.py`` writes."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from suites import HEADERS, L2_HEADERS, ROW_NAMES, _P

def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_cell(values: Sequence[float]) -> str:
    """``"mean ± std"`` over seeds (two decimals); the mean alone for one seed; ``""`` for none."""
    if not values:
        return ""
    mean, std = mean_std(values)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def summarize(records: Sequence[Dict[str, Any]], metrics: Sequence[str]) -> List[Dict[str, Any]]:
    """Group row records by (student, method[, variant]) and aggregate every metric over the seeds."""
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["student"], r["method"], r.get("variant")), []).append(r)
    rows = []
    for (student, method, variant), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        row = {"student": student, "method": method, "variant": variant, "seeds": [r["seed"] for r in rs],
               "cells": {}, "mean": {}, "std": {}, "per_seed": {}}
        row["metric_seeds"] = {}
        for m in metrics:
            vals = [r["accuracy"][m] for r in rs if m in r["accuracy"]]
            row["per_seed"][m] = vals
            row["metric_seeds"][m] = [r["seed"] for r in rs if m in r["accuracy"]]
            row["cells"][m] = format_cell(vals)
            if vals and len(vals) < len(rs):  # say which seeds a cell averages when it is not all of the row's
                row["cells"][m] += f" (seed{'s' * (len(vals) > 1)} {','.join(map(str, row['metric_seeds'][m]))})"
            if vals:
                row["mean"][m], row["std"][m] = mean_std(vals)
        row["train_seconds"] = sum(r["train_seconds"] for r in rs)
        row["eval_seconds"] = sum(r["eval_seconds"] for r in rs)
        row["command"] = rs[0].get("command", "")
        rows.append(row)
    return rows


STRENGTH = ("autoattack", "cw30", "cw20", "pgd20")


def strongest_metric(rows: List[Dict[str, Any]]) -> str:
    """The strongest attack any row was measured with: AutoAttack, else CW∞ (30 or 20 steps), else PGD-20."""
    return (difference_metrics(rows) or ["autoattack"])[0]


def difference_metrics(rows: List[Dict[str, Any]]) -> List[str]:
    """The attacks the Δ columns pair, strongest first: AutoAttack where measured, and the strongest of the
    others (every row has it, so rows measured without AutoAttack still get a difference)."""
    measured = {m for r in rows for m, values in r.get("per_seed", {}).items() if values}
    found = [m for m in STRENGTH if m in measured]
    return found[:1] + [m for m in found[1:2] if found[0] == "autoattack"]


def add_differences(rows: List[Dict[str, Any]], metric: str = "autoattack", base: str = "at") -> None:
    """Give every row ``deltas[metric]``: its ``metric`` minus the ``base`` method's of the same student, paired
    by seed (the same data subset and order), as per-seed values, mean and std, and the cell ``"mean ± std"``
    (``cells["delta"]`` and ``delta`` for the first metric paired, ``cells["delta:<metric>"]`` for each)."""
    bases = {r["student"]: r for r in rows if r["method"] == base and r.get("variant") is None}
    for r in rows:
        ref = bases.get(r["student"])
        if ref is None or r["method"] == "teacher" or not r.get("per_seed", {}).get(metric):
            continue
        seeds_of = (lambda row: row.get("metric_seeds", {}).get(metric, row["seeds"]))
        theirs = dict(zip(seeds_of(ref), ref["per_seed"].get(metric, [])))
        diffs = [v - theirs[s] for s, v in zip(seeds_of(r), r["per_seed"][metric]) if s in theirs]
        if diffs:
            mean, std = mean_std(diffs)
            delta = {"metric": metric, "base": base, "per_seed": diffs, "mean": mean, "std": std}
            cell = f"{mean:+.2f}" + ("" if std is None else f" ± {std:.2f}")
            r.setdefault("deltas", {})[metric] = delta
            r.setdefault("cells", {})[f"delta:{metric}"] = cell
            if "delta" not in r:
                r["delta"], r["cells"]["delta"] = delta, cell


def write_table(path: Path, title: str, meta: Dict[str, Any], rows: List[Dict[str, Any]], metrics: Sequence[str],
                published: Optional[Dict[Tuple[str, str], Dict[str, float]]] = None, variant_column: bool = False,
                order: Sequence[str] = ROW_NAMES, students: Sequence[str] = (),
                records: Optional[Sequence[Dict[str, Any]]] = None) -> None:
    """``path``.md (the table and how it was made) and ``path``.json (the same, plus per-seed numbers and, given
    ``records``, every row's own record: what a clean clone resumes the suite from, see :mod:`table_records`)."""
    rank = {m: i for i, m in enumerate(("teacher",) + tuple(order))}
    first = {name: i for i, name in enumerate(students)}
    rows = sorted(rows, key=lambda r: (first.get(r["student"], len(first)), r["student"], rank.get(r["method"], 99),
                                       r["variant"] or ""))
    names = L2_HEADERS if meta.get("settings", {}).get("norm") == "l2" else HEADERS
    lines = [f"# {title}", ""]
    if meta.get("partial"):
        lines += [f"**PARTIAL run** — {len(meta['partial'])} rows of this command have not run yet (the table "
                  "was written with --table-only from the rows that finished; the same command without it runs "
                  "the rest and resumes): " + ", ".join(meta["partial"]), ""]
    if meta.get("no_autoattack"):
        lines += [f"**Without AutoAttack** — {len(meta['no_autoattack'])} rows below lack this run's AutoAttack (their "
                  "cells are empty); the same command without --table-only adds it, from the row's saved weights "
                  "where it kept them, else by retraining the row: " + ", ".join(meta["no_autoattack"]), ""]
    if meta.get("reduced"):
        lines += ["**REDUCED run** — not the suite's protocol; it differs in:", ""]
        lines += [f"- {d}" for d in meta["reduced"]] + [""]
    for key, label in [("command", "Command"), ("commit", "Git commit"),
                       ("row_commits", "Rows' commits (row runs)"),
                       ("date", "Date (UTC)"),
                       ("machine", "Machine"), ("wall_time", "Wall time"), ("teacher", "Teacher"),
                       ("teacher_lead", "Teacher minus the AT student")]:
        if meta.get(key):
            value = f"`{meta[key]}`" if key in ("command", "commit") else meta[key]
            lines.append(f"- {label}: {value}")
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    lines.append("")
    head = ["Student", "Variant" if variant_column else "Method", "Seeds"]
    for m in metrics:
        head.append(f"{names[m]} (ours)" if published is not None else names[m])
        if published is not None and m in _P:
            head.append(f"{names[m]} (paper)")
    deltas = [m for m in STRENGTH if any(m in r.get("deltas", {}) for r in rows)]
    head += [f"Δ {'AA' if m == 'autoattack' else names[m]} vs AT" for m in deltas]
    head += ["Train (s)", "Eval (s)", "Rerun this row"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join([":--"] * 3 + ["--:"] * (len(head) - 4) + [":--"]) + "|"]
    for r in rows:
        cells = [r["student"], r["variant"] if variant_column else r["method"],
                 ",".join(map(str, r["seeds"])) if r["seeds"] else ""]
        for m in metrics:
            cells.append(r["cells"].get(m, ""))
            if published is not None and m in _P:
                p = published.get((r["student"], r["method"]), {}).get(m)
                cells.append("" if p is None else f"{p:.2f}")
        cells += [r["cells"].get(f"delta:{m}", "") for m in deltas]
        cells += [f"{r.get('train_seconds', 0):.0f}" if r["seeds"] else "",
                  f"{r.get('eval_seconds', 0):.0f}" if r["seeds"] else "",
                  f"`{r['command']}`" if r.get("command") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += meta.get("footer", [])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    record = {"title": title, "meta": meta, "metrics": list(metrics),
              "rows": [{k: v for k, v in r.items() if k != "cells"} for r in rows]}
    if published is not None:
        record["published"] = {f"{s}/{m}": v for (s, m), v in published.items()}
        record["published_source"] = meta.get("published_source")
    if records is not None:
        record["records"] = list(records)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
