"""Which numbers a table's columns show, and what its "Avg" averages: declared per experiment, else the defaults.

An experiment file may carry a ``report:`` node (``conf/experiment/table1.yaml``)::

    report:
      columns:                 # per dataset, the metric(s) shown, one column each, in this order
        mrpc: [accuracy, f1]   # -> columns "mrpc acc", "mrpc F1"
        ropes: [exact_match, f1]
      average: [mrpc.accuracy, mrpc.f1, cola.mcc, ropes.exact_match, ropes.f1, gsm8k.accuracy]

The report reads it at report time by the runs' experiment name (``table2_cpu`` -> ``table2.yaml``: a scale overlay
keeps the table's layout). Without a node, a dataset shows its ``headline`` (``conf/dataset/*.yaml``) in a column
named after the dataset alone, and "Avg" is the mean of every column, as before. In a table with a ``report`` node,
every column names its metric (``webq acc``), so a reader never has to guess which of a dataset's numbers it is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import imsm
from imsm.report.labels import conf_entry, headline
from imsm.report.runs import ReportError

# how a metric is named in a column header (the paper's abbreviations); other names print as themselves
METRIC_LABEL = {"accuracy": "acc", "f1": "F1", "mcc": "MCC", "exact_match": "EM", "auroc": "AUROC"}


class ColumnSpecError(ReportError, ValueError):
    """A ``report:`` node that names no metric or an unknown column (the CLI prints it, exit code 2)."""


@dataclass(frozen=True)
class Column:
    """One column of a table: a dataset's metric (first present of ``metrics``), shown under ``name``."""

    name: str  # the header: "mrpc acc", or "mrpc" for an undeclared dataset in an undeclared table
    dataset: str
    metrics: tuple[str, ...]  # preference order: the first the metric dict holds is the score

    def score(self, metrics: dict[str, Any] | None) -> float | None:
        """This column's number from one metric dict, in percent; None when the dict lacks every metric."""
        for name in self.metrics:
            value = (metrics or {}).get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return 100.0 * float(value)
        return None

    @property
    def key(self) -> str:
        """``mrpc.accuracy``: how a ``report.average`` list names this column (dataset alone when undeclared)."""
        return f"{self.dataset}.{self.metrics[0]}" if len(self.metrics) == 1 else self.dataset


def metric_label(metric: str) -> str:
    return METRIC_LABEL.get(metric, metric)


@dataclass(frozen=True)
class ReportSpec:
    """The ``report:`` node of an experiment: per-dataset metrics and the Avg's column keys (None: defaults)."""

    source: str | None = None  # the file it came from, for messages
    columns: dict[str, tuple[str, ...]] | None = None
    average: tuple[str, ...] | None = None

    @property
    def declared(self) -> bool:
        return self.columns is not None

    def columns_for(self, datasets: list[str]) -> list[Column]:
        """The table's columns for these datasets (their order kept), each expanded into its metrics."""
        if self.columns is None:
            return [Column(d, d, headline(d)) for d in datasets]
        out = []
        for d in datasets:
            metrics = self.columns.get(d) or headline(d)[:1]  # undeclared dataset: its first headline metric
            out += [Column(f"{d} {metric_label(m)}", d, (m,)) for m in metrics]
        return out

    def average_columns(self, columns: list[Column]) -> tuple[list[Column], list[str]]:
        """(the columns "Avg" averages, the declared keys these runs lack); all columns when undeclared."""
        if self.average is None:
            return list(columns), []
        by_key = {c.key: c for c in columns}
        return [by_key[k] for k in self.average if k in by_key], [k for k in self.average if k not in by_key]


def _as_tuple(value: Any, where: str) -> tuple[str, ...]:
    values = (value,) if isinstance(value, str) else tuple(value or ())
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ColumnSpecError(f"{where}: expected a metric name or a list of them, got {value!r}")
    return values


def parse_spec(node: Any, source: str) -> ReportSpec:
    """A ``report:`` node as a ``ReportSpec``; a malformed one names the file, the key and what it expected."""
    if node is None:
        return ReportSpec(source)
    if not isinstance(node, dict) or set(node) - {"columns", "average"}:
        raise ColumnSpecError(f"{source}: report must be a mapping with keys columns, average; got {node!r}")
    columns = node.get("columns")
    if columns is not None and not isinstance(columns, dict):
        raise ColumnSpecError(f"{source}: report.columns must map a dataset to its metrics, got {columns!r}")
    parsed = {str(d): _as_tuple(m, f"{source}: report.columns.{d}") for d, m in (columns or {}).items()}
    average = node.get("average")
    keys = None if average is None else _as_tuple(average, f"{source}: report.average")
    if keys is not None and columns is not None:
        known = {f"{d}.{m}" for d, ms in parsed.items() for m in ms}
        unknown = [k for k in keys if "." in k and k.split(".")[0] in parsed and k not in known]
        if unknown:
            raise ColumnSpecError(
                f"{source}: report.average names {unknown}, not among the declared columns {sorted(known)}"
            )
    return ReportSpec(source, parsed if columns is not None else None, keys)


def experiment_file(experiment: str | None) -> str | None:
    """The experiment file a run's name comes from: ``table2`` itself, or ``table2`` for ``table2_<scale>``."""
    if not experiment:
        return None
    if conf_entry("experiment", experiment):
        return experiment
    for scale in sorted(p.stem for p in (imsm.CONF_DIR / "scale").glob("*.yaml")):
        base = experiment.removesuffix(f"_{scale}")
        if base != experiment and conf_entry("experiment", base):
            return base
    return None


@functools.cache
def report_spec(experiment: str | None) -> ReportSpec:
    """The ``report:`` node of the runs' experiment file (``ReportSpec()`` when it has none or there is none)."""
    name = experiment_file(experiment)
    if name is None:
        return ReportSpec()
    return parse_spec(conf_entry("experiment", name).get("report"), f"conf/experiment/{name}.yaml")
