"""A suite's finished rows, kept in its committed table so that a clean clone resumes the suite.

The run directory (``benchmarks/runs/<suite>``, one JSON per row and the students' weights) is not in git, so a new
checkout starts without it, and the next row a suite runs would otherwise be tabled alone. ``reproduce.py`` writes
every row's record into the table's JSON (``records``) and, when a row's file is missing from the run directory,
restores it from there before it decides what to run. Tables written before the records were kept hold only each
row's per-seed numbers; :func:`rebuilt_records` turns those back into one record per seed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from ardir.checkpoint import atomic_write_text

Job = Tuple[str, str, int, Optional[str]]  # (student, method, seed, variant)
ConfigOf = Callable[[str, Optional[str]], Optional[Dict[str, Any]]]


def rebuilt_records(table: Dict[str, Any], config_of: ConfigOf) -> list:
    """One record per (row, seed) of a table written before ``records`` were kept: its per-seed accuracies, the
    table's settings, and the method configuration ``config_of(method, variant)`` gives, today's: such a table does
    not say which configuration its rows ran with (it showed only rows whose configuration held when it was
    written), so a rebuilt record says it was rebuilt (``restored_from``), that its weights are not kept, and the
    commit that wrote its table (``table_commit``: the row ran at or before it). A row's
    times were kept as totals over its seeds, so a row of several seeds gets its total split evenly and says so
    (``seconds_split_evenly``); the table's sums stay exact."""
    settings = table.get("meta", {}).get("settings", {})
    table_commit = table.get("meta", {}).get("commit") or "unknown"
    records = []
    for row in table.get("rows", []):
        seeds = row.get("seeds") or []
        # tables before ``metric_seeds`` measured every metric of a row on all its seeds
        metric_seeds = row.get("metric_seeds") or {m: seeds for m, values in row.get("per_seed", {}).items()
                                                   if len(values) == len(seeds)}
        for seed in seeds:
            accuracy = {m: values[metric_seeds[m].index(seed)] for m, values in row["per_seed"].items()
                        if seed in metric_seeds.get(m, [])}
            rec = {"student": row["student"], "method": row["method"], "seed": seed, "accuracy": accuracy,
                   "settings": settings, "method_config": config_of(row["method"], row.get("variant")),
                   "command": re.sub(r"--seeds \d+", f"--seeds {seed}", row.get("command", "")),
                   "weights_sha256": "not kept",  # a stray <row>.pt is then not taken for its weights
                   "table_commit": table_commit}  # the row ran at or before the commit that wrote its table
            if row.get("variant") is not None:
                rec["variant"] = row["variant"]
            if "autoattack" in accuracy:
                rec["aa_size"] = settings.get("aa_size")
            for name in ("train_seconds", "eval_seconds"):
                rec[name] = round(row.get(name, 0.0) / len(seeds), 1)
            if len(seeds) > 1:
                rec["seconds_split_evenly"] = True
            records.append(rec)
    return records


def committed_records(table_json: Path, config_of: ConfigOf) -> Dict[Job, Dict[str, Any]]:
    """The row records a committed table holds (the teacher's too), by (student, method, seed, variant); empty when
    there is none."""
    if not table_json.exists():
        return {}
    table = json.loads(table_json.read_text())  # ValueError when it cannot be read (a merge conflict, say)
    if not isinstance(table, dict):
        raise ValueError("not a table: its JSON is not an object")
    kept = table.get("records")
    records = kept if kept is not None else rebuilt_records(table, config_of)
    for r in records:  # a hand-edited or truncated record: the table cannot be read, rather than a KeyError
        missing = [k for k in ("student", "method", "seed", "accuracy") if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"a row record lacks {', '.join(missing)}")
    source = f"{table_json.name}" + ("" if kept is not None else " (rebuilt from its per-seed numbers)")
    return {(r["student"], r["method"], r["seed"], r.get("variant")):
            dict(r, restored_from=r.get("restored_from", source), weights_sha256=r.get("weights_sha256") or "not kept")
            for r in records}


def restore_row(path: Path, record: Optional[Dict[str, Any]], accepts: Callable[[Dict[str, Any]], bool]) -> bool:
    """Write a committed ``record`` to the run directory's row file ``path`` (missing, or not holding for this run:
    the caller decides) when the record holds for this run (``accepts``: same settings, same method configuration).
    Its weights were never committed, so an attack the row lacks is added by retraining it."""
    if record is None or not accepts(record):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(record, indent=2) + "\n", path)  # a killed run leaves no half-written row
    return True
