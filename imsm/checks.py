"""Settings that would make a run silently wrong (or fail deep inside torch) are refused before any work starts.

``check_run_config(cfg)`` runs first in ``imsm.train.train``: every problem is listed at once, each naming its key,
the value given and what is valid. Before it, ``max_train_samples=0`` trained on the whole split (``[:0]`` read as
"no limit"), ``-3`` on all but three examples, ``max_output_length=0`` kept all but the last target token,
``gate.rank=0`` trained a gate with no parameters labelled as IMSM, and a zero batch size or a negative rank failed
with a ``ZeroDivisionError`` that named no setting.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from imsm.schema import schema_errors


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_run_config(cfg: DictConfig) -> None:
    """Raise ``ValueError`` listing every setting of ``cfg`` (a composed ``train.yaml``) of a wrong key, type or range."""
    errors: list[str] = schema_errors(cfg)  # keys and types (imsm.schema), then the ranges below

    def at_least_one(key: str, nullable: bool) -> None:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and nullable:
            return
        if not _is_int(value) or value < 1:
            allowed = "null (no limit) or an integer >= 1" if nullable else "an integer >= 1"
            errors.append(f"{key}={value!r}: must be {allowed}")

    for key in ("max_train_samples", "max_eval_samples"):
        at_least_one(key, nullable=True)
    for key in (
        "max_input_length",
        "max_output_length",
        "eval.batch_size",
        "trainer.args.per_device_train_batch_size",
    ):
        at_least_one(key, nullable=False)
    at_least_one("trainer.effective_batch_size", nullable=True)
    at_least_one("eval.every_n_steps", nullable=True)
    report_to = OmegaConf.select(cfg, "trainer.args.report_to", default=None)
    reporters = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if [r for r in reporters if r != "none"]:
        errors.append(
            f"trainer.args.report_to={report_to!r}: imsm logs to W&B itself (logger=wandb: its config, metrics, gate "
            "and artifact); transformers' own reporting would open a second run without them or log every row "
            "twice. Use logger=wandb and leave trainer.args.report_to=none"
        )
    for name, limit in (cfg.eval.get("limits") or {}).items():
        if limit is not None and (not _is_int(limit) or limit < 1):
            errors.append(f"eval.limits.{name}={limit!r}: must be null (all) or an integer >= 1")

    module = cfg.gate.get("module")
    if module is not None and "rank" in module:  # a gate with weights (query_aware, no_query): r >= 1
        rank = cfg.gate.get("rank")
        if not _is_int(rank) or rank < 1:
            errors.append(
                f"gate.rank={rank!r}: gate={cfg.gate.type} needs an integer rank >= 1 (the paper's is 8); "
                "gate=fixed or gate=none have no weights"
            )

    args = cfg.trainer.args
    if args.get("fp16") and not torch.cuda.is_available():
        errors.append(
            "trainer.args.fp16=true: fp16 mixed precision needs a CUDA GPU and none is visible (it would run in "
            "fp32 without a word); on a CPU use trainer.args.bf16=true with trainer.args.use_cpu=true, or fp32"
        )
    if args.get("fp16") and args.get("bf16"):
        errors.append("trainer.args.fp16=true and trainer.args.bf16=true: choose one")
    steps, epochs = args.get("max_steps", -1), args.get("num_train_epochs", 1)
    if (steps is None or steps <= 0) and (epochs is None or epochs <= 0):
        errors.append(
            f"trainer.args.max_steps={steps!r} and trainer.args.num_train_epochs={epochs!r}: nothing to train "
            "(set max_steps >= 1 or num_train_epochs > 0)"
        )
    if errors:
        raise ValueError("invalid run settings (nothing was started):\n- " + "\n- ".join(errors))
