"""A run directory belongs to one job at a time and to one configuration.

``claim_run_dir`` runs before the model is built, and decides what a job does in its ``run_dir``:

- **One job at a time**: rank 0 holds an exclusive lock on ``<run_dir>/.imsm.lock`` (``fcntl.flock``, released by
  the kernel if the process dies) for the whole job; a second job in the same directory is refused, naming the
  first (pid, host, start time, command). Two jobs there would delete each other's checkpoints.
- **One configuration**: ``config.yaml`` is written when the job starts. A later job in the same directory whose
  training settings differ (dataset, learning rate, seed, ...) is refused, listing each differing key with both
  values, as long as the directory holds anything to lose (checkpoints or a finished run). The user can say what
  they mean: ``resume=true`` (or a checkpoint path) continues the checkpoint with the new settings (e.g. more
  steps), with a warning listing them; ``resume=false`` discards the earlier run and starts afresh.
- **Finished runs are not re-run**: ``metrics.json`` with ``status: ok``, the adapter and the same settings mean the
  job is done; nothing is run or written and the stored record is returned (a pinned sweep re-run over a finished
  directory trains nothing). The same training with other evaluation settings is refused, pointing to
  ``imsm.evaluate``, which evaluates a saved run without touching it.
- **A fresh start leaves no mix**: when no checkpoint is resumed from, the outputs of an earlier run in the
  directory (adapter, gate, metrics, evaluation folders: all written by imsm) are removed before anything else, so
  a job killed before its own save cannot leave a new adapter beside an old gate and an old ``status: ok``.

What counts as a training setting: the whole resolved config except where a job runs and how it reports
(``NOT_TRAINING``) and the evaluation settings (``EVALUATION``), compared separately.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from imsm.io import write_text_atomic
from imsm.model.checkpoint import ADAPTER_DIR, GATE_CONFIG, GATE_WEIGHTS, RUN_CONFIG
from imsm.record import RECORD_FILE, RECORDED, RunRecord, read_record
from imsm.resilience import CHECKPOINTS, clear_rank_failures, is_complete, own_checkpoint_dirs, resume_mode

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = ".imsm.lock"
# where a job runs and how it reports: never a reason to refuse a directory
NOT_TRAINING = (
    "run_dir",
    "data_dir",
    "resume",
    "logger",
    "experiment_name",
    "dry_run",
    "speed",
    "trainer.args.logging_steps",
    "trainer.args.logging_first_step",
    "trainer.args.save_steps",
    "trainer.args.save_total_limit",
    "trainer.args.disable_tqdm",
    "trainer.args.dataloader_num_workers",
    "trainer.args.report_to",
    "trainer.cache_frozen",  # the same steps, with the frozen states read back instead of recomputed
)
EVALUATION = ("eval", "eval_datasets", "max_eval_samples")
NOT_EVALUATION = ("eval.original_cache", "eval.batch_size")  # change how, not what, evaluation computes
# what a run writes into its directory besides checkpoints and Hydra's record; removed before a fresh start
OUTPUTS = (ADAPTER_DIR, GATE_WEIGHTS, GATE_CONFIG, RECORD_FILE, "eval", "eval_base", "eval_steps")


class RunDirError(RuntimeError):
    """The run directory belongs to another job or configuration; the directory's own files are left untouched."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        setattr(self, RECORDED, True)  # its metrics.json is not this job's to overwrite with a failure record


