"""The numbers of a table: per-cell mean ± sample std over seeds, per-seed row averages, paired t-tests.

The unit of replication is the seed: a gated method is compared with the same method without the gate on the seeds
both ran (two-sided paired t-test, ``scipy.stats.ttest_rel``), per cell and on the per-seed average over the
columns (the "p (Avg)" column). A cell is marked at p < ``ALPHA`` (raw, as the paper marks); fewer than 2 common
seeds give no test. Every test of a table is also given its Holm-adjusted p-value (``holm``), the family being all
the table's tests, so a reader can see which marks survive the correction for testing many cells.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

ALPHA = 0.05


@dataclass
class Cell:
    """One row x dataset: the scores (percent) of the seeds that ran, the errors of those that failed."""

    values: dict[int, float] = field(default_factory=dict)  # seed -> score
    failed: list[str] = field(default_factory=list)
    p_value: float | None = None  # vs the same method without the gate
    p_holm: float | None = None  # p_value adjusted over the table's tests (``holm``)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values.values()) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else None

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < ALPHA


def paired_ttest(treated: dict[int, float], control: dict[int, float]) -> float | None:
    """Two-sided paired t-test over the seeds both have (``scipy.stats.ttest_rel``).

    None below 2 pairs, and when every pair differs by the same amount: the differences have no variance, the test
    is undefined (scipy would give p = 0 for a constant non-zero difference, a "significant" 2-seed tie of zeros).
    """
    from scipy.stats import ttest_rel

    seeds = sorted(set(treated) & set(control))
    if len(seeds) < 2 or len({round(treated[s] - control[s], 9) for s in seeds}) == 1:
        return None
    p = float(ttest_rel([treated[s] for s in seeds], [control[s] for s in seeds]).pvalue)
    return None if math.isnan(p) else p


def row_average(cells: list[Cell | None]) -> float | None:
    """Mean of a row's cell means, only when every column has one (an all-failed or missing cell: None)."""
    means = [c.mean if c is not None else None for c in cells]
    if not means or any(m is None for m in means):
        return None
    return statistics.fmean(means)  # type: ignore[arg-type]


def seed_averages(cells: list[Cell | None]) -> dict[int, float]:
    """Per seed, the mean over all columns (only the seeds that scored every column)."""
    if not cells or any(c is None for c in cells):
        return {}
    seeds = set.intersection(*(set(c.values) for c in cells))  # type: ignore[union-attr]
    return {s: statistics.fmean(c.values[s] for c in cells) for s in sorted(seeds)}  # type: ignore[union-attr]


def average_p_value(treated: list[Cell | None], control: list[Cell | None] | None) -> float | None:
    """The "p (Avg)" column: the paired t-test of the per-seed averages, gated row vs its row without the gate."""
    if control is None:
        return None
    return paired_ttest(seed_averages(treated), seed_averages(control))


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None: no test, left out of the family, kept None).

    Sorted ascending, the i-th smallest (1-based) of m becomes ``max over j <= i of min(1, (m - j + 1) p_(j))``:
    rejecting ``adjusted < alpha`` controls the family-wise error rate at alpha under any dependence.
    """
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(tested)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))  # monotone: never below a smaller p's adjustment
        adjusted[i] = running
    return adjusted
