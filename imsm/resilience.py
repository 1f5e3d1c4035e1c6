"""A killed job costs minutes, not the run: complete checkpoints, resume, NaN and out-of-memory stops.

- A checkpoint (every ``trainer.args.save_steps`` optimizer steps, in ``<run_dir>/checkpoints/checkpoint-<step>``)
  holds what a resumed run needs: every trainable tensor by exact parameter name (``trainable.safetensors``, what
  resume reads), the adapter + gate + config (a checkpoint is also a run directory ``load_model`` opens), optimizer,
  scheduler, each rank's RNG states and ``trainer_state.json`` (the data position: the global step, from which
  Trainer skips the batches already seen; its seedable sampler draws the same order again).
- It counts only once ``checkpoint.complete`` exists, written by rank 0 after every rank saved its part. A job killed
  mid-save leaves a directory without it: resume skips it and deletes it. Older checkpoints are removed only after a
  newer one is complete (``rotate_checkpoints``), so a complete one always survives.
- imsm deletes only what it wrote: ``checkpoint.imsm`` is written into a checkpoint directory before anything else,
  and a ``checkpoint-N`` directory without it (or the completion marker) is another tool's and is left alone.
- Before a resume the checkpoint's files are checked (``check_checkpoint``: JSON parses, safetensors and torch zip
  archives whole): a corrupted one is named, file and reason, with the intact older checkpoint to resume from instead.
- ``progress.json`` carries the loss sum and training seconds of every segment so far: after a resume, the run's
  ``train_loss`` and ``train_seconds`` cover the whole run, not only the last segment.
- ``resume``: ``auto`` continues from the last complete checkpoint if there is one, ``true`` requires one,
  ``false`` starts afresh (deleting this run directory's checkpoints, so a later ``auto`` cannot pick them), a path
  resumes from that checkpoint.
- A NaN or infinite loss stops the run before that step's update (``NonFiniteLossError``, naming the step and the
  last good checkpoint, which is kept); out of GPU memory, the error says which settings to lower (``explain_oom``).
- Nothing is unpickled: weights are safetensors; optimizer, scheduler and RNG load with ``torch.load(weights_only=
  True)`` (Trainer's loaders); DeepSpeed's own checkpoint files load the same way (``deepspeed_resume``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import struct
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from imsm.io import share, write_json

log = logging.getLogger(__name__)

COMPLETE = "checkpoint.complete"
OWNER = "checkpoint.imsm"  # written first: this checkpoint directory is imsm's (and may be deleted by it)
PROGRESS = "progress.json"
TRAINABLE_WEIGHTS = "trainable.safetensors"
CHECKPOINTS = "checkpoints"
_STEP = re.compile(r"^checkpoint-(\d+)$")


# --- checkpoints -------------------------------------------------------------------------------------------------
def checkpoint_dirs(folder: str | Path) -> list[Path]:
    """``checkpoint-<step>`` directories in ``folder``, oldest step first (complete or not, imsm's or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found)]


def is_complete(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / COMPLETE).is_file()


def is_ours(checkpoint: str | Path) -> bool:
    """imsm wrote this directory (its owner marker, or a completion marker from before the owner marker existed)."""
    return (Path(checkpoint) / OWNER).is_file() or is_complete(checkpoint)


def own_checkpoint_dirs(folder: str | Path) -> list[Path]:
    """``checkpoint_dirs`` that imsm wrote; another tool's are named in a warning and never touched."""
    dirs = checkpoint_dirs(folder)
    foreign = [p.name for p in dirs if not is_ours(p)]
    if foreign:
        log.warning(
            "%s: %s not written by imsm (no %s): left alone, never resumed from or deleted",
            folder,
            foreign,
            OWNER,
        )
    return [p for p in dirs if is_ours(p)]


def claim_checkpoint(checkpoint: str | Path) -> None:
    """Mark ``checkpoint`` as imsm's before anything is written into it (rank 0, at the start of a save)."""
    Path(checkpoint).mkdir(parents=True, exist_ok=True)
    (Path(checkpoint) / OWNER).write_text("written by imsm; deleted by imsm's rotation and resume=false\n")


def last_complete_checkpoint(folder: str | Path) -> Path | None:
    """The highest-step checkpoint whose every part was written, or None."""
    complete = [p for p in checkpoint_dirs(folder) if is_complete(p)]
    return complete[-1] if complete else None


def checkpoint_step(checkpoint: str | Path) -> int:
    """The optimizer step a checkpoint was saved at (its directory name says it)."""
    m = _STEP.match(Path(checkpoint).name)
    if m is None:
        raise ValueError(f"{checkpoint}: not a checkpoint-<step> directory")
    return int(m.group(1))


def mark_complete(checkpoint: str | Path, step: int) -> None:
    """Written last (atomically), once every rank has saved its part of ``checkpoint``."""
    write_json(Path(checkpoint) / COMPLETE, {"global_step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S")})


