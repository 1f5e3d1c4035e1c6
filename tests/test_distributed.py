"""Scale-out on CPU: torchrun (gloo) matches one process, DeepSpeed ZeRO-2 / ZeRO-3 train, activation checkpointing.

- Two processes with batch 2 each must end where one process with batch 4 ends (same global batch, dropout off).
- ZeRO-3 partitions the frozen backbone too: a probe inside the run checks that the frozen stream still sees whole
  weights while it runs, and the result must match the unsharded run.
- DeepSpeed's first use on CPU compiles its shared-memory op (about a minute): those tests are ``slow``.

Run as a script (``torchrun ... tests/test_distributed.py zero3-probe OUT OVERRIDES...``), this file is the probe.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_imsm
from helpers import compose_train
from multiproc import (
    launch_env,
    max_difference,
    run_command,
    tiny_overrides,
    torchrun_cmd,
    trained_weights,
    write_gsm8k,
)

from imsm import distributed

DETERMINISTIC = {"peft.config.lora_dropout": 0, "gate.dropout": 0, "trainer.args.bf16": "false"}
TOLERANCE = 1e-5  # gloo sums in another order than one process: float rounding, nothing more


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_gsm8k(tmp_path_factory.mktemp("data"), 8)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, data_dir) -> dict[str, torch.Tensor]:
    """One process, batch 4, 3 steps: what every distributed variant must reproduce."""
    from imsm.train import train

    run_dir = tmp_path_factory.mktemp("single")
    train(compose_train(tiny_overrides(data_dir, run_dir=run_dir, **DETERMINISTIC)))
    return trained_weights(run_dir)


# --- torchrun / DDP --------------------------------------------------------------------------------------------
def test_torchrun_two_processes_match_one_process(tmp_path, data_dir, single_process):
    """2 x batch 2 (gloo) = 1 x batch 4; one run directory although each rank's Hydra picked its own; rank 0 writes."""
    overrides = tiny_overrides(
        data_dir,
        **DETERMINISTIC,
        trainer="ddp",
        **{
            "trainer.args.per_device_train_batch_size": 2,
            "hydra.run.dir": f"{tmp_path}/rank${{oc.env:RANK}}",
        },
    )
    done = run_command(torchrun_cmd(2, overrides), timeout=300)
    assert done.returncode == 0, done.output[-4000:]
    run_dir = tmp_path / "rank0"
    assert not (tmp_path / "rank1").exists()  # rank 1's Hydra directory gave way to rank 0's
    assert max_difference(trained_weights(run_dir), single_process) < TOLERANCE
    assert done.output.count("trainable: adapter") == 1  # only rank 0 reports
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["global_steps"] == 3
    checkpoint = run_dir / "checkpoints" / "checkpoint-3"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["epoch"] == 1.5  # 8 examples, global batch 4: the ranks split the data, not each all of it
    assert {p.name for p in checkpoint.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert (checkpoint / "checkpoint.complete").exists()


NAN_ON_RANK_1 = """
import functools, os, runpy, sys
from imsm.model.siamese import IMSMModel

forward = IMSMModel.forward
calls = []

@functools.wraps(forward)
def poisoned(self, *args, **kwargs):
    out = forward(self, *args, **kwargs)
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2 and out.loss is not None:  # rank 1's second step
        out.loss = out.loss * float("nan")
    return out

IMSMModel.forward = poisoned
sys.argv = ["imsm/train.py", *sys.argv[1:]]
runpy.run_module("imsm.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_a_nan_on_one_rank_is_recorded_as_the_nan_and_its_step(tmp_path, data_dir):
    """Rank 0 sees only gloo's broken connection; metrics.json must say what rank 1 saw."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        data_dir,
        **DETERMINISTIC,
        trainer="ddp",
        run_dir=run_dir,
        **{"trainer.args.per_device_train_batch_size": 2},
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    done = run_command([*cmd, *overrides], timeout=300)
    assert done.returncode != 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert metrics["error"].startswith("rank 1: NonFiniteLossError: loss is nan at optimizer step 2"), (
        metrics["error"]
    )


# --- DeepSpeed ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deepspeed_zero2_trains_and_resumes_in_one_process(tmp_path, data_dir, single_process):
    """The ``deepspeed`` launcher (with its ``--local_rank``) + ZeRO-2: same result as plain training, a checkpoint
    without the frozen backbone, and a resume from DeepSpeed's files (loaded without unpickling) that ends the same."""
    run_dir = tmp_path / "z2"
    overrides = tiny_overrides(
        data_dir, **DETERMINISTIC, trainer="deepspeed_z2", run_dir=run_dir, **{"trainer.args.save_steps": 2}
    )
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
        "--module", "imsm.train", *overrides,
    ]  # fmt: skip
    done = run_command(cmd, timeout=420)
    assert done.returncode == 0, done.output[-4000:]
    first = trained_weights(run_dir)
    assert max_difference(first, single_process) < TOLERANCE
    states = list((run_dir / "checkpoints" / "checkpoint-2").glob("global_step2/*model_states.pt"))
    assert states and all(
        p.stat().st_size < 200_000 for p in states
    )  # adapter + gate, not the 12 MB backbone

    # crash after checkpoint-2: the last checkpoint and the outputs are gone; the same command resumes
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-3")
    shutil.rmtree(run_dir / "adapter")
    for name in ("gate.safetensors", "metrics.json"):
        (run_dir / name).unlink()
    again = run_command(cmd, timeout=300)
    assert again.returncode == 0, again.output[-4000:]
    assert "resuming from" in again.output and "checkpoint-2" in again.output
    assert max_difference(trained_weights(run_dir), first) == 0.0


