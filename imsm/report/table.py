"""One group of runs -> a ``Table``: rows (a method on a backbone) x columns (evaluation datasets) of ``Cell``s.

A row is backbone, target (when runs evaluate several datasets), PEFT method, gate, gate rank (when it is swept)
and the group's varying choices. Trained rows take each run's scores; the "Original" row takes the frozen
backbone's scores that every run also records. A gated cell gets the p-value of the paired t-test against its
control, the row with the same choices and no gate. Names come from ``labels`` (the config files).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from imsm.report.labels import gate_suffix, headline_score, peft_label
from imsm.report.runs import Run, choice_values, eval_names, natural, varying_keys
from imsm.report.stats import Cell, average_p_value, paired_ttest, row_average

ORIGINAL = "original"
# display order; names not listed come after, alphabetically
PEFT_ORDER = ("lora", "ia3", "adalora", "dora", "loha", "loramoe", "loramoe_nolbc")
GATE_ORDER = ("none", "query_aware", "no_query", "fixed")
TARGET_ORDER = ("mrpc", "cola", "ropes", "gsm8k")  # Table 1's columns
# gates without a learned rank (the fixed 0.5 mix records 0): beside learned gates they are no rank sweep
RANKLESS_GATES = ("none", "fixed")

Choices = tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class RowKey:
    """One table row: a method on a backbone (and a target when runs evaluate several datasets)."""

    backbone: str
    target: str
    peft: str
    gate: str
    gate_rank: int = 0
    choices: Choices = ()  # the group's varying choice keys, None where this row's runs did not set one

    @property
    def is_original(self) -> bool:
        return self.peft == ORIGINAL

    @property
    def original(self) -> RowKey:
        """The frozen backbone's row for the same backbone and target."""
        return RowKey(self.backbone, self.target, ORIGINAL, "-")

    def controls(self) -> list[RowKey]:
        """Rows this one is tested against, best first: same choices without the gate; then also without the
        ``gate.*`` choices, which a run without a gate need not set."""
        same = RowKey(self.backbone, self.target, self.peft, "none", 0, self.choices)
        ungated = tuple((k, None if k.startswith("gate.") else v) for k, v in self.choices)
        return [same] if ungated == self.choices else [same, same._with(ungated)]

    def _with(self, choices: Choices) -> RowKey:
        return RowKey(self.backbone, self.target, self.peft, self.gate, self.gate_rank, choices)


@dataclass
class Table:
    name: str
    setup: dict[str, Any]
    columns: list[str]  # evaluation datasets: the targets, then the forgetting datasets
    rows: list[RowKey]
    cells: dict[tuple[RowKey, str], Cell]
    show_target: bool
    show_rank: bool
    forgetting: bool
    runs: list[Run]
    choice_keys: list[str]  # the choices that vary between the runs (part of each row)

    def row_cells(self, row: RowKey) -> list[Cell | None]:
        return [self.cells.get((row, c)) for c in self.columns]

    def control(self, row: RowKey) -> RowKey | None:
        """The same method without the gate, when the table has it (Table 6 has no vanilla rows)."""
        if row.is_original or row.gate == "none":
            return None
        return next((c for c in row.controls() if c in self.rows), None)

    def average(self, row: RowKey) -> float | None:
        return row_average(self.row_cells(row))

    def average_p(self, row: RowKey) -> float | None:
        control = self.control(row)
        return average_p_value(self.row_cells(row), None if control is None else self.row_cells(control))

    def method_label(self, row: RowKey) -> str:
        return method_label(row, self.show_rank)

    def change_vs_original(self, row: RowKey, column: str) -> tuple[float, float] | None:
        """(mean score, its change vs the Original row) of a trained row's cell, where both have a mean."""
        cell, base = self.cells.get((row, column)), self.cells.get((row.original, column))
        if cell is None or cell.mean is None or base is None or base.mean is None:
            return None
        return cell.mean, cell.mean - base.mean

    def row_label(self, row: RowKey, show_rank: bool | None = None) -> str:
        """``smollm2 ropes: LoRA + IMSM``: a row named on its own (figure axes and legends)."""
        target = f"{row.target}: " if row.target else ""
        rank = self.show_rank if show_rank is None else show_rank
        return f"{row.backbone} {target}{method_label(row, rank)}"


