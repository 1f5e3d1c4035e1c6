"""Resilience: kill -9 mid-run and resume to the same weights; incomplete checkpoints; NaN and OOM stops; no pickle.

The kill test runs the CLI twice with the same command: the first is SIGKILLed while writing checkpoint 4 (model and
optimizer written, RNG state and the completion marker not), the second resumes from checkpoint 2 by itself. With
dropout on, gradient accumulation, a resume in the middle of an epoch and an epoch boundary after it, its adapter and
gate must equal those of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_train
from multiproc import run_command, tiny_overrides, train_cmd, trained_weights, write_gsm8k
from safetensors.torch import save_file

from imsm import resilience
from imsm.io import write_json

# 12 examples, micro-batch 2, accumulation 2: 3 optimizer steps per epoch; 6 steps = 2 epochs; dropout stays on
RESUME_RUN = {
    "max_train_samples": 12,
    "trainer.args.max_steps": 6,
    "trainer.args.per_device_train_batch_size": 2,
    "trainer.effective_batch_size": 4,
    "trainer.args.save_steps": 2,
    "trainer.args.save_total_limit": 3,
}
KILL_WHILE_SAVING = """
import os, runpy, signal, sys
import imsm.training as training

original = training.IMSMTrainer._save_rng_state

def save_rng_state(self, output_dir):
    if self.state.global_step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-checkpoint: weights and optimizer written, the rest not
    original(self, output_dir)

training.IMSMTrainer._save_rng_state = save_rng_state
sys.argv = ["imsm/train.py", *sys.argv[1:]]
runpy.run_module("imsm.train", run_name="__main__", alter_sys=True)  # exactly `python -m imsm.train ...`
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_gsm8k(tmp_path_factory.mktemp("data"), 12)


