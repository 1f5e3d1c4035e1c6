"""Train IMSM (or its vanilla PEFT baseline) on a target task, then evaluate it.

``python -m imsm.train backbone=smollm2 peft=lora gate=query_aware dataset=gsm8k`` (or ``imsm-train ...``) composes
``imsm/conf/train.yaml``; ``train(cfg)`` is the plain function behind it (tests call it directly) and reads as the
recipe: settings -> data -> model -> Trainer -> fit -> save -> evaluate -> record. The run directory receives the
adapter, the gate, ``config.yaml``, ``eval/`` + ``eval_base/`` (see ``imsm.evaluation``) and ``metrics.json`` (an
``imsm.record.RunRecord``).

A job that raises still writes ``metrics.json`` (``status: failed``, the error, its choices): in a multirun the
sweep goes on and ``imsm.report`` shows the cell as failed; a single run exits non-zero. ``dry_run=true`` and
``speed={...}`` are aliases of the ``imsm.dryrun`` and ``imsm.speed`` entry points.
"""

from __future__ import annotations

from imsm.cli import absolute_paths, quick_answer, record_refused

quick_answer(__name__, "train")  # --help, --cfg, --info: answered before the heavy imports below

import contextlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from transformers import TrainingArguments, set_seed

from imsm import CONF_DIR, tracking
from imsm.checks import check_run_config
from imsm.data import Examples, load_split
from imsm.data.collate import TokenizedDataset, TrainCollator
from imsm.distributed import (
    agree_run_dir,
    defer_termination,
    leave_zero3,
    strip_local_rank_arg,
    zero3_enabled,
)
from imsm.evaluation import (
    MODEL_DIR,
    STEPS_DIR,
    EvalResult,
    EvalSettings,
    EvaluateAtSteps,
    evaluate_datasets,
)
from imsm.model.adalora import training_steps
from imsm.model.build import build_model, load_model, save_model
from imsm.model.siamese import IMSMModel
from imsm.record import RECORDED, RunRecord, flat_metrics, write_record
from imsm.resilience import CHECKPOINTS, explain_oom, rank_failures, resolve_resume
from imsm.rundir import RunDirError, claim_run_dir
from imsm.training import IMSMTrainer, training_arguments

log = logging.getLogger(__name__)

