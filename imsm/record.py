"""The run record: what one job writes to ``<run_dir>/metrics.json`` and what ``imsm.report`` reads back.

One dataclass, one writer (``write_record``), one reader (``read_record``): the training run, a failed job, a
speed job and the dry run all fill the same fields, so a new field is added here once. Fields a job did not reach
stay None and are left out of the file; unknown keys in an old file are kept in ``extra`` rather than dropped.

``choices`` are the job's Hydra overrides as ``{key: value}`` strings (``{"gate.pooling": "max", "seed": "1"}``):
the report groups runs by every key that varies between them, so a sweep over any setting never merges into one cell.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imsm.io import write_json

RECORD_FILE = "metrics.json"
RECORDED = (
    "_imsm_record_written"  # set on an exception that must not (or need not) be written as a failed record
)
STATUSES = ("ok", "failed", "dry_run")


@dataclass
class RunRecord:
    """One job. Metric dicts are ``{metric: value}`` as ``imsm.metrics.score`` returns them."""

    status: str
    run_dir: str | None = None
    # --- the job's choices (what the report groups by)
    experiment: str | None = None
    backbone: str | None = None
    peft: str | None = None
    gate: str | None = None
    gate_rank: int | None = None
    dataset: str | None = None
    seed: int | None = None
    eval_dataset_names: list[str] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)
    # --- training
    train_examples: int | None = None
    truncated_prompts: int | None = None
    truncated_targets: int | None = None
    # rows left out as malformed (on_bad_row=skip), per split read: {"<dataset>/<split>": n}, zeros included (the
    # training split, then every evaluation split: ``EvalResult.skipped_rows``); None: not recorded by this job
    skipped_rows: dict[str, int] | None = None
    train_loss: float | None = None
    global_steps: int | None = None
    trainable_parameters: dict[str, int] | None = None
    train_seconds: float | None = None
    # --- evaluation: the target, then the forgetting sets; ``base_*`` the frozen backbone on the same examples
    metrics: dict[str, Any] | None = None
    base_metrics: dict[str, Any] | None = None
    eval_datasets: dict[str, dict[str, Any]] | None = None
    base_eval_datasets: dict[str, dict[str, Any]] | None = None
    eval_seconds: float | None = None
    wall_seconds: float | None = None
    # --- speed jobs (Table 5)
    speed: dict[str, Any] | None = None
    # --- failures
    error: str | None = None
    traceback: str | None = None
    record_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"run record status={self.status!r} is not one of {list(STATUSES)}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: None fields left out, ``extra`` merged back at the top level."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if v is not None}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        for key in ("eval_dataset_names", "setup", "choices"):
            if known.get(key) is None:
                known.pop(key, None)
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})


def write_record(run_dir: str | Path, record: RunRecord) -> Path:
    """``<run_dir>/metrics.json``, atomically."""
    path = Path(run_dir) / RECORD_FILE
    write_json(path, record.to_dict())
    return path


def is_record(data: Any) -> bool:
    """A job's record (not one of the per-dataset ``metrics.json`` files under ``eval/``)."""
    return isinstance(data, dict) and data.get("status") in STATUSES and "backbone" in data


def read_record(path: str | Path) -> RunRecord:
    """Parse one job's ``metrics.json``; a file that is not a record names itself in the error."""
    path = Path(path)
    data = json.loads(path.read_text())
    if not is_record(data):
        raise ValueError(
            f"{path} is not an imsm run record (needs 'status' in {list(STATUSES)} and 'backbone')"
        )
    return RunRecord.from_dict(data)


def flat_metrics(metrics: dict[str, Any] | None, with_ci: bool = False) -> dict[str, float]:
    """One dataset's metrics as ``{name: number}`` for tables and W&B.

    Plain numbers keep their names; the likelihood section's measures become ``lik_<name>`` (their mean; with
    ``with_ci`` also ``lik_<name>_ci_low`` / ``_ci_high``), the choice and gate sections ``choice_<name>`` and
    ``gate_<name>``.
    """
    flat: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            flat[key] = value
        elif key == "likelihood" and isinstance(value, dict):
            for name, stat in value.items():
                if isinstance(stat, dict) and stat.get("mean") is not None:
                    flat[f"lik_{name}"] = stat["mean"]
                    if with_ci and stat.get("ci"):
                        flat[f"lik_{name}_ci_low"], flat[f"lik_{name}_ci_high"] = stat["ci"]
        elif isinstance(value, dict):
            flat.update(
                {f"{key}_{k}": v for k, v in value.items() if isinstance(v, int | float) and v is not None}
            )
    return flat
