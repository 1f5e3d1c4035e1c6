"""The paper's Table 5 as a job: decoding tokens/s of vanilla PEFT vs IMSM for one backbone and method.

``speed={...}`` in the run config (``conf/experiment/table5*.yaml``) makes ``imsm.train`` time decoding instead of
training. The model is the run's own build (backbone + the method's adapter + the configured gate); vanilla is the
same weights with no gate, so only the tuned stream runs. Both decode through ``IMSMModel.generate`` with the
benchmark's timing (``imsm.bench``): contenders interleaved inside every repeat, EOS ignored so each produces exactly
``new_tokens``, the median over repeats. Timing does not depend on the weights' values, so nothing is trained.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import set_seed

from imsm.bench import alternate, decode_fn, prompt_batch
from imsm.io import write_json
from imsm.model.build import build_model
from imsm.model.siamese import IMSMModel

ADALORA_PLACEHOLDER_STEPS = 1000  # AdaLoRA's schedule needs a step count; decoding does not depend on it


def speed_run(cfg: DictConfig, run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Time greedy decoding of IMSM and vanilla; writes and returns ``metrics.json`` (``speed`` section)."""
    sp = cfg.speed
    start = time.perf_counter()
    set_seed(int(cfg.seed))
    imsm, tokenizer = build_model(cfg, total_steps=ADALORA_PLACEHOLDER_STEPS)
    if imsm.gate is None:
        raise ValueError(
            f"speed runs compare IMSM with vanilla: gate={cfg.gate.type!r} has no gate to compare"
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
            "imsm/vanilla": tokens_per_s["imsm"] / tokens_per_s["vanilla"],
        },
        "trainable_parameters": imsm.trainable_parameters(),
        "wall_seconds": time.perf_counter() - start,
    }
    write_json(run_dir / "metrics.json", result)
    print(
        f"\ndecoding {cfg.backbone.name} {cfg.peft.name}: IMSM {tokens_per_s['imsm']:.1f} tok/s, "
        f"vanilla {tokens_per_s['vanilla']:.1f} tok/s (batch {batch}, {new} new tokens)\nrun dir: {run_dir}",
        flush=True,
    )
    return result