# Hydra overrides that say where a job runs, not what it computes: never a reason to put runs in separate rows.
NOT_CHOICES = ("run_dir", "data_dir", "resume", "eval.original_cache", "experiment")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, save, evaluate; returns the dict written to ``metrics.json``."""
    if cfg.get("dry_run"):
        from imsm.dryrun import dry_run

        return dry_run(cfg)
    if cfg.get("speed"):
        from imsm.speed import speed_run

        return speed_run(cfg, resolve_run_dir(cfg), run_record(cfg).to_dict())
    wall_start = time.perf_counter()
    check_run_config(cfg)  # out-of-range settings, all named at once, before any work
    evaluation = EvalSettings.from_train_config(
        cfg
    )  # every dataset, split and scorer checked before training
    ds, world = cfg.dataset, int(os.environ.get("WORLD_SIZE", 1))
    train_examples = load_split(ds, cfg.data_dir, ds.train_split, cfg.max_train_samples)
    args = training_arguments(cfg, str(resolve_run_dir(cfg) / CHECKPOINTS), world_size=world)
    defer_termination()  # several ranks: the launcher's SIGTERM still lets this job record its failure
    # one run directory for all ranks (each rank's Hydra resolved its own timestamp); needs the process group
    run_dir = agree_run_dir(resolve_run_dir(cfg), hydra_output_dir())
    args.output_dir = str(run_dir / CHECKPOINTS)
    # one job per directory, one configuration per directory; a finished run is not run again
    with claim_run_dir(run_dir, cfg, tracking.is_main_process()) as claim:
        if claim.finished is not None:
            print("\n" + summary_table(claim.finished), flush=True)
            return claim.finished.to_dict()
        return fit_and_evaluate(cfg, run_dir, args, train_examples, evaluation, wall_start)


def fit_and_evaluate(
    cfg: DictConfig,
    run_dir: Path,
    args: TrainingArguments,
    train_examples: Examples,
    evaluation: EvalSettings,
    wall_start: float,
) -> dict[str, Any]:
    """The recipe inside a claimed run directory: model -> Trainer -> fit -> save -> evaluate -> record."""
    ds, world = cfg.dataset, int(os.environ.get("WORLD_SIZE", 1))
    set_seed(int(cfg.seed))
    total_steps = optimizer_steps(len(train_examples), args, world)
    model, tokenizer = build_model(cfg, total_steps=total_steps)
    record = run_record(cfg, run_dir)
    record.trainable_parameters = model.trainable_parameters()  # before DeepSpeed ZeRO-3 partitions them
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
        callbacks=tracking.trainer_callbacks(tracker, model)
        + step_evaluation(cfg, model, tokenizer, evaluation, run_dir, total_steps, tracker),
    )
    main_process = trainer.is_world_process_zero()
    # resume=auto: the same command re-run in the same run_dir continues from its last complete checkpoint
    checkpoint = resolve_resume(cfg.get("resume", "auto"), run_dir / CHECKPOINTS, main_process)
    with explain_oom(cfg, "train"):
        output = trainer.train(resume_from_checkpoint=checkpoint, total_steps=total_steps)
    # the whole run's loss and time, earlier segments of a resumed run included
    record.train_seconds = output.metrics.get("train_runtime")
    record.train_loss, record.global_steps = output.training_loss, output.global_step
    record.train_examples = len(train_set)
    record.truncated_prompts, record.truncated_targets = train_set.stats.prompts, train_set.stats.targets
    record.skipped_rows = {f"{ds.name}/{ds.train_split}": train_examples.skipped}  # on_bad_row=skip
    model = save_trained(trainer, model, cfg, run_dir)
    result = EvalResult()
    if cfg.eval.enabled and main_process:
        try:
            with explain_oom(cfg, "eval"):
                result = evaluate_datasets(model, tokenizer, evaluation, run_dir / MODEL_DIR)
        except Exception as e:  # the failed record keeps what training computed (loss, steps, times)
            record_failure(cfg, e, time.perf_counter() - wall_start, record)
            raise
    add_evaluation(record, cfg, result)
    record.skipped_rows = {**(record.skipped_rows or {}), **result.skipped_rows}
    record.wall_seconds = time.perf_counter() - wall_start
    if main_process:
        write_record(run_dir, record)
        tracking.log_results(tracker, cfg, record.to_dict(), result.rows.get(ds.name, []))
        tracking.log_artifact(tracker, cfg, run_dir)
        print("\n" + summary_table(record), flush=True)
        tracking.PROGRESS.info("\n%s", summary_table(record))  # the same table in <run_dir>/train.log
    tracking.finish(tracker)
    return record.to_dict()


# --- the recipe's steps ---------------------------------------------------------------------------------------------


def resolve_run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir) if cfg.get("run_dir") else Path(HydraConfig.get().runtime.output_dir)


def hydra_output_dir() -> Path | None:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def optimizer_steps(n_examples: int, args: Any, world: int) -> int:
    """The run's optimizer steps, known before the model exists (AdaLoRA's rank schedule is built from it)."""
    batch, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    return training_steps(n_examples, batch, accumulation, args.num_train_epochs, world, args.max_steps)


def step_evaluation(
    cfg: DictConfig,
    model: IMSMModel,
    tokenizer: Any,
    settings: EvalSettings,
    run_dir: Path,
    total_steps: int,
    tracker: Any = None,
) -> list[EvaluateAtSteps]:
    """``eval.at_steps`` / ``eval.every_n_steps``: likelihood scoring during training (the forgetting curve,
    ``imsm.evaluation.EvaluateAtSteps``; logged to W&B with ``logger=wandb``), or nothing."""
    steps = set(cfg.eval.get("at_steps") or [])
    every = cfg.eval.get("every_n_steps")
    if every:
        steps |= set(range(int(every), total_steps + 1, int(every)))
    if not steps or not cfg.eval.enabled:
        return []
    if zero3_enabled():  # the weights are sharded over the ranks: rank 0 alone cannot run a forward
        raise ValueError("eval.at_steps is not supported under DeepSpeed ZeRO-3; evaluate saved checkpoints")

    def report(step: int, result: EvalResult) -> None:
        tracking.log_probe(tracker, step, result.model)

    return [EvaluateAtSteps(model, tokenizer, settings, sorted(steps), run_dir / STEPS_DIR, report)]


def save_trained(trainer: IMSMTrainer, model: IMSMModel, cfg: DictConfig, run_dir: Path) -> IMSMModel:
    """Write adapter, gate and config to ``run_dir``; returns the model to evaluate.

    DeepSpeed saves through its engine on every rank (ZeRO-3 gathers adapter + gate, rank 0 writes). Under ZeRO-3
    the trained weights stay sharded over the ranks, so rank 0 evaluates the saved run, reloaded unsharded.
    """
    main_process = trainer.is_world_process_zero()
    if trainer.is_deepspeed_enabled:
        trainer.save_model(str(run_dir))
    elif main_process:
        save_model(model, run_dir, cfg)
    if zero3_enabled():
        leave_zero3()
        if main_process and cfg.eval.enabled:
            # the run this command just trained, with the user's own config: its remote-code choice stands
            model, _ = load_model(run_dir, trust_remote_code=bool(cfg.backbone.get("trust_remote_code")))
    return model


def add_evaluation(record: RunRecord, cfg: DictConfig, result: EvalResult) -> None:
    """The stage's results into the record: the target, the forgetting sets, the frozen backbone's scores."""
    target, others = cfg.dataset.name, list(cfg.eval_datasets or [])
    record.metrics = result.model.get(target, {})
    record.eval_seconds = result.seconds
    if not result.model:
        return
    if result.base:
        record.base_metrics = result.base.get(target)
    if others:
        record.eval_datasets = {n: result.model[n] for n in others}
        if result.base:
            record.base_eval_datasets = {n: result.base[n] for n in others}


def run_choices() -> dict[str, str]:
    """This job's Hydra overrides as ``{key: value}`` (sweep parameters included); {} outside Hydra."""
    if not HydraConfig.initialized():
        return {}
    choices = {}
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.lstrip("+~").partition("=")
        if key not in NOT_CHOICES and not key.startswith("hydra."):
            choices[key] = value
    return choices