def rotate_checkpoints(folder: str | Path, keep: int | None) -> None:
    """Keep the newest ``keep`` complete checkpoints; delete older ones and incomplete ones below the newest."""
    dirs = own_checkpoint_dirs(folder)
    complete = [p for p in dirs if is_complete(p)]
    if not complete:
        return
    kept = set(complete[-keep:]) if keep and keep > 0 else set(complete)
    newest = complete[-1]
    for p in dirs:
        if p not in kept and dirs.index(p) < dirs.index(newest):
            shutil.rmtree(p, ignore_errors=True)


def remove_incomplete(folder: str | Path) -> list[Path]:
    """Delete imsm's checkpoint directories a crash left half-written; returns them."""
    removed = [p for p in own_checkpoint_dirs(folder) if not is_complete(p)]
    for p in removed:
        log.warning("removing incomplete checkpoint %s (the job stopped while saving it)", p)
        shutil.rmtree(p, ignore_errors=True)
    return removed


def resume_mode(resume: Any) -> str:
    """``auto``, ``true``, ``false``, or ``path`` (a checkpoint directory), from the ``resume`` setting."""
    text = str(resume).strip().lower() if resume is not None else "auto"
    if text in ("auto", "none", "null", ""):
        return "auto"
    return text if text in ("true", "false") else "path"


def resolve_resume(resume: Any, folder: str | Path, main_process: bool = True) -> str | None:
    """The checkpoint to resume from (None: start afresh), from the ``resume`` setting.

    Args:
        resume: ``auto`` / None (the last complete checkpoint if any), ``true`` (it must exist), ``false`` (start
            afresh: rank 0 deletes ``folder``'s imsm checkpoints), or a checkpoint directory.
        folder: ``<run_dir>/checkpoints``.
        main_process: only rank 0 deletes anything.

    Raises:
        CorruptCheckpointError: the checkpoint to resume from has a damaged file (named, with the older intact one).
    """
    folder = Path(folder)
    mode = resume_mode(resume)
    if mode in ("auto", "true"):
        found = last_complete_checkpoint(folder)
        if found is None and mode == "true":
            raise FileNotFoundError(
                f"resume=true but {folder} holds no complete checkpoint (directories: "
                f"{[p.name for p in checkpoint_dirs(folder)]}). Use the same run_dir as the interrupted run, or "
                "resume=auto / resume=false to start afresh."
            )
        if found is not None:
            check_checkpoint(found, folder)
        if main_process:
            remove_incomplete(folder)
        if found is not None:
            log.info("resuming from %s (resume=%s found it; resume=false starts afresh)", found, mode)
        return None if found is None else str(found)
    if mode == "false":
        own = own_checkpoint_dirs(folder)
        if main_process and own:
            log.warning("resume=false: deleting the earlier checkpoints in %s", folder)
            for p in own:
                shutil.rmtree(p, ignore_errors=True)
        return None
    path = Path(str(resume))
    if not is_complete(path):
        raise FileNotFoundError(
            f"resume={resume}: not a complete checkpoint directory (no {COMPLETE}); complete ones in {folder}: "
            f"{[p.name for p in checkpoint_dirs(folder) if is_complete(p)]}"
        )
    check_checkpoint(path, folder)
    return str(path)


# --- is a checkpoint intact? -------------------------------------------------------------------------------------
class CorruptCheckpointError(RuntimeError):
    """A file of the checkpoint to resume from is damaged; the message names it and the older intact checkpoint."""


def check_checkpoint(checkpoint: str | Path, folder: str | Path | None = None) -> None:
    """Raise ``CorruptCheckpointError`` if a file of ``checkpoint`` is damaged (cheap: no tensor is deserialised).

    JSON files must parse, safetensors files must hold every byte their header promises, torch files (zip archives)
    must pass a CRC check. The message offers the newest older checkpoint of ``folder`` that passes the same checks.
    """
    checkpoint = Path(checkpoint)
    problem = _first_damaged_file(checkpoint)
    if problem is None:
        return
    file, reason = problem
    older = [p for p in checkpoint_dirs(folder or checkpoint.parent) if is_complete(p) and p != checkpoint]
    older = [p for p in older if checkpoint_step(p) < checkpoint_step(checkpoint)]
    intact = next((p for p in reversed(older) if _first_damaged_file(p) is None), None)
    offer = (
        f"resume={intact} continues from the newest intact checkpoint ({checkpoint_step(checkpoint)}"
        f" - {checkpoint_step(intact)} steps earlier), after which {checkpoint} can be deleted"
        if intact
        else "no older intact checkpoint exists; resume=false starts afresh"
    )
    raise CorruptCheckpointError(f"cannot resume from {checkpoint}: {file} is damaged ({reason}). {offer}.")


