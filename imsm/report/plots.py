"""Figures of a table, written as PNG beside it: the forgetting heatmap and the score-vs-gate-rank plot.

Both read a built ``Table`` (no numbers are computed here beyond what the table holds) and are written
atomically, like every other report file. matplotlib runs headless (Agg).
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from imsm.report.table import RowKey, Table


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figure(fig: Any, path: Path) -> None:
    """PNG written atomically (a reader never sees half a file)."""
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
    import numpy as np

    plt = _pyplot()
    columns = table.columns
    rows = [r for r in table.rows if not r.is_original]
    delta = np.full((len(rows), len(columns)), np.nan)
    for i, row in enumerate(rows):
        for j, c in enumerate(columns):
            change = table.change_vs_original(row, c)
            if change is not None:
                delta[i, j] = change[1]
    bound = float(np.nanmax(np.abs(delta))) if np.isfinite(delta).any() else 1.0
    bound = bound or 1.0
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 0.9 + 0.45 * len(rows)))
    im = ax.imshow(np.ma.masked_invalid(delta), cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [table.row_label(r) for r in rows])
    for i, row in enumerate(rows):
        for j, c in enumerate(columns):
            change = table.change_vs_original(row, c)
            if change is not None:
                score, d = change
                color = "white" if abs(d) > 0.6 * bound else "black"  # readable on the darkest cells
                ax.text(j, i, f"{d:+.1f}\n({score:.1f})", ha="center", va="center", fontsize=7, color=color)
            else:
                cell = table.cells.get((row, c))
                text = "failed" if cell is not None and cell.failed else "missing"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="gray")
    fig.colorbar(im, ax=ax, label="change vs Original (points)")
    ax.set_title(
        f"{table.name}: forgetting (score change vs the frozen backbone; score in brackets)", fontsize=9
    )
    write_figure(fig, path)
    plt.close(fig)


def rank_plot(table: Table, path: Path) -> None:
    """Score against gate rank, one line per backbone x method, one panel per evaluation dataset (Table 6)."""
    plt = _pyplot()
    columns = table.columns
    fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns), 3.2), squeeze=False)
    # one line per row that differs only in its gate rank
    lines: dict[RowKey, list[RowKey]] = defaultdict(list)
    for row in table.rows:
        if not row.is_original and row.gate != "none":
            lines[RowKey(row.backbone, row.target, row.peft, row.gate, 0, row.choices)].append(row)
    ranks = sorted({r.gate_rank for rows in lines.values() for r in rows})
    for ax, c in zip(axes[0], columns, strict=True):
        for line, rows in lines.items():
            pts = [(r.gate_rank, table.cells.get((r, c))) for r in sorted(rows, key=lambda r: r.gate_rank)]
            pts = [(k, cell) for k, cell in pts if cell is not None and cell.mean is not None]
            if pts:
                ax.errorbar(
                    [k for k, _ in pts],
                    [cell.mean for _, cell in pts],
                    yerr=[cell.std or 0.0 for _, cell in pts],
                    marker="o",
                    capsize=3,
                    label=table.row_label(line, show_rank=False),
                )
        for row in table.rows:
            cell = table.cells.get((row, c))
            if row.is_original and cell is not None and cell.mean is not None:
                ax.axhline(
                    cell.mean, color="gray", linestyle="--", linewidth=1, label=f"{row.backbone} Original"
                )
        ax.set_title(c)
        ax.set_xlabel("gate rank")
        if ranks and min(ranks) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(k) for k in ranks])
        ax.minorticks_off()
        ax.set_ylabel("score (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{table.name}: score vs gate rank (mean ± std over seeds; dashed: Original)", fontsize=10)
    fig.tight_layout()
    write_figure(fig, path)
    plt.close(fig)