def run_record(cfg: DictConfig, run_dir: Path | str | None = None) -> RunRecord:
    """The job's choices and setup, recorded even when it fails: what ``imsm.report`` groups by.

    Runs whose ``setup`` differs (other subsets, steps, evaluation sets) are never averaged together.
    """
    ds, args = cfg.dataset, cfg.trainer.args
    container = OmegaConf.to_container
    return RunRecord(
        status="ok",
        run_dir=str(run_dir or cfg.get("run_dir") or ""),
        experiment=cfg.get("experiment_name"),
        backbone=cfg.backbone.name,
        peft=cfg.peft.name,
        gate=cfg.gate.type,
        gate_rank=cfg.gate.get("rank"),
        dataset=ds.name,
        seed=int(cfg.seed),
        eval_dataset_names=list(cfg.eval_datasets or []),
        choices=run_choices(),
        setup={
            "source": ds.source,
            "max_train_samples": cfg.max_train_samples,
            "max_eval_samples": cfg.max_eval_samples,
            "eval_limits": container(cfg.eval.limits, resolve=True) if cfg.eval.get("limits") else None,
            "max_input_length": cfg.max_input_length,
            "max_output_length": cfg.max_output_length,
            "eval_max_new_tokens": cfg.eval.max_new_tokens,
            "eval_autocast": cfg.eval.get("autocast"),
            "chat_template": cfg.chat_template,
            "num_train_epochs": args.get("num_train_epochs"),
            "max_steps": args.get("max_steps"),
            "effective_batch_size": cfg.trainer.get("effective_batch_size"),
            "speed": container(cfg.speed, resolve=True) if cfg.get("speed") else None,
        },
    )


