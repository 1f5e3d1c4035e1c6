"""Figures of a table, written as PNG beside it: the forgetting heatmap, the score-vs-gate-rank plot, the gate boxes.

Both read a built ``Table`` (no numbers are computed here beyond what the table holds) and are written
atomically, like every other report file. matplotlib runs headless (Agg).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from imsm.io import atomic_path
from imsm.report.table import RowKey, Table


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figure(fig: Any, path: Path) -> None:
    """PNG written atomically (a reader never sees half a file)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")


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
    ticks = [f"{c} (gain)" if table.is_target_column(c) else c for c in columns]  # the trained-on dataset
    ax.set_xticks(range(len(columns)), ticks, rotation=30, ha="right")
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


def gate_plot(table: Table, gates: Any, path: Path) -> None:
    """One panel per gated row, one box per evaluated dataset, drawn from the gate's quantiles over answer positions.

    ``gates``: ``likelihood.gate_frame(table)`` (quantiles averaged over seeds). Whiskers q05-q95, box q25-q75,
    line the median, a dot the mean; the trained-on dataset is the orange box. The gate is the weight on the frozen
    stream (1: the frozen model), so the paper's mechanism predicts higher boxes on datasets foreign to the target.
    """
    plt = _pyplot()
    gates = gates.dropna(subset=["mean", *("q05", "q25", "q50", "q75", "q95")])
    if not len(gates):
        return
    panels = list(dict.fromkeys(zip(gates["backbone"], gates["target"], gates["method"], strict=True)))
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (backbone, target, method) in zip(axes.flat, panels, strict=False):
        mine = gates[
            (gates["backbone"] == backbone) & (gates["target"] == target) & (gates["method"] == method)
        ]
        stats = [
            {
                "label": d,
                "whislo": q05,
                "q1": q25,
                "med": q50,
                "q3": q75,
                "whishi": q95,
                "mean": mean,
                "fliers": [],
            }
            for d, q05, q25, q50, q75, q95, mean in zip(
                mine["dataset"],
                mine["q05"],
                mine["q25"],
                mine["q50"],
                mine["q75"],
                mine["q95"],
                mine["mean"],
                strict=True,
            )
        ]
        boxes = ax.bxp(stats, showmeans=True, patch_artist=True)
        for box, s in zip(boxes["boxes"], stats, strict=True):
            box.set_facecolor("tab:orange" if s["label"] == target else "tab:blue")
            box.set_alpha(0.6)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("gate (weight on the frozen stream)", fontsize=8)
        ax.set_title(f"{backbone} {target + ': ' if target else ''}{method}", fontsize=8)
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"{table.name}: gate over answer positions (q05-q95, mean over seeds; orange: target)", fontsize=9
    )
    fig.tight_layout()
    write_figure(fig, path)
    plt.close(fig)
