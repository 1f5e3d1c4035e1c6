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

import torch
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
        group=lg.get("group") or sweep_group(),
        name=lg.get("run_name"),
        tags=list(lg.get("tags") or []),
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        dir=str(run_dir),
        mode=resolve_mode(lg.get("mode")),
        reinit="finish_previous",  # a multirun opens one run per job in the same process
    )


def trainer_callbacks(run: Any | None, model: Any = None) -> list[Any]:
    """``GateStats`` (a model with a learned gate), ``LogProgress`` always; with a W&B run, transformers'
    ``WandbCallback`` (it reuses the run: loss, lr and the gate's curves). Order matters: each sees the log rows the
    ones before it added."""
    callbacks: list[Any] = []
    if (
        model is not None
        and getattr(model, "gate", None) is not None
        and next(model.gate.parameters(), None) is not None
    ):
        callbacks.append(GateStats(model))
    callbacks.append(LogProgress())
    if run is None:
        return callbacks
    from transformers.integrations import WandbCallback

    return [*callbacks, WandbCallback()]


class GateStats(TrainerCallback):
    """The gate during training, added to every log row: ``gate_mean`` / ``gate_std`` of g over the trained
    positions (those predicting a response token; every feature), since the previous row.

    g near 1 keeps the frozen model's state, near 0 the tuned one's. ``IMSMModel.forward`` mixes the streams at the
    trained positions only, so in training the gate's output is (n_positions, d): a forward hook reads it, the model's
    code is unchanged, and the sums stay on the device until a row is logged.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.sums: list[Any] = []  # [sum g, sum g^2, count] as tensors
        model.gate.register_forward_hook(self._gate)

    def _gate(self, module: Any, args: Any, g: Any) -> None:
        if not self.model.training or g.dim() != 2:  # evaluation, or a caller mixing whole sequences
            return
        g = g.detach().float()
        sums = [g.sum(), (g * g).sum(), torch.tensor(float(g.numel()), device=g.device)]
        self.sums = sums if not self.sums else [a + b for a, b in zip(self.sums, sums, strict=True)]

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if logs is None or not self.sums or "loss" not in logs:
            return
        total, squares, count = (float(x) for x in self.sums)
        self.sums = []
        if count > 0:
            mean = total / count
            logs["gate_mean"] = mean
            logs["gate_std"] = max(squares / count - mean * mean, 0.0) ** 0.5


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


def log_probe(run: Any | None, step: int, scores: dict[str, dict[str, Any]]) -> None:
    """Scores of the evaluation during training (``eval.at_steps`` / ``every_n_steps``) at ``step``:
    ``probe/<dataset>/<metric>`` on the training curves' step axis."""
    if run is None:
        return
    row: dict[str, Any] = {"train/global_step": step}
    for name, metrics in scores.items():
        row.update({f"probe/{name}/{k}": v for k, v in flat_metrics(metrics).items()})
    run.log(row)


def log_artifact(run: Any | None, cfg: DictConfig, run_dir: Path) -> None:
    """The trained run (adapter, gate, config, metrics: what ``load_model`` needs) as a W&B model artifact."""
    if run is None or not cfg.logger.get("artifact", True) or not (run_dir / "adapter").is_dir():
        return
    import wandb

    artifact = wandb.Artifact(f"imsm-{run.id}", type="model", metadata={"run_dir": str(run_dir)})
    artifact.add_dir(str(run_dir / "adapter"), name="adapter")
    for name in ("gate.safetensors", "gate.json", "config.yaml", "metrics.json"):
        if (run_dir / name).is_file():
            artifact.add_file(str(run_dir / name), name=name)
    run.log_artifact(artifact)


def sweep_group() -> str | None:
    """An ad-hoc multirun's W&B group: its sweep directory (an experiment's sweep is grouped by its name)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return str(HydraConfig.get().sweep.dir)
    return None


def finish(run: Any | None, failed: bool = False) -> None:
    if run is not None:
        run.finish(exit_code=1 if failed else 0)


def finish_active(failed: bool = True) -> None:
    """Close a run left open by a job that raised (only if wandb was ever imported)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.finish(exit_code=1 if failed else 0)
