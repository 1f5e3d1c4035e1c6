"""Training through Hugging Face ``Trainer``: what IMSM changes and nothing more.

- The loss comes from ``IMSMModel.forward`` (response tokens only), so ``Trainer.compute_loss`` is unchanged.
- The gate gets its own learning rate (the authors trained it at 1e-3) in its own optimizer parameter group; the
  optimizer class itself is whatever ``TrainingArguments.optim`` names (AdamW, Adafactor, ...).
- Checkpoints and the final save hold the adapter and the gate only, never the frozen backbone.
- AdaLoRA: the loss gets peft's orthogonal regulariser (IMSM's loss is computed outside ``PeftModel.forward``, where
  peft would add it) and ``AdaLoraCallback`` re-allocates the rank budget every optimizer step.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import Trainer, TrainingArguments

from imsm.model.adalora import AdaLoraCallback, adalora_config, orthogonal_regularisation
from imsm.model.build import save_model
from imsm.model.siamese import IMSMModel


class IMSMTrainer(Trainer):
    """``Trainer`` with a gate learning rate, adapter-only checkpoints and complete AdaLoRA training."""

    def __init__(self, *args: Any, gate_learning_rate: float | None = None, **kwargs: Any):
        self.gate_learning_rate = gate_learning_rate
        super().__init__(*args, **kwargs)
        model = self.model
        needs_allocation = isinstance(model, IMSMModel) and adalora_config(model.peft_model) is not None
        if needs_allocation and not any(
            isinstance(c, AdaLoraCallback) for c in self.callback_handler.callbacks
        ):
            self.add_callback(AdaLoraCallback(model.peft_model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        out = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        unwrapped = self.accelerator.unwrap_model(model)
        config = adalora_config(unwrapped.peft_model) if isinstance(unwrapped, IMSMModel) else None
        if config is None or config.orth_reg_weight == 0 or not model.training:
            return out
        reg = config.orth_reg_weight * orthogonal_regularisation(unwrapped.peft_model)
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
        if isinstance(model, IMSMModel):
            save_model(model, output_dir)
        else:  # pragma: no cover - Trainer only ever wraps an IMSMModel here
            super()._save(output_dir, state_dict)


def training_arguments(cfg: DictConfig, output_dir: str, world_size: int = 1) -> TrainingArguments:
    """``TrainingArguments`` from ``cfg.trainer.args`` plus the method's recipe (``cfg.peft.optimizer``).

    ``trainer.effective_batch_size`` (default: the method's paper batch) sets the gradient accumulation so
    ``per_device_train_batch_size * accumulation * world_size`` reaches it.
    """
    args: dict[str, Any] = OmegaConf.to_container(cfg.trainer.args, resolve=True)  # type: ignore[assignment]
    args.update(OmegaConf.to_container(cfg.peft.optimizer, resolve=True))  # type: ignore[arg-type]
    per_device = int(args.get("per_device_train_batch_size", 8))
    effective = cfg.trainer.get("effective_batch_size")
    if effective:
        args["gradient_accumulation_steps"] = max(1, math.ceil(int(effective) / (per_device * world_size)))
    args.setdefault("report_to", "none")
    return TrainingArguments(output_dir=output_dir, seed=int(cfg.seed), remove_unused_columns=False, **args)
