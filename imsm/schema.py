"""The types of imsm's own settings: a structured-config schema checked before any work.

``conf/train.yaml``'s top-level keys and its ``eval`` group are imsm's (the config groups ``backbone``, ``peft``,
``gate``, ``dataset``, ``trainer``, ``logger`` are checked where they are used: peft's and transformers' own
dataclasses, ``imsm.checks``; of ``trainer`` only ``cache_frozen``'s choice is checked here). Hydra rejects an
unknown key unless it is added with ``+``; this schema also catches what Hydra lets through: a value of the wrong
type (``max_train_samples=ten``, ``eval.at_steps=5``), a choice that does not exist (``eval.scoring=likelyhood``,
``trainer.cache_frozen=dsik``), and a misspelt key added with ``+`` (``+eval.scorng=both``). Every problem is
listed at once, each with its key.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException


class Scoring(Enum):
    generate = 1
    likelihood = 2
    both = 3


class Aliases(Enum):
    first = 1
    best = 2


class BadRows(Enum):
    error = 1
    skip = 2


class Autocast(Enum):
    fp32 = 1
    bf16 = 2
    fp16 = 3


@dataclass
class EvalSchema:
    enabled: bool = True
    scoring: Scoring = Scoring.generate
    aliases: Aliases = Aliases.first
    answer_eos: bool = True
    scoring_by_dataset: dict[str, Scoring] | None = None
    at_steps: list[int] = field(default_factory=list)
    every_n_steps: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    autocast: Autocast | None = None
    limits: dict[str, int | None] | None = None
    compare_base: bool = True
    original_cache: str | None = None
    on_bad_row: BadRows = BadRows.error


@dataclass
class TrainSchema:
    seed: int = 42
    data_dir: str | None = None
    run_dir: str | None = None
    resume: Any = (
        "auto"  # auto | true | false | a checkpoint path (checked by imsm.resilience.resolve_resume)
    )
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_input_length: int = 512
    max_output_length: int = 512
    chat_template: bool = False
    dry_run: bool = False
    experiment_name: str | None = None
    speed: Any = None
    eval_datasets: list[str] = field(default_factory=list)
    eval: EvalSchema = field(default_factory=EvalSchema)


GROUPS = (
    "backbone",
    "peft",
    "gate",
    "dataset",
    "trainer",
    "logger",
    "report",
    "scale",
)  # checked where they are used


def schema_errors(cfg: DictConfig) -> list[str]:
    """One line per imsm setting of ``cfg`` whose key or type is wrong (empty: all fine)."""
    errors: list[str] = []
    schema = OmegaConf.structured(TrainSchema)
    for key in cfg:
        if key in GROUPS:
            continue
        if key not in schema:
            errors.append(f"{key}: not a setting of imsm.train{_did_you_mean(key, [*schema, *GROUPS])}")
            continue
        if key == "eval":
            for sub in cfg.eval:
                errors += _check(OmegaConf.structured(EvalSchema), cfg.eval, sub, "eval.")
        else:
            errors += _check(schema, cfg, key, "")
    try:
        cache_frozen_storage(OmegaConf.select(cfg, "trainer.cache_frozen", default=False))
    except ValueError as e:
        errors.append(str(e))
    return errors


# trainer.cache_frozen -> where the frozen stream's states are kept (imsm.model.frozen_cache); None: not cached
CACHE_FROZEN = {
    False: None,
    True: "memory",
    "false": None,
    "true": "memory",
    "memory": "memory",
    "disk": "disk",
}


def cache_frozen_storage(value: Any) -> str | None:
    """``trainer.cache_frozen`` as ``"memory"``, ``"disk"`` or None (off); ``true`` is ``memory``.

    Raises:
        ValueError: any other value, naming the choices.
    """
    if isinstance(value, bool | str) and value in CACHE_FROZEN:
        return CACHE_FROZEN[value]
    choices = ["false", "true", "memory", "disk"]
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"trainer.cache_frozen={value!r}: expected one of [{', '.join(choices)}]{hint}")


def _check(schema: DictConfig, node: DictConfig, key: str, prefix: str) -> list[str]:
    """Merge one value into its typed slot (resolved when it can be: ``${hydra:...}`` cannot be outside a job)."""
    if key not in schema:
        return [f"{prefix}{key}: not a setting{_did_you_mean(key, list(schema))}"]
    try:
        value = OmegaConf.to_container(node, resolve=True)[key]
    except InterpolationResolutionError:
        return []
    try:
        OmegaConf.merge(schema, {key: value})
    except OmegaConfBaseException as e:
        reason = str(e).splitlines()[0]
        return [f"{prefix}{key}={value!r}: {reason}"]
    return []


def _did_you_mean(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (choices: {sorted(choices)})"
