"""Helpers for tests that launch training in other processes: tiny data, overrides, launching with a hard timeout.

Every launch gets its own process group and is killed as a group on timeout, so no test leaves workers behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from conftest import REPO
from safetensors.torch import load_file


def write_gsm8k(root: Path, n: int) -> Path:
    """``n`` GSM8K-style rows whose targets all tokenize to the same length (single-digit numbers).

    Equal lengths make a per-micro-batch mean loss equal the global mean, so one process with batch 4 and two
    processes with batch 2 each compute the same gradient.
    """
    d = root / "gsm8k"
    d.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "question": f"Ann has {i % 4 + 1} pens and gets {i % 5 + 1} more. How many pens has she?",
            "answer": f"She has <<{i % 4 + 1}+{i % 5 + 1}={i % 4 + i % 5 + 2}>>{i % 4 + i % 5 + 2} pens.\n"
            f"#### {i % 4 + i % 5 + 2}",
        }
        for i in range(n)
    ]
    for split in ("train", "test"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tiny_overrides(data_dir: Path, **extra: object) -> list[str]:
    """Hydra overrides for a tiny_llama IMSM run; ``extra`` adds or replaces ``key=value`` pairs."""
    base: dict[str, object] = {
        "backbone": "tiny_llama",
        "dataset": "gsm8k",
        "data_dir": data_dir,
        "max_train_samples": 8,
        "eval.enabled": "false",
        "trainer.args.max_steps": 3,
        "trainer.args.per_device_train_batch_size": 4,
        "trainer.effective_batch_size": 4,
        "trainer.args.disable_tqdm": "true",
        "trainer.args.logging_steps": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launch_env(**extra: str) -> dict[str, str]:
    """The environment for a launched run: one thread per process (2 cores are shared), offline, no tokenizer forks."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}  # a launcher sets its own
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    env.setdefault("IMSM_CACHE", str(REPO / ".cache"))
    env.update(extra)
    return env


@dataclass
class Finished:
    returncode: int
    output: str


def run_command(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> Finished:
    """Run ``cmd`` (stdout + stderr together) in its own process group; on timeout kill the whole group."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env or launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}") from None
    finally:
        if proc.poll() is None:  # pragma: no cover - only when communicate itself failed
            os.killpg(proc.pid, signal.SIGKILL)
    return Finished(proc.returncode, out)


def train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "imsm.train", *overrides]


def torchrun_cmd(nproc: int, overrides: list[str]) -> list[str]:
    """``torchrun --standalone`` (a free port each time: other test runs may share the machine)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "imsm.train", *overrides,
    ]  # fmt: skip


def trained_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Adapter and gate tensors of a saved run, keys prefixed by their file."""
    out = {
        f"adapter/{k}": v
        for k, v in load_file(str(run_dir / "adapter" / "adapter_model.safetensors")).items()
    }
    if (run_dir / "gate.safetensors").exists():
        out.update({f"gate/{k}": v for k, v in load_file(str(run_dir / "gate.safetensors")).items()})
    return out


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
