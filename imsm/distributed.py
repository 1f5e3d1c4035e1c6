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
  adapter off, under ``no_grad``) sees full weights; the adapter's modules do not run there and are not gathered.
  The gate runs once per forward, after both streams, with gradients: its weights are gathered like the adapter's,
  except those at or below ``stage3_param_persistence_threshold`` (10 x hidden size under ``auto``: the gate's
  ``W_B``, r x d with r < 10), which stay whole on every rank. Gradients, fp32 master weights and optimizer states
  of adapter and gate are partitioned either way. A rank-0-only evaluation cannot join the gathers, so after a
  ZeRO-3 run rank 0 reloads the saved run unsharded (``leave_zero3``) and evaluates that.
- DeepSpeed on CPU (tests, CPU clusters): accelerate recognises no multi-process DeepSpeed launch there and would
  let every rank train alone as rank 0 of 1; ``deepspeed_cpu_ranks`` makes it count the ranks (gloo).
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
import signal
import threading
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


@contextlib.contextmanager
def deepspeed_cpu_ranks(args: dict[str, Any], world_size: int) -> Iterator[None]:
    """Inside (around ``TrainingArguments(...)``): a multi-process DeepSpeed launch on CPU counts its ranks.

    accelerate (1.x) takes a launch for a distributed one only on a device it knows (CUDA, XPU, NPU, ...) or with
    ``use_cpu``, which turns DeepSpeed off. For DeepSpeed on CPU it records no backend, one process and rank 0 on
    every rank, although ``deepspeed.comm`` has joined them in a gloo group: each rank would train alone on all the
    data and write as the main process. Inside, accelerate's backend lookup answers gloo (its CPU choice) where it
    found none; DeepSpeed then joins the ranks over gloo, and accelerate counts them and marks the run as DeepSpeed.
    A no-op with CUDA, without DeepSpeed or with one process.
    """
    if not args.get("deepspeed") or world_size == 1 or torch.cuda.is_available():
        yield
        return
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def prepare_backend(self: Any, cpu: bool = False, sagemaker_dp: bool = False, backend: Any = None) -> Any:
        found = original(self, cpu, sagemaker_dp, backend)
        return found if found[0] is not None else ("gloo", DistributedType.MULTI_CPU)

    PartialState._prepare_backend = prepare_backend  # type: ignore[method-assign]
    try:
        yield
    finally:
        PartialState._prepare_backend = original  # type: ignore[method-assign]


def defer_termination() -> None:
    """With several processes: the launcher's SIGTERM is logged instead of ending this process at once.

    torchrun sends SIGTERM to the other ranks when one fails (e.g. a NaN only it saw). Killed at once, rank 0 would
    never write ``metrics.json``. Deferred, rank 0 fails at its next collective (the stopped rank's connections are
    closed) and its failure handling records the first rank's own error (``imsm.resilience.rank_failures``); a rank
    stuck for longer is still ended by the launcher's SIGKILL after its grace period.
    """
    if world_size() <= 1 or threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        log.warning(
            "rank %d: SIGTERM from the launcher (another rank stopped); ending at the next collective", rank()
        )

    signal.signal(signal.SIGTERM, handler)


def check_world_size(args: Any, expected: int) -> None:
    """Fail fast when the launcher started ``expected`` processes but Trainer would not train them together."""
    args.device  # noqa: B018 - sets up the process group (a cached property) so world_size is the real one
    if expected > 1 and args.world_size != expected:
        raise RuntimeError(
            f"WORLD_SIZE={expected} processes were launched but Trainer sees {args.world_size}: they would train "
            "alone, each on all the data. Check trainer.args.use_cpu / ddp_backend and that the launcher (torchrun, "
            "deepspeed, accelerate launch) started the processes together."
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