def _first_damaged_file(checkpoint: Path) -> tuple[Path, str] | None:
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        reason = _damage(file)
        if reason is not None:
            return file, reason
    return None


def _damage(file: Path) -> str | None:
    """Why ``file`` cannot be read back, or None (JSON, safetensors and torch's zip format; other files unchecked)."""
    try:
        if file.suffix == ".json" or file.name == COMPLETE:
            json.loads(file.read_text(encoding="utf-8"))
        elif file.suffix == ".safetensors":
            return _safetensors_damage(file)
        elif file.suffix in (".pt", ".pth", ".bin"):
            if not zipfile.is_zipfile(file):
                return "not a complete torch file (no zip directory: truncated or overwritten)"
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
            return None if bad is None else f"entry {bad} fails its CRC check"
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return None


def _safetensors_damage(file: Path) -> str | None:
    """The safetensors layout: 8-byte header length, JSON header, then exactly the bytes its offsets cover."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes: shorter than a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            return f"header of {length} bytes but the file has {size}"
        header = json.loads(f.read(length))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"the header describes {8 + length + end} bytes, the file has {size} (truncated?)"
    return None


# --- the whole run's loss and time, across resumed segments --------------------------------------------------------
def write_progress(checkpoint: str | Path, step: int, loss_sum: float, train_seconds: float) -> None:
    """Record in ``checkpoint`` the run so far: its summed step losses and its training seconds."""
    write_json(
        Path(checkpoint) / PROGRESS,
        {"global_step": step, "loss_sum": loss_sum, "train_seconds": train_seconds},
    )


def read_progress(checkpoint: str | Path | None) -> dict[str, float]:
    """``progress.json`` of ``checkpoint`` ({} when starting afresh or for a checkpoint written before it existed)."""
    if checkpoint is None or not (Path(checkpoint) / PROGRESS).is_file():
        return {}
    return json.loads((Path(checkpoint) / PROGRESS).read_text())


def save_trainable(model: torch.nn.Module, path: str | Path) -> None:
    """Every trainable tensor by its exact parameter name: what resume loads back, whatever the PEFT method."""
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(path))
    share(path)


def load_trainable(model: torch.nn.Module, path: str | Path) -> None:
    """Copy ``save_trainable``'s tensors into ``model``; every trainable name and shape must match."""
    tensors = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    wrong = [
        (n, tuple(t.shape), tuple(params[n].shape))
        for n, t in tensors.items()
        if n in params and t.shape != params[n].shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not match this model (was the run's config changed since the checkpoint?): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape (saved, model) {wrong[:5]}"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))


@contextlib.contextmanager
def deepspeed_resume() -> Iterator[None]:
    """Resume from DeepSpeed's checkpoint files without unpickling them, and without the frozen backbone in them.

    - DeepSpeed (0.19) reads its files with ``torch.load(weights_only=False)``; here they load with
      ``weights_only=True``, allow-listing only the few DeepSpeed value types they hold (loss scaler, ZeRO stage,
      fragment addresses).
    - Trainer loads the module states strictly unless the model is a bare ``PeftModel``; IMSM's checkpoints leave
      the frozen backbone out (``IMSMTrainer._save_optimizer_and_scheduler``), so the load must be non-strict.
    """
    import transformers.trainer as hf_trainer
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original_load, original_resume = TorchCheckpointEngine.load, hf_trainer.deepspeed_load_checkpoint

    def load(self: Any, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    def resume(engine: Any, checkpoint: str, load_module_strict: bool = True) -> None:
        original_resume(engine, checkpoint, load_module_strict=False)

    TorchCheckpointEngine.load = load  # type: ignore[method-assign]
    hf_trainer.deepspeed_load_checkpoint = resume
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original_load  # type: ignore[method-assign]
        hf_trainer.deepspeed_load_checkpoint = original_resume


@contextlib.contextmanager
def trainable_module_states(engine: Any) -> Iterator[None]:
    """Inside: DeepSpeed checkpoints hold only the trainable weights of the module (adapter + gate).

    ``save_checkpoint(exclude_frozen_parameters=True)`` drops frozen weights by their ``named_parameters`` name, which
    lists a tied weight once: a tied head (``lm_head.weight`` = the embeddings) would stay in every checkpoint.
    """
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    original = engine.module_state_dict

    def module_state_dict(*args: Any, **kwargs: Any) -> Any:
        states = original(*args, **kwargs)
        for name in [n for n in states if n not in trainable]:
            del states[name]
        return states

    engine.module_state_dict = module_state_dict
    try:
        yield
    finally:
        del engine.module_state_dict  # back to the class's method


def _deepspeed_safe_globals() -> list[Any]:
    """Non-tensor types DeepSpeed writes into its checkpoint files (plain values, no code)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


# --- failures ----------------------------------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: the run stops before the update that would spread it into the weights."""


def check_finite_loss(loss: torch.Tensor, step: int, epoch: float | None, checkpoints: str | Path) -> None:
    """Raise ``NonFiniteLossError`` naming the optimizer step when ``loss`` is NaN or infinite.

    Args:
        loss: the micro-batch loss (any shape).
        step: the 1-based optimizer step this micro-batch belongs to.
        epoch: fractional epoch, for the message.
        checkpoints: the checkpoint folder; the message names its last complete checkpoint (kept).
    """
    if bool(torch.isfinite(loss.detach()).all()):
        return
    value = loss.detach().float().flatten()[0].item()
    last = last_complete_checkpoint(checkpoints)
    kept = f"the last good checkpoint {last} is kept" if last else f"no checkpoint in {checkpoints} yet"
    where = f"optimizer step {step}" + (f" (epoch {epoch:.2f})" if epoch is not None else "")
    raise NonFiniteLossError(
        f"loss is {value} at {where}: training stopped before that step's update; {kept}. Usual causes: a learning "
        "rate too high (peft.optimizer.learning_rate, gate.lr), fp16 overflow (use trainer.args.bf16=true or fp32), "
        "a batch without response tokens (max_output_length, truncated targets). resume=true continues from the "
        "checkpoint with the same settings."
    )


RANK_FAILURE = "failure-rank-{rank}.json"


def record_rank_failure(run_dir: str | Path, rank: int, error: BaseException) -> None:
    """A rank other than 0 stopping on its own (a NaN only it saw) leaves its reason where rank 0 can find it.

    Without it rank 0 only sees the collective the stopped rank never joined (gloo: "Connection closed by peer").
    """
    write_json(
        Path(run_dir) / RANK_FAILURE.format(rank=rank),
        {"rank": rank, "error": f"{type(error).__name__}: {error}"},
    )


def rank_failures(run_dir: str | Path) -> list[dict[str, Any]]:
    """What other ranks recorded with ``record_rank_failure`` in this job, lowest rank first."""
    files = sorted(Path(run_dir).glob(RANK_FAILURE.format(rank="*")))
    found = []
    for f in files:
        with contextlib.suppress(ValueError, OSError):
            found.append(json.loads(f.read_text()))
    return sorted(found, key=lambda r: r.get("rank", 0))


def clear_rank_failures(run_dir: str | Path) -> None:
    """At a job's start: an earlier job's rank failures are not this job's."""
    for f in Path(run_dir).glob(RANK_FAILURE.format(rank="*")):
        f.unlink(missing_ok=True)


def oom_advice(cfg: DictConfig, phase: str) -> str:
    """Which settings to lower, with their current values, for an out-of-memory error in ``phase``."""
    args = cfg.trainer.args
    if phase == "eval":
        return (
            "out of GPU memory while evaluating. Lower eval.batch_size (now "
            f"{cfg.eval.batch_size}), max_input_length (now {cfg.max_input_length}) or eval.max_new_tokens "
            f"(now {cfg.eval.max_new_tokens or 'the dataset default'})."
        )
    checkpointing = bool(args.get("gradient_checkpointing") or args.get("activation_checkpointing"))
    tips = [
        f"trainer.args.per_device_train_batch_size (now {args.get('per_device_train_batch_size')}; "
        "trainer.effective_batch_size keeps the effective batch by raising gradient accumulation)",
        f"max_input_length (now {cfg.max_input_length}) / max_output_length (now {cfg.max_output_length})",
    ]
    if not checkpointing:
        tips.append(
            "trainer.args.activation_checkpointing=true (recompute activations: ~30% slower, far less memory)"
        )
    if not (args.get("bf16") or args.get("fp16")) and cfg.backbone.get("dtype") == "fp32":
        tips.append("mixed precision: trainer.args.bf16=true or backbone.dtype=bf16")
    tips.append(
        "shard or offload with DeepSpeed: trainer=deepspeed_z2 / deepspeed_z3, optimizer states to CPU with "
        "trainer.args.deepspeed.zero_optimization.offload_optimizer.device=cpu"
    )
    return "out of GPU memory while training. Lower, in this order: " + "; ".join(tips) + "."


@contextlib.contextmanager
def explain_oom(cfg: DictConfig, phase: str) -> Iterator[None]:
    """Re-raise ``torch.OutOfMemoryError`` with ``oom_advice`` in front of torch's own message."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(f"{oom_advice(cfg, phase)}\n{e}") from e
