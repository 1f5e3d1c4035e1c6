"""Experiment tracking (``conf/logger/``): ``logger=wandb`` logs a run to Weights & Biases, ``logger=none`` nothing.

A W&B run gets the resolved config, the training curves (transformers' ``WandbCallback`` on the ``Trainer``), the
final metrics in its summary and a sample of predictions as a table. Its group is the experiment (``table2``), its
name the Hydra choices, so a sweep is one dashboard. Without an API key (``WANDB_API_KEY`` or a ``~/.netrc`` entry)
it logs offline into ``<run_dir>/wandb/`` (``wandb sync`` uploads it later); ``logger.mode`` or ``WANDB_MODE``
overrides that. Only the main process (``RANK`` 0) logs. ``read_offline_run`` reads such a directory back.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from imsm.record import flat_metrics


def enabled(cfg: DictConfig) -> bool:
    return (cfg.get("logger") or {}).get("name") == "wandb"


def has_api_key() -> bool:
    """An API key in the environment or in ``~/.netrc`` for the W&B host: online logging is possible."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str | None) -> str:
    """``logger.mode``, else ``WANDB_MODE``, else online with an API key and offline without."""
    return mode or os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def start(cfg: DictConfig, run_dir: Path) -> Any | None:
    """Open a W&B run for this job (main process only); ``None`` when ``logger=none``."""
    if not enabled(cfg) or not is_main_process():
        return None
    import wandb

    lg = cfg.logger
    run_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=lg.project,
        entity=lg.get("entity"),
        group=lg.get("group"),
        name=lg.get("run_name"),
        tags=list(lg.get("tags") or []),
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        dir=str(run_dir),
        mode=resolve_mode(lg.get("mode")),
        reinit="finish_previous",  # a multirun opens one run per job in the same process
    )


def trainer_callbacks(run: Any | None) -> list[Any]:
    """``LogProgress`` always; with a W&B run, transformers' ``WandbCallback`` (it reuses the run: loss / lr curves)."""
    callbacks: list[Any] = [LogProgress()]
    if run is None:
        return callbacks
    from transformers.integrations import WandbCallback

    return [*callbacks, WandbCallback()]


# --- the job's log file ----------------------------------------------------------------------------------------
PROGRESS = logging.getLogger("imsm.progress")  # under Hydra: into <run_dir>/train.log only


class LogProgress(TrainerCallback):
    """Trainer's log rows (loss, learning rate, grad norm, per ``logging_steps``) into the job's log file."""

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero and logs:
            PROGRESS.info("step %d: %s", state.global_step, json.dumps(logs))


def progress_to_file_only() -> None:
    """Under Hydra, ``PROGRESS`` records reach ``train.log`` but not the console (its progress bar shows them)."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.addFilter(_not_progress)


def _not_progress(record: logging.LogRecord) -> bool:
    return not record.name.startswith(PROGRESS.name)


def flatten_metrics(result: dict[str, Any]) -> dict[str, float]:
    """``{"<target>/<metric>": v, "<dataset>/<metric>": v, "original/<dataset>/<metric>": v}`` of a result."""
    flat: dict[str, float] = {}
    sections = [(result.get("dataset", "target"), result.get("metrics") or {}, "")]
    sections.append((result.get("dataset", "target"), result.get("base_metrics") or {}, "original/"))
    sections += [(n, m, "") for n, m in (result.get("eval_datasets") or {}).items()]
    sections += [(n, m, "original/") for n, m in (result.get("base_eval_datasets") or {}).items()]
    for name, metrics, prefix in sections:
        for k, v in flat_metrics(metrics, with_ci=True).items():
            flat[f"{prefix}eval/{name}/{k}"] = v
    return flat


def log_results(run: Any | None, cfg: DictConfig, result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Final metrics into the run summary, the first ``logger.predictions`` predictions as a table."""
    if run is None:
        return
    import wandb

    run.summary.update(flatten_metrics(result))
    for key in ("train_loss", "train_seconds", "eval_seconds", "wall_seconds", "status"):
        if key in result:
            run.summary[key] = result[key]
    run.summary["trainable_parameters"] = (result.get("trainable_parameters") or {}).get("total")
    sample = rows[: int(cfg.logger.get("predictions") or 0)]
    if sample:
        columns = ["prompt", "generation", "gold", "correct"]
        table = wandb.Table(
            columns=columns,
            data=[[json.dumps(r.get(c)) if c == "gold" else r.get(c) for c in columns] for r in sample],
        )
        run.log({"predictions": table})


def finish(run: Any | None, failed: bool = False) -> None:
    if run is not None:
        run.finish(exit_code=1 if failed else 0)


def finish_active(failed: bool = True) -> None:
    """Close a run left open by a job that raised (only if wandb was ever imported)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.finish(exit_code=1 if failed else 0)
