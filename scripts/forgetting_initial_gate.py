"""The gate value g of the untrained IMSM model of each seed of scripts/forgetting_cpu.sh (docs/results-forgetting-cpu.md).

train() seeds, then builds the model, so set_seed(seed) + build_model gives the same gate initialisation as the
run of that seed. Scored by likelihood on the first 200 WebQ test questions and 200 MRPC test pairs, as the runs
were (bf16 autocast, batch 32). Usage: IMSM_DATA_DIR=../shared/data python scripts/forgetting_initial_gate.py
"""

import tempfile
from dataclasses import replace
from pathlib import Path

from hydra import compose, initialize_config_dir
from transformers import set_seed

from imsm import CONF_DIR
from imsm.evaluation import EvalSettings, score_dataset
from imsm.model.build import build_model

with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose(
        "train", overrides=["experiment=forgetting_cpu", "gate=query_aware", "eval.original_cache=null"]
    )
for seed in (1, 2, 3, 4):
    set_seed(seed)
    model, tok = build_model(cfg)
    s = EvalSettings.from_train_config(cfg)
    out = []
    for ds in s.datasets:
        if ds.name in ("webq", "mrpc"):
            m, _ = score_dataset(model, tok, replace(ds, limit=200), s, Path(tempfile.mkdtemp()), "imsm")
            out.append(f"{ds.name} {m['gate']['mean']:.4f}")
    print("seed", seed, *out, flush=True)
