"""Train IMSM (or its vanilla PEFT baseline) on a target task, then evaluate it.

``python -m imsm.train backbone=smollm2 peft=lora gate=query_aware dataset=gsm8k`` composes ``conf/train.yaml``;
``train(cfg)`` is the plain function behind it (tests call it directly). The run directory receives the adapter,
the gate, ``config.yaml``, ``metrics.json`` and ``predictions.jsonl``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from imsm.data import load_split
from imsm.data.collate import TokenizedDataset, TrainCollator
from imsm.evaluate import evaluate_datasets
from imsm.io import write_json, write_jsonl
from imsm.model.adalora import training_steps
from imsm.model.build import build_model, save_model
from imsm.predict import evaluate_examples
from imsm.training import IMSMTrainer, training_arguments

log = logging.getLogger(__name__)


def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def evaluate_on(
    model, tokenizer, cfg: DictConfig, streams: str = "imsm"
) -> tuple[dict[str, Any], list[dict]]:
    """The target's eval split (first ``max_eval_samples``), generated and scored."""
    ds = cfg.dataset
    examples = load_split(ds, cfg.data_dir, ds.eval_split, cfg.max_eval_samples)
    return evaluate_examples(
        model,
        tokenizer,
        examples,
        ds.metric,
        max_new_tokens=cfg.eval.max_new_tokens or ds.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        max_input_length=cfg.max_input_length,
        chat_template=cfg.chat_template,
        streams=streams,
        desc=f"eval {ds.name} ({streams})",
    )


def summary_table(result: dict[str, Any]) -> str:
    """One screen: each metric of the trained model next to the frozen model's on the same examples."""
    rows = [(result["dataset"], result["metrics"], result.get("base_metrics") or {})]
    for name, metrics in (result.get("eval_datasets") or {}).items():
        rows.append((name, metrics, (result.get("base_eval_datasets") or {}).get(name, {})))
    lines = [f"{'':28}{'trained':>12}{'frozen base':>14}"]
    for name, m, b in rows:
        for k, v in m.items():
            if isinstance(v, float):
                base = f"{b[k]:.4f}" if isinstance(b.get(k), float) else "-"
                lines.append(f"{name + ' ' + k:28}{v:>12.4f}{base:>14}")
    p = result["trainable_parameters"]
    lines += [
        f"trainable: adapter {p['adapter']:,} + gate {p['gate']:,} = {p['total']:,}",
        f"time: train {result['train_seconds']:.0f}s, eval {result['eval_seconds']:.0f}s",
        f"run dir: {result['run_dir']}",
    ]
    return "\n".join(lines)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, save, evaluate; returns the dict written to ``metrics.json``.

    ``dry_run=true``: build on the meta device, print the trainable-parameter table, return it (``imsm.dryrun``).
    """
    if cfg.get("dry_run"):
        from imsm.dryrun import dry_run

        return dry_run(cfg)
    run_dir = resolve_run_dir(cfg)
    ds = cfg.dataset
    train_examples = load_split(ds, cfg.data_dir, ds.train_split, cfg.max_train_samples)
    world = int(os.environ.get("WORLD_SIZE", 1))
    args = training_arguments(cfg, str(run_dir / "checkpoints"), world_size=world)
    # The optimizer-step count is known before the model exists (AdaLoRA's rank schedule is built from it).
    total_steps = training_steps(
        len(train_examples),
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.num_train_epochs,
        world,
        args.max_steps,
    )
    set_seed(int(cfg.seed))
    model, tokenizer = build_model(cfg, total_steps=total_steps)
    train_set = TokenizedDataset(
        train_examples,
        tokenizer,
        cfg.max_input_length,
        cfg.max_output_length,
        cfg.chat_template,
        name=f"{ds.name}/{ds.train_split}",
    )
    trainer = IMSMTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=TrainCollator(tokenizer.pad_token_id),
        gate_learning_rate=cfg.gate.get("lr"),
    )
    start = time.perf_counter()
    train_output = trainer.train()
    train_seconds = time.perf_counter() - start
    main_process = trainer.is_world_process_zero()
    if main_process:
        save_model(model, run_dir, cfg)

    result: dict[str, Any] = {
        "status": "ok",
        "run_dir": str(run_dir),
        "backbone": cfg.backbone.name,
        "peft": cfg.peft.name,
        "gate": cfg.gate.type,
        "gate_rank": cfg.gate.rank,
        "dataset": ds.name,
        "seed": int(cfg.seed),
        "train_examples": len(train_set),
        "truncated_prompts": train_set.stats.prompts,
        "truncated_targets": train_set.stats.targets,
        "train_loss": train_output.training_loss,
        "global_steps": train_output.global_step,
        "trainable_parameters": model.trainable_parameters(),
        "train_seconds": train_seconds,
    }
    start = time.perf_counter()
    if cfg.eval.enabled and main_process:
        metrics, rows = evaluate_on(model, tokenizer, cfg)
        result["metrics"] = metrics
        write_jsonl(run_dir / "predictions.jsonl", rows)
        if cfg.eval.compare_base:
            result["base_metrics"], base_rows = evaluate_on(model, tokenizer, cfg, streams="base")
            write_jsonl(run_dir / "predictions_base.jsonl", base_rows)
        if cfg.eval_datasets:
            # the forgetting row: the trained model (and the frozen one) on other tasks' evaluation splits
            others = {"imsm": "eval", "base": "eval_base"} if cfg.eval.compare_base else {"imsm": "eval"}
            for streams, sub in others.items():
                key = "eval_datasets" if streams == "imsm" else "base_eval_datasets"
                result[key] = evaluate_datasets(
                    model, tokenizer, list(cfg.eval_datasets), cfg.data_dir, cfg.max_eval_samples,
                    run_dir / sub, cfg.eval.batch_size, cfg.max_input_length, cfg.chat_template, streams,
                )
    else:
        result["metrics"] = {}
    result["eval_seconds"] = time.perf_counter() - start
    if main_process:
        write_json(run_dir / "metrics.json", result)
        print("\n" + summary_table(result), flush=True)
    return result


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if not cfg.get("run_dir"):
        OmegaConf.update(cfg, "run_dir", HydraConfig.get().runtime.output_dir, force_add=True)
    train(cfg)


if __name__ == "__main__":
    main()
