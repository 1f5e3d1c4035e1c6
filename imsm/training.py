"""Training through Hugging Face ``Trainer``: what IMSM changes and nothing more.

- The loss comes from ``IMSMModel.forward`` (response tokens only), so ``Trainer.compute_loss`` is unchanged.
- The gate gets its own learning rate (the authors trained it at 1e-3) in its own optimizer parameter group; the
  optimizer class itself is whatever ``TrainingArguments.optim`` names (AdamW, Adafactor, ...).
- Checkpoints and the final save hold the adapter and the gate only, never the frozen backbone (with DeepSpeed
  too, gathered under ZeRO-3). A checkpoint also holds optimizer, scheduler, RNG states and the step, counts once
  every rank has saved its part, and is what a re-run resumes from; a NaN loss stops before its update
  (``imsm.resilience``). Activation checkpointing goes to the backbone (``imsm.distributed``).
- AdaLoRA: the loss gets peft's orthogonal regulariser (IMSM's loss is computed outside ``PeftModel.forward``, where
  peft would add it) and ``AdaLoraCallback`` re-allocates the rank budget every optimizer step.
- LoRAMoE: the loss gets its localized balancing constraint (the batch's ``task_type`` and the routing weights
  the tuned stream recorded), as the official model adds it to its own loss.
- ``trainer.cache_frozen`` (read from the run config): the training set's items carry their index, and the frozen
  stream's states are stored in the first epoch and read in the later ones (``imsm.model.frozen_cache``); with
  ``disk``, in a scratch file per process under the run directory that ``train`` creates and deletes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import Trainer, TrainingArguments
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from imsm import distributed, resilience
from imsm.data.collate import IndexedDataset
from imsm.model.adalora import AdaLoraCallback, adalora_config, orthogonal_regularisation
from imsm.model.build import save_model
from imsm.model.frozen_cache import frozen_cache_for, states_file
from imsm.model.loramoe import loramoe_model
from imsm.model.siamese import IMSMModel
from imsm.schema import cache_frozen_storage

logger = logging.getLogger(__name__)


class IMSMTrainer(Trainer):
    """``Trainer`` with a gate learning rate, adapter-only resumable checkpoints and complete AdaLoRA training."""

    def __init__(
        self,
        *args: Any,
        gate_learning_rate: float | None = None,
        run_config: DictConfig | None = None,
        **kwargs: Any,
    ):
        self.gate_learning_rate = gate_learning_rate
        self._prior: dict[
            str, float
        ] = {}  # the resumed checkpoint's progress.json (earlier segments' totals)
        self._segment_start = time.perf_counter()
        # saved as config.yaml in every checkpoint too: each checkpoint is a run directory load_model opens
        self.run_config = run_config
        super().__init__(*args, **kwargs)
        model = self.model
        if self.args.activation_checkpointing and isinstance(model, IMSMModel):
            # on the backbone, here: Trainer.train would look for the method on IMSMModel itself
            distributed.enable_activation_checkpointing(
                model.backbone, self.args.activation_checkpointing_kwargs
            )
            self.args.activation_checkpointing = self.args.gradient_checkpointing = False
        setting = run_config is not None and OmegaConf.select(
            run_config, "trainer.cache_frozen", default=False
        )
        storage = cache_frozen_storage(setting)  # None (off), "memory" or "disk"; a misspelt value is refused
        if isinstance(model, IMSMModel):
            # later epochs read the frozen stream's states instead of running it (imsm.model.frozen_cache);
            # disk: a scratch file per process in the run directory, the parent of checkpoints/ (as resilience's)
            disk_file = (
                states_file(Path(self.args.output_dir).parent, self.args.process_index)
                if storage == "disk"
                else None
            )
            model.frozen_cache = (
                frozen_cache_for(model, distributed.zero3_enabled(), self.args.world_size, disk_file)
                if storage
                else None
            )
            if model.frozen_cache is not None:
                self.train_dataset = IndexedDataset(self.train_dataset)
        needs_allocation = isinstance(model, IMSMModel) and adalora_config(model.peft_model) is not None
        if needs_allocation and not any(
            isinstance(c, AdaLoraCallback) for c in self.callback_handler.callbacks
        ):
            self.add_callback(AdaLoraCallback(model.peft_model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        # read before the forward: the parent may pop labels from the batch
        labels, task_type, attention_mask = (inputs.get(k) for k in ("labels", "task_type", "attention_mask"))
        out = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        unwrapped = self.accelerator.unwrap_model(model)
        if not isinstance(unwrapped, IMSMModel) or not model.training:
            return out
        reg = None
        config = adalora_config(unwrapped.peft_model)
        if config is not None and config.orth_reg_weight != 0:
            reg = config.orth_reg_weight * orthogonal_regularisation(unwrapped.peft_model)
        loramoe = loramoe_model(unwrapped.peft_model)
        if loramoe is not None and labels is not None:
            # LoRAMoE's localized balancing constraint on the routing of the tuned stream that just ran
            lbc = loramoe.balance_loss(task_type, attention_mask)
            reg = lbc if reg is None else reg + lbc
        if reg is None:
            return out
        return (out[0] + reg, out[1]) if return_outputs else out + reg

    def create_optimizer(self, model=None):  # noqa: D102 - same contract as Trainer
        if self.optimizer is not None:
            return self.optimizer
        model = self.model
        opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[str, dict[str, Any]] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            is_gate = name.startswith("gate.")
            key = ("gate" if is_gate else "adapter") + ("_decay" if name in decay else "_no_decay")
            group = groups.setdefault(
                key, {"params": [], "weight_decay": self.args.weight_decay if name in decay else 0.0}
            )
            if is_gate and self.gate_learning_rate is not None:
                group["lr"] = self.gate_learning_rate
            group["params"].append(param)
        self.optimizer = opt_cls(list(groups.values()), **opt_kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, IMSMModel):  # pragma: no cover - Trainer only ever wraps an IMSMModel here
            super()._save(output_dir, state_dict)
            return
        # ZeRO-3: every rank joins the gather of adapter + gate; rank 0 writes
        with distributed.gathered_trainable(model):
            if self.args.should_save:
                save_model(model, output_dir, self.run_config)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:  # noqa: D102
        if self.is_deepspeed_enabled:
            # straight to _save (adapter + gate, gathered under ZeRO-3): Trainer would gather the whole backbone
            self._save(output_dir or self.args.output_dir)
            return
        super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        # accelerate defines this class only when deepspeed is installed (the `deepspeed` extra)
        from accelerate.utils import DeepSpeedSchedulerWrapper

        # DeepSpeed's checkpoint without the frozen backbone (Trainer leaves it out only for a bare PeftModel)
        with resilience.trainable_module_states(self.model_wrapped):
            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), str(Path(output_dir) / SCHEDULER_NAME))

    # --- resilience (imsm.resilience) ---------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: D102 - same contract as Trainer
        loss = super().training_step(model, inputs, num_items_in_batch)
        # before the optimizer step: a NaN never reaches the weights or a checkpoint
        try:
            resilience.check_finite_loss(
                loss, self.state.global_step + 1, self.state.epoch, self.args.output_dir
            )
        except resilience.NonFiniteLossError as e:
            if not self.is_world_process_zero():  # rank 0 will only see a broken collective: tell it why
                resilience.record_rank_failure(Path(self.args.output_dir).parent, self.args.process_index, e)
            raise
        return loss

    def _save_checkpoint(self, model, trial) -> None:  # noqa: D102
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotated below, only once this checkpoint is complete
        folder = Path(self._get_output_dir(trial=trial))
        checkpoint = folder / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:  # before any file: a half-written checkpoint is still recognisably imsm's
            resilience.claim_checkpoint(checkpoint)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.args.should_save and not self.is_deepspeed_enabled:  # DeepSpeed resumes from its own files
            resilience.save_trainable(unwrapped, checkpoint / resilience.TRAINABLE_WEIGHTS)
        self.accelerator.wait_for_everyone()  # every rank's RNG state and shards are on disk
        if self.args.should_save:
            loss_sum, seconds = self.run_totals()
            resilience.write_progress(checkpoint, self.state.global_step, loss_sum, seconds)
            resilience.mark_complete(checkpoint, self.state.global_step)
            resilience.rotate_checkpoints(folder, limit)

    def run_totals(self) -> tuple[float, float]:
        """The whole run so far, earlier segments included: (sum of step losses, training seconds).

        Trainer's own loss counters cover this ``train()`` call only (logged part + not yet logged part).
        """
        segment_loss = getattr(self, "_total_loss_scalar", 0.0) + float(getattr(self, "_tr_loss", 0.0))
        seconds = time.perf_counter() - self._segment_start
        return self._prior.get("loss_sum", 0.0) + segment_loss, self._prior.get(
            "train_seconds", 0.0
        ) + seconds

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        """Adapter and gate from ``trainable.safetensors`` (Trainer's loader expects a full or a peft model)."""
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(target, IMSMModel):  # pragma: no cover
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        path = Path(resume_from_checkpoint) / resilience.TRAINABLE_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(
                f"{resume_from_checkpoint} has no {resilience.TRAINABLE_WEIGHTS}: not an IMSM checkpoint"
            )
        resilience.load_trainable(target, path)

    def train(  # noqa: D417
        self,
        resume_from_checkpoint: str | None = None,
        *,
        total_steps: int | None = None,
        **kwargs: Any,
    ) -> TrainOutput:
        """``Trainer.train``, whose ``training_loss`` and ``metrics["train_runtime"]`` cover the whole run.

        Args:
            resume_from_checkpoint: a complete checkpoint directory (``imsm.resilience.resolve_resume``) or None.
            total_steps: the run's planned optimizer steps. A checkpoint already at it means training finished
                (the job stopped while saving or evaluating): its weights are loaded and no step is run, where
                Trainer would run one step past the end.
        """
        self._prior = resilience.read_progress(resume_from_checkpoint)
        self._segment_start = time.perf_counter()
        done = resume_from_checkpoint and total_steps
        if done and resilience.checkpoint_step(resume_from_checkpoint) >= total_steps:
            return self._finished_at(resume_from_checkpoint)
        resuming_deepspeed = self.is_deepspeed_enabled and resume_from_checkpoint
        cache = getattr(self.model, "frozen_cache", None)
        # trainer.cache_frozen=disk: a fresh scratch file, deleted below however training ends
        if cache is not None:
            cache.open()
        try:
            with resilience.deepspeed_resume() if resuming_deepspeed else contextlib.nullcontext():
                output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            if cache is not None:
                cache.close()
        # Trainer's loss covers this call's steps only; the checkpoint's progress.json holds the steps before them
        segment_steps = output.global_step - getattr(self, "_initial_global_step", 0)
        loss_sum = self._prior.get("loss_sum", 0.0) + output.training_loss * segment_steps
        seconds = self._prior.get("train_seconds", 0.0) + time.perf_counter() - self._segment_start
        resumed = bool(self._prior) and output.global_step > 0
        loss = loss_sum / output.global_step if resumed else output.training_loss
        return TrainOutput(output.global_step, loss, {**output.metrics, "train_runtime": seconds})

    def _finished_at(self, checkpoint: str) -> TrainOutput:
        """The output of a run whose last checkpoint is its end: the checkpoint's weights, its recorded totals."""
        step = resilience.checkpoint_step(checkpoint)
        if self.is_deepspeed_enabled:
            raise NotImplementedError(  # DeepSpeed's weights load through its engine, built inside Trainer.train
                f"{checkpoint} is the end of training (step {step}); under DeepSpeed load it with "
                f"imsm.evaluate run_dir={checkpoint}, or resume=false to train again"
            )
        logger.info(
            "%s is at the end of training (step %d): no step is run, its weights are the result",
            checkpoint,
            step,
        )
        self._load_from_checkpoint(checkpoint)
        self.state.global_step = step
        totals = self._prior
        loss = totals["loss_sum"] / max(step, 1) if "loss_sum" in totals else None  # a checkpoint from before
        return TrainOutput(step, loss, {"train_runtime": totals.get("train_seconds", 0.0)})


def training_arguments(cfg: DictConfig, output_dir: str, world_size: int = 1) -> TrainingArguments:
    """``TrainingArguments`` from ``cfg.trainer.args`` over the method's recipe (``cfg.peft.optimizer``).

    The recipe is the default and an explicit ``trainer.args.*`` value wins: conf/trainer/default.yaml's ``optim``,
    ``learning_rate``, ``weight_decay``, ``lr_scheduler_type`` and ``warmup_steps`` interpolate the method's values,
    so ``trainer.args.learning_rate=1e-4`` replaces them; recipe keys the trainer does not name pass through.
    ``trainer.effective_batch_size`` (default: the method's paper batch, ``peft.batch_size``) sets the gradient
    accumulation so ``per_device_train_batch_size * accumulation * world_size`` reaches it.
    """
    args: dict[str, Any] = dict(OmegaConf.to_container(cfg.peft.optimizer, resolve=True))  # type: ignore[arg-type]
    args.update(OmegaConf.to_container(cfg.trainer.args, resolve=True))  # type: ignore[arg-type]
    per_device = int(args.get("per_device_train_batch_size", 8))
    effective = cfg.trainer.get("effective_batch_size")
    if effective:
        args["gradient_accumulation_steps"] = max(1, math.ceil(int(effective) / (per_device * world_size)))
    args.setdefault("report_to", "none")
    args = distributed.launcher_arguments(args, world_size)
    with distributed.deepspeed_cpu_ranks(args, world_size):
        training_args = TrainingArguments(
            output_dir=output_dir, seed=int(cfg.seed), remove_unused_columns=False, **args
        )
        distributed.check_world_size(training_args, world_size)
    return training_args
