"""The quickstart's table: what the target learned and what the model kept, frozen vs vanilla vs IMSM.

``python -m imsm.report.quickstart outputs/quickstart`` (``make run`` prints it) reads the sweep's job records and
writes ``<dir>/quickstart.md``: one row per measure, one column per model. The frozen backbone's numbers come from
the same records (``base_*``: scored on the same examples). Lower NLL is better; P(EOS first) is the probability
that the model's first answer token is end-of-sequence, i.e. that it would not answer at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from imsm.record import RunRecord
from imsm.report.runs import load_runs

# (label, dataset role, path inside a dataset's metrics)
MEASURES: list[tuple[str, str, tuple[str, ...]]] = [
    ("target: gold answer NLL (nats/token, lower = learned)", "target", ("likelihood", "nll", "mean")),
    ("target: yes/no choice accuracy", "target", ("choice", "accuracy")),
    ("kept: gold answer NLL (nats/token)", "kept", ("likelihood", "nll", "mean")),
    ("kept: P(EOS first) (would not answer)", "kept", ("likelihood", "p_eos_first", "mean")),
    ("kept: greedy answer contains gold", "kept", ("accuracy",)),
]
COLUMNS = {"none": "vanilla LoRA", "query_aware": "LoRA + IMSM"}


def lookup(metrics: dict[str, Any] | None, path: tuple[str, ...]) -> float | None:
    node: Any = metrics
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, int | float) else None


def table(records: list[RunRecord]) -> str:
    """Markdown: measures x (frozen, vanilla, IMSM); the kept set is the first forgetting dataset."""
    by_gate = {r.gate: r for r in records if r.ok}
    if not by_gate:
        raise ValueError(
            "no finished job in the quickstart directory (see each job's metrics.json for its error)"
        )
    first = next(iter(by_gate.values()))
    target, kept = first.dataset, (first.eval_dataset_names or [None])[0]
    header = ["measure", "frozen model", *(COLUMNS.get(g, g) for g in by_gate)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, role, path in MEASURES:
        name = target if role == "target" else kept

        def of(record: RunRecord, base: bool, name: str = name, role: str = role) -> dict[str, Any] | None:
            if role == "target":
                return record.base_metrics if base else record.metrics
            return ((record.base_eval_datasets if base else record.eval_datasets) or {}).get(name)

        cells = [
            lookup(of(first, base=True), path),
            *(lookup(of(r, base=False), path) for r in by_gate.values()),
        ]
        if all(c is None for c in cells):
            continue
        shown = ["-" if c is None else f"{c:.3f}" for c in cells]
        lines.append(
            f"| {label.replace('target', target).replace('kept', str(kept))} | " + " | ".join(shown) + " |"
        )
    steps = first.global_steps
    lines.append("")
    lines.append(
        f"{first.backbone}, {steps} optimizer steps on {first.train_examples} {target} examples, one seed "
        f"({first.seed}); {target} and {kept} scored on the same examples for every column. A demonstration, not a "
        "result: docs/results-forgetting-cpu.md is the powered experiment."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="imsm.report.quickstart", description=__doc__)
    p.add_argument("dir", type=Path, help="the quickstart's sweep directory (outputs/quickstart)")
    args = p.parse_args(argv)
    runs = load_runs(args.dir)
    records = [r.record for r in sorted(runs, key=lambda r: r.mtime) if r.record.experiment == "quickstart"]
    try:
        text = table(records)
    except ValueError as e:
        print(f"imsm.report.quickstart: {e}", file=sys.stderr)
        return 1
    (args.dir / "quickstart.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