@pytest.mark.slow
def test_zero3_frozen_stream_sees_whole_weights(tmp_path, data_dir, single_process):
    """ZeRO-3 partitions the frozen backbone; the frozen stream still runs on whole weights; same result, then the
    saved run is reloaded unsharded and evaluated."""
    run_dir, probe = tmp_path / "z3", tmp_path / "probe.json"
    overrides = tiny_overrides(
        data_dir,
        **DETERMINISTIC,
        trainer="deepspeed_z3",
        run_dir=run_dir,
        **{
            "trainer.args.deepspeed.zero_optimization.stage3_param_persistence_threshold": 0,
            "eval.enabled": "true",
            "max_eval_samples": 2,
            "eval.max_new_tokens": 4,
            "eval.batch_size": 2,
        },
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        str(Path(__file__)), "zero3-probe", str(probe), *overrides,
    ]  # fmt: skip
    done = run_command(cmd, timeout=420, env=launch_env(PYTHONPATH=str(Path(__file__).parent)))
    assert done.returncode == 0, done.output[-4000:]
    seen = json.loads(probe.read_text())
    full = seen["full_numel"]
    assert seen["numel_between_runs"] == 0 and seen["ds_numel"] == full  # partitioned when not running
    assert len(seen["frozen"]) >= 3 and set(seen["frozen"]) == {full}  # whole while the frozen stream runs
    assert set(seen["tuned"]) == {full}
    assert max_difference(trained_weights(run_dir), single_process) < TOLERANCE
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["metrics"]["n"] == 2 and metrics["base_metrics"]["n"] == 2
    assert metrics["trainable_parameters"]["gate"] > 0


