"""Helpers shared by the tests: one way to compose the run config, tiny-run overrides, a tiny GSM8K directory."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from imsm import CONF_DIR

CONF = str(CONF_DIR)
GSM_ROWS = [
    {
        "question": f"Tom has {i} apples and buys {i + 1} more. How many apples does he have?",
        "answer": f"Tom has {i} + {i + 1} = <<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1} apples.\n#### {2 * i + 1}",
    }
    for i in range(12)
]


def compose_train(
    overrides: list[str], config_name: str = "train", searchpath: Path | None = None
) -> DictConfig:
    """``conf/<config_name>.yaml`` with Hydra ``overrides`` (and an extra config directory searched first)."""
    if searchpath is not None:
        overrides = [*overrides, f"hydra.searchpath=[file://{searchpath}]"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def write_gsm(root: Path, rows: list[dict] = GSM_ROWS) -> Path:
    """``root/gsm8k/{train,test}.jsonl`` with ``rows``; returns ``root`` (a ``data_dir``)."""
    d = root / "gsm8k"
    d.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# a tiny_llama run: 8 training examples, 2 optimizer steps of 4, 3 evaluation examples of 6 new tokens
TINY_RUN = [
    "backbone=tiny_llama",
    "max_train_samples=8",
    "max_eval_samples=3",
    "eval.max_new_tokens=6",
    "eval.batch_size=2",
    "trainer.args.max_steps=2",
    "trainer.args.per_device_train_batch_size=4",
    "trainer.effective_batch_size=4",
    "trainer.args.disable_tqdm=true",
]


def tiny_overrides(run_dir: Path, data_dir: Path, gate: str = "query_aware") -> list[str]:
    """``TINY_RUN`` with its gate, run directory and data."""
    return [*TINY_RUN, f"gate={gate}", f"run_dir={run_dir}", f"data_dir={data_dir}"]
