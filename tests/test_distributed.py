"""Scale-out on CPU: torchrun (gloo) matches one process, DeepSpeed ZeRO-2 / ZeRO-3 train, activation checkpointing.

- Two processes with batch 2 each must end where one process with batch 4 ends (same global batch, dropout off).
- ZeRO-3 partitions the frozen backbone too: a probe inside the run checks that the frozen stream still sees whole
  weights while it runs, and the result must match the unsharded run.
- Two DeepSpeed ranks on CPU (gloo), ZeRO-2 and ZeRO-3, where sharding is real: the same adapter and gate as one
  process, under ZeRO-3 the gate's weights, gradients and optimizer states split beside the adapter's, a kill -9
  of both ranks resumed from the sharded checkpoint to the same weights, the saved run reloaded on one process.
- DeepSpeed's first use on CPU compiles its shared-memory op (about a minute): those tests are ``slow``.

Run as a script (``torchrun ... tests/test_distributed.py zero3-probe OUT OVERRIDES...``), this file is the probe.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_imsm
from helpers import compose_train
from multiproc import (
    Finished,
    launch_env,
    max_difference,
    run_command,
    tiny_overrides,
    torchrun_cmd,
    trained_weights,
    write_gsm8k,
)

from imsm import distributed, resilience

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
@pytest.mark.slow  # subprocess run(s), over 7 s: .ci/run runs the slow tests too
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


def run_deepspeed_launcher(
    num_gpus: int, target: list[str], overrides: list[str], timeout: float, env: dict[str, str] | None = None
) -> Finished:
    """The ``deepspeed`` launcher (it appends ``--local_rank=N``; ``imsm.train`` drops it) on a free port.

    On CPU the launcher's ``LOCAL_SIZE`` makes DeepSpeed map a shared-memory all-reduce buffer per rank
    (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, 69 MB) that it never unlinks; this run's are
    removed afterwards (torchrun sets no ``LOCAL_SIZE``: no buffer).
    """
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(num_gpus),
        "--master_port",
        str(port),
    ]
    try:
        return run_command([*cmd, *target, *overrides], timeout=timeout, env=env)
    finally:
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
            leftover.unlink(missing_ok=True)


@pytest.mark.slow
def test_deepspeed_zero2_trains_and_resumes_in_one_process(tmp_path, data_dir, single_process):
    """The ``deepspeed`` launcher (with its ``--local_rank``) + ZeRO-2: same result as plain training, a checkpoint
    without the frozen backbone, and a resume from DeepSpeed's files (loaded without unpickling) that ends the same."""
    run_dir = tmp_path / "z2"
    overrides = tiny_overrides(
        data_dir, **DETERMINISTIC, trainer="deepspeed_z2", run_dir=run_dir, **{"trainer.args.save_steps": 2}
    )
    target = ["--module", "imsm.train"]
    done = run_deepspeed_launcher(1, target, overrides, timeout=420)
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
    again = run_deepspeed_launcher(1, target, overrides, timeout=300)
    assert again.returncode == 0, again.output[-4000:]
    assert "resuming from" in again.output and "checkpoint-2" in again.output
    assert max_difference(trained_weights(run_dir), first) == 0.0


@pytest.mark.slow
def test_zero3_frozen_stream_sees_whole_weights(tmp_path, data_dir, single_process):
    """ZeRO-3 partitions the frozen backbone; the frozen stream still runs on whole weights; same result, then the
    saved run is reloaded unsharded and evaluated."""
    run_dir, probe = tmp_path / "z3", tmp_path / "probe"
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
    seen = json.loads((probe / "rank0.json").read_text())
    full = seen["full_numel"]
    assert seen["numel_between_runs"] == 0 and seen["ds_numel"] == full  # partitioned when not running
    assert len(seen["frozen"]) >= 3 and set(seen["frozen"]) == {full}  # whole while the frozen stream runs
    assert set(seen["tuned"]) == {full}
    assert max_difference(trained_weights(run_dir), single_process) < TOLERANCE
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["metrics"]["n"] == 2 and metrics["base_metrics"]["n"] == 2
    assert metrics["trainable_parameters"]["gate"] > 0


