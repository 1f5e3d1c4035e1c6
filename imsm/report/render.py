"""Tables as pandas DataFrames of display strings, written as Markdown (``to_markdown``), LaTeX and CSV.

Each table is built once as a DataFrame in plain text (``51.20 ± 1.30*``) and every format is a view of it: the
LaTeX writer only escapes (``±`` -> ``$\\pm$``, ``*`` -> ``$^*$``). The CSV of the main table is tidy instead: one
row per cell with its per-seed values, std, failures, raw and Holm-adjusted p-values, for analysis outside this
package. The Original row is one frozen model scored once: its cells show the single value (n = 1), no std, no test.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Any

import pandas as pd

from imsm.report.labels import peft_label
from imsm.report.runs import Run, choice_values, natural, varying_keys
from imsm.report.stats import ALPHA, Cell, seed_averages
from imsm.report.table import PEFT_ORDER, Table, order_key

# --- writers ------------------------------------------------------------------------------------------------------


def markdown(df: pd.DataFrame) -> str:
    """GitHub pipe table; cells kept as written (no number parsing: ``40.00`` stays ``40.00``)."""
    return df.to_markdown(index=False, disable_numparse=True)


def latex_text(text: Any) -> str:
    """Plain display text as LaTeX: special characters escaped, ``±``, ``Δ`` and the ``*`` mark as math."""
    text = str(text)
    for plain, tex in (
        ("$", r"\$"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("#", r"\#"),
        ("_", r"\_"),
        ("±", r"$\pm$"),
        ("Δ", r"$\Delta$"),
        ("*", r"$^*$"),
    ):
        text = text.replace(plain, tex)
    return text


def latex(df: pd.DataFrame, caption: str) -> str:
    """A booktabs ``table`` environment (``\\toprule`` ... ``\\bottomrule``), every column left-aligned."""
    tex = df.map(latex_text).rename(columns=latex_text)
    text = tex.to_latex(
        index=False, escape=False, caption=latex_text(caption), position="t", column_format="l" * df.shape[1]
    )
    return text.replace("\\begin{table}[t]\n", "\\begin{table}[t]\n\\centering\n", 1)


def csv_text(df: pd.DataFrame) -> str:
    return df.to_csv(index=False, lineterminator="\n")


# --- cells --------------------------------------------------------------------------------------------------------


def format_cell(cell: Cell | None) -> str:
    """``51.20 ± 1.30*``, ``51.20 ± 1.30 (1 failed)``, ``failed``, or ``missing`` for a run that never reported."""
    if cell is None:
        return "missing"
    if cell.mean is None:
        return "failed" if cell.failed else "missing"
    text = f"{cell.mean:.2f}" + (f" ± {cell.std:.2f}" if cell.std is not None else "")
    if cell.significant:
        text += "*"
    if cell.failed:
        text += f" ({len(cell.failed)} failed)"
    return text


def format_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def format_p_holm(p: float | None, p_holm: float | None) -> str:
    """``0.0039 (Holm 0.023)``: the raw p-value beside its Holm adjustment over the table's tests."""
    return "-" if p is None else f"{p:.3g} (Holm {format_p(p_holm)})"


def _row_fields(table: Table, row: Any, target: bool) -> dict[str, str]:
    fields = {"backbone": row.backbone}
    if target:
        fields["target"] = row.target
    fields["method"] = table.method_label(row)
    return fields


# --- the main table -----------------------------------------------------------------------------------------------


def main_frame(table: Table) -> pd.DataFrame:
    """Rows x evaluation datasets, then ``Avg`` (of the cell means) and ``p (Avg)`` (its t-test)."""
    records = []
    for row in table.rows:
        record = _row_fields(table, row, table.show_target)
        for c in table.columns:
            cell = table.cells.get((row, c))
            if row.is_original and cell is not None and cell.mean is not None:
                record[c] = f"{cell.mean:.2f}"  # one frozen model: no spread to show
            else:
                record[c] = format_cell(cell)
        avg, p = table.average(row), table.average_p(row)
        record["Avg"] = "-" if avg is None else f"{avg:.2f}" + ("*" if p is not None and p < ALPHA else "")
        record["p (Avg)"] = format_p(p)
        records.append(record)
    header = [
        "backbone",
        *(["target"] if table.show_target else []),
        "method",
        *table.columns,
        "Avg",
        "p (Avg)",
    ]
    return pd.DataFrame(records, columns=header)


def p_value_frame(table: Table) -> pd.DataFrame:
    """The p-values of the gated rows that have a control row, each beside its Holm adjustment (empty: none)."""
    records = []
    for row in table.rows:
        if table.control(row) is None:
            continue
        record = _row_fields(table, row, True)
        for c in table.columns:
            cell = table.cells.get((row, c))
            record[c] = "-" if cell is None else format_p_holm(cell.p_value, cell.p_holm)
        record["Avg"] = format_p_holm(table.average_p(row), table.average_p_holm(row))
        records.append(record)
    return pd.DataFrame(records, columns=["backbone", "target", "method", *table.columns, "Avg"])