def zero3_probe(out: Path, overrides: list[str]) -> None:
    """Train through ``imsm.train.train`` with a hook on a frozen layer that records its weight size per stream."""
    from transformers import TrainerCallback

    import imsm.train as train_module
    from imsm.train import train

    seen: dict[str, list[int]] = {"frozen": [], "tuned": []}
    layer_box: list[torch.nn.Module] = []

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # DeepSpeed registered its gather hooks when it wrapped the model; this one runs after them
            layer = model.peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
            layer_box.append(layer)

            def record(module, inputs):
                seen["tuned" if torch.is_grad_enabled() else "frozen"].append(module.weight.numel())

            layer.register_forward_pre_hook(record)

    class ProbedTrainer(train_module.IMSMTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(Probe())

    train_module.IMSMTrainer = ProbedTrainer
    train(compose_train(overrides))
    layer = layer_box[0]
    seen_json = {
        **seen,
        "numel_between_runs": layer.weight.numel(),
        "ds_numel": int(getattr(layer.weight, "ds_numel", -1)),
        "full_numel": layer.in_features * layer.out_features,
    }
    out.write_text(json.dumps(seen_json))


# --- activation checkpointing ------------------------------------------------------------------------------------
def test_activation_checkpointing_keeps_gradients_and_frozen_stream(monkeypatch):
    """Non-reentrant checkpointing on the backbone: same loss and adapter/gate gradients, recomputation happens."""
    import transformers.modeling_utils as modeling_utils

    calls = []
    original = modeling_utils.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting)
    torch.manual_seed(0)
    ids = torch.randint(1, 90, (2, 10))
    mask, query = torch.ones_like(ids), torch.zeros_like(ids)
    query[:, :6] = 1
    labels = ids.masked_fill(query.bool(), -100)

    def run(checkpointing: bool):
        model = make_imsm()
        model.gate.dropout.p = 0.0
        model.train()
        if checkpointing:
            distributed.enable_activation_checkpointing(model.backbone)
        loss = model(ids, mask, query, labels).loss
        loss.backward()
        with torch.no_grad():
            base = model.stream_hidden(ids, mask, adapter=False)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss, grads, base

    loss, grads, base = run(False)
    assert not calls
    loss_ckpt, grads_ckpt, base_ckpt = run(True)
    assert calls and set(calls) == {False}  # recomputed, non-reentrant
    assert torch.allclose(loss, loss_ckpt)
    assert torch.equal(base, base_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], atol=1e-7), name


def test_trainer_runs_with_activation_checkpointing(tmp_path, data_dir, single_process, monkeypatch):
    """``trainer.args.activation_checkpointing=true`` goes to the backbone (not IMSMModel) and trains the same."""
    import transformers.modeling_utils as modeling_utils

    from imsm.train import train

    calls = []
    original = modeling_utils.checkpoint
    monkeypatch.setattr(modeling_utils, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    run_dir = tmp_path / "ckpt"
    cfg = compose_train(
        tiny_overrides(
            data_dir, run_dir=run_dir, **DETERMINISTIC, **{"trainer.args.activation_checkpointing": "true"}
        )
    )
    train(cfg)
    assert calls
    assert max_difference(trained_weights(run_dir), single_process) < 1e-6


# --- launchers -----------------------------------------------------------------------------------------------------
def test_local_rank_argument_moves_to_the_environment(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # recorded first: the environment is restored after the test
    monkeypatch.delenv("LOCAL_RANK")
    assert distributed.strip_local_rank_arg(["imsm.train", "--local_rank=3", "backbone=tiny_llama"]) == [
        "imsm.train",
        "backbone=tiny_llama",
    ]
    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.delenv("LOCAL_RANK")
    assert distributed.strip_local_rank_arg(["x", "--local-rank", "1", "a=b"]) == ["x", "a=b"]
    assert os.environ["LOCAL_RANK"] == "1"


def test_launcher_arguments_start_gloo_on_cpu_and_name_missing_deepspeed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.launcher_arguments({}, 2)["use_cpu"] is True
    assert "use_cpu" not in distributed.launcher_arguments({}, 1)
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[deepspeed\]'"):
        distributed.launcher_arguments({"deepspeed": {"zero_optimization": {"stage": 2}}}, 1)


def test_a_launch_that_would_train_ranks_alone_fails():
    class Args:
        device = "cpu"
        world_size = 1

    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 processes were launched but Trainer sees 1"):
        distributed.check_world_size(Args(), 2)
    distributed.check_world_size(Args(), 1)


def test_trainer_configs_set_zero_stage_and_precision():
    """ddp / deepspeed_z2 / deepspeed_z3 build on default; the ZeRO stage and precision are where Trainer reads them."""
    for name, stage in (("ddp", None), ("deepspeed_z2", 2), ("deepspeed_z3", 3)):
        cfg = compose_train([f"trainer={name}", "backbone=tiny_llama"])
        args = cfg.trainer.args
        assert args.bf16 is True and args.save_strategy == "steps" and args.activation_checkpointing is False
        if stage:
            assert args.deepspeed.zero_optimization.stage == stage
            assert args.deepspeed.zero_optimization.offload_optimizer.device == "none"


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "zero3-probe":
    zero3_probe(Path(sys.argv[2]), sys.argv[3:])