# --- DeepSpeed with two ranks: real sharding -------------------------------------------------------------------
# 12 examples, global batch 4: one process 4 x 1, two ranks 1 x 2 (gradient accumulation) each; 6 steps = 2 epochs.
# SGD with momentum, not AdamW: its update is linear in the gradient (AdamW's first steps move every weight by about
# lr * sign(g), so a gradient summed instead of averaged over the ranks, or half of it lost, would pass unseen), and
# its momentum is an optimizer state that ZeRO shards and a resume must restore. The gate has its own learning rate:
# its own optimizer group, partitioned beside the adapter's. Evaluation on: rank 0 scores the trained run.
SHARDED_RUN = {
    **DETERMINISTIC,
    "max_train_samples": 12,
    "trainer.args.max_steps": 6,
    "trainer.effective_batch_size": 4,
    "trainer.args.save_steps": 2,
    "trainer.args.save_total_limit": 3,
    "trainer.args.optim": "sgd",
    "+trainer.args.optim_args": "'momentum=0.9'",
    "trainer.args.learning_rate": 1.0,
    "trainer.args.warmup_steps": 0,
    "gate.lr": 0.5,
    "eval.enabled": "true",
    "max_eval_samples": 4,
    "eval.max_new_tokens": 8,
    "eval.batch_size": 2,
}
# fp32 on both sides; only the order of the sums differs (gloo's all-reduce / reduce-scatter against one process's
# batch sum): a few float32 ulps per gradient element, carried through 6 momentum steps. Measured: 3.0e-8 for ZeRO-2
# and ZeRO-3 (weights up to 0.35, 1 ulp there = 3e-8). The faults this must catch move some weight by far more
# (measured on the one-process run): the gate at the adapter's learning rate 1.5e-2, each rank on half the global
# batch 1.9e-2, momentum lost 8.5e-2, gradients summed instead of averaged over the ranks 1.0e-1.
SHARDED_TOLERANCE = 1e-6
STAGES = ("deepspeed_z2", "deepspeed_z3")


@pytest.fixture(scope="module")
def sharded_data(tmp_path_factory) -> Path:
    return write_gsm8k(tmp_path_factory.mktemp("sharded_data"), 12)


@pytest.fixture(scope="module")
def sharded_reference(tmp_path_factory, sharded_data) -> Path:
    """One process, no DeepSpeed, batch 4: the run every two-rank DeepSpeed run must reproduce."""
    from imsm.train import train

    run_dir = tmp_path_factory.mktemp("sharded_reference") / "run"
    overrides = {**SHARDED_RUN, "trainer.args.per_device_train_batch_size": 4}
    train(compose_train(tiny_overrides(sharded_data, run_dir=run_dir, **overrides)))
    return run_dir