def summary_table(record: RunRecord) -> str:
    """One screen: each metric of the trained model next to the frozen model's on the same examples."""
    rows = [(record.dataset, record.metrics or {}, record.base_metrics or {})]
    for name, metrics in (record.eval_datasets or {}).items():
        rows.append((name, metrics, (record.base_eval_datasets or {}).get(name, {})))
    lines = [f"{'':28}{'trained':>12}{'frozen base':>14}"]
    for name, m, b in rows:
        m, b = flat_metrics(m), flat_metrics(b)
        for k, v in m.items():
            if isinstance(v, float):
                base = f"{b[k]:.4f}" if isinstance(b.get(k), float) else "-"
                lines.append(f"{f'{name} {k}':28}{v:>12.4f}{base:>14}")
    p = record.trainable_parameters or {"adapter": 0, "gate": 0, "total": 0}
    lines += [
        f"trainable: adapter {p['adapter']:,} + gate {p['gate']:,} = {p['total']:,}",
        f"time: train {record.train_seconds or 0:.0f}s, eval {record.eval_seconds or 0:.0f}s",
        f"run dir: {record.run_dir}",
    ]
    return "\n".join(lines)


def record_failure(
    cfg: DictConfig, error: BaseException, wall_seconds: float, record: RunRecord | None = None
) -> None:
    """``metrics.json`` of a failed job: its choices, the error and the traceback.

    ``record``: what the job already computed (e.g. training's loss and times when evaluation fails), kept. The error
    is marked as recorded, so the entry point does not overwrite this record with an emptier one.
    """
    if getattr(error, RECORDED, False):
        return
    if record is None:
        try:
            record = run_record(cfg)
        except Exception as e:  # a config broken enough to fail here still gets its error written
            record = RunRecord(status="failed", run_dir=str(cfg.run_dir), record_error=repr(e))
    record.status = "failed"
    record.error = f"{type(error).__name__}: {error}"
    others = rank_failures(record.run_dir or cfg.run_dir) if (record.run_dir or cfg.get("run_dir")) else []
    if others:  # another rank stopped first (e.g. a NaN only it saw); this rank's error is the consequence
        first = others[0]
        record.error = f"rank {first['rank']}: {first['error']} (rank 0 then failed with {record.error})"
    record.traceback = "".join(traceback.format_exception(error))
    record.wall_seconds = wall_seconds
    write_record(record.run_dir or cfg.run_dir, record)
    with contextlib.suppress(AttributeError):  # a few built-in exceptions take no attributes
        setattr(error, RECORDED, True)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    # relative paths mean the directory the command was started in, also with hydra.job.chdir=true
    absolute_paths(cfg, ("data_dir", "run_dir", "eval.original_cache", "backbone.name_or_path"))
    if not cfg.get("run_dir"):
        OmegaConf.update(cfg, "run_dir", HydraConfig.get().runtime.output_dir, force_add=True)
    tracking.progress_to_file_only()
    start = time.perf_counter()
    try:
        train(cfg)
    except Exception as e:
        tracking.finish_active(failed=True)
        if tracking.is_main_process():
            record_failure(cfg, e, time.perf_counter() - start)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        if isinstance(e, RunDirError):  # no record of its own (not its directory to write); others have one
            hydra_cfg = HydraConfig.get()
            record_refused(
                hydra_cfg.sweep.dir, str(hydra_cfg.job.num), f"{cfg.run_dir}: {type(e).__name__}: {e}"
            )
        log.error(
            "job failed (the sweep goes on; metrics.json has status failed): %s: %s", type(e).__name__, e
        )


def main() -> None:
    """``python -m imsm.train`` / ``imsm-train``: drops the deepspeed launcher's ``--local_rank=N`` (Hydra rejects it).

    A multirun finishes every job; if any failed it then exits with status 1 and one line per failed job
    (``imsm.cli.SweepStatus``, a Hydra callback), so a scheduler or CI sees the failure.
    """
    sys.argv = strip_local_rank_arg(sys.argv)
    hydra_main()


if __name__ == "__main__":
    main()
