"""Train IMSM (or its vanilla PEFT baseline) on a target task, then evaluate it.

``python -m imsm.train backbone=smollm2 peft=lora gate=query_aware dataset=gsm8k`` composes ``conf/train.yaml``;
``train(cfg)`` is the plain function behind it (tests call it directly). The run directory receives the adapter,
the gate, ``config.yaml``, ``metrics.json`` and ``predictions.jsonl``.

A job that raises still writes ``metrics.json`` (``status: failed``, the error, its choices): in a multirun the
sweep goes on and ``imsm.report`` shows the cell as failed; a single run exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from imsm import tracking
from imsm.data import dataset_config, load_split
from imsm.data.collate import TokenizedDataset, TrainCollator
from imsm.distributed import agree_run_dir, leave_zero3, strip_local_rank_arg, zero3_enabled
from imsm.evaluate import evaluate_datasets
from imsm.io import write_json, write_jsonl
from imsm.model.adalora import training_steps
from imsm.model.build import build_model, load_model, save_model
from imsm.predict import evaluate_examples
from imsm.resilience import CHECKPOINTS, explain_oom, resolve_resume
from imsm.training import IMSMTrainer, training_arguments

log = logging.getLogger(__name__)


def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def eval_limit(cfg: DictConfig, name: str) -> int | None:
    """How many evaluation examples of dataset ``name``: ``eval.limits[name]`` if set, else ``max_eval_samples``."""
    limits = cfg.eval.get("limits") or {}
    return limits.get(name, cfg.max_eval_samples)


def evaluate_on(
    model, tokenizer, cfg: DictConfig, streams: str = "imsm"
) -> tuple[dict[str, Any], list[dict]]:
    """The target's eval split (first ``eval_limit`` examples), generated and scored."""
    ds = cfg.dataset
    examples = load_split(ds, cfg.data_dir, ds.eval_split, eval_limit(cfg, ds.name))
    with explain_oom(cfg, "eval"):
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
            autocast=cfg.eval.get("autocast"),
        )


def run_record(cfg: DictConfig) -> dict[str, Any]:
    """The job's choices and setup, written to ``metrics.json`` even when it fails: what ``imsm.report`` groups by.

    Runs whose ``setup`` differs (other subsets, steps, evaluation sets) are never averaged together.
    """
    ds, args = cfg.dataset, cfg.trainer.args
    return {
        "experiment": cfg.get("experiment_name"),
        "backbone": cfg.backbone.name,
        "peft": cfg.peft.name,
        "gate": cfg.gate.type,
        "gate_rank": cfg.gate.rank,
        "dataset": ds.name,
        "seed": int(cfg.seed),
        "eval_dataset_names": list(cfg.eval_datasets or []),
        "setup": {
            "source": ds.source,
            "max_train_samples": cfg.max_train_samples,
            "max_eval_samples": cfg.max_eval_samples,
            "eval_limits": OmegaConf.to_container(cfg.eval.limits, resolve=True)
            if cfg.eval.get("limits")
            else None,
            "max_input_length": cfg.max_input_length,
            "max_output_length": cfg.max_output_length,
            "eval_max_new_tokens": cfg.eval.max_new_tokens,
            "eval_autocast": cfg.eval.get("autocast"),
            "chat_template": cfg.chat_template,
            "num_train_epochs": args.get("num_train_epochs"),
            "max_steps": args.get("max_steps"),
            "effective_batch_size": cfg.trainer.get("effective_batch_size"),
            "speed": OmegaConf.to_container(cfg.speed, resolve=True) if cfg.get("speed") else None,
        },
    }


