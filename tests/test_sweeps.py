"""The paper's tables as Hydra multiruns: every sweep composes, a smoke sweep runs and reports, failures are kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO
from helpers import compose_train
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict

from imsm.report import main as report_main
from imsm.train import train

CONF = str(REPO / "imsm" / "conf")
# the experiment group's own files (its shared part, experiment/base/sweep.yaml, is in a subfolder)
EXPERIMENTS = sorted(p.stem for p in (REPO / "imsm" / "conf" / "experiment").glob("*.yaml"))
TABLES = [e for e in EXPERIMENTS if e.startswith("table")]
FIGURES = [e for e in EXPERIMENTS if e.startswith("fig")]
PAPER = [*TABLES, *FIGURES]  # each also runs at CPU scale: experiment=<name> scale=cpu
SWEEPS = [*PAPER, "smoke", "replicate_cpu_mrpc", "replicate_cpu_cola", "replicate_cpu_cola_ablation"]


def compose_hydra(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def sweep_params(experiment: str, *overrides: str) -> dict[str, str]:
    return dict(compose_hydra([f"experiment={experiment}", *overrides]).hydra.sweeper.params or {})


@contextmanager
def inside_hydra(overrides: list[str]) -> Iterator[DictConfig]:
    """A job's config with its ``${hydra:...}`` values resolved, as ``python -m imsm.train`` would see them."""
    cfg = compose_hydra(overrides)
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]  # its sweep subdir needs a job number
        OmegaConf.resolve(cfg)
        yield cfg
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment] - no Hydra run leaks into later tests


