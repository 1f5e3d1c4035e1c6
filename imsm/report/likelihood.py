"""The likelihood, choice and gate numbers a run may record per dataset, as tables beside the main one.

Evaluation with ``eval.scoring=likelihood`` (or ``both``) adds nested dicts to each dataset's metrics (the shared
contract of issue #16)::

    "likelihood": {"n": 150, "nll": {"mean": 2.31, "ci": [2.10, 2.52]}, "delta_nll": {...}, "kl": {...}, ...}
    "choice": {"accuracy": .., "f1": .., "mcc": .., "auroc": .., "n": ..}     # yes/no datasets
    "gate": {"mean": .., "q05": .., "q25": .., "q50": .., "q75": .., "q95": .., "n_positions": ..}  # IMSM

Rows are the main table's (``Table.row_of``), columns the evaluated datasets. A likelihood cell is the mean over
seeds of a metric's ``mean``: with one seed (and always for the Original row, one frozen model) it shows the
bootstrap CI over examples, ``0.420 [0.310, 0.550]``; with several, mean ± std over seeds. Choice metrics are in %,
as the main table. Gate quantiles are averaged over seeds (an approximation of the pooled quantiles, said so).
Any of these keys may be absent: a table without them gets no such section.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Any

import pandas as pd

from imsm.report.columns import metric_label
from imsm.report.runs import eval_names
from imsm.report.table import RowKey, Table

# the likelihood metrics of the tidy CSV, in this order; the Markdown table shows the first (forgetting: > 0 worse)
LIKELIHOOD_METRICS = (
    "delta_nll",
    "nll",
    "kl",
    "p_eos_first",
    "nll_tuned",
    "nll_frozen",
    "p_eos_first_frozen",
)
CHOICE_METRICS = ("accuracy", "f1", "mcc", "auroc")
GATE_QUANTILES = ("q05", "q25", "q50", "q75", "q95")

Slot = dict[
    int, dict[str, Any]
]  # seed -> the dataset's nested dict of that run (seed 0: the Original's one copy)


def datasets(table: Table) -> list[str]:
    """The table's datasets in column order (one column of a dataset may show several metrics)."""
    out: list[str] = []
    for c in table.columns:
        if table.specs[c].dataset not in out:
            out.append(table.specs[c].dataset)
    return out


def collect(table: Table, key: str) -> dict[tuple[RowKey, str], Slot]:
    """Per (row, dataset), the ``key`` dict of each seed's run; the Original row from the runs' frozen copies."""
    slots: dict[tuple[RowKey, str], Slot] = defaultdict(dict)
    for run in table.runs:
        r = run.record
        if not r.ok:
            continue
        row = table.row_of(r)
        trained = {str(r.dataset): r.metrics, **(r.eval_datasets or {})}
        frozen = {str(r.dataset): r.base_metrics, **(r.base_eval_datasets or {})}
        for d in [str(r.dataset), *eval_names(r)]:
            value = (trained.get(d) or {}).get(key)
            if isinstance(value, dict):
                slots[(row, d)][int(r.seed or 0)] = value
            base = (frozen.get(d) or {}).get(key)
            if isinstance(base, dict):
                slots[(row.original, d)].setdefault(0, base)  # one frozen model: its first copy, n = 1
    return dict(slots)


def estimate(entry: Any) -> tuple[float | None, tuple[float, float] | None]:
    """``{"mean": m, "ci": [lo, hi]}`` (or a bare number) -> (m, (lo, hi) or None)."""
    if isinstance(entry, int | float) and not isinstance(entry, bool):
        return float(entry), None
    if not isinstance(entry, dict) or not isinstance(entry.get("mean"), int | float):
        return None, None
    ci = entry.get("ci")
    valid = isinstance(ci, list | tuple) and len(ci) == 2 and all(isinstance(v, int | float) for v in ci)
    return float(entry["mean"]), (float(ci[0]), float(ci[1])) if valid else None


def summary(slot: Slot, metric: str, scale: float = 1.0) -> dict[str, Any] | None:
    """Mean, std over seeds, per-seed values and (one seed) the CI of ``slot[seed][metric]``; None if absent."""
    found = {s: estimate(d.get(metric)) for s, d in slot.items()}
    values = {s: v * scale for s, (v, _) in found.items() if v is not None}
    if not values:
        return None
    ci = found[next(iter(values))][1] if len(values) == 1 else None
    return {
        "mean": statistics.fmean(values.values()),
        "std": statistics.stdev(values.values()) if len(values) > 1 else None,
        "n_seeds": len(values),
        "values": [values[s] for s in sorted(values)],
        "ci": None if ci is None else (ci[0] * scale, ci[1] * scale),
    }