@dataclass
class Claim:
    """What the job does in its directory: ``finished`` holds the stored record of a run that is already done."""

    run_dir: Path
    finished: RunRecord | None = None


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, cfg: DictConfig, main_process: bool = True) -> Iterator[Claim]:
    """Lock ``run_dir`` for this job and check it against ``cfg`` (see the module docstring).

    Raises:
        RunDirError: another job holds the directory, or it holds another configuration's work.
    """
    with _locked(run_dir, main_process):
        finished = _check(run_dir, cfg)
        if finished is None and main_process:
            clear_rank_failures(run_dir)
            if _fresh_start(run_dir, cfg):
                _remove_outputs(run_dir)
            write_text_atomic(run_dir / RUN_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
        yield Claim(run_dir, finished)


def _check(run_dir: Path, cfg: DictConfig) -> RunRecord | None:
    """The stored record if the run is finished with these settings; None to run; raises on a conflict."""
    if resume_setting(cfg) == "false" or not (run_dir / RUN_CONFIG).is_file():
        return None
    saved = OmegaConf.load(run_dir / RUN_CONFIG)
    now = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    record = stored_record(run_dir)
    finished = record is not None and record.ok and (run_dir / ADAPTER_DIR).is_dir()
    has_work = finished or any(own_checkpoint_dirs(run_dir / CHECKPOINTS))
    changed = differences(saved, now, skip=NOT_TRAINING + EVALUATION)
    if changed and has_work and resume_setting(cfg) != "auto":  # resume=true or a path: the user asked for it
        log.warning(
            "resume=%s with changed settings (%s): %s", cfg.get("resume"), run_dir, "; ".join(changed)
        )
        return None
    if changed and has_work:
        raise RunDirError(
            f"{run_dir} holds a run with other training settings ({what_it_holds(run_dir, finished)}): "
            f"{'; '.join(changed)}. Use another run_dir for this configuration; resume=true to continue that run's "
            "last checkpoint with these settings; or resume=false to discard it and start afresh there."
        )
    if changed:
        return None
    if not finished:
        return None
    changed = differences(saved, now, skip=NOT_EVALUATION, only=EVALUATION)
    if changed:
        raise RunDirError(
            f"{run_dir} holds a finished run with the same training but other evaluation settings: "
            f"{'; '.join(changed)}. Evaluate the saved run without re-training it: python -m imsm.evaluate "
            f"run_dir={run_dir} ... (or resume=false to train it again)."
        )
    log.info("%s: finished with these settings (metrics.json status ok); nothing to do", run_dir)
    return record


def resume_setting(cfg: DictConfig) -> str:
    """``cfg.resume`` as ``auto``, ``true``, ``false`` or ``path`` (``imsm.resilience.resume_mode``)."""
    return resume_mode(cfg.get("resume", "auto"))


def stored_record(run_dir: Path) -> RunRecord | None:
    """The directory's ``metrics.json`` record; None if absent or unreadable (then the run is not finished)."""
    try:
        return read_record(run_dir / RECORD_FILE) if (run_dir / RECORD_FILE).is_file() else None
    except (ValueError, TypeError) as e:  # a damaged or foreign file: the run is redone, and says why
        log.warning("%s: unreadable (%s); the run is treated as unfinished", run_dir / RECORD_FILE, e)
        return None


def _fresh_start(run_dir: Path, cfg: DictConfig) -> bool:
    """No checkpoint will be resumed from: the directory's earlier outputs must not survive beside new ones."""
    if resume_setting(cfg) == "false":
        return True
    return not any(is_complete(p) for p in own_checkpoint_dirs(run_dir / CHECKPOINTS))


def _remove_outputs(run_dir: Path) -> None:
    present = [name for name in OUTPUTS if (run_dir / name).exists()]
    if not present:
        return
    log.warning("%s: a fresh start; removing the earlier run's %s first", run_dir, present)
    for name in present:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def what_it_holds(run_dir: Path, finished: bool) -> str:
    steps = [p.name for p in own_checkpoint_dirs(run_dir / CHECKPOINTS)]
    return ", ".join((["a finished run"] if finished else []) + ([f"checkpoints {steps}"] if steps else []))


def differences(
    saved: DictConfig, now: DictConfig, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None
) -> list[str]:
    """``key: saved -> now`` for every leaf that differs (dotted keys; ``skip`` and ``only`` match key prefixes)."""
    a, b = _leaves(OmegaConf.to_container(saved)), _leaves(OmegaConf.to_container(now))

    def counted(key: str) -> bool:
        under = lambda prefixes: any(key == p or key.startswith(p + ".") for p in prefixes)  # noqa: E731
        return not under(skip) and (only is None or under(only))

    missing = object()
    return [
        f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}"
        for key in sorted(set(a) | set(b))
        if counted(key) and a.get(key, missing) != b.get(key, missing)
    ]


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


@contextlib.contextmanager
def _locked(run_dir: Path, main_process: bool) -> Iterator[None]:
    """Rank 0 holds ``<run_dir>/.imsm.lock`` exclusively while the block runs."""
    if not main_process or fcntl is None:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "(unknown)"
            raise RunDirError(
                f"{run_dir} is in use by another imsm job ({holder}): two jobs in one run directory would "
                "overwrite each other's checkpoints. Wait for it to end, or choose another run_dir."
            ) from None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        f.seek(0)
        f.truncate()
        f.write(json.dumps(me) + "\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
