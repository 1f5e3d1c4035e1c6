"""Evaluate a saved run, or the frozen backbone alone, on several datasets: the paper's forgetting row.

``python -m imsm.evaluate run_dir=...`` (or ``imsm-evaluate ...``) loads a run saved by ``imsm.train``;
``python -m imsm.evaluate model=base`` evaluates the backbone alone (the paper's "Original" row): it is wrapped in an
``IMSMModel`` with a throw-away rank-1 LoRA adapter and no gate, and scored with ``streams="base"``, i.e. with the
adapter switched off, so the same batched, KV-cached code runs the frozen model unchanged. The scoring itself is the
evaluation stage (``imsm.evaluation``): ``<out_dir>/<name>/{metrics.json, predictions.jsonl}`` per dataset and a
table (dataset x metric) on the terminal. ``on_bad_row=skip`` skips malformed rows of every dataset; each dataset's
``metrics.json`` says how many (``skipped_rows``), and the terminal lists the sets that had any.
"""

from __future__ import annotations

from imsm.cli import absolute_paths, quick_answer

quick_answer(__name__, "evaluate")  # --help, --cfg, --info: answered before the heavy imports below

import logging
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedTokenizerBase

from imsm import CONF_DIR
from imsm.backbones import load_backbone
from imsm.evaluation import EvalSettings, evaluate_datasets, results_table
from imsm.model.build import load_model
from imsm.model.siamese import IMSMModel

log = logging.getLogger(__name__)
MODELS = ("run", "base")


def base_model(backbone_cfg: DictConfig) -> tuple[IMSMModel, PreTrainedTokenizerBase]:
    """The backbone alone, as an ``IMSMModel`` to score with ``streams="base"`` (adapter disabled)."""
    backbone, tokenizer = load_backbone(backbone_cfg)
    for p in backbone.parameters():
        p.requires_grad_(False)
    targets = (backbone_cfg.get("target_modules") or {}).get("lora")
    # never switched on: streams="base" disables it, so its size and initial values do not matter
    adapter = LoraConfig(r=1, target_modules=list(targets) if targets else None, task_type="CAUSAL_LM")
    return IMSMModel(get_peft_model(backbone, adapter), gate=None).eval(), tokenizer


def evaluate(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Build the model ``cfg.model`` asks for and run the evaluation stage; prints the table."""
    if cfg.model not in MODELS:
        raise ValueError(f"model={cfg.model!r} is not one of {list(MODELS)}")
    if cfg.model == "run" and not cfg.get("run_dir"):
        raise ValueError("model=run needs run_dir=<a directory saved by imsm.train>; or use model=base")
    settings = EvalSettings.from_evaluate_config(cfg)  # unknown datasets fail before the model loads
    if cfg.model == "base":
        (model, tokenizer), streams = base_model(cfg.backbone), "base"
    else:
        (model, tokenizer), streams = (
            load_model(cfg.run_dir, trust_remote_code=bool(cfg.get("trust_remote_code"))),
            cfg.streams,
        )
    out_dir = cfg.get("out_dir") or HydraConfig.get().runtime.output_dir
    evaluated = evaluate_datasets(model, tokenizer, settings, out_dir, streams)
    results = evaluated.model
    label = "base model" if cfg.model == "base" else f"{cfg.run_dir} (streams={streams})"
    skipped = {split: n for split, n in evaluated.skipped_rows.items() if n}
    note = f"\nmalformed rows skipped (on_bad_row=skip): {skipped}" if skipped else ""
    print(f"\n{label}, limit={cfg.limit}\n{results_table(results)}{note}\noutputs: {out_dir}", flush=True)
    return results


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("imsm").setLevel(logging.INFO)
    absolute_paths(
        cfg, ("data_dir", "run_dir", "out_dir", "backbone.name_or_path")
    )  # also under hydra.job.chdir
    evaluate(cfg)


if __name__ == "__main__":
    main()