def run_train(
    args: list[str], data_dir: Path | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline")
    if data_dir is not None:
        env["IMSM_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "imsm.train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def job_metrics(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]


def test_every_paper_table_has_a_cpu_version_and_a_grid():
    assert {f"table{i}" for i in range(1, 7)} == set(TABLES) and {"fig3", "fig4"} <= set(FIGURES)
    for name in PAPER:
        params = sweep_params(name)
        assert params["seed"] == "1,2,3", name  # seeds for the t-test
        assert compose_train([f"experiment={name}"]).experiment_name == name
    for name in PAPER:  # the CPU version: one overlay, conf/scale/cpu.yaml
        params = sweep_params(name, "scale=cpu")
        assert (params["seed"], params["backbone"]) == ("1,2", "smollm2"), name
        with inside_hydra([f"experiment={name}", "scale=cpu"]) as cfg:
            assert cfg.experiment_name == f"{name}_cpu" and cfg.backbone.name == "smollm2", name
            assert (cfg.max_train_samples, cfg.max_eval_samples, cfg.trainer.effective_batch_size) == (
                32,
                20,
                4,
            )
            assert cfg.eval.original_cache.startswith(f"multirun/{name}_cpu/")


def test_the_sweep_settings_live_in_one_base_file():
    """Multirun mode, multirun/<experiment>/<time> and the shared Original cache: experiment/base/sweep.yaml only."""
    for path in (REPO / "imsm" / "conf" / "experiment").glob("*.yaml"):
        text = path.read_text()
        assert "original_cache" not in text and "MULTIRUN" not in text, path.name
    for name in SWEEPS:
        with inside_hydra([f"experiment={name}"]) as cfg:
            sweep_dir = str(Path(cfg.eval.original_cache).parent)
        assert sweep_dir.startswith(f"multirun/{name}/"), name
        assert compose_hydra([f"experiment={name}"]).hydra.mode.name == "MULTIRUN", name
    assert compose_hydra([]).hydra.mode is None  # a plain run stays a single run


def test_cpu_scale_keeps_the_per_target_differences():
    """What the CPU scale changes per experiment is said once in conf/scale/cpu.yaml: GSM8K's generation limit
    (a target's own otherwise), table5's shorter timing; the paper's settings without it."""
    with inside_hydra(["experiment=table3", "scale=cpu"]) as cfg:
        assert (cfg.dataset.name, cfg.eval.max_new_tokens) == ("gsm8k", 160)
    with inside_hydra(["experiment=table2", "scale=cpu"]) as cfg:
        assert (cfg.dataset.name, cfg.eval.max_new_tokens, cfg.max_input_length) == ("ropes", None, 256)
    with inside_hydra(["experiment=table3"]) as cfg:
        assert cfg.eval.max_new_tokens is None  # GSM8K's own 256
    with inside_hydra(["experiment=table5", "scale=cpu"]) as cfg:
        assert (cfg.speed.new_tokens, cfg.speed.repeats, cfg.speed.prompt_length) == (32, 3, 100)
    with inside_hydra(["experiment=table5"]) as cfg:
        assert (cfg.speed.new_tokens, cfg.speed.repeats) == (128, 5)
    with inside_hydra(["experiment=table2", "scale=cpu", "max_train_samples=64", "seed=3"]) as cfg:
        assert (cfg.max_train_samples, cfg.seed) == (64, 3)  # the command line still wins


def test_the_preregistered_cpu_replication_keeps_its_settings():
    """scripts/replicate_cpu.sh's three sweeps (docs/results-cpu.md): the settings they were registered with."""
    with inside_hydra(["experiment=replicate_cpu_cola"]) as cfg:
        assert (cfg.backbone.name, cfg.peft.name, cfg.dataset.name) == ("smollm2", "lora", "cola")
        assert (cfg.max_train_samples, cfg.max_eval_samples, cfg.max_input_length, cfg.max_output_length) == (
            640,
            None,
            512,
            8,
        )
        assert list(cfg.eval_datasets) == ["webq", "freebaseqa", "multirc", "mrpc"]
        assert OmegaConf.to_container(cfg.eval.limits) == {
            "webq": 200,
            "freebaseqa": 200,
            "multirc": None,
            "mrpc": 400,
        }
        assert (cfg.eval.batch_size, cfg.eval.autocast) == (32, "bf16")
        args = cfg.trainer.args
        assert (args.learning_rate, args.per_device_train_batch_size, args.num_train_epochs) == (1e-3, 16, 1)
        assert (args.bf16, args.use_cpu, args.save_steps, cfg.trainer.effective_batch_size) == (
            True,
            True,
            100000,
            16,
        )
    assert sweep_params("replicate_cpu_mrpc") == {"gate": "none,query_aware", "seed": "1,2,3"}
    assert sweep_params("replicate_cpu_cola_ablation") == {"gate": "no_query,fixed", "seed": "1"}


@pytest.mark.parametrize("experiment", [*SWEEPS, *(f"{name} scale=cpu" for name in PAPER)])
def test_every_sweep_value_composes(experiment):
    """Each value of each swept key composes (what Hydra would otherwise find out at that job)."""
    name, *scale = experiment.split()
    for key, values in sweep_params(name, *scale).items():
        for value in values.split(","):
            cfg = compose_train([f"experiment={name}", *scale, f"{key}={value}"])
            if key in ("seed", "gate.rank"):
                assert str(OmegaConf.select(cfg, key)) == value


@pytest.mark.slow  # subprocess run(s), over 7 s: .ci/run runs the slow tests too
def test_smoke_multirun_then_report(tmp_path, data_dir, capsys):
    """The 2 x 2 grid x 2 seeds on tiny_llama, then the report: every cell, stds, the t-test column, a heatmap."""
    sweep = tmp_path / "sweep"
    start = time.perf_counter()
    proc = run_train(["experiment=smoke", f"hydra.sweep.dir={sweep}"], data_dir, timeout=180)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 180
    runs = job_metrics(sweep)
    assert len(runs) == 8 and {r["status"] for r in runs} == {"ok"}
    assert {(r["peft"], r["gate"], r["seed"]) for r in runs} == {
        (p, g, s) for p in ("lora", "ia3") for g in ("none", "query_aware") for s in (1, 2)
    }
    r = runs[0]
    assert r["experiment"] == "smoke" and r["eval_dataset_names"] == ["cola"] and r["wall_seconds"] > 0
    assert set(r["base_eval_datasets"]) == {"cola"} and r["base_metrics"]["n"] == 4
    assert len(list((sweep / "original").glob("*.json"))) == 2  # the frozen backbone scored once per dataset

    assert report_main([str(sweep)]) == 0
    out = capsys.readouterr().out
    table = (sweep / "report" / "smoke.md").read_text().splitlines()
    assert " ".join(table[0].split()) == "| backbone | target | method | mrpc | cola | Avg | p (Avg) |"
    methods = [line.split("|")[3].strip() for line in table[2:]]
    assert methods == ["Original", "LoRA", "LoRA + IMSM", "IA3", "IA3 + IMSM"]
    for line in table[3:]:  # every trained cell has a mean and a std over the 2 seeds
        assert line.count(" ± ") == 2, line
    assert "missing" not in out and "failed" not in "".join(table)
    assert "Paired t-test p-values" in out
    assert (sweep / "report" / "smoke_forgetting.png").read_bytes()[:4] == b"\x89PNG"
    for suffix in (".csv", ".tex", "_forgetting.md", "_forgetting.csv"):
        assert (sweep / "report" / f"smoke{suffix}").exists()


@pytest.mark.slow  # subprocess run(s), over 7 s: .ci/run runs the slow tests too
def test_a_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path, data_dir):
    """FreebaseQA has no training split: that job fails, the MRPC job still runs, the report says which failed, the
    sweep exits 1; run again over its directory, the finished job is not run again."""
    sweep = tmp_path / "sweep"
    command = [
        "experiment=smoke",
        "dataset=freebaseqa,mrpc",
        "peft=lora",
        "gate=query_aware",
        "seed=1",
        "eval_datasets=[]",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = run_train(command, data_dir)
    assert proc.returncode == 1, proc.stderr[-3000:]  # every job ran; the sweep says one failed
    summary = proc.stderr.splitlines()[-2:]  # after every job: how many failed, one line each
    assert (
        summary[0] == "1 job(s) of the sweep failed:"
        and "freebaseqa_s1: DataError: freebaseqa: no split" in summary[1]
    )
    by_target = {r["dataset"]: r for r in job_metrics(sweep)}
    failed = by_target["freebaseqa"]
    assert failed["status"] == "failed" and "no split given" in failed["error"]
    assert (failed["backbone"], failed["peft"], failed["gate"], failed["seed"]) == (
        "tiny_llama",
        "lora",
        "query_aware",
        1,
    )
    assert "Traceback" in failed["traceback"] and failed["experiment"] == "smoke"
    assert by_target["mrpc"]["status"] == "ok"
    assert report_main([str(sweep)]) == 0
    md = (sweep / "report" / "report.md").read_text()
    assert "| tiny_llama | LoRA + IMSM | 0.00 | failed |" in " ".join(md.split())  # columns mrpc, freebaseqa
    assert "Failed runs:" in md and "no split given" in md

    # the same sweep again over its directory: the finished job is recognised, nothing of it is rewritten
    mrpc_dir = Path(by_target["mrpc"]["run_dir"])

    def results() -> dict[Path, bytes]:  # Hydra's own record and log are Hydra's, rewritten by every launch
        skip = (".hydra", "train.log", ".imsm.lock")
        return {
            p: p.read_bytes() for p in mrpc_dir.rglob("*") if p.is_file() and not set(skip) & set(p.parts)
        }

    before = results()
    again = run_train(command, data_dir)
    assert "nothing to do" in again.stderr + again.stdout
    assert results() == before and (mrpc_dir / "adapter").is_dir()


@pytest.mark.slow  # subprocess run(s), over 7 s: .ci/run runs the slow tests too
def test_a_failed_single_run_exits_nonzero_and_records_its_status(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(["backbone=tiny_llama", "dataset=freebaseqa", f"hydra.run.dir={run_dir}"])
    assert proc.returncode != 0 and "no split given" in proc.stderr
    record = json.loads((run_dir / "metrics.json").read_text())
    assert (
        record["status"] == "failed" and record["dataset"] == "freebaseqa" and "DataError" in record["error"]
    )


@pytest.mark.slow  # subprocess run(s), over 7 s: .ci/run runs the slow tests too
def test_bad_sweeps_fail_before_any_job(tmp_path):
    with pytest.raises(MissingConfigException, match="Could not find 'experiment/table9'") as error:
        compose_train(["experiment=table9"])
    assert "table2" in str(error.value) and "base/sweep" not in str(error.value)  # the experiments are listed
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose_train(["experiment=smoke", "no_such_key=1"])
    # a bad value in a sweep fails before the first job: nothing is run or written
    sweep = tmp_path / "sweep"
    proc = run_train(["experiment=smoke", "peft=lora,nope", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode != 0 and "Could not find 'peft/nope'" in proc.stderr
    assert not sweep.exists() or not [p for p in sweep.iterdir() if p.is_dir()]


def test_speed_job_times_imsm_and_vanilla(tmp_path):
    overrides = ["experiment=table5", "scale=cpu", "backbone=tiny_llama", f"run_dir={tmp_path}"]
    with inside_hydra([*overrides, "speed.new_tokens=4", "speed.repeats=1", "speed.prompt_length=16"]) as cfg:
        result = train(cfg)
    speed = json.loads((tmp_path / "metrics.json").read_text())["speed"]
    assert result["status"] == "ok" and result["experiment"] == "table5_cpu"
    assert (
        speed["tokens_per_s"]["imsm"] > 0
        and speed["tokens_per_s"]["vanilla"] > 0
        and speed["new_tokens"] == 4
    )
    with (
        pytest.raises(ValueError, match="no gate to compare"),
        inside_hydra([*overrides, "gate=none"]) as cfg,
    ):
        train(cfg)


SHRINK = [
    "backbone=tiny_llama",
    "seed=1",
    "max_train_samples=4",
    "max_eval_samples=2",
    "max_output_length=8",
    "trainer.args.max_steps=1",
    "eval.max_new_tokens=4",
    "eval.batch_size=2",
]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", PAPER)
def test_cpu_table_runs_end_to_end_on_a_tiny_model(experiment, tmp_path, data_dir):
    """Each grid at CPU scale, one seed, on tiny_llama with 1 step: every job ok and the report renders."""
    sweep = tmp_path / "sweep"
    extra = (
        ["speed.new_tokens=4", "speed.repeats=1", "speed.prompt_length=16"]
        if experiment == "table5"
        else SHRINK[2:]
    )
    proc = run_train(
        ["-m", f"experiment={experiment}", "scale=cpu", *SHRINK[:2], *extra, f"hydra.sweep.dir={sweep}"],
        data_dir,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = job_metrics(sweep)
    assert runs and all(r["status"] == "ok" and r["experiment"] == f"{experiment}_cpu" for r in runs), [
        r.get("error") for r in runs
    ]
    assert report_main([str(sweep)]) == 0
    assert (sweep / "report" / f"{experiment}_cpu.md").exists()


@pytest.mark.slow
def test_replication_script_runs_every_stage_and_writes_the_document(tmp_path, data_dir):
    """scripts/replicate_cpu.sh on tiny_llama (1 seed, 1 step, 2 examples per set): its three sweeps run, the
    Original row is scored once per dataset, and results-cpu.md holds the stage times, both tables, the heatmaps
    and the hand-written reading appended at the end."""
    docs, root = tmp_path / "docs", tmp_path / "runs"
    docs.mkdir()
    (docs / "results-cpu-reading.md").write_text("## Reading\n\nwritten after the run\n")
    env = dict(os.environ, WANDB_MODE="offline", IMSM_DATA_DIR=str(data_dir), SEEDS="1", DOCS=str(docs))
    env.update(ROOT=str(root), PY=sys.executable)
    limits = [
        f"++eval.limits.{name}=2" for name in ("webq", "freebaseqa", "multirc", "mrpc")
    ]  # ++: add or set
    tiny = [*SHRINK[:1], *SHRINK[2:], "trainer.args.bf16=false", *limits]
    proc = subprocess.run(
        [str(REPO / "scripts" / "replicate_cpu.sh"), *tiny],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {stage: job_metrics(root / stage) for stage in ("mrpc", "cola", "cola_ablation")}
    assert {s: sorted(r["gate"] for r in runs) for s, runs in jobs.items()} == {
        "mrpc": ["none", "query_aware"],
        "cola": ["none", "query_aware"],
        "cola_ablation": ["fixed", "no_query"],
    }
    assert all(r["status"] == "ok" for runs in jobs.values() for r in runs)
    assert jobs["cola"][0]["eval_dataset_names"] == ["webq", "freebaseqa", "multirc", "mrpc"]
    assert all(r["eval_datasets"]["multirc"]["n"] == 2 for r in jobs["cola"])
    # the frozen backbone: 4 forgetting sets + 2 targets, mrpc's shared by its target and forgetting role
    assert len(list((root / "original").glob("*.json"))) == 5
    text = (docs / "results-cpu.md").read_text()
    for needle in (
        "| cola_ablation |",
        "## replicate_cpu_mrpc",
        "## replicate_cpu_cola",
        "LoRA + IMSM w/o gate",
    ):
        assert needle in text, needle
    assert "](results-cpu/replicate_cpu_cola_forgetting.png)" in text
    assert (docs / "results-cpu" / "replicate_cpu_cola_forgetting.png").read_bytes()[:4] == b"\x89PNG"
    assert text.rstrip().endswith("written after the run")


@pytest.mark.parametrize(
    ("name", "choices"),
    [
        ("table2_cpu", "experiment=table2 scale=cpu"),
        ("table2", "experiment=table2"),
        ("fig3_cpu", "experiment=fig3 scale=cpu"),
    ],
)
def test_sweep_script_maps_cpu_names_to_the_overlay(tmp_path, name, choices):
    """scripts/sweep.sh NAME_cpu = experiment=NAME scale=cpu, and the report picks that experiment's runs."""
    calls = tmp_path / "calls"
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    fake_python.chmod(0o755)
    env = dict(os.environ, PY=str(fake_python), SWEEP_DIR=str(tmp_path / "sweep"))
    proc = subprocess.run(
        [str(REPO / "scripts" / "sweep.sh"), name, "seed=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    train_call, report_call = calls.read_text().splitlines()
    assert train_call == f"-m imsm.train -m {choices} hydra.sweep.dir={tmp_path / 'sweep'} seed=1"
    assert report_call == f"-m imsm.report {tmp_path / 'sweep'} --table {name}"
