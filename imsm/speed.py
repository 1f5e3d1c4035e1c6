"""The paper's Table 5 as a job: decoding tokens/s of vanilla PEFT vs IMSM for one backbone and method.

``python -m imsm.speed [overrides]`` (``imsm-speed``) composes the training config (``conf/train.yaml``) and times
decoding; ``python -m imsm.train speed={...}`` (``conf/experiment/table5*.yaml``) does the same. The model is the
run's own build (backbone + the method's adapter + the configured gate); vanilla is the same weights with no gate,
so only the tuned stream runs. Both decode through ``IMSMModel.generate`` with ``imsm.timing``: contenders
interleaved inside every repeat, EOS ignored so each produces exactly ``new_tokens``, the median over repeats;
the ratio is the median of the per-repeat ratios, with its confidence interval (``imsm.timing.paired_ratio``).
Timing does not depend on the weights' values, so nothing is trained.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from imsm import CONF_DIR
from imsm.model.build import build_model
from imsm.model.siamese import IMSMModel
from imsm.record import RunRecord, write_record
from imsm.timing import alternate, decode_fn, paired_ratio, prompt_batch

ADALORA_PLACEHOLDER_STEPS = 1000  # AdaLoRA's schedule needs a step count; decoding does not depend on it
# `speed` when the config leaves it null (`python -m imsm.speed` alone): the paper's Table 5 settings
DEFAULT_SPEED = {"batch_size": 1, "prompt_length": 100, "new_tokens": 128, "repeats": 5}


def speed_run(cfg: DictConfig, run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Time greedy decoding of IMSM and vanilla; writes and returns ``metrics.json`` (``speed`` section).

    ``cfg.speed``: ``{batch_size, prompt_length, new_tokens, repeats}``; ``record``: the job's choices and setup,
    copied into ``metrics.json`` first.
    """
    sp = cfg.speed
    start = time.perf_counter()
    set_seed(int(cfg.seed))
    imsm, tokenizer = build_model(cfg, total_steps=ADALORA_PLACEHOLDER_STEPS)
    if imsm.gate is None:
        raise ValueError(
            f"speed runs compare IMSM with vanilla: gate={cfg.gate.type!r} has no gate to compare "
            "(choose gate=query_aware, no_query or fixed)"
        )
    imsm.eval()
    vanilla = IMSMModel(imsm.peft_model, None, pooling=imsm.pooling).eval()
    device = str(next(imsm.parameters()).device)
    batch, new = int(sp.batch_size), int(sp.new_tokens)
    ids, mask = prompt_batch(tokenizer, batch, int(sp.prompt_length), device)
    with torch.no_grad():
        seconds = alternate(
            {"imsm": decode_fn(imsm, ids, mask, new), "vanilla": decode_fn(vanilla, ids, mask, new)},
            int(sp.repeats),
            device,
        )
    tokens_per_s = {name: batch * new / s["median"] for name, s in seconds.items()}
    # the tokens/s ratio per round (vanilla's time over IMSM's, timed side by side): its median and interval
    paired = paired_ratio(seconds["vanilla"], seconds["imsm"])
    result = {
        **record,
        "status": "ok",
        "run_dir": str(run_dir),
        "speed": {
            "device": device,
            "batch_size": batch,
            "prompt_length": int(ids.shape[1]),
            "new_tokens": new,
            "repeats": int(sp.repeats),
            "seconds": seconds,
            "tokens_per_s": tokens_per_s,
            "imsm/vanilla": paired["median"],
            "imsm/vanilla_interval": paired,
        },
        "trainable_parameters": imsm.trainable_parameters(),
        "wall_seconds": time.perf_counter() - start,
    }
    write_record(run_dir, RunRecord.from_dict(result))  # the same metrics.json writer as every other job
    print(
        f"\ndecoding {cfg.backbone.name} {cfg.peft.name}: IMSM {tokens_per_s['imsm']:.1f} tok/s, "
        f"vanilla {tokens_per_s['vanilla']:.1f} tok/s (batch {batch}, {new} new tokens)\nrun dir: {run_dir}",
        flush=True,
    )
    return result


def with_speed_defaults(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``speed`` filled in: ``DEFAULT_SPEED`` under whatever the config or command line set."""
    given = OmegaConf.to_container(cfg.speed, resolve=True) if cfg.get("speed") else {}
    OmegaConf.update(cfg, "speed", {**DEFAULT_SPEED, **given}, merge=False, force_add=True)
    return cfg


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """``python -m imsm.speed backbone=... peft=... ['speed={new_tokens: 32}']``: one speed job.

    ``speed`` is null in ``train.yaml``, so its keys are set as one dict; the rest come from ``DEFAULT_SPEED``.
    """
    from imsm.train import run_record  # the same record a training job writes, so imsm.report groups both

    cfg = with_speed_defaults(cfg)
    run_dir = Path(cfg.get("run_dir") or HydraConfig.get().runtime.output_dir)
    speed_run(cfg, run_dir, run_record(cfg, run_dir).to_dict())


if __name__ == "__main__":
    main()
