"""The forgetting curve: scores during training (``eval.every_n_steps`` / ``eval.at_steps``), vanilla against IMSM.

``python -m imsm.report.curves ROOT`` reads every job under ROOT (a sweep directory) that scored its sets during
training (``<run_dir>/eval_steps/step-<N>/<dataset>/metrics.json``) and writes ``ROOT/report/``:

- ``curves.csv``: one row per job, step, dataset and measure (tidy, for any plotting tool);
- ``curves.md``: per dataset and measure, the mean over seeds at each step, one row per gate (method);
- ``curves.png``: the same as lines, one panel per (dataset, measure).

Measures: the gold answer's NLL (``lik_nll``: the target's loss, and what the forgetting sets keep), its change
from the frozen model (``lik_delta_nll``: > 0 means forgotten) and ``lik_p_eos_first`` (the model would not
answer), when the scoring recorded them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from imsm.io import write_text_atomic
from imsm.record import flat_metrics
from imsm.report.plots import _pyplot, write_figure
from imsm.report.runs import load_runs

MEASURES = ("lik_nll", "lik_delta_nll", "lik_p_eos_first")
GATES = {"none": "vanilla", "query_aware": "IMSM", "no_query": "w/o query", "fixed": "w/o gate"}
Point = dict[str, Any]  # {job, gate, seed, step, dataset, measure, value}


def points(root: Path) -> list[Point]:
    """Every step score of every job under ``root``."""
    out: list[Point] = []
    for run in load_runs(root):
        job_dir = run.path.parent  # where the record is now (the run may have been moved since)
        for file in sorted(job_dir.glob("eval_steps/step-*/*/metrics.json")):
            step = int(file.parent.parent.name.removeprefix("step-"))
            data = json.loads(file.read_text())
            scores = flat_metrics(data.get("metrics", data))
            for measure in MEASURES:
                if measure in scores:
                    out.append(
                        {
                            "job": job_dir.name,
                            "gate": GATES.get(run.record.gate or "", run.record.gate),
                            "seed": run.record.seed,
                            "step": step,
                            "dataset": file.parent.name,
                            "measure": measure,
                            "value": scores[measure],
                        }
                    )
    return out


def means(found: list[Point]) -> dict[tuple[str, str], dict[str, dict[int, float]]]:
    """{(dataset, measure): {gate: {step: mean over seeds}}}."""
    grouped: dict[tuple[str, str], dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for p in found:
        grouped[(p["dataset"], p["measure"])][p["gate"]][p["step"]].append(p["value"])
    return {
        key: {gate: {s: mean(v) for s, v in sorted(steps.items())} for gate, steps in by_gate.items()}
        for key, by_gate in grouped.items()
    }


def markdown(curves: dict[tuple[str, str], dict[str, dict[int, float]]]) -> str:
    parts = []
    for (dataset, measure), by_gate in sorted(curves.items()):
        steps = sorted({s for series in by_gate.values() for s in series})
        lines = [
            f"### {dataset}: {measure} (mean over seeds)",
            "",
            "| method | " + " | ".join(f"step {s}" for s in steps) + " |",
        ]
        lines.append("|---|" + "---|" * len(steps))
        for gate, series in sorted(by_gate.items()):
            lines.append(
                f"| {gate} | " + " | ".join(f"{series[s]:.3f}" if s in series else "-" for s in steps) + " |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def figure(curves: dict[tuple[str, str], dict[str, dict[int, float]]], path: Path) -> None:
    plt = _pyplot()
    keys = sorted(curves)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for gate, series in sorted(curves[key].items()):
            ax.plot(list(series), list(series.values()), marker="o", label=gate)
        ax.set_title(f"{key[0]}: {key[1]}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    write_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="imsm.report.curves", description=__doc__)
    p.add_argument("root", type=Path, help="a sweep directory (or any directory above job run directories)")
    args = p.parse_args(argv)
    found = points(args.root)
    if not found:
        print(
            f"imsm.report.curves: no eval_steps under {args.root} (train with eval.every_n_steps=N)",
            file=sys.stderr,
        )
        return 1
    out = args.root / "report"
    columns = ["job", "gate", "seed", "step", "dataset", "measure", "value"]
    rows = [",".join(str(p[c]) for c in columns) for p in found]
    write_text_atomic(out / "curves.csv", "\n".join([",".join(columns), *rows]) + "\n")
    curves = means(found)
    text = markdown(curves)
    write_text_atomic(out / "curves.md", text)
    figure(curves, out / "curves.png")
    print(text + f"\nwrote {out / 'curves.csv'}, curves.md, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
