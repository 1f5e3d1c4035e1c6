"""Loading and grouping: every job's ``metrics.json`` under a directory -> ``Run``s -> groups that share a table.

A group holds the runs of one experiment whose setup (subset sizes, steps, evaluation datasets; speed or training
job) agrees: runs that differ there are reported as separate tables, never averaged together. Inside a group, a row
is the shown fields (backbone, method, gate, gate rank) plus every ``choices`` key whose value differs between the
runs (``gate.pooling=max``), so a sweep over any setting never merges into one cell; a re-run of the same choices
and seed replaces the older one instead of counting as another seed.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from imsm.record import RECORD_FILE, RunRecord, is_record


class ReportError(Exception):
    """Nothing to report (no runs, or none of the requested table)."""


# choices already shown as row fields (or the replicate axis): never an extra part of a row's key
SHOWN_CHOICES = frozenset(
    {
        "seed",
        "backbone",
        "backbone.name",
        "peft",
        "peft.name",
        "gate",
        "gate.type",
        "gate.rank",
        "dataset",
        "dataset.name",
    }
)


@dataclass(frozen=True)
class Run:
    """One job's record, where it was read from, and when it was written (the newest re-run wins)."""

    record: RunRecord
    path: Path
    mtime: float


def load_runs(root: str | Path) -> list[Run]:
    """Every job's record under ``root``; the per-dataset ``metrics.json`` files (under ``eval/``) are skipped."""
    root = Path(root)
    if not root.exists():
        raise ReportError(f"{root} does not exist")
    runs = []
    for path in sorted(root.rglob(RECORD_FILE)):
        try:
            data = json.loads(path.read_text())
            if is_record(data):
                runs.append(Run(RunRecord.from_dict(data), path, path.stat().st_mtime))
        except (OSError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            print(f"warning: skipping unreadable run record {path}: {e}", file=sys.stderr)
    return runs


def eval_names(record: RunRecord) -> list[str]:
    """The forgetting datasets a run was (or, failed, would have been) evaluated on, in config order."""
    return list(record.eval_dataset_names or record.eval_datasets or {})


def is_speed(record: RunRecord) -> bool:
    return record.speed is not None or bool(record.setup.get("speed"))


def setup_key(record: RunRecord) -> str:
    """What must agree for runs to share a table: experiment, setup, evaluation datasets; speed vs training jobs."""
    setup = dict(record.setup)
    setup["eval_datasets"] = eval_names(record)
    setup["kind"] = "speed" if is_speed(record) else "train"
    return json.dumps({"experiment": record.experiment, "setup": setup}, sort_keys=True, default=str)


def choices(record: RunRecord) -> dict[str, str]:
    """The record's overrides other than the shown fields; ``+key`` (Hydra's "add") is the same key as ``key``."""
    out = {}
    for key, value in record.choices.items():
        name = key.lstrip("+")
        if name not in SHOWN_CHOICES and not name.startswith("hydra."):  # hydra.*: where a job ran, not what
            out[name] = str(value)
    return out


def varying_keys(runs: Iterable[Run]) -> list[str]:
    """The choice keys whose value differs between ``runs`` (absent in some and set in others counts)."""
    all_choices = [choices(r.record) for r in runs]
    keys = {k for c in all_choices for k in c}
    return sorted(k for k in keys if len({c.get(k) for c in all_choices}) > 1)


def choice_values(record: RunRecord, keys: list[str]) -> tuple[tuple[str, str | None], ...]:
    """``((key, value), ...)`` of ``keys`` for one run, None where the run did not set that key."""
    mine = choices(record)
    return tuple((k, mine.get(k)) for k in keys)


def natural(value: str | None) -> tuple[int, float, str]:
    """Sort key: unset first, then numbers by value (``4 < 16``, ``1e-4 < 3e-4``), then text."""
    if value is None:
        return (0, 0.0, "")
    try:
        return (1, float(value), value)
    except ValueError:
        return (2, 0.0, value)


def dedupe(runs: list[Run]) -> list[Run]:
    """One run per (setup, shown fields, varying choices, seed): the newest file wins."""
    by_setup: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_setup[setup_key(run.record)].append(run)
    latest: dict[tuple, Run] = {}
    for setup, group in by_setup.items():
        keys = varying_keys(group)
        for run in group:
            r = run.record
            key = (setup, r.backbone, r.peft, r.gate, r.gate_rank, r.dataset, r.seed, choice_values(r, keys))
            if key not in latest or run.mtime > latest[key].mtime:
                latest[key] = run
    return list(latest.values())


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by ``setup_key``, named after the experiment (``table2``, then ``table2_b`` for a second setup)."""
    by_key: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_key[setup_key(run.record)].append(run)
    groups: dict[str, list[Run]] = {}
    for key in sorted(by_key, key=lambda k: (json.loads(k)["experiment"] or "", k)):
        group = by_key[key]
        base = safe_name(group[0].record.experiment or "runs")
        name, i = base, 0
        while name in groups:
            i += 1
            name = f"{base}_{chr(ord('a') + i)}"
        groups[name] = group
    return groups


def safe_name(name: str) -> str:
    """An experiment name as a file name (``a/b`` would write outside the report directory)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "runs"
