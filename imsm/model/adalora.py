"""AdaLoRA done fully: the orthogonal regulariser in the loss, rank re-allocation every optimizer step, a schedule.

peft adds AdaLoRA's orthogonal regulariser inside ``AdaLoraModel.forward`` and leaves the budget re-allocation
(``update_and_allocate``) to the training loop. IMSM computes its loss on the mixed state, outside
``PeftModel.forward``, so neither would happen by itself. Here:

- ``orthogonal_regularisation``: peft's term, ``mean_i ||P_i P_i^T - I||_F`` over every ``lora_A`` (P = A) and
  ``lora_B`` (P = B^T) of the trained adapter; ``IMSMTrainer.compute_loss`` adds ``orth_reg_weight`` times it.
- ``AdaLoraCallback``: calls ``update_and_allocate(global_step)`` from ``on_optimizer_step``, i.e. after
  ``optimizer.step()`` and before ``zero_grad()`` (the gradients it scores importance with are still there), with
  the 0-based index of that optimizer step, as peft's own example loop does.
- ``adalora_schedule``: ``total_step`` is the run's number of optimizer steps; ``tinit`` / ``tfinal`` may be given as
  fractions of it, so tiny test runs and full runs share one config.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from peft import AdaLoraConfig, PeftModel
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)


def adalora_config(peft_model: PeftModel) -> AdaLoraConfig | None:
    """The trained adapter's config when it is AdaLoRA, else None."""
    config = peft_model.peft_config.get(peft_model.active_adapter)
    return config if isinstance(config, AdaLoraConfig) else None


def freeze_ranknum(peft_model: PeftModel) -> int:
    """Keep AdaLoRA's ``ranknum`` (the constant each layer divides its scaling by) out of training; returns how many.

    peft 0.21.2 creates it with ``requires_grad=False`` but then moves the adapter to the base layer's device/dtype,
    and the ``ParameterDict`` re-wraps the moved tensor as a *trainable* Parameter: on any bf16 or GPU backbone the
    optimizer would update it, and since peft never saves it, a reloaded adapter would not match the trained one.
    """
    frozen = 0
    for n, p in peft_model.named_parameters():
        if ".ranknum." in n and p.requires_grad:
            p.requires_grad_(False)
            frozen += 1
    return frozen


def orthogonal_regularisation(peft_model: PeftModel) -> torch.Tensor:
    """``mean ||P P^T - I||_F`` over the adapter's ``lora_A`` (P = A, r x in) and ``lora_B`` (P = B^T, r x out).

    The same term as ``peft.tuners.adalora.AdaLoraModel.forward`` (unweighted); a 0-dim tensor with gradients.
    """
    name = peft_model.active_adapter
    terms = []
    for n, p in peft_model.named_parameters():
        if (".lora_A." in n or ".lora_B." in n) and n.endswith(f".{name}"):
            cov = p @ p.T if ".lora_A." in n else p.T @ p
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
    if not terms:
        raise ValueError(
            "orthogonal_regularisation: the active adapter has no lora_A / lora_B (is it AdaLoRA?)"
        )
    return torch.stack(terms).mean()


def adalora_schedule(node: dict[str, Any], total_steps: int) -> dict[str, Any]:
    """``total_step``, ``tinit``, ``tfinal`` for a run of ``total_steps`` optimizer steps.

    ``tinit`` / ``tfinal`` below 1 are fractions of ``total_steps``. ``tfinal`` is at least 1 so the final budget
    (``target_r`` per module) is really reached at step ``total_step - tfinal`` (steps count from 0). Where the run is
    too short for a budgeting phase, both shrink so ``tinit < total_step - tfinal`` (peft's requirement).
    """
    if total_steps < 1:
        raise ValueError(f"AdaLoRA needs at least one optimizer step, got total_step={total_steps}")

    def steps(value: Any, default: float) -> int:
        value = default if value is None else value
        return int(round(value * total_steps)) if isinstance(value, float) and value < 1 else int(value)

    tinit, tfinal = steps(node.get("tinit"), 0.1), max(1, steps(node.get("tfinal"), 0.2))
    if tinit >= total_steps - tfinal:
        tinit, tfinal = 0, min(tfinal, max(total_steps - 1, 0))
        if tinit >= total_steps - tfinal:
            tfinal = 0
    return {"total_step": int(total_steps), "tinit": tinit, "tfinal": tfinal}


def training_steps(
    n_examples: int,
    per_device_batch: int,
    grad_accumulation: int,
    epochs: float,
    world_size: int = 1,
    max_steps: int = -1,
) -> int:
    """Optimizer steps ``transformers.Trainer`` will take (its own arithmetic): ``max_steps`` when > 0, else
    ``ceil(epochs * ceil(batches_per_process / grad_accumulation))`` with ``ceil(ceil(n / batch) / world)``
    batches per process."""
    if max_steps and max_steps > 0:
        return int(max_steps)
    batches = math.ceil(math.ceil(n_examples / per_device_batch) / world_size)
    per_epoch = max(math.ceil(batches / grad_accumulation), 1)
    return math.ceil(epochs * per_epoch)


class AdaLoraCallback(TrainerCallback):
    """Re-allocate AdaLoRA's rank budget after every optimizer step (peft's ``update_and_allocate``).

    Args:
        peft_model: the ``PeftModel`` holding the AdaLoRA adapter (``IMSMModel.peft_model``).
    """

    def __init__(self, peft_model: PeftModel):
        self.peft_model = peft_model
        # ranks kept by the allocator after each optimizer step: a trace for tests and logs
        self.budgets: list[int] = []

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        config = adalora_config(self.peft_model)
        if config is not None and state.max_steps != config.total_step:
            log.warning(
                "AdaLoRA total_step=%d but the Trainer will take %d optimizer steps: the rank budget schedule will "
                "not end where planned",
                config.total_step,
                state.max_steps,
            )

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Trainer: optimizer.step() -> on_optimizer_step -> lr_scheduler.step() -> zero_grad() -> global_step += 1
        self.peft_model.base_model.update_and_allocate(state.global_step)
        self.budgets.append(allocated_ranks(self.peft_model))


def allocated_ranks(peft_model: PeftModel) -> int:
    """Ranks the allocator keeps across the adapter: all ``init_r`` per module until it first prunes, then the
    ``True`` entries of ``rank_pattern``."""
    config = adalora_config(peft_model)
    if config is None:
        raise ValueError("allocated_ranks: the active adapter is not AdaLoRA")
    if config.rank_pattern:
        return int(sum(sum(bool(x) for x in mask) for mask in config.rank_pattern.values()))
    name = peft_model.active_adapter
    return sum(
        p.shape[0] for n, p in peft_model.named_parameters() if ".lora_E." in n and n.endswith(f".{name}")
    )


def active_ranks(peft_model: PeftModel) -> int:
    """Nonzero singular values (``lora_E`` entries) across the adapter: the ranks really in use (``lora_E`` starts
    at zero, so this counts only after training steps with a nonzero learning rate)."""
    name = peft_model.active_adapter
    return int(
        sum(
            (p != 0).sum().item()
            for n, p in peft_model.named_parameters()
            if ".lora_E." in n and n.endswith(f".{name}")
        )
    )
