"""One group of runs -> a ``Table``: rows (a method on a backbone) x columns (a dataset's metric) of ``Cell``s.

A row is backbone, target (when runs evaluate several datasets), PEFT method, gate, gate rank (when it is swept)
and the group's varying choices. Columns are what the experiment's ``report:`` node declares (``columns``), else
each dataset's headline metric. Trained rows take each run's scores, one value per seed; the "Original" row is the
frozen backbone, one model scored once, so its cell holds one value (n = 1) however many runs carry a copy of it.
A gated cell gets the p-value of the paired t-test against its control, the row with the same choices and no gate,
and every test of the table its Holm-adjusted p-value. Names come from ``labels`` (the config files).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from imsm.record import RunRecord
from imsm.report.columns import Column, ReportSpec, report_spec
from imsm.report.labels import gate_suffix, peft_label
from imsm.report.runs import Run, choice_values, eval_names, natural, varying_keys
from imsm.report.stats import Cell, average_p_value, holm, paired_ttest, row_average

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
    columns: list[str]  # column names: the targets' metrics, then the forgetting datasets'
    rows: list[RowKey]
    cells: dict[tuple[RowKey, str], Cell]
    show_target: bool
    show_rank: bool
    forgetting: bool
    runs: list[Run]
    choice_keys: list[str]  # the choices that vary between the runs (part of each row)
    specs: dict[str, Column] = field(default_factory=dict)  # column name -> its dataset and metric
    targets: list[str] = field(default_factory=list)  # the datasets runs were trained on
    average_columns: list[str] = field(default_factory=list)  # what "Avg" averages (all columns by default)
    average_absent: list[str] = field(default_factory=list)  # declared for Avg, absent from these runs
    spec: ReportSpec = field(default_factory=ReportSpec)
    original_spread: dict[tuple[RowKey, str], float] = field(default_factory=dict)  # copies that disagree
    average_p_values: dict[RowKey, tuple[float | None, float | None]] = field(
        default_factory=dict
    )  # raw, Holm

    def row_cells(self, row: RowKey) -> list[Cell | None]:
        return [self.cells.get((row, c)) for c in self.columns]

    def average_cells(self, row: RowKey) -> list[Cell | None]:
        return [self.cells.get((row, c)) for c in self.average_columns]

    def is_target_column(self, column: str) -> bool:
        """In a forgetting table, a column of a dataset some row was trained on: its change is a gain."""
        return self.forgetting and self.specs[column].dataset in self.targets

    def is_gain(self, row: RowKey, column: str) -> bool:
        """The cell's change vs Original is the gain of training on it (the row's own target)."""
        return self.forgetting and row.target == self.specs[column].dataset

    def row_of(self, record: RunRecord) -> RowKey:
        """The row a run's scores go to (its Original row: ``.original``)."""
        rank = int(record.gate_rank or 0) if self.show_rank and record.gate not in RANKLESS_GATES else 0
        return RowKey(
            str(record.backbone),
            str(record.dataset) if self.forgetting else "",
            str(record.peft),
            str(record.gate),
            rank,
            choice_values(record, self.choice_keys),
        )

    def control(self, row: RowKey) -> RowKey | None:
        """The same method without the gate, when the table has it (Table 6 has no vanilla rows)."""
        if row.is_original or row.gate == "none":
            return None
        return next((c for c in row.controls() if c in self.rows), None)

    def average(self, row: RowKey) -> float | None:
        return row_average(self.average_cells(row)) if self.average_columns else None

    def average_p(self, row: RowKey) -> float | None:
        return self.average_p_values.get(row, (None, None))[0]

    def average_p_holm(self, row: RowKey) -> float | None:
        return self.average_p_values.get(row, (None, None))[1]

    def _average_test(self, row: RowKey) -> float | None:
        control = self.control(row)
        if control is None or not self.average_columns:
            return None
        return average_p_value(self.average_cells(row), self.average_cells(control))

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


def build_table(name: str, runs: list[Run], spec: ReportSpec | None = None) -> Table:
    """Cells of one group: trained rows from each run's scores, the Original row from its frozen-backbone scores.

    ``spec``: the columns and average (default: the ``report:`` node of the runs' experiment file).
    """
    records = [r.record for r in runs]
    spec = spec if spec is not None else report_spec(records[0].experiment)
    forgetting = any(eval_names(r) for r in records)
    show_rank = len({r.gate_rank for r in records if r.gate not in RANKLESS_GATES}) > 1
    backbones: list[str] = []
    targets: list[str] = []
    for r in records:
        _append_new(backbones, [str(r.backbone)])
        _append_new(targets, [str(r.dataset)])
    targets.sort(key=lambda t: order_key(t, TARGET_ORDER))
    datasets = list(targets)
    for r in records:
        _append_new(datasets, eval_names(r))
    columns = spec.columns_for(datasets)
    by_dataset: dict[str, list[Column]] = defaultdict(list)
    for c in columns:
        by_dataset[c.dataset].append(c)
    averaged, absent = spec.average_columns(columns)
    table = Table(
        name,
        {**records[0].setup, "eval_datasets": eval_names(records[0])},
        [c.name for c in columns],
        [],
        {},
        forgetting,
        show_rank,
        forgetting,
        runs,
        varying_keys(runs),
        specs={c.name: c for c in columns},
        targets=targets,
        average_columns=[c.name for c in averaged],
        average_absent=absent,
        spec=spec,
    )

    cells: dict[tuple[RowKey, str], Cell] = defaultdict(Cell)
    originals: dict[tuple[RowKey, str], list[float]] = defaultdict(list)
    for r in records:
        dataset = str(r.dataset)
        row = table.row_of(r)
        names = [dataset, *[d for d in eval_names(r) if d != dataset]]
        if not r.ok:
            for d in names:
                for c in by_dataset[d]:
                    cells[(row, c.name)].failed.append(r.error or r.status)
            continue
        trained = {dataset: r.metrics, **(r.eval_datasets or {})}
        frozen = {dataset: r.base_metrics, **(r.base_eval_datasets or {})}
        for d in names:
            for c in by_dataset[d]:
                score = c.score(trained.get(d))
                if score is not None:
                    cells[(row, c.name)].values[int(r.seed or 0)] = score
                base = c.score(frozen.get(d))
                if base is not None:  # every run carries a copy of the one frozen model's score
                    originals[(row.original, c.name)].append(base)
    for key, copies in originals.items():
        # one model scored once: n = 1 (copies agree within a sweep; their mean if another sweep's differ)
        cells[key].values = {0: statistics.fmean(copies)}
        if max(copies) - min(copies) > 1e-9:
            table.original_spread[key] = max(copies) - min(copies)

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

    table.rows = sorted({row for row, _ in cells}, key=sort_key)
    table.cells = dict(cells)
    for (row, c), cell in table.cells.items():
        control = table.control(row)
        if control is not None and (control, c) in table.cells:
            cell.p_value = paired_ttest(cell.values, table.cells[(control, c)].values)
    add_holm(table)
    return table


def add_holm(table: Table) -> None:
    """Holm-adjust the table's family of tests: every cell's and every row average's (the "p (Avg)")."""
    cells = [cell for cell in table.cells.values() if cell.p_value is not None]
    averages = {row: table._average_test(row) for row in table.rows}
    adjusted = holm([c.p_value for c in cells] + list(averages.values()))
    for cell, p in zip(cells, adjusted[: len(cells)], strict=True):
        cell.p_holm = p
    for (row, p), p_adj in zip(averages.items(), adjusted[len(cells) :], strict=True):
        table.average_p_values[row] = (p, p_adj)