def format_summary(s: dict[str, Any] | None, digits: int) -> str:
    """``0.420 [0.310, 0.550]`` (one seed, with its CI), ``0.420 ± 0.050`` (seeds), ``0.420``, or ``-``."""
    if s is None:
        return "-"
    text = f"{s['mean']:.{digits}f}"
    if s["std"] is not None:
        return f"{text} ± {s['std']:.{digits}f}"
    if s["ci"] is not None:
        return f"{text} [{s['ci'][0]:.{digits}f}, {s['ci'][1]:.{digits}f}]"
    return text


def _fields(table: Table, row: RowKey) -> dict[str, Any]:
    return {"backbone": row.backbone, "target": row.target, "method": table.method_label(row)}


def _rows(table: Table, slots: dict[tuple[RowKey, str], Slot]) -> list[RowKey]:
    return [row for row in table.rows if any((row, d) in slots for d in datasets(table))]


def likelihood_frame(table: Table, metric: str = "delta_nll") -> pd.DataFrame:
    """Rows x datasets: ``metric`` (nats/token) per cell; empty when no run recorded likelihoods."""
    slots = collect(table, "likelihood")
    names = datasets(table)
    records = []
    for row in _rows(table, slots):
        record = _fields(table, row)
        for d in names:
            record[d] = format_summary(summary(slots.get((row, d), {}), metric), 3)
        records.append(record)
    return pd.DataFrame(records, columns=["backbone", "target", "method", *names])


def choice_frame(table: Table) -> pd.DataFrame:
    """Rows x (dataset, choice metric) in %: log p(yes) vs log p(no) scored like a classifier; empty when absent."""
    slots = collect(table, "choice")
    columns = [
        (d, m)
        for d in datasets(table)
        for m in CHOICE_METRICS
        if any(
            estimate(s.get(m))[0] is not None
            for (_, d2), seeds in slots.items()
            if d2 == d
            for s in seeds.values()
        )
    ]
    records = []
    for row in _rows(table, slots):
        record = _fields(table, row)
        for d, m in columns:
            record[f"{d} {metric_label(m)}"] = format_summary(summary(slots.get((row, d), {}), m, 100.0), 2)
        records.append(record)
    return pd.DataFrame(
        records, columns=["backbone", "target", "method", *[f"{d} {metric_label(m)}" for d, m in columns]]
    )


def tidy_frame(table: Table) -> pd.DataFrame:
    """One row per (row, dataset, metric) of the likelihood and choice dicts: mean, std, seeds, CI, n examples."""
    records = []
    for family, metrics, scale in (
        ("likelihood", LIKELIHOOD_METRICS, 1.0),
        ("choice", CHOICE_METRICS, 100.0),
    ):
        slots = collect(table, family)
        for row in table.rows:
            for d in datasets(table):
                slot = slots.get((row, d))
                for m in metrics if slot else ():
                    s = summary(slot, m, scale)
                    if s is None:
                        continue
                    n = [seed.get("n") for seed in slot.values() if isinstance(seed.get("n"), int)]
                    records.append(
                        {
                            **_fields(table, row),
                            "peft": row.peft,
                            "gate": row.gate,
                            "dataset": d,
                            "family": family,
                            "metric": m,
                            "mean": round(s["mean"], 6),
                            "std": None if s["std"] is None else round(s["std"], 6),
                            "n_seeds": s["n_seeds"],
                            "values": json.dumps([round(v, 6) for v in s["values"]]),
                            "ci_low": None if s["ci"] is None else round(s["ci"][0], 6),
                            "ci_high": None if s["ci"] is None else round(s["ci"][1], 6),
                            "n_examples": n[0] if len(set(n)) == 1 else json.dumps(n),
                        }
                    )
    header = ["backbone", "target", "method", "peft", "gate", "dataset", "family", "metric", "mean", "std"]
    return pd.DataFrame(records, columns=[*header, "n_seeds", "values", "ci_low", "ci_high", "n_examples"])


def gate_frame(table: Table) -> pd.DataFrame:
    """Per gated row and dataset: the gate's quantiles over answer positions, each averaged over seeds."""
    slots = collect(table, "gate")
    records = []
    for row in table.rows:
        for d in datasets(table):
            slot = slots.get((row, d))
            if not slot:
                continue
            record: dict[str, Any] = {**_fields(table, row), "dataset": d, "n_seeds": len(slot)}
            for q in ("mean", *GATE_QUANTILES):
                values = [float(s[q]) for s in slot.values() if isinstance(s.get(q), int | float)]
                record[q] = round(statistics.fmean(values), 6) if values else None
            records.append(record)
    header = ["backbone", "target", "method", "dataset", "n_seeds", "mean", *GATE_QUANTILES]
    return pd.DataFrame(records, columns=header)
