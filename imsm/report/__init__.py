"""Run directories -> the paper's tables: mean ± std over seeds, paired t-tests, forgetting matrices, plots.

``python -m imsm.report multirun/table2 [--table table2] [--out DIR]`` reads every job's ``metrics.json``
(``imsm.record``) under the directory and writes, per group of comparable runs (``runs``):

- ``<name>.md`` / ``.tex`` / ``.csv``: rows = backbone x method (+ the choices a sweep varies, e.g.
  ``LoRA + IMSM (gate.pooling=max)``), plus the frozen backbone's "Original" row (one model: one value, n = 1);
  columns = what the experiment's ``report:`` node declares (``mrpc acc``, ``mrpc F1``; ``columns``), else each
  dataset's headline metric (``conf/dataset/*.yaml``), and "Avg" (the declared columns' mean, else all columns').
  A cell is the mean ± std over seeds in percent, marked ``*`` when the paired t-test against the same method
  without the gate gives p < 0.05 (``stats``); every p-value also has its Holm adjustment over the table's tests.
  The CSV is tidy, one row per cell. A failed job shows in its cell (``failed``, ``(1 failed)``), never a gap or 0.
- ``<name>_forgetting.*`` and ``.png``: per trained row, the target's gain vs Original and, for the other datasets,
  the score and its change vs Original (``plots``).
- ``<name>_likelihood.*`` / ``<name>_choice.*`` when runs recorded likelihood scoring, ``<name>_gate.png`` / ``.csv``
  when they recorded the gate's quantiles (``likelihood``).
- ``<name>_rank.png`` when the gate rank varies (Table 6); for ``speed`` jobs (Table 5) a tokens/s table.

Modules: ``runs`` (load, dedupe, group), ``columns`` (what each column shows), ``table`` (rows and cells),
``stats``, ``render`` (pandas -> Markdown, LaTeX, CSV), ``likelihood``, ``plots``, ``labels`` (names from the
config files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imsm.io import write_text_atomic
from imsm.report import likelihood
from imsm.report.columns import Column, ReportSpec, report_spec
from imsm.report.labels import DEFAULT_HEADLINE, dataset_label
from imsm.report.plots import gate_plot, heatmap, rank_plot
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
from imsm.report.stats import ALPHA, Cell, holm, paired_ttest
from imsm.report.table import ORIGINAL, RowKey, Table, build_table, method_label

__all__ = [
    "ORIGINAL",
    "Cell",
    "Column",
    "ReportError",
    "ReportSpec",
    "RowKey",
    "Run",
    "Table",
    "build_table",
    "dedupe",
    "group_runs",
    "holm",
    "load_runs",
    "main",
    "method_label",
    "paired_ttest",
    "report",
    "report_spec",
]


def describe_setup(runs: list[Run]) -> str:
    n_failed = sum(not r.record.ok for r in runs)
    shown = {k: v for k, v in runs[0].record.setup.items() if v not in (None, [], {})}
    return f"{len(runs)} runs ({n_failed} failed); setup: " + ", ".join(f"{k}={v}" for k, v in shown.items())


def describe_scores(table: Table) -> str:
    """Which metric each column shows (declared, or the datasets' ``headline``), what Avg averages, the tests."""
    shown = []
    for c in table.columns:
        spec = table.specs[c]
        names = spec.metrics
        metric = f"first of {', '.join(names)}" if names == DEFAULT_HEADLINE else " / ".join(names)
        shown.append(f"{c}: {dataset_label(spec.dataset)} {metric}")
    source = f" (declared in {table.spec.source})" if table.spec.declared or table.spec.average else ""
    if not table.average_columns:
        avg = "Avg: none of the declared columns ran."
    elif table.average_columns == table.columns:
        avg = f"Avg: the mean of the {len(table.columns)} columns{source}."
    else:
        avg = f"Avg: the mean of {', '.join(table.average_columns)}{source}."
    if table.average_absent:
        avg += f" Declared but not in these runs: {', '.join(table.average_absent)}."
    split = f" Rows also split by the swept {', '.join(table.choice_keys)}." if table.choice_keys else ""
    return (
        f"Score in % ({'; '.join(shown)}), mean ± std over seeds; Original: the frozen backbone, one model scored "
        f"once (n = 1). {avg} `*`: paired t-test vs the same method without the gate, raw p < {ALPHA} (as the "
        f"paper marks; Holm-adjusted p-values below and in the CSV); p (Avg): that test on the per-seed average "
        f"over the Avg columns.{split}"
    )


def original_warnings(table: Table) -> list[str]:
    """Original copies that disagree (runs of other sweeps in one group): their mean is shown, said so."""
    return [
        f"- Original {row.backbone} {c}: the runs' copies differ by up to {spread:.2f} points; their mean is shown"
        for (row, c), spread in table.original_spread.items()
    ]


def likelihood_sections(name: str, table: Table, out: Path) -> list[str]:
    """The likelihood, choice and gate tables/plot of a group, when its runs recorded them."""
    section: list[str] = []
    lk = likelihood.likelihood_frame(table)
    if len(lk):
        md = markdown(lk)
        tidy = csv_text(likelihood.tidy_frame(table))
        write_all(out, f"{name}_likelihood", md, latex(lk, f"{name}: delta NLL vs the frozen model"), tidy)
        section += [
            "Likelihood: Δ NLL vs the frozen model on the gold answer, nats/token (> 0: the answer became less "
            "likely: forgetting); one seed: [95% bootstrap CI over examples], several: ± std over seeds. "
            f"NLL, KL(frozen || model) and P(EOS first) in {name}_likelihood.csv.",
            "",
            md,
            "",
        ]
    choice = likelihood.choice_frame(table)
    if len(choice) and len(choice.columns) > 3:
        md = markdown(choice)
        write_all(
            out, f"{name}_choice", md, latex(choice, f"{name}: yes/no by log-likelihood"), csv_text(choice)
        )
        section += [
            "Choice scoring (log p(yes) vs log p(no)), in %, mean ± std over seeds:",
            "",
            md,
            "",
        ]
    gates = likelihood.gate_frame(table)
    if len(gates):
        gate_plot(table, gates, out / f"{name}_gate.png")
        write_text_atomic(out / f"{name}_gate.csv", csv_text(gates))
        section += [
            "Gate (weight on the frozen stream) over answer positions, quantiles averaged over seeds "
            f"({name}_gate.csv): the paper's mechanism predicts more weight on the frozen stream for datasets "
            "foreign to the training task.",
            "",
            f"![gate]({name}_gate.png)",
            "",
        ]
    return section


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
        section += original_warnings(table) + ([""] if table.original_spread else [])
        p_values = p_value_frame(table)
        if len(p_values):
            section += [
                "Paired t-test p-values (vs the same method without the gate, over common seeds), each with its "
                "Holm adjustment over the table's tests (every cell and Avg):",
                "",
                markdown(p_values),
                "",
            ]
        if table.forgetting:
            f_df = forgetting_frame(table)
            f_md = markdown(f_df)
            write_all(out, f"{name}_forgetting", f_md, latex(f_df, f"{name}: forgetting"), csv_text(f_df))
            heatmap(table, out / f"{name}_forgetting.png")
            section += [
                "Forgetting, points: the trained-on dataset's gain vs Original (score), the other datasets' score "
                "(change vs Original):",
                "",
                f_md,
                "",
            ]
            section += [f"![forgetting]({name}_forgetting.png)", ""]
        if table.show_rank:
            rank_plot(table, out / f"{name}_rank.png")
            section += [f"![gate rank]({name}_rank.png)", ""]
        section += likelihood_sections(name, table, out)
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
