"""``training_arguments``: the method file's recipe is the default, an explicit ``trainer.args`` value wins."""

from __future__ import annotations

import pytest
from helpers import compose_train

from imsm.training import training_arguments


def args_for(overrides: list[str], tmp_path):
    return training_arguments(compose_train(overrides), str(tmp_path))


@pytest.mark.parametrize(
    ("method", "optim", "lr", "weight_decay", "batch"),
    [
        ("lora", "adamw_torch", 3e-4, 0.01, 16),
        ("ia3", "adafactor", 3e-3, 0.0, 8),
        ("adalora", "adamw_torch", 2e-3, 0.01, 16),
        ("dora", "adamw_torch", 1e-4, 0.01, 16),
    ],
)
def test_the_method_recipe_applies_by_default(tmp_path, method, optim, lr, weight_decay, batch):
    args = args_for([f"peft={method}"], tmp_path)
    assert (args.optim.value, args.learning_rate, args.weight_decay) == (optim, lr, weight_decay)
    assert args.lr_scheduler_type.value == "cosine" and args.warmup_steps == 0.1  # the trainer's own defaults
    # the method's batch (peft.batch_size) is reached by accumulation over the per-device batch of 4
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == batch


def test_a_method_recipe_beats_the_trainer_defaults(tmp_path):
    """LoRAMoE's recipe names its schedule too: it replaces the trainer file's warm-up."""
    args = args_for(["peft=loramoe"], tmp_path)
    assert (args.learning_rate, args.weight_decay, args.warmup_steps) == (2e-4, 0.0, 0.03)


def test_explicit_trainer_args_win_over_the_method_recipe(tmp_path):
    args = args_for(
        [
            "peft=loramoe",
            "trainer.args.learning_rate=1e-5",
            "trainer.args.optim=adafactor",
            "trainer.args.weight_decay=0.5",
            "trainer.args.warmup_steps=7",
            "trainer.args.lr_scheduler_type=linear",
            "trainer.effective_batch_size=32",
        ],
        tmp_path,
    )
    assert (args.learning_rate, args.optim.value, args.weight_decay) == (1e-5, "adafactor", 0.5)
    assert (args.warmup_steps, args.lr_scheduler_type.value) == (7, "linear")
    assert args.gradient_accumulation_steps == 8  # 32 / per-device 4, not LoRAMoE's batch 8


def test_changing_the_method_recipe_still_reaches_the_trainer(tmp_path):
    """An experiment that retunes the method (replicate_cpu_*: peft.optimizer.learning_rate=1e-3) keeps working."""
    assert args_for(["peft.optimizer.learning_rate=1e-3"], tmp_path).learning_rate == 1e-3
    args = args_for(["experiment=replicate_cpu_mrpc", "trainer.args.bf16=false"], tmp_path)
    assert (args.learning_rate, args.gradient_accumulation_steps) == (1e-3, 1)  # 16 per device = LoRA's 16
    assert (
        args_for(["experiment=replicate_cpu_mrpc", "trainer.args.learning_rate=5e-4"], tmp_path).learning_rate
        == 5e-4
    )


def test_recipe_keys_the_trainer_does_not_name_pass_through(tmp_path):
    """A method file may set any TrainingArguments field in `optimizer:`; it is the default for that field too."""
    assert args_for(["+peft.optimizer.adam_beta2=0.95"], tmp_path).adam_beta2 == 0.95
    overridden = args_for(["+peft.optimizer.adam_beta2=0.95", "+trainer.args.adam_beta2=0.9"], tmp_path)
    assert overridden.adam_beta2 == 0.9