def method_label(row: RowKey, show_rank: bool) -> str:
    """``LoRA + IMSM``, ``LoRA + IMSM (r=8)``, ``LoRA + IMSM (gate.pooling=max)``, ``Original``."""
    if row.is_original:
        return "Original"
    label = peft_label(row.peft) + gate_suffix(row.gate)
    parts = [f"r={row.gate_rank}"] if show_rank and row.gate not in RANKLESS_GATES else []
    parts += [f"{k}={v}" for k, v in row.choices if v is not None]
    return f"{label} ({', '.join(parts)})" if parts else label


def order_key(value: str, order: tuple[str, ...]) -> tuple[int, str]:
    return (order.index(value), value) if value in order else (len(order), value)


def _append_new(items: list[str], values: list[str]) -> None:
    items += [v for v in values if v not in items]


def build_table(name: str, runs: list[Run]) -> Table:
    """Cells of one group: trained rows from each run's scores, the Original row from its frozen-backbone scores."""
    records = [r.record for r in runs]
    forgetting = any(eval_names(r) for r in records)
    show_rank = len({r.gate_rank for r in records if r.gate not in RANKLESS_GATES}) > 1
    keys = varying_keys(runs)
    backbones: list[str] = []
    targets: list[str] = []
    for r in records:
        _append_new(backbones, [str(r.backbone)])
        _append_new(targets, [str(r.dataset)])
    targets.sort(key=lambda t: order_key(t, TARGET_ORDER))
    columns = list(targets)
    for r in records:
        _append_new(columns, eval_names(r))

    cells: dict[tuple[RowKey, str], Cell] = defaultdict(Cell)
    for r in records:
        dataset = str(r.dataset)
        rank = int(r.gate_rank or 0) if show_rank and r.gate not in RANKLESS_GATES else 0
        row = RowKey(
            str(r.backbone),
            dataset if forgetting else "",
            str(r.peft),
            str(r.gate),
            rank,
            choice_values(r, keys),
        )
        names = [dataset, *[d for d in eval_names(r) if d != dataset]]
        if not r.ok:
            for d in names:
                cells[(row, d)].failed.append(r.error or r.status)
            continue
        trained = {dataset: r.metrics, **(r.eval_datasets or {})}
        frozen = {dataset: r.base_metrics, **(r.base_eval_datasets or {})}
        for d in names:
            score = headline_score(d, trained.get(d))
            if score is not None:
                cells[(row, d)].values[int(r.seed or 0)] = score
            base = headline_score(d, frozen.get(d))
            if (
                base is not None
            ):  # the same frozen model for every seed and method: kept per run to show they agree
                original = cells[(row.original, d)]
                original.values[len(original.values)] = base

    def sort_key(row: RowKey) -> tuple:
        return (
            backbones.index(row.backbone),
            targets.index(row.target) if row.target in targets else -1,
            not row.is_original,
            order_key(row.peft, PEFT_ORDER),
            order_key(row.gate, GATE_ORDER),
            row.gate_rank,
            [natural(v) for _, v in row.choices],
        )

    rows = sorted({row for row, _ in cells}, key=sort_key)
    setup = {**records[0].setup, "eval_datasets": eval_names(records[0])}
    table = Table(name, setup, columns, rows, dict(cells), forgetting, show_rank, forgetting, runs, keys)
    for (row, d), cell in table.cells.items():
        control = table.control(row)
        if control is not None and (control, d) in table.cells:
            cell.p_value = paired_ttest(cell.values, table.cells[(control, d)].values)
    return table