def original_scores(
    cfg: DictConfig, ds: DictConfig, max_new_tokens: int, compute: Callable[[], dict]
) -> dict:
    """The frozen backbone's metrics on ``ds`` (the "Original" row), computed once per ``eval.original_cache``.

    Every job of a sweep would otherwise decode the same examples with the same frozen weights; the cache key holds
    everything the result depends on (backbone, dataset config, data, limit, decoding settings).
    """
    cache = cfg.eval.get("original_cache")
    if not cache:
        return compute()
    key = {
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        "dataset": OmegaConf.to_container(ds, resolve=True),
        "data_dir": cfg.data_dir,
        "limit": eval_limit(cfg, ds.name),
        "max_new_tokens": max_new_tokens,
        "autocast": cfg.eval.get("autocast"),
        "batch_size": cfg.eval.batch_size,
        "max_input_length": cfg.max_input_length,
        "chat_template": cfg.chat_template,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(cache) / f"{cfg.backbone.name}_{ds.name}_{digest}.json"
    if path.exists():
        log.info("original %s: reusing %s", ds.name, path)
        return json.loads(path.read_text())["metrics"]
    metrics = compute()
    write_json(path, {"key": key, "metrics": metrics, "computed_in": cfg.get("run_dir")})
    return metrics


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
    ``speed={...}``: time decoding of IMSM vs vanilla instead of training (``imsm.speed``, the paper's Table 5).
    """
    if cfg.get("dry_run"):
        from imsm.dryrun import dry_run

        return dry_run(cfg)
    wall_start = time.perf_counter()
    run_dir = resolve_run_dir(cfg)
    if cfg.get("speed"):
        from imsm.speed import speed_run

        return speed_run(cfg, run_dir, run_record(cfg))
    ds = cfg.dataset
    train_examples = load_split(ds, cfg.data_dir, ds.train_split, cfg.max_train_samples)
    world = int(os.environ.get("WORLD_SIZE", 1))
    args = training_arguments(cfg, str(run_dir / CHECKPOINTS), world_size=world)
    # one run directory for all ranks (each rank's Hydra resolved its own timestamp); needs the process group
    hydra_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    run_dir = agree_run_dir(run_dir, hydra_dir)
    args.output_dir = str(run_dir / CHECKPOINTS)
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
    trainable = model.trainable_parameters()  # counted before DeepSpeed ZeRO-3 partitions them
    tracker = tracking.start(cfg, run_dir)  # logger=wandb, main process only; None otherwise
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
        run_config=cfg,
        callbacks=tracking.trainer_callbacks(tracker),
    )
    main_process = trainer.is_world_process_zero()
    # resume=auto: the same command re-run in the same run_dir continues from its last complete checkpoint
    checkpoint = resolve_resume(cfg.get("resume", "auto"), run_dir / CHECKPOINTS, main_process)
    start = time.perf_counter()
    with explain_oom(cfg, "train"):
        train_output = trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - start
    if trainer.is_deepspeed_enabled:
        trainer.save_model(str(run_dir))  # on every rank: ZeRO-3 gathers adapter + gate, rank 0 writes
    elif main_process:
        save_model(model, run_dir, cfg)
    if zero3_enabled():
        # the trained weights are sharded over the ranks: rank 0 evaluates the saved run, reloaded unsharded
        leave_zero3()
        if main_process and cfg.eval.enabled:
            model, tokenizer = load_model(run_dir)

    result: dict[str, Any] = {
        "status": "ok",
        "run_dir": str(run_dir),
        **run_record(cfg),
        "train_examples": len(train_set),
        "truncated_prompts": train_set.stats.prompts,
        "truncated_targets": train_set.stats.targets,
        "train_loss": train_output.training_loss,
        "global_steps": train_output.global_step,
        "trainable_parameters": trainable,
        "train_seconds": train_seconds,
    }
    start = time.perf_counter()
    rows: list[dict] = []
    if cfg.eval.enabled and main_process:
        metrics, rows = evaluate_on(model, tokenizer, cfg)
        result["metrics"] = metrics
        write_jsonl(run_dir / "predictions.jsonl", rows)
        if cfg.eval.compare_base:

            def base_target() -> dict:
                base_metrics, base_rows = evaluate_on(model, tokenizer, cfg, streams="base")
                write_jsonl(run_dir / "predictions_base.jsonl", base_rows)
                return base_metrics

            result["base_metrics"] = original_scores(
                cfg, ds, cfg.eval.max_new_tokens or ds.max_new_tokens, base_target
            )
        if cfg.eval_datasets:
            # the forgetting row: the trained model (and the frozen one) on other tasks' evaluation splits
            names = list(cfg.eval_datasets)
            eval_args = (cfg.data_dir, cfg.max_eval_samples)
            gen_args = (cfg.eval.batch_size, cfg.max_input_length, cfg.chat_template)
            options = {"limits": {n: eval_limit(cfg, n) for n in names}, "autocast": cfg.eval.get("autocast")}
            result["eval_datasets"] = evaluate_datasets(
                model, tokenizer, names, *eval_args, run_dir / "eval", *gen_args, "imsm", **options
            )
            if cfg.eval.compare_base:

                def base_other(name: str) -> dict:
                    # writes eval_base/<name>/; eval_base/metrics.json (all datasets) is rewritten below
                    out = run_dir / "eval_base"
                    return evaluate_datasets(
                        model, tokenizer, [name], *eval_args, out, *gen_args, "base", **options
                    )[name]

                result["base_eval_datasets"] = {}
                for name in names:
                    other = dataset_config(name)
                    result["base_eval_datasets"][name] = original_scores(
                        cfg, other, other.max_new_tokens, lambda name=name: base_other(name)
                    )
                write_json(run_dir / "eval_base" / "metrics.json", result["base_eval_datasets"])
    else:
        result["metrics"] = {}
    result["eval_seconds"] = time.perf_counter() - start
    result["wall_seconds"] = time.perf_counter() - wall_start
    if main_process:
        write_json(run_dir / "metrics.json", result)
        tracking.log_results(tracker, cfg, result, rows)
        print("\n" + summary_table(result), flush=True)
    tracking.finish(tracker)
    return result


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if not cfg.get("run_dir"):
        OmegaConf.update(cfg, "run_dir", HydraConfig.get().runtime.output_dir, force_add=True)
    start = time.perf_counter()
    try:
        train(cfg)
    except Exception as e:
        tracking.finish_active(failed=True)
        if tracking.is_main_process():
            record_failure(cfg, e, time.perf_counter() - start)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        log.error(
            "job failed (the sweep goes on; metrics.json has status failed): %s: %s", type(e).__name__, e
        )


def record_failure(cfg: DictConfig, error: BaseException, wall_seconds: float) -> None:
    """``metrics.json`` of a failed job: its choices, the error and the traceback."""
    record: dict[str, Any] = {"status": "failed", "run_dir": str(cfg.run_dir)}
    try:
        record.update(run_record(cfg))
    except Exception as e:  # a config broken enough to fail here still gets its error written
        record["record_error"] = repr(e)
    record.update(
        error=f"{type(error).__name__}: {error}",
        traceback="".join(traceback.format_exception(error)),
        wall_seconds=wall_seconds,
    )
    write_json(Path(cfg.run_dir) / "metrics.json", record)


if __name__ == "__main__":
    import sys

    sys.argv = strip_local_rank_arg(sys.argv)  # the deepspeed launcher's --local_rank=N, which Hydra rejects
    main()