def run_two_ranks(
    launcher: str, target: list[str], overrides: list[str], env: dict[str, str] | None = None
) -> Finished:
    """Two CPU ranks through ``launcher`` (``deepspeed`` or ``torchrun``).

    ``target``: ``["--module", "imsm.train"]`` or a script and its first arguments.
    """
    if launcher == "deepspeed":
        return run_deepspeed_launcher(2, target, overrides, timeout=300, env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    target = ["-m", *target[1:]] if target[0] == "--module" else target
    return run_command([*torchrun, *target, *overrides], timeout=300, env=env)


def two_rank_overrides(data_dir: Path, stage: str, run_dir: Path) -> list[str]:
    return tiny_overrides(
        data_dir,
        **SHARDED_RUN,
        trainer=stage,
        run_dir=run_dir,
        **{"trainer.args.per_device_train_batch_size": 1},
    )


@pytest.fixture(scope="module", params=STAGES)
def two_ranks(request, tmp_path_factory, sharded_data) -> dict[str, Any]:
    """The two-rank run of each ZeRO stage, uninterrupted; ZeRO-3 with the probe (``zero3_probe``) on each rank."""
    stage = request.param
    root = tmp_path_factory.mktemp(stage)
    run_dir, probe = root / "run", root / "probe"
    overrides = two_rank_overrides(sharded_data, stage, run_dir)
    target = ["--module", "imsm.train"]
    if stage == "deepspeed_z3":
        target = [str(Path(__file__)), "zero3-probe", str(probe)]
    started = time.perf_counter()
    # ZeRO-2 through the deepspeed launcher (it appends --local_rank and sets LOCAL_SIZE), ZeRO-3 through torchrun
    launcher = "deepspeed" if stage == "deepspeed_z2" else "torchrun"
    done = run_two_ranks(launcher, target, overrides, env=launch_env(PYTHONPATH=str(Path(__file__).parent)))
    assert done.returncode == 0, failure_excerpt(done.output)
    print(f"{stage}: two-rank run {time.perf_counter() - started:.0f}s")
    return {"stage": stage, "run_dir": run_dir, "probe": probe, "output": done.output}


def failure_excerpt(output: str) -> str:
    """Each rank's traceback, not only the launcher's summary that ends the output."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    return "\n".join(line for i in starts[:3] for line in lines[i : i + 60]) + "\n...\n" + output[-2000:]


def predictions(run_dir: Path) -> list[str]:
    rows = (run_dir / "eval" / "gsm8k" / "predictions.jsonl").read_text().splitlines()
    return [json.loads(row)["generation"] for row in rows]


@pytest.mark.slow
def test_two_deepspeed_ranks_train_save_and_evaluate_as_one_process(two_ranks, sharded_reference):
    """(a) adapter and gate of 2 ranks x micro-batch 1 x accumulation 2 under ZeRO-2 / ZeRO-3 = 1 process x 4;
    (c) the saved run reloads on one process (``load_model``) with the one-process run's logits and tokens, and rank 0
    evaluated it to the same predictions (under ZeRO-3 from its unsharded reload)."""
    from imsm.model.build import load_model

    run_dir, stage = two_ranks["run_dir"], two_ranks["stage"]
    got, want = trained_weights(run_dir), trained_weights(sharded_reference)
    assert any(k.startswith("gate/") for k in want)
    difference = max_difference(got, want)
    moved = max(t.abs().max().item() for k, t in want.items() if "lora_B" in k)  # lora_B starts at zero
    print(
        f"{stage}: max |2 ranks - 1 process| = {difference:.2e}; largest lora_B weight (its update) {moved:.2e}"
    )
    assert difference < SHARDED_TOLERANCE
    assert two_ranks["output"].count("trainable: adapter") == 1  # only rank 0 reports
    metrics = json.loads((run_dir / "metrics.json").read_text())
    reference = json.loads((sharded_reference / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["global_steps"] == 6
    assert metrics["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)
    checkpoint = run_dir / "checkpoints" / "checkpoint-6"
    assert (
        json.loads((checkpoint / "trainer_state.json").read_text())["epoch"] == 2.0
    )  # the ranks split the data
    shards = sorted(p.name for p in (checkpoint / "global_step6").glob("*optim_states.pt"))
    assert (
        len(shards) == 2 and "zero_pp_rank_1" in shards[1]
    )  # each rank wrote its slice of the optimizer state

    # rank 0 evaluated: the same greedy predictions as the one-process run
    assert metrics["metrics"]["n"] == 4 and predictions(run_dir) == predictions(sharded_reference)
    # a fresh process reloads both runs: same tokens, logits within the weights' difference
    sharded, tokenizer = load_model(run_dir)
    single, _ = load_model(sharded_reference)
    prompts = [f"Ann has {i} pens and gets {i + 2} more. How many pens has she?" for i in range(3)]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        logits = [m(ids, mask, mask, return_logits=True).logits for m in (sharded, single)]
        with single.frozen():
            frozen = single.backbone(input_ids=ids, attention_mask=mask).logits
    logit_difference = (logits[0] - logits[1]).abs().max().item()
    trained_effect = (logits[1] - frozen).abs().max().item()
    print(
        f"{stage}: max |logits 2 ranks - 1 process| = {logit_difference:.2e}; trained vs frozen {trained_effect:.2e}"
    )
    assert logit_difference < 1e-4 < trained_effect
    tokens = [m.generate(ids, mask, 12, tokenizer.eos_token_id, pad) for m in (sharded, single)]
    assert torch.equal(tokens[0], tokens[1])

    if stage == "deepspeed_z3":
        check_zero3_sharding(two_ranks["probe"])


def check_zero3_sharding(probe: Path) -> None:
    """What the probe saw on each of the two ZeRO-3 ranks (``zero3_probe``)."""
    for rank in (0, 1):
        seen = json.loads((probe / f"rank{rank}.json").read_text())
        full = seen["full_numel"]
        # the frozen backbone: this rank's slice at rest, whole while either stream runs; the adapter never runs in
        # the frozen stream, so its partitioned weights are not gathered there
        assert seen["numel_between_runs"] == 0 and seen["ds_numel"] == full
        assert len(seen["frozen"]) >= 12 and set(seen["frozen"]) == set(seen["tuned"]) == {full}
        assert seen["lora_in_frozen"] == 0
        shares, gradients = seen["shares"], seen["gradients"]
        gate = {n: s for n, s in shares.items() if n.startswith("gate.")}
        assert gate and any(n.startswith("peft_model.") for n in shares)
        for name, share in shares.items():
            half = -(-share["full"] // 2)
            # gradient, fp32 master weight and momentum: half on each rank, for the gate as for the adapter
            assert share["slice"] == share["fp32"] == share["momentum"] == gradients[name]["grad"] == half, (
                name
            )
            # weights at or below the persistence threshold (10 x hidden size) stay whole on every rank
            assert share["persist"] == (share["full"] <= seen["persistence_threshold"]), name
            assert share["numel_between_runs"] == (share["full"] if share["persist"] else 0), name
        assert not all(s["persist"] for s in gate.values())  # W_A (4d x r) is partitioned
        # each gate weight is whole while its layer runs (with gradients: the gate never runs in the frozen stream)
        in_forward = {(name, numel, grad) for name, numel, grad in seen["gate_in_forward"]}
        assert in_forward == {(n.split(".")[1], s["full"], True) for n, s in gate.items()}


KILL_BOTH_RANKS = """
import os, runpy, signal, sys
import imsm.training as training

original = training.IMSMTrainer._save_rng_state

def save_rng_state(self, output_dir):
    if self.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # every rank, after DeepSpeed wrote its shards of checkpoint-4
    original(self, output_dir)

training.IMSMTrainer._save_rng_state = save_rng_state
sys.argv = ["imsm/train.py", *sys.argv[1:]]
runpy.run_module("imsm.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_two_deepspeed_ranks_killed_mid_run_resume_to_the_same_weights(tmp_path, sharded_data, two_ranks):
    """(b) kill -9 of both ranks while they save checkpoint-4 (model and optimizer shards written, RNG states and the
    completion marker not); the same command resumes from checkpoint-2's sharded optimizer state and ends exactly
    where the uninterrupted two-rank run ended (for ZeRO-2 that one came through the deepspeed launcher)."""
    stage = two_ranks["stage"]
    script = tmp_path / "kill_both_ranks.py"
    script.write_text(KILL_BOTH_RANKS)
    run_dir = tmp_path / "run"
    overrides = two_rank_overrides(sharded_data, stage, run_dir)
    # torchrun for both segments: about 20 s quicker than the deepspeed launcher on 2 cores
    killed = run_two_ranks("torchrun", [str(script)], overrides)
    assert killed.returncode != 0, failure_excerpt(killed.output)
    checkpoints = run_dir / "checkpoints"
    assert resilience.is_complete(checkpoints / "checkpoint-2")
    assert (checkpoints / "checkpoint-4").is_dir() and not resilience.is_complete(
        checkpoints / "checkpoint-4"
    )
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "adapter").exists()
    step2 = checkpoints / "checkpoint-2"
    assert {p.name for p in step2.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert len(list((step2 / "global_step2").glob("*optim_states.pt"))) == 2

    resumed = run_two_ranks("torchrun", ["--module", "imsm.train"], overrides)
    assert resumed.returncode == 0, failure_excerpt(resumed.output)
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in resumed.output
    assert "removing incomplete checkpoint" in resumed.output
    want, got = trained_weights(two_ranks["run_dir"]), trained_weights(run_dir)
    print(f"{stage}: max |resumed - uninterrupted| = {max_difference(got, want):.2e}")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    uninterrupted = json.loads((two_ranks["run_dir"] / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["global_steps"] == 6
    assert metrics["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-5)
    assert predictions(run_dir) == predictions(two_ranks["run_dir"])


def zero3_probe(out: Path, overrides: list[str]) -> None:
    """Train through ``imsm.train.train`` with hooks that record, on this rank, what ZeRO-3 holds where.

    Writes ``out/rank<RANK>.json``: a frozen layer's weight size while each stream runs (``frozen``, ``tuned``) and
    between runs; how often an adapter module ran in the frozen stream; each gate weight's size while its linear
    layer runs; and per trainable parameter (adapter and gate) its full size, its slice on this rank, whether it
    stays whole (``ds_persist``), and this rank's share of its fp32 master copy, momentum and gradient.
    """
    import deepspeed.utils as ds_utils
    from transformers import TrainerCallback

    import imsm.train as train_module
    from imsm.train import train

    seen: dict[str, Any] = {"frozen": [], "tuned": [], "lora_in_frozen": 0, "gate_in_forward": []}
    layer_box: list[torch.nn.Module] = []

    def trainable_shares(model: torch.nn.Module, grads: bool) -> dict[str, dict[str, Any]]:
        shares = {}
        for name, p in model.named_parameters():
            if p.requires_grad and hasattr(p, "ds_id"):
                share = {"full": int(p.ds_numel), "slice": p.ds_tensor.numel(), "persist": bool(p.ds_persist)}
                if grads:
                    share["grad"] = ds_utils.safe_get_local_grad(p).numel()
                else:
                    share["fp32"] = ds_utils.safe_get_local_fp32_param(p).numel()
                    share["momentum"] = optimizer_state_share(p)
                    share["numel_between_runs"] = p.numel()
                shares[name] = share
        return shares

    def optimizer_state_share(p: torch.nn.Parameter) -> int | None:
        for key in ("momentum_buffer", "exp_avg"):  # SGD with momentum, Adam
            with contextlib.suppress(KeyError):
                return ds_utils.safe_get_local_optimizer_state(p, key).numel()
        return None

    class Probe(TrainerCallback):
        def __init__(self, trainer: Any):
            self.trainer = trainer

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # DeepSpeed registered its gather hooks when it wrapped the model; these run after them
            backbone = model.peft_model.get_base_model()
            layer = backbone.model.layers[0].self_attn.q_proj
            layer_box.append(layer.base_layer)

            def record(module, inputs):
                seen["tuned" if torch.is_grad_enabled() else "frozen"].append(module.weight.numel())

            def lora_ran(module, inputs):
                seen["lora_in_frozen"] += not torch.is_grad_enabled()

            layer.base_layer.register_forward_pre_hook(record)
            for lora in layer.lora_A.values():
                lora.register_forward_pre_hook(lora_ran)
            for name, linear in model.gate.named_children():
                if isinstance(linear, torch.nn.Linear):
                    linear.register_forward_pre_hook(
                        lambda module, inputs, name=name: seen["gate_in_forward"].append(
                            [name, module.weight.numel(), torch.is_grad_enabled()]
                        )
                    )
            engine = self.trainer.model_wrapped
            seen["persistence_threshold"] = engine.zero_param_persistence_threshold()
            optimizer_step = engine.optimizer.step

            def step(*a, **k):  # the gradients are reduced and partitioned, not yet applied
                seen.setdefault("gradients", trainable_shares(model, grads=True))
                return optimizer_step(*a, **k)

            engine.optimizer.step = step

        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen["shares"] = trainable_shares(model, grads=False)

    class ProbedTrainer(train_module.IMSMTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(Probe(self))

    train_module.IMSMTrainer = ProbedTrainer
    train(compose_train(overrides))
    layer = layer_box[0]
    seen.update(
        numel_between_runs=layer.weight.numel(),
        ds_numel=int(getattr(layer.weight, "ds_numel", -1)),
        full_numel=layer.in_features * layer.out_features,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(seen))


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


def test_deepspeed_on_cpu_counts_its_ranks(monkeypatch):
    """accelerate finds no backend for DeepSpeed without an accelerator (one process, rank 0 on every rank); inside
    ``deepspeed_cpu_ranks`` its lookup answers gloo, and only for a multi-process DeepSpeed launch."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    state = object.__new__(PartialState)  # the lookup reads the environment, not the (shared) state
    ds = {"deepspeed": {"zero_optimization": {"stage": 3}}}
    assert PartialState._prepare_backend(state, cpu=False) == (None, DistributedType.NO)
    with distributed.deepspeed_cpu_ranks(ds, 2):
        assert PartialState._prepare_backend(state, cpu=False) == ("gloo", DistributedType.MULTI_CPU)
    assert PartialState._prepare_backend(state, cpu=False) == (None, DistributedType.NO)
    for args, world in ((ds, 1), ({}, 2)):
        with distributed.deepspeed_cpu_ranks(args, world):
            assert PartialState._prepare_backend(state, cpu=False) == (None, DistributedType.NO)


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
