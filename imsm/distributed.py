"""One code path from a laptop to many nodes: launchers, ranks, one run directory, ZeRO-3, activation checkpointing.

- Launchers: ``torchrun`` and ``accelerate launch`` set ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE``; the ``deepspeed``
  launcher also appends ``--local_rank=N`` to the command line, which Hydra rejects as an override.
  ``strip_local_rank_arg`` moves it into ``LOCAL_RANK`` before Hydra parses ``sys.argv`` (so ``--no_local_rank`` is
  recommended but not required). ``TrainingArguments`` and ``imsm.backbones.resolve_device`` read the environment.
- One run directory: each rank's Hydra resolves ``${now:...}`` itself, so ranks started a second apart would pick
  different directories. ``agree_run_dir`` broadcasts rank 0's and removes the others' empty Hydra directories.
  Only rank 0 writes outputs (``TrainingArguments.should_save``); every rank writes its own RNG state into the
  shared checkpoint (a multi-node run needs ``run_dir`` on a shared filesystem).
- ZeRO-3 partitions every weight, the frozen backbone's included. DeepSpeed's forward hooks gather a module's
  weights whenever that module runs, with or without gradients, so the frozen stream (the same modules with the
  adapter off, under ``no_grad``) sees full weights. A rank-0-only evaluation cannot join those gathers, so after a
  ZeRO-3 run rank 0 reloads the saved run unsharded (``leave_zero3``) and evaluates that.
- Activation checkpointing (``enable_activation_checkpointing``): non-reentrant, on the backbone's decoder layers,
  with inputs that require grad (the adapter's gradients must flow through frozen embeddings). The frozen stream runs
  under ``no_grad``, where checkpointing has nothing to save.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Processes in the job (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def strip_local_rank_arg(argv: list[str]) -> list[str]:
    """``argv`` without ``--local_rank=N`` / ``--local-rank N`` (the ``deepspeed`` launcher's), moved into the env.

    Hydra treats every argument as an override and rejects this one; ``LOCAL_RANK`` in the environment says the
    same thing and is what ``TrainingArguments`` reads.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, _, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not value and i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(arg)
        i += 1
    return out


def launcher_arguments(args: dict[str, Any], world_size: int) -> dict[str, Any]:
    """``TrainingArguments`` keywords completed for the launch: CPU processes, DeepSpeed present.

    Several processes without CUDA (the CPU tests, a CPU cluster) need ``use_cpu``: without it ``TrainingArguments``
    starts no process group and every rank would silently train alone.
    """
    args = dict(args)
    if args.get("deepspeed"):
        if importlib.util.find_spec("deepspeed") is None:
            raise ImportError(
                "trainer.args.deepspeed is set (trainer=deepspeed_z2 / deepspeed_z3) but DeepSpeed is not installed: "
                "pip install -e '.[deepspeed]' (or use trainer=ddp)"
            )
    elif world_size > 1 and not torch.cuda.is_available():
        args.setdefault("use_cpu", True)
    return args


def check_world_size(args: Any, expected: int) -> None:
    """Fail fast when the launcher started ``expected`` processes but Trainer would not train them together."""
    args.device  # noqa: B018 - sets up the process group (a cached property) so world_size is the real one
    if expected > 1 and args.world_size != expected:
        raise RuntimeError(
            f"WORLD_SIZE={expected} processes were launched but Trainer sees {args.world_size}: they would train "
            "alone, each on all the data. Multi-process DeepSpeed needs GPUs (accelerate runs DeepSpeed on CPU as one "
            "process per rank): on CPU use trainer=ddp; check trainer.args.use_cpu / ddp_backend."
        )


def _is_empty_hydra_dir(path: Path) -> bool:
    """Only what Hydra itself put there (``.hydra/`` and the job log): safe to remove."""
    return path.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in path.iterdir())


def agree_run_dir(run_dir: Path, hydra_dir: Path | None = None) -> Path:
    """Rank 0's run directory, on every rank (needs the process group, i.e. after ``TrainingArguments``).

    Args:
        run_dir: this rank's run directory.
        hydra_dir: this rank's Hydra output directory; removed when it differs from rank 0's and holds only
            Hydra's own files (ranks that resolved ``${now:...}`` a second later than rank 0).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return run_dir
    if torch.distributed.get_world_size() == 1:
        return run_dir
    box = [str(run_dir)]
    torch.distributed.broadcast_object_list(box, src=0)
    agreed = Path(box[0])
    if agreed != run_dir:
        log.info("rank %d: using rank 0's run directory %s (not %s)", rank(), agreed, run_dir)
        for stray in {run_dir, hydra_dir}:
            if stray is not None and stray.resolve() != agreed.resolve() and _is_empty_hydra_dir(stray):
                shutil.rmtree(stray, ignore_errors=True)
    return agreed


def zero3_enabled() -> bool:
    """True while ``TrainingArguments`` with a ZeRO-3 DeepSpeed config are alive (weights are partitioned)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers always has it
        return False
    return bool(is_deepspeed_zero3_enabled())


def leave_zero3() -> None:
    """Stop ``from_pretrained`` / ``from_config`` from partitioning new models (``deepspeed.zero.Init``).

    After a ZeRO-3 run, rank 0 reloads the saved run to evaluate it; built under ZeRO-3 that reload would wait for
    the other ranks' gathers forever.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


@contextlib.contextmanager
def outside_zero3_init() -> Iterator[None]:
    """Build models inside as plain, whole models even while ZeRO-3 is configured.

    Random tiny backbones (tests, debugging) must get the same weights with or without ZeRO-3: ``from_config``
    under ``deepspeed.zero.Init`` initialises them differently, and a saved run could not be rebuilt from its config.
    DeepSpeed partitions such a model when Trainer wraps it.
    """
    try:
        import transformers.integrations.deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def gathered_trainable(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Inside: the trainable (adapter + gate) weights are whole on every rank, also under ZeRO-3.

    A collective under ZeRO-3: every rank must enter (``IMSMTrainer._save`` runs on all ranks; rank 0 writes).
    """
    params = [p for p in model.parameters() if p.requires_grad and hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def enable_activation_checkpointing(
    backbone: torch.nn.Module, kwargs: dict[str, Any] | str | None = None
) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    Non-reentrant checkpointing (the reentrant kind breaks DDP's unused-parameter search and needs every
    checkpointed input to require grad) and inputs that require grad anyway, as peft recommends: the backbone's
    embeddings are frozen, so without it no layer input would. ``kwargs`` (``trainer.args.
    activation_checkpointing_kwargs``): ``every_n_layers``, ``offload`` and the rest for
    ``torch.utils.checkpoint.checkpoint``; ``use_reentrant`` defaults to False.
    """
    if isinstance(kwargs, str):  # TrainingArguments accepts a JSON string
        kwargs = json.loads(kwargs)
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    layout = {k: kwargs.pop(k) for k in ("every_n_layers", "offload") if k in kwargs}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **layout)
    elif hasattr(backbone, "gradient_checkpointing_enable"):  # remote-code models (ChatGLM)
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            f"trainer.args.activation_checkpointing=true: {type(backbone).__name__} supports no activation "
            "checkpointing; set it to false"
        )
    if hasattr(backbone, "enable_input_require_grads"):
        backbone.enable_input_require_grads()
