"""Run directories -> the paper's tables: mean ± std over seeds, paired t-tests, forgetting matrices, plots.

``python -m imsm.report multirun/table2 [--table table2] [--out DIR]`` reads every job's ``metrics.json``
(``imsm.record``) under the directory and writes, per group of comparable runs (``runs``):

- ``<name>.md`` / ``.tex`` / ``.csv``: rows = backbone x method (+ the choices a sweep varies, e.g.
  ``LoRA + IMSM (gate.pooling=max)``), plus the frozen backbone's "Original" row; columns = evaluation datasets and
  their average. A cell is the mean ± std over seeds of the dataset's headline metric (``conf/dataset/*.yaml``),
  in percent, marked ``*`` when the paired t-test against the same method without the gate gives p < 0.05
  (``stats``); the CSV is tidy, one row per cell with its p-value. A failed job shows in its cell (``failed``,
  ``(1 failed)``), never as a gap or a zero.
- ``<name>_forgetting.*`` and ``.png``: score and change vs Original per trained row and dataset (``plots``).
- ``<name>_rank.png`` when the gate rank varies (Table 6); for ``speed`` jobs (Table 5) a tokens/s table.

Modules: ``runs`` (load, dedupe, group), ``table`` (rows and cells), ``stats``, ``render`` (pandas -> Markdown,
LaTeX, CSV), ``plots``, ``labels`` (names and headline metrics from the config files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imsm.io import write_text_atomic
from imsm.report.labels import DEFAULT_HEADLINE, dataset_label, headline
from imsm.report.plots import heatmap, rank_plot
from imsm.report.render import (
    csv_text,
    forgetting_frame,
    latex,
    main_frame,
    markdown,
    p_value_frame,
    speed_frame,
    tidy_frame,
)
from imsm.report.runs import ReportError, Run, dedupe, group_runs, is_speed, load_runs
from imsm.report.stats import ALPHA, Cell, paired_ttest
from imsm.report.table import ORIGINAL, RowKey, Table, build_table, method_label

__all__ = [
    "ORIGINAL",
    "Cell",
    "ReportError",
    "RowKey",
    "Run",
    "Table",
    "build_table",
    "dedupe",
    "group_runs",
    "load_runs",
    "main",
    "method_label",
    "paired_ttest",
    "report",
]


def describe_setup(runs: list[Run]) -> str:
    n_failed = sum(not r.record.ok for r in runs)
    shown = {k: v for k, v in runs[0].record.setup.items() if v not in (None, [], {})}
    return f"{len(runs)} runs ({n_failed} failed); setup: " + ", ".join(f"{k}={v}" for k, v in shown.items())


def describe_scores(table: Table) -> str:
    """Which metric each column shows, from the datasets' ``headline`` (or the fallback order)."""
    shown = []
    for c in table.columns:
        names = headline(c)
        metric = f"first of {', '.join(names)}" if names == DEFAULT_HEADLINE else " / ".join(names)
        shown.append(f"{dataset_label(c)}: {metric}")
    split = f" Rows also split by the swept {', '.join(table.choice_keys)}." if table.choice_keys else ""
    return (
        f"Score in % ({'; '.join(shown)}), mean ± std over seeds; `*`: paired t-test vs the same method without "
        f"the gate, p < {ALPHA}; p (Avg): that test on the per-seed average over the columns.{split}"
    )


def failures(runs: list[Run]) -> list[str]:
    return [
        f"- {r.backbone} {r.peft} {r.gate} {r.dataset} seed {r.seed}: {r.error or r.status} ({run.path.parent})"
        for run in runs
        if not (r := run.record).ok
    ]


def write_all(out: Path, stem: str, md: str, tex: str, csv: str) -> None:
    write_text_atomic(out / f"{stem}.md", md + "\n")
    write_text_atomic(out / f"{stem}.tex", tex)
    write_text_atomic(out / f"{stem}.csv", csv)


def report_group(name: str, runs: list[Run], out: Path) -> str:
    """Write one group's files; returns its Markdown section of ``report.md``."""
    section = [f"## {name}", "", describe_setup(runs), ""]
    if any(is_speed(r.record) for r in runs):
        df = speed_frame(runs)
        md = markdown(df)
        write_all(out, name, md, latex(df, f"{name}: decoding speed (tokens/s)"), csv_text(df))
        section += [md, ""]
    else:
        table = build_table(name, runs)
        df = main_frame(table)
        md = markdown(df)
        write_all(out, name, md, latex(df, f"{name} (mean ± std)"), csv_text(tidy_frame(table)))
        section += [describe_scores(table), "", md, ""]
        p_values = p_value_frame(table)
        if len(p_values):
            section += [
                "Paired t-test p-values (vs the same method without the gate, over common seeds):",
                "",
                markdown(p_values),
                "",
            ]
        if table.forgetting:
            f_df = forgetting_frame(table)
            f_md = markdown(f_df)
            write_all(out, f"{name}_forgetting", f_md, latex(f_df, f"{name}: forgetting"), csv_text(f_df))
            heatmap(table, out / f"{name}_forgetting.png")
            section += ["Forgetting: score (change vs Original), points:", "", f_md, ""]
            section += [f"![forgetting]({name}_forgetting.png)", ""]
        if table.show_rank:
            rank_plot(table, out / f"{name}_rank.png")
            section += [f"![gate rank]({name}_rank.png)", ""]
    failed = failures(runs)
    if failed:
        section += ["Failed runs:", "", *failed, ""]
    return "\n".join(section)


def report(root: str | Path, table: str | None = None, out: str | Path | None = None) -> Path:
    """Collect runs under ``root``, write every group's files and ``report.md`` into ``out``; returns its path."""
    root = Path(root)
    runs = load_runs(root)
    if not runs:
        raise ReportError(
            f"no runs under {root}: no metrics.json written by imsm.train (did the sweep start?)"
        )
    if table:
        found = sorted({str(r.record.experiment) for r in runs})
        runs = [r for r in runs if r.record.experiment == table]
        if not runs:
            raise ReportError(f"no runs of experiment {table!r} under {root}; experiments found: {found}")
    out = Path(out) if out else root / "report"
    sections = [f"# Report: {root}", ""]
    for name, group in group_runs(dedupe(runs)).items():
        sections.append(report_group(name, group, out))
    write_text_atomic(out / "report.md", "\n".join(sections))
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="imsm-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