def tidy_frame(table: Table) -> pd.DataFrame:
    """One row per cell (and per row's ``Avg``): mean, std, per-seed values, failures, p-value vs the control."""
    records = []
    for row in table.rows:
        fields = {
            "backbone": row.backbone,
            "target": row.target,
            "method": table.method_label(row),
            "peft": row.peft,
            "gate": row.gate,
            "gate_rank": row.gate_rank,
            **{k: v for k, v in row.choices},
        }
        for c in table.columns:
            cell = table.cells.get((row, c))
            if cell is None:
                continue
            values = [round(cell.values[s], 4) for s in sorted(cell.values)]
            spec = table.specs[c]
            records.append(
                {
                    **fields,
                    "column": c,
                    "dataset": spec.dataset,
                    "metric": " / ".join(spec.metrics),
                    "mean": None if cell.mean is None else round(cell.mean, 4),
                    "std": None if cell.std is None else round(cell.std, 4),
                    "n": len(cell.values),
                    "n_failed": len(cell.failed),
                    "values": json.dumps(values),
                    "p_value_vs_vanilla": None if cell.p_value is None else f"{cell.p_value:.6g}",
                    "p_holm": None if cell.p_holm is None else f"{cell.p_holm:.6g}",
                    "significant": None if cell.p_value is None else cell.significant,
                    "errors": " | ".join(sorted(set(cell.failed))),
                }
            )
        averages = seed_averages(table.average_cells(row)) if table.average_columns else {}
        p, p_holm = table.average_p(row), table.average_p_holm(row)
        if averages:
            values = [round(averages[s], 4) for s in sorted(averages)]
            records.append(
                {
                    **fields,
                    "column": "Avg",
                    "dataset": "Avg",
                    "metric": "mean of " + ", ".join(table.average_columns),
                    "mean": round(statistics.fmean(values), 4),
                    "std": round(statistics.stdev(values), 4) if len(values) > 1 else None,
                    "n": len(values),
                    "n_failed": 0,
                    "values": json.dumps(values),
                    "p_value_vs_vanilla": None if p is None else f"{p:.6g}",
                    "p_holm": None if p_holm is None else f"{p_holm:.6g}",
                    "significant": None if p is None else p < ALPHA,
                    "errors": "",
                }
            )
    header = ["backbone", "target", "method", "peft", "gate", "gate_rank", *table.choice_keys, "column"]
    header += ["dataset", "metric", "mean", "std", "n", "n_failed", "values", "p_value_vs_vanilla", "p_holm"]
    header += ["significant", "errors"]
    return pd.DataFrame(records, columns=header)


# --- forgetting ---------------------------------------------------------------------------------------------------


def forgetting_header(table: Table, column: str) -> str:
    """``ropes EM (gain vs Original)`` for a trained-on dataset, ``webq (Δ vs Original)`` for the others."""
    if not table.is_target_column(column):
        return f"{column} (Δ vs Original)"
    rows = [r for r in table.rows if not r.is_original and (r, column) in table.cells]
    if all(table.is_gain(r, column) for r in rows):
        return f"{column} (gain vs Original)"
    return f"{column} (gain vs Original where trained on it, else Δ)"  # a target of some rows, forgetting of others


def forgetting_frame(table: Table) -> pd.DataFrame:
    """Trained rows x evaluation datasets, else the cell's failed / missing.

    A target column shows the gain of training, ``+16.33 (56.33)`` (gain, then the score); a forgetting column the
    score and its change, ``30.00 (-5.00)``.
    """
    records = []
    for row in table.rows:
        if row.is_original:
            continue
        record = _row_fields(table, row, True)
        for c in table.columns:
            change = table.change_vs_original(row, c)
            if change is None:
                text = format_cell(table.cells.get((row, c)))
            elif table.is_gain(row, c):
                text = f"{change[1]:+.2f} ({change[0]:.2f})"
            else:
                text = f"{change[0]:.2f} ({change[1]:+.2f})"
            record[forgetting_header(table, c)] = text
        records.append(record)
    columns = ["backbone", "target", "method", *[forgetting_header(table, c) for c in table.columns]]
    return pd.DataFrame(records, columns=columns)


# --- speed (Table 5) ----------------------------------------------------------------------------------------------


def speed_frame(runs: list[Run]) -> pd.DataFrame:
    """Backbone x method: vanilla and IMSM tokens/s and their ratio, mean ± std over seeds (repeated timings)."""
    keys = varying_keys(runs)
    by_row: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        r = run.record
        slot = by_row[(str(r.backbone), str(r.peft), choice_values(r, keys))]
        if not r.ok or not r.speed:
            slot["failed"].append(r.error or (r.status if not r.ok else "no speed measurement"))
            continue
        slot["vanilla"].append(r.speed["tokens_per_s"]["vanilla"])
        slot["imsm"].append(r.speed["tokens_per_s"]["imsm"])
        slot["ratio"].append(r.speed["imsm/vanilla"])

    def fmt(xs: list[float], digits: int, failed: int) -> str:
        if not xs:
            return "failed"
        text = f"{statistics.fmean(xs):.{digits}f}"
        text += f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else ""
        return text + (f" ({failed} failed)" if failed else "")

    def sort_key(key: tuple) -> tuple:
        backbone, peft, choices = key
        return (backbone, order_key(peft, PEFT_ORDER), [natural(v) for _, v in choices])

    records = []
    for key in sorted(by_row, key=sort_key):
        backbone, peft, choices = key
        slot, n_failed = by_row[key], len(by_row[key]["failed"])
        extra = ", ".join(f"{k}={v}" for k, v in choices if v is not None)
        records.append(
            {
                "backbone": backbone,
                "method": peft_label(peft) + (f" ({extra})" if extra else ""),
                "vanilla tokens/s": fmt(slot["vanilla"], 1, n_failed),
                "IMSM tokens/s": fmt(slot["imsm"], 1, n_failed),
                "IMSM / vanilla": fmt(slot["ratio"], 3, n_failed),
            }
        )
    return pd.DataFrame(
        records, columns=["backbone", "method", "vanilla tokens/s", "IMSM tokens/s", "IMSM / vanilla"]
    )
