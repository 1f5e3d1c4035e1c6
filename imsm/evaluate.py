"""Evaluate a model on several datasets at once: the forgetting evaluation of the paper.

``python -m imsm.evaluate run_dir=...`` loads a saved run (``imsm.model.build.load_model``);
``python -m imsm.evaluate model=base`` evaluates the backbone alone (the paper's "Original" row). The backbone is
wrapped in an ``IMSMModel`` with a throw-away rank-1 LoRA adapter and no gate, and generation runs with
``streams="base"``, i.e. with the adapter switched off: the existing batched, KV-cached generation code runs the
frozen model unchanged. Each dataset's evaluation split (``conf/dataset/<name>.yaml``) is generated and scored; every
dataset gets ``<out_dir>/<name>/metrics.json`` and ``predictions.jsonl``, and a table (dataset x metric) is printed.

``evaluate_datasets`` is the reusable part: the training script calls it after training on ``eval_datasets``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedTokenizerBase

from imsm.backbones import load_backbone
from imsm.data import dataset_config, load_split
from imsm.io import write_json, write_jsonl
from imsm.model.build import load_model
from imsm.model.siamese import IMSMModel
from imsm.predict import evaluate_examples

log = logging.getLogger(__name__)
MODELS = ("run", "base")


def base_model(backbone_cfg: DictConfig) -> tuple[IMSMModel, PreTrainedTokenizerBase]:
    """The backbone alone, as an ``IMSMModel`` to generate from with ``streams="base"`` (adapter disabled)."""
    backbone, tokenizer = load_backbone(backbone_cfg)
    for p in backbone.parameters():
        p.requires_grad_(False)
    targets = (backbone_cfg.get("target_modules") or {}).get("lora")
    # never switched on: streams="base" disables it, so its size and initial values do not matter
    adapter = LoraConfig(r=1, target_modules=list(targets) if targets else None, task_type="CAUSAL_LM")
    return IMSMModel(get_peft_model(backbone, adapter), gate=None).eval(), tokenizer


def evaluate_datasets(
    model: IMSMModel,
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    data_dir: str | None,
    limit: int | None,
    out_dir: str | Path,
    batch_size: int,
    max_input_length: int,
    chat_template: bool,
    streams: str = "imsm",
    *,
    max_new_tokens: int | None = None,
    source: str | None = None,
    limits: Mapping[str, int | None] | None = None,
    autocast: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Generate and score the evaluation split of each named dataset.

    Args:
        names: file names in ``conf/dataset/`` (e.g. ``["webq", "freebaseqa", "multirc", "mrpc"]``).
        limit: first N examples of each split (None: all).
        limits: per-dataset overrides of ``limit`` (``{"multirc": None, "webq": 200}``).
        autocast: ``bf16`` / ``fp16`` autocast during generation (None: the weights' precision).
        out_dir: receives ``<name>/metrics.json``, ``<name>/predictions.jsonl`` and ``metrics.json`` (all of them).
        streams: ``imsm``, ``base`` (frozen model alone) or ``tuned``.
        max_new_tokens: overrides each dataset's ``max_new_tokens``.
        source: overrides each dataset's ``source`` (``raw`` | ``reference`` | ``hub``).

    Returns:
        ``{name: metrics}`` (the metric summary of each dataset).
    """
    configs = {name: dataset_config(name) for name in names}  # unknown names fail before any generation
    out_dir = Path(out_dir)
    results: dict[str, dict[str, Any]] = {}
    for i, (name, ds) in enumerate(configs.items(), start=1):
        if source:
            ds.source = source
        split = ds.eval_split
        n = limits[name] if limits and name in limits else limit
        examples = load_split(ds, data_dir, split, n)
        log.info("[%d/%d] %s/%s (%s): %d examples", i, len(configs), name, split, ds.source, len(examples))
        start = time.perf_counter()
        metrics, rows = evaluate_examples(
            model,
            tokenizer,
            examples,
            ds.metric,
            max_new_tokens=max_new_tokens or ds.max_new_tokens,
            batch_size=batch_size,
            max_input_length=max_input_length,
            chat_template=chat_template,
            streams=streams,
            desc=f"{name} ({streams})",
            autocast=autocast,
        )
        info = {
            "dataset": name,
            "split": split,
            "source": ds.source,
            "metric": ds.metric,
            "streams": streams,
            "limit": n,
            "autocast": autocast,
            "seconds": round(time.perf_counter() - start, 2),
            "metrics": metrics,
        }
        write_json(out_dir / name / "metrics.json", info)
        write_jsonl(out_dir / name / "predictions.jsonl", rows)
        results[name] = metrics
    write_json(out_dir / "metrics.json", results)
    return results


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """Datasets as rows, every metric that any of them reports as columns (``-`` where absent)."""
    columns: list[str] = []
    for metrics in results.values():
        columns += [k for k in metrics if k not in columns]
    counts = [c for c in ("invalid", "n") if c in columns]  # counts after the scores
    columns = [c for c in columns if c not in counts] + counts
    width = max([len("dataset"), *map(len, results)]) + 2
    lines = [f"{'dataset':<{width}}" + "".join(f"{c:>13}" for c in columns)]
    for name, metrics in results.items():
        cells = []
        for c in columns:
            v = metrics.get(c)
            cells.append("-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append(f"{name:<{width}}" + "".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Build the model ``cfg.model`` asks for and run ``evaluate_datasets``; prints the table."""
    if cfg.model not in MODELS:
        raise ValueError(f"model={cfg.model!r} is not one of {list(MODELS)}")
    if cfg.model == "base":
        model, tokenizer = base_model(cfg.backbone)
        streams = "base"
    else:
        if not cfg.get("run_dir"):
            raise ValueError("model=run needs run_dir=<a directory saved by imsm.train>; or use model=base")
        model, tokenizer = load_model(cfg.run_dir)
        streams = cfg.streams
    out_dir = cfg.get("out_dir") or HydraConfig.get().runtime.output_dir
    names = list(cfg.datasets) if not isinstance(cfg.datasets, str) else [cfg.datasets]
    results = evaluate_datasets(
        model,
        tokenizer,
        names,
        cfg.data_dir,
        cfg.limit,
        out_dir,
        cfg.batch_size,
        cfg.max_input_length,
        cfg.chat_template,
        streams,
        max_new_tokens=cfg.max_new_tokens,
        source=cfg.source,
        autocast=cfg.get("autocast"),
    )
    label = "base model" if cfg.model == "base" else f"{cfg.run_dir} (streams={streams})"
    print(f"\n{label}, limit={cfg.limit}\n{results_table(results)}\noutputs: {out_dir}", flush=True)
    return results


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("imsm").setLevel(logging.INFO)
    evaluate(cfg)


if __name__ == "__main__":
    main()