@pytest.mark.slow  # subprocess run(s), over 7 s: .ci/run runs the slow tests too
def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, data_dir):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    done = run_command(train_cmd(tiny_overrides(data_dir, run_dir=reference, **RESUME_RUN)), timeout=240)
    assert done.returncode == 0, done.output[-4000:]

    overrides = tiny_overrides(data_dir, run_dir=crashed, **RESUME_RUN)
    killed = run_command([sys.executable, "-c", KILL_WHILE_SAVING.format(step=4), *overrides], timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.output[-4000:]
    checkpoints = crashed / "checkpoints"
    assert resilience.is_complete(checkpoints / "checkpoint-2")
    assert (checkpoints / "checkpoint-4").is_dir() and not resilience.is_complete(
        checkpoints / "checkpoint-4"
    )
    assert not (crashed / "metrics.json").exists() and not (crashed / "adapter").exists()

    resumed = run_command(train_cmd(overrides), timeout=240)  # the same command, nothing added
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in resumed.output
    assert "removing incomplete checkpoint" in resumed.output
    want, got = trained_weights(reference), trained_weights(crashed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    metrics = json.loads((crashed / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["global_steps"] == 6
    # the whole run's loss (both segments), not the resumed segment's alone
    uninterrupted = json.loads((reference / "metrics.json").read_text())
    assert metrics["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-5)
    assert [p.name for p in resilience.checkpoint_dirs(checkpoints)] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]


def test_resume_restores_everything_without_unpickling(tmp_path, data_dir, monkeypatch):
    """resume=true after a finished 2-step run: step count, adapter + gate, optimizer groups (the gate's own lr);
    every torch.load is weights_only."""
    from imsm.train import train

    run_dir = tmp_path / "run"
    first = {**RESUME_RUN, "trainer.args.max_steps": 2}
    train(compose_train(tiny_overrides(data_dir, run_dir=run_dir, **first)))
    saved = torch.load(run_dir / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert {g["initial_lr"] for g in saved["param_groups"]} == {3e-4, 1e-3}  # the gate has its own lr group

    loads = []
    original = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = {}

    import imsm.training as training

    original_load = training.resilience.load_trainable

    def load_trainable(model, path):
        original_load(model, path)
        loaded.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    monkeypatch.setattr(training.resilience, "load_trainable", load_trainable)
    result = train(compose_train(tiny_overrides(data_dir, run_dir=run_dir, resume="true", **RESUME_RUN)))
    assert result["global_steps"] == 6
    assert loads and all(w is True for w in loads)
    from safetensors.torch import load_file

    saved_trainable = load_file(str(run_dir / "checkpoints" / "checkpoint-2" / resilience.TRAINABLE_WEIGHTS))
    assert loaded.keys() == saved_trainable.keys() and any(n.startswith("gate.") for n in loaded)
    assert all(torch.equal(loaded[n], saved_trainable[n]) for n in loaded)


# --- checkpoint bookkeeping ------------------------------------------------------------------------------------
def make_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    """An imsm checkpoint directory with a (small, valid) optimizer file and a trainable-weights file."""
    path = folder / f"checkpoint-{step}"
    resilience.claim_checkpoint(path)
    torch.save({"state": {0: torch.ones(3)}}, path / "optimizer.pt")
    save_file({"w": torch.arange(4.0)}, str(path / resilience.TRAINABLE_WEIGHTS))
    if complete:
        resilience.mark_complete(path, step)
    return path


def test_resume_setting_picks_the_last_complete_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    assert resilience.resolve_resume("auto", folder) is None
    with pytest.raises(FileNotFoundError, match="resume=true but .* holds no complete checkpoint"):
        resilience.resolve_resume(True, folder)
    make_checkpoint(folder, 2)
    make_checkpoint(folder, 10)
    make_checkpoint(folder, 12, complete=False)  # killed while saving
    assert resilience.resolve_resume("auto", folder, main_process=False) == str(folder / "checkpoint-10")
    assert (folder / "checkpoint-12").exists()  # only rank 0 deletes
    assert resilience.resolve_resume(None, folder) == str(folder / "checkpoint-10")
    assert not (folder / "checkpoint-12").exists()
    assert resilience.resolve_resume(True, folder) == str(folder / "checkpoint-10")
    assert resilience.resolve_resume(str(folder / "checkpoint-2"), folder) == str(folder / "checkpoint-2")
    make_checkpoint(folder, 14, complete=False)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resilience.resolve_resume(str(folder / "checkpoint-14"), folder)
    assert resilience.resolve_resume(False, folder) is None
    assert resilience.checkpoint_dirs(folder) == []  # a fresh start: a later auto cannot pick stale ones


def test_rotation_only_after_a_newer_checkpoint_is_complete(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        make_checkpoint(folder, step)
    make_checkpoint(folder, 4, complete=False)
    resilience.rotate_checkpoints(folder, keep=1)
    assert [p.name for p in resilience.checkpoint_dirs(folder)] == ["checkpoint-3", "checkpoint-4"]
    resilience.rotate_checkpoints(folder, keep=None)
    assert len(resilience.checkpoint_dirs(folder)) == 2


# --- failures ------------------------------------------------------------------------------------------------------
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    from imsm.model.siamese import IMSMModel
    from imsm.train import train

    forward = IMSMModel.forward
    calls = []

    @functools.wraps(forward)  # same signature: Trainer decides from it which arguments the model takes
    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5 and out.loss is not None:  # micro-batch 5 = optimizer step 3 (accumulation 2)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(IMSMModel, "forward", poisoned)
    run_dir = tmp_path / "run"
    cfg = compose_train(
        tiny_overrides(data_dir, run_dir=run_dir, **{**RESUME_RUN, "trainer.args.save_steps": 1})
    )
    with pytest.raises(
        resilience.NonFiniteLossError, match=r"loss is nan at optimizer step 3 .*checkpoint-2 is kept"
    ):
        train(cfg)
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in resilience.checkpoint_dirs(checkpoints)] == ["checkpoint-1", "checkpoint-2"]
    assert resilience.is_complete(checkpoints / "checkpoint-2")
    kept = trained_weights(checkpoints / "checkpoint-2")
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert not (run_dir / "adapter").exists()  # no final save of a broken model


def test_out_of_memory_names_the_settings_to_lower(tmp_path, data_dir, monkeypatch):
    import imsm.training as training
    from imsm.train import train

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training.IMSMTrainer, "training_step", oom)
    cfg = compose_train(tiny_overrides(data_dir, run_dir=tmp_path / "run"))
    with pytest.raises(torch.OutOfMemoryError) as error:
        train(cfg)
    message = str(error.value)
    for needed in (
        "per_device_train_batch_size (now 4",
        "max_input_length (now 512)",
        "trainer.args.activation_checkpointing=true",
        "deepspeed_z3",
        "Tried to allocate 2.00 GiB",
    ):
        assert needed in message, needed
    with (
        pytest.raises(torch.OutOfMemoryError, match=r"eval.batch_size \(now 8\)"),
        resilience.explain_oom(cfg, "eval"),
    ):
        raise torch.OutOfMemoryError("CUDA out of memory")


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path):
    """metrics.json and predictions are written to a temp file and renamed: never half a file."""

    class Unwritable:
        def __str__(self) -> str:
            raise RuntimeError("disk full")

    path = tmp_path / "metrics.json"
    write_json(path, {"status": "ok", "metrics": {"accuracy": 0.5}})
    with pytest.raises(RuntimeError, match="disk full"):
        write_json(path, {"status": "ok", "metrics": {"accuracy": Unwritable()}})
    assert json.loads(path.read_text())["metrics"]["accuracy"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind
