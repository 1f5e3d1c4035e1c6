"""Run directories -> the paper's tables: mean ± std over seeds, paired t-tests, forgetting matrices, plots.

``python -m imsm.report multirun/table2 [--table table2] [--out DIR]`` reads every ``metrics.json`` that
``imsm.train`` wrote under the directory (one per job, ``status`` ok or failed) and writes, per experiment:

- ``<name>.md`` / ``.csv`` / ``.tex``: rows = backbone x method (vanilla, ``+ IMSM``, ablations, gate ranks), plus the
  frozen backbone's "Original" row; columns = evaluation datasets (the targets, then the forgetting datasets) and
  their average. Each cell is the mean ± sample std over seeds of the dataset's main metric, in percent
  (MCC for CoLA, F1 for MRPC and ROPES, accuracy otherwise). A gated cell gets ``*`` when a paired t-test against the
  same method without the gate (same backbone, target and seeds) gives p < 0.05, as in the paper; the CSV has
  the p-value of every cell. A failed job shows in its cell (``failed`` or ``(1 failed)``), never as a gap or a zero.
- ``<name>_forgetting.*`` and ``.png`` (when runs were evaluated on other datasets): train target x evaluation
  dataset, the score and its change vs Original, as a table and a heatmap.
- ``<name>_rank.png`` (when the gate rank varies, Table 6): score against gate rank, one line per method.
- for ``speed`` jobs (Table 5), ``<name>.*`` is decoding tokens/s, vanilla vs IMSM, and their ratio.

The "Original" row is the frozen backbone (adapter off, no gate) on the same examples, which every training job
scores when ``eval.compare_base`` is on (once per sweep with ``eval.original_cache``). Runs whose setup differs
(subset sizes, steps, evaluation datasets) are reported as separate tables, never averaged together.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imsm.io import write_text_atomic

# the paper's metric per dataset, found by name in the dataset's metric dict (first present wins)
MAIN_METRICS = ("mcc", "f1", "accuracy", "exact_match")
PEFT_ORDER = ("lora", "ia3", "adalora", "dora", "loha", "loramoe")
GATE_ORDER = ("none", "query_aware", "no_query", "fixed")
PEFT_NAMES = {"lora": "LoRA", "ia3": "IA3", "adalora": "AdaLoRA", "dora": "DoRA", "loha": "LoHa"}
GATE_SUFFIX = {
    "none": "",
    "query_aware": " + IMSM",
    "no_query": " + IMSM w/o query",
    "fixed": " + IMSM w/o gate",
}
RANKLESS_GATES = ("none", "fixed")
TARGET_ORDER = ("mrpc", "cola", "ropes", "gsm8k")  # Table 1's columns
ORIGINAL = "original"
ALPHA = 0.05


class ReportError(Exception):
    """Nothing to report (no runs, or none of the requested table)."""


@dataclass(frozen=True, order=True)
class RowKey:
    """One table row: a method on a backbone (and a target when runs evaluate several datasets)."""

    backbone: str
    target: str
    peft: str
    gate: str
    gate_rank: int

    @property
    def vanilla(self) -> RowKey:
        return RowKey(self.backbone, self.target, self.peft, "none", 0)


@dataclass
class Cell:
    values: dict[int, float] = field(default_factory=dict)  # seed -> score (percent)
    failed: list[str] = field(default_factory=list)  # errors of failed seeds
    p_value: float | None = None

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values.values()) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else None


@dataclass
class Table:
    name: str
    setup: dict[str, Any]
    columns: list[str]
    rows: list[RowKey]
    cells: dict[tuple[RowKey, str], Cell]
    show_target: bool
    show_rank: bool
    forgetting: bool
    runs: list[dict[str, Any]]


# --- loading ------------------------------------------------------------------------------------------------------


def load_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every job's ``metrics.json`` under ``root`` (the per-dataset files under ``eval/`` etc. are skipped)."""
    root = Path(root)
    if not root.exists():
        raise ReportError(f"{root} does not exist")
    runs = []
    for path in sorted(root.rglob("metrics.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"warning: skipping unreadable {path}: {e}", file=sys.stderr)
            continue
        if isinstance(data, dict) and "status" in data and "backbone" in data:
            data["_path"] = str(path)
            data["_mtime"] = path.stat().st_mtime
            runs.append(data)
    return runs


def main_metric(metrics: dict[str, Any] | None) -> float | None:
    """The paper's metric of one dataset's metric dict, in percent."""
    for name in MAIN_METRICS:
        if metrics and isinstance(metrics.get(name), int | float):
            return 100.0 * float(metrics[name])
    return None


def eval_names(run: dict[str, Any]) -> list[str]:
    """The forgetting datasets a run was (or, failed, would have been) evaluated on, in config order."""
    names = run.get("eval_dataset_names")
    return list(names) if names is not None else list(run.get("eval_datasets") or {})


def setup_key(run: dict[str, Any]) -> str:
    """What must agree for runs to share a table: experiment, setup, evaluation datasets; speed vs training jobs."""
    setup = dict(run.get("setup") or {})
    setup["eval_datasets"] = eval_names(run)
    setup["kind"] = "speed" if "speed" in run or setup.get("speed") else "train"
    return json.dumps({"experiment": run.get("experiment"), "setup": setup}, sort_keys=True, default=str)


def dedupe(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per (choices, seed): a re-run replaces an older one instead of counting as another seed."""
    latest: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        key = (
            setup_key(run),
            run.get("backbone"),
            run.get("peft"),
            run.get("gate"),
            run.get("gate_rank"),
            run.get("dataset"),
            run.get("seed"),
        )
        if key not in latest or run["_mtime"] > latest[key]["_mtime"]:
            latest[key] = run
    return list(latest.values())


def group_runs(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs by ``setup_key``, named after the experiment (``table2``, ``table2_b`` for a second setup)."""
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_key[setup_key(run)].append(run)
    groups: dict[str, list[dict[str, Any]]] = {}
    for key in sorted(by_key, key=lambda k: (json.loads(k)["experiment"] or "", k)):
        group = by_key[key]
        base = group[0].get("experiment") or "runs"
        name, i = base, 0
        while name in groups:
            i += 1
            name = f"{base}_{chr(ord('a') + i)}"
        groups[name] = group
    return groups


# --- statistics ---------------------------------------------------------------------------------------------------


def paired_ttest(treated: dict[int, float], control: dict[int, float]) -> float | None:
    """Two-sided paired t-test over the seeds both have (``scipy.stats.ttest_rel``).

    None below 2 pairs, and when every pair differs by the same amount: the differences have no variance, the test
    is undefined (scipy would give p = 0 for a constant non-zero difference, a "significant" 2-seed tie of zeros).
    """
    from scipy.stats import ttest_rel

    seeds = sorted(set(treated) & set(control))
    if len(seeds) < 2 or len({round(treated[s] - control[s], 9) for s in seeds}) == 1:
        return None
    p = float(ttest_rel([treated[s] for s in seeds], [control[s] for s in seeds]).pvalue)
    return None if math.isnan(p) else p


# --- the table ----------------------------------------------------------------------------------------------------


def _order(value: str, order: tuple[str, ...]) -> tuple[int, str]:
    return (order.index(value), value) if value in order else (len(order), value)


def row_sort_key(row: RowKey, backbones: list[str], targets: list[str]) -> tuple:
    original = row.peft == ORIGINAL
    return (
        backbones.index(row.backbone),
        targets.index(row.target) if row.target in targets else -1,
        not original,
        _order(row.peft, PEFT_ORDER),
        _order(row.gate, GATE_ORDER),
        row.gate_rank,
    )


def build_table(name: str, runs: list[dict[str, Any]]) -> Table:
    """Cells of one group: trained rows from each run's scores, the Original row from its frozen-backbone scores."""
    forgetting = any(eval_names(r) for r in runs)
    # only learned gates have a rank (the fixed 0.5 mix records 0): a table with both is not a rank sweep
    ranks = {r.get("gate_rank") for r in runs if r.get("gate") not in RANKLESS_GATES}
    show_rank = len(ranks) > 1
    backbones, targets, columns = [], [], []
    for r in runs:
        for lst, v in ((backbones, r["backbone"]), (targets, r["dataset"])):
            if v not in lst:
                lst.append(v)
    targets.sort(key=lambda t: _order(t, TARGET_ORDER))
    columns += targets
    for r in runs:
        columns += [d for d in eval_names(r) if d not in columns]

    cells: dict[tuple[RowKey, str], Cell] = defaultdict(Cell)
    for r in runs:
        target = r["dataset"] if forgetting else ""
        rank = int(r.get("gate_rank") or 0) if show_rank and r.get("gate") not in RANKLESS_GATES else 0
        row = RowKey(r["backbone"], target, r["peft"], r["gate"], rank)
        original = RowKey(r["backbone"], target, ORIGINAL, "-", 0)
        seed = int(r.get("seed", 0))
        names = [r["dataset"], *[d for d in eval_names(r) if d != r["dataset"]]]
        if r["status"] != "ok":
            for d in names:
                cells[(row, d)].failed.append(str(r.get("error", "failed")))
            continue
        trained = {r["dataset"]: r.get("metrics"), **(r.get("eval_datasets") or {})}
        frozen = {r["dataset"]: r.get("base_metrics"), **(r.get("base_eval_datasets") or {})}
        for d in names:
            score = main_metric(trained.get(d))
            if score is not None:
                cells[(row, d)].values[seed] = score
            base = main_metric(frozen.get(d))
            if base is not None:  # identical for every seed and method; kept per run to show they agree
                cells[(original, d)].values[len(cells[(original, d)].values)] = base

    for (row, d), cell in cells.items():
        if row.peft != ORIGINAL and row.gate != "none" and (row.vanilla, d) in cells:
            cell.p_value = paired_ttest(cell.values, cells[(row.vanilla, d)].values)
    rows = sorted({row for row, _ in cells}, key=lambda r: row_sort_key(r, backbones, targets))
    setup = dict(runs[0].get("setup") or {})
    setup["eval_datasets"] = eval_names(runs[0])
    return Table(name, setup, columns, rows, dict(cells), forgetting, show_rank, forgetting, runs)


def method_label(row: RowKey, show_rank: bool) -> str:
    if row.peft == ORIGINAL:
        return "Original"
    label = PEFT_NAMES.get(row.peft, row.peft) + GATE_SUFFIX.get(row.gate, f" + gate {row.gate}")
    return f"{label} (r={row.gate_rank})" if show_rank and row.gate not in RANKLESS_GATES else label


def row_average(table: Table, row: RowKey) -> float | None:
    """Mean of the row's cell means, only when every column has one (an all-failed or missing cell: none)."""
    cells = [table.cells.get((row, c)) for c in table.columns]
    if not all(c is not None and c.mean is not None for c in cells):
        return None
    return statistics.fmean(c.mean for c in cells)  # type: ignore[union-attr,misc]


def seed_averages(table: Table, row: RowKey) -> dict[int, float]:
    """Per seed, the mean over all columns (seeds that scored every column only)."""
    cells = [table.cells.get((row, c)) for c in table.columns]
    if any(c is None for c in cells):
        return {}
    seeds = set.intersection(*(set(c.values) for c in cells))  # type: ignore[union-attr]
    return {s: statistics.fmean(c.values[s] for c in cells) for s in sorted(seeds)}  # type: ignore[union-attr]


def average_p_value(table: Table, row: RowKey) -> float | None:
    """The "p (Avg)" column: paired t-test of the per-seed averages, gated row vs its vanilla row."""
    if row.peft == ORIGINAL or row.gate == "none" or row.vanilla not in table.rows:
        return None
    return paired_ttest(seed_averages(table, row), seed_averages(table, row.vanilla))


def format_cell(cell: Cell | None, latex: bool = False) -> str:
    """``51.20 ± 1.30*``, ``51.20 ± 1.30 (1 failed)``, ``failed``, or ``missing`` for a run that never reported."""
    if cell is None:
        return "missing"
    if cell.mean is None:
        return "failed" if cell.failed else "missing"
    pm = r" $\pm$ " if latex else " ± "
    text = f"{cell.mean:.2f}" + (f"{pm}{cell.std:.2f}" if cell.std is not None else "")
    if cell.p_value is not None and cell.p_value < ALPHA:
        text += "$^*$" if latex else "*"
    if cell.failed:
        text += f" ({len(cell.failed)} failed)"
    return text


def table_rows(table: Table, latex: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and body of the main table, as strings."""
    header = [
        "backbone",
        *(["target"] if table.show_target else []),
        "method",
        *table.columns,
        "Avg",
        "p (Avg)",
    ]
    body = []
    for row in table.rows:
        original = row.peft == ORIGINAL
        cells = []
        for c in table.columns:
            cell = table.cells.get((row, c))
            if original and cell is not None and cell.mean is not None:  # one frozen model: no spread to show
                cells.append(f"{cell.mean:.2f}")
            else:
                cells.append(format_cell(cell, latex))
        avg, p = row_average(table, row), average_p_value(table, row)
        if avg is not None and p is not None and p < ALPHA:
            avg_text = f"{avg:.2f}" + ("$^*$" if latex else "*")
        else:
            avg_text = "-" if avg is None else f"{avg:.2f}"
        body.append(
            [
                row.backbone,
                *([row.target] if table.show_target else []),
                method_label(row, table.show_rank),
                *cells,
                avg_text,
                "-" if p is None else f"{p:.3g}",
            ]
        )
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def latex(header: list[str], body: list[list[str]], caption: str) -> str:
    def esc(s: str) -> str:
        return (
            s
            if "$" in s
            else s.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$").replace("Δ", r"$\Delta$")
        )

    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{esc(caption)}}}",
        r"\begin{tabular}{" + "l" * len(header) + "}",
        r"\toprule",
        " & ".join(esc(h) for h in header) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(esc(c) for c in r) + r" \\" for r in body]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def tidy_rows(table: Table) -> tuple[list[str], list[list[Any]]]:
    """One CSV row per cell: mean, std, seeds, failures, the t-test's p-value against the vanilla method."""
    header = [
        "backbone",
        "target",
        "method",
        "peft",
        "gate",
        "gate_rank",
        "dataset",
        "mean",
        "std",
        "n",
        "n_failed",
        "values",
        "p_value_vs_vanilla",
        "significant",
        "errors",
    ]
    rows = []
    for row in table.rows:
        for c in table.columns:
            cell = table.cells.get((row, c))
            if cell is None:
                continue
            values = [round(cell.values[s], 4) for s in sorted(cell.values)]
            rows.append(
                [
                    row.backbone,
                    row.target,
                    method_label(row, table.show_rank),
                    row.peft,
                    row.gate,
                    row.gate_rank,
                    c,
                    "" if cell.mean is None else round(cell.mean, 4),
                    "" if cell.std is None else round(cell.std, 4),
                    len(cell.values),
                    len(cell.failed),
                    json.dumps(values),
                    "" if cell.p_value is None else f"{cell.p_value:.6g}",
                    "" if cell.p_value is None else cell.p_value < ALPHA,
                    " | ".join(sorted(set(cell.failed))),
                ]
            )
        averages, p = seed_averages(table, row), average_p_value(table, row)
        if averages:
            values = [round(averages[s], 4) for s in sorted(averages)]
            rows.append(
                [
                    row.backbone,
                    row.target,
                    method_label(row, table.show_rank),
                    row.peft,
                    row.gate,
                    row.gate_rank,
                    "Avg",
                    round(statistics.fmean(values), 4),
                    round(statistics.stdev(values), 4) if len(values) > 1 else "",
                    len(values),
                    0,
                    json.dumps(values),
                    "" if p is None else f"{p:.6g}",
                    "" if p is None else p < ALPHA,
                    "",
                ]
            )
    return header, rows


# --- forgetting ---------------------------------------------------------------------------------------------------


def forgetting_matrix(
    table: Table,
) -> tuple[list[str], list[RowKey], dict[tuple[RowKey, str], tuple[float, float]]]:
    """Trained rows x evaluation datasets: (mean score, change vs the Original row) where both exist."""
    rows = [r for r in table.rows if r.peft != ORIGINAL]
    values: dict[tuple[RowKey, str], tuple[float, float]] = {}
    for row in rows:
        original = RowKey(row.backbone, row.target, ORIGINAL, "-", 0)
        for c in table.columns:
            cell, base = table.cells.get((row, c)), table.cells.get((original, c))
            if cell is not None and cell.mean is not None and base is not None and base.mean is not None:
                values[(row, c)] = (cell.mean, cell.mean - base.mean)
    return table.columns, rows, values


def row_label(table: Table, row: RowKey) -> str:
    target = f"{row.target}: " if row.target else ""
    return f"{row.backbone} {target}{method_label(row, table.show_rank)}"


def forgetting_tables(table: Table) -> tuple[list[str], list[list[str]]]:
    columns, rows, values = forgetting_matrix(table)
    header = ["backbone", "target", "method", *[f"{c} (Δ vs Original)" for c in columns]]
    body = []
    for row in rows:
        cells = []
        for c in columns:
            if (row, c) in values:
                score, delta = values[(row, c)]
                cells.append(f"{score:.2f} ({delta:+.2f})")
            else:
                cells.append(format_cell(table.cells.get((row, c))))
        body.append([row.backbone, row.target, method_label(row, table.show_rank), *cells])
    return header, body


def write_figure(fig: Any, path: Path) -> None:
    """PNG written atomically, like every other report file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def heatmap(table: Table, path: Path) -> None:
    """Change vs Original (points) per trained row and evaluation dataset; diverging colours, the score annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns, rows, values = forgetting_matrix(table)
    delta = np.full((len(rows), len(columns)), np.nan)
    for i, row in enumerate(rows):
        for j, c in enumerate(columns):
            if (row, c) in values:
                delta[i, j] = values[(row, c)][1]
    bound = float(np.nanmax(np.abs(delta))) if np.isfinite(delta).any() else 1.0
    bound = bound or 1.0
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 0.9 + 0.45 * len(rows)))
    im = ax.imshow(np.ma.masked_invalid(delta), cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [row_label(table, r) for r in rows])
    for i, row in enumerate(rows):
        for j, c in enumerate(columns):
            if (row, c) in values:
                score, d = values[(row, c)]
                color = "white" if abs(d) > 0.6 * bound else "black"  # readable on the darkest cells
                ax.text(j, i, f"{d:+.1f}\n({score:.1f})", ha="center", va="center", fontsize=7, color=color)
            else:
                cell = table.cells.get((row, c))
                ax.text(
                    j,
                    i,
                    "failed" if cell is not None and cell.failed else "missing",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="gray",
                )
    fig.colorbar(im, ax=ax, label="change vs Original (points)")
    ax.set_title(
        f"{table.name}: forgetting (score change vs the frozen backbone; score in brackets)", fontsize=9
    )
    write_figure(fig, path)
    plt.close(fig)


def rank_plot(table: Table, path: Path) -> None:
    """Score against gate rank, one line per backbone x method, one panel per evaluation dataset (Table 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = table.columns
    fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns), 3.2), squeeze=False)
    lines: dict[tuple[str, str, str], list[RowKey]] = defaultdict(list)
    for row in table.rows:
        if row.peft != ORIGINAL and row.gate != "none":
            lines[(row.backbone, row.target, row.peft)].append(row)
    for ax, c in zip(axes[0], columns, strict=True):
        for (backbone, _target, peft), rows in lines.items():
            pts = [(r.gate_rank, table.cells.get((r, c))) for r in sorted(rows, key=lambda r: r.gate_rank)]
            pts = [(k, cell) for k, cell in pts if cell is not None and cell.mean is not None]
            if pts:
                ax.errorbar(
                    [k for k, _ in pts],
                    [cell.mean for _, cell in pts],
                    yerr=[cell.std or 0.0 for _, cell in pts],
                    marker="o",
                    capsize=3,
                    label=f"{backbone} {PEFT_NAMES.get(peft, peft)} + IMSM",
                )
        for row in table.rows:
            cell = table.cells.get((row, c))
            if row.peft == ORIGINAL and cell is not None and cell.mean is not None:
                ax.axhline(
                    cell.mean, color="gray", linestyle="--", linewidth=1, label=f"{row.backbone} Original"
                )
        ax.set_title(c)
        ax.set_xlabel("gate rank")
        ax.set_xscale("log", base=2)
        ranks = sorted({r.gate_rank for rows in lines.values() for r in rows})
        ax.set_xticks(ranks, [str(k) for k in ranks])
        ax.minorticks_off()
        ax.set_ylabel("score (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{table.name}: score vs gate rank (mean ± std over seeds; dashed: Original)", fontsize=10)
    fig.tight_layout()
    write_figure(fig, path)
    plt.close(fig)


# --- speed (Table 5) ----------------------------------------------------------------------------------------------


def speed_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Backbone x method: vanilla and IMSM tokens/s and their ratio, mean ± std over seeds (repeated timings)."""
    by_row: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        slot = by_row[(r["backbone"], r["peft"])]
        if r["status"] != "ok":
            slot["failed"].append(r.get("error", "failed"))
            continue
        sp = r["speed"]
        slot["vanilla"].append(sp["tokens_per_s"]["vanilla"])
        slot["imsm"].append(sp["tokens_per_s"]["imsm"])
        slot["ratio"].append(sp["imsm/vanilla"])

    def fmt(xs: list[float], digits: int, failed: int) -> str:
        if not xs:
            return "failed"
        text = f"{statistics.fmean(xs):.{digits}f}" + (
            f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else ""
        )
        return text + (f" ({failed} failed)" if failed else "")

    header = ["backbone", "method", "vanilla tokens/s", "IMSM tokens/s", "IMSM / vanilla"]
    body = []
    for (backbone, peft), slot in sorted(
        by_row.items(), key=lambda kv: (kv[0][0], _order(kv[0][1], PEFT_ORDER))
    ):
        n_failed = len(slot["failed"])
        body.append(
            [
                backbone,
                PEFT_NAMES.get(peft, peft),
                fmt(slot["vanilla"], 1, n_failed),
                fmt(slot["imsm"], 1, n_failed),
                fmt(slot["ratio"], 3, n_failed),
            ]
        )
    return header, body


# --- the report ---------------------------------------------------------------------------------------------------


def describe_setup(setup: dict[str, Any], n_runs: int, n_failed: int) -> str:
    shown = {k: v for k, v in setup.items() if v not in (None, [], {})}
    return f"{n_runs} runs ({n_failed} failed); setup: " + ", ".join(f"{k}={v}" for k, v in shown.items())


def failures(runs: list[dict[str, Any]]) -> list[str]:
    return [
        f"- {r.get('backbone')} {r.get('peft')} {r.get('gate')} {r.get('dataset')} seed {r.get('seed')}: "
        f"{r.get('error')} ({Path(r['_path']).parent})"
        for r in runs
        if r["status"] != "ok"
    ]


def report_group(name: str, runs: list[dict[str, Any]], out: Path) -> str:
    """Write one group's files; returns its markdown section."""
    n_failed = sum(r["status"] != "ok" for r in runs)
    setup = runs[0].get("setup") or {}
    section = [f"## {name}", "", describe_setup(setup, len(runs), n_failed), ""]
    if any("speed" in r or (r.get("setup") or {}).get("speed") for r in runs):
        header, body = speed_rows(runs)
        md = markdown(header, body)
        write_text_atomic(out / f"{name}.md", md + "\n")
        write_text_atomic(out / f"{name}.csv", csv_text(header, body))
        write_text_atomic(out / f"{name}.tex", latex(header, body, f"{name}: decoding speed (tokens/s)"))
        section += [md, ""]
    else:
        table = build_table(name, runs)
        header, body = table_rows(table)
        md = markdown(header, body)
        section += [
            f"Score in % (MCC for CoLA, F1 for MRPC and ROPES, accuracy otherwise), mean ± std over seeds; "
            f"`*`: paired t-test vs the same method without the gate, p < {ALPHA}; p (Avg): that test on the "
            "per-seed average over the columns.",
            "",
            md,
            "",
        ]
        write_text_atomic(out / f"{name}.md", md + "\n")
        write_text_atomic(
            out / f"{name}.tex", latex(*table_rows(table, latex=True), f"{name} (mean $\\pm$ std)")
        )
        write_text_atomic(out / f"{name}.csv", csv_text(*tidy_rows(table)))
        p_header = ["backbone", "target", "method", *table.columns]
        p_body = [
            [
                r.backbone,
                r.target,
                method_label(r, table.show_rank),
                *[_p(table.cells.get((r, c))) for c in table.columns],
            ]
            for r in table.rows
            if r.peft != ORIGINAL
            and r.gate != "none"
            and r.vanilla in table.rows  # table6 has no vanilla rows
        ]
        if p_body:
            section += [
                "Paired t-test p-values (vs the same method without the gate, over common seeds):",
                "",
                markdown(p_header, p_body),
                "",
            ]
        if table.forgetting:
            f_header, f_body = forgetting_tables(table)
            f_md = markdown(f_header, f_body)
            write_text_atomic(out / f"{name}_forgetting.md", f_md + "\n")
            write_text_atomic(out / f"{name}_forgetting.csv", csv_text(f_header, f_body))
            write_text_atomic(out / f"{name}_forgetting.tex", latex(f_header, f_body, f"{name}: forgetting"))
            heatmap(table, out / f"{name}_forgetting.png")
            section += [
                "Forgetting: score (change vs Original), points:",
                "",
                f_md,
                "",
                f"![forgetting]({name}_forgetting.png)",
                "",
            ]
        if table.show_rank:
            rank_plot(table, out / f"{name}_rank.png")
            section += [f"![gate rank]({name}_rank.png)", ""]
    failed = failures(runs)
    if failed:
        section += ["Failed runs:", "", *failed, ""]
    return "\n".join(section)


def _p(cell: Cell | None) -> str:
    return "-" if cell is None or cell.p_value is None else f"{cell.p_value:.3g}"


def report(root: str | Path, table: str | None = None, out: str | Path | None = None) -> Path:
    """Collect runs under ``root``, write every group's files and ``report.md`` into ``out``; returns its path."""
    root = Path(root)
    runs = load_runs(root)
    if not runs:
        raise ReportError(
            f"no runs under {root}: no metrics.json written by imsm.train (did the sweep start?)"
        )
    if table:
        found = sorted({str(r.get("experiment")) for r in runs})
        runs = [r for r in runs if r.get("experiment") == table]
        if not runs:
            raise ReportError(f"no runs of experiment {table!r} under {root}; experiments found: {found}")
    runs = dedupe(runs)
    out = Path(out) if out else root / "report"
    sections = [f"# Report: {root}", ""]
    for name, group in group_runs(runs).items():
        sections.append(report_group(name, group, out))
    text = "\n".join(sections)
    write_text_atomic(out / "report.md", text)
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "path", help="a sweep directory (multirun/table2/...) or any directory above run directories"
    )
    p.add_argument("--table", help="only the runs of this experiment (table1 ... table6, table2_cpu, ...)")
    p.add_argument("--out", help="output directory (default: <path>/report)")
    args = p.parse_args(argv)
    try:
        path = report(args.path, args.table, args.out)
    except ReportError as e:
        print(f"imsm.report: {e}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"written: {path.parent}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
