"""The paper's tables as Hydra multiruns: every sweep composes, a smoke sweep runs and reports, failures are kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_train import compose_train

from imsm.report import main as report_main
from imsm.train import train

CONF = str(REPO / "imsm" / "conf")
EXPERIMENTS = sorted(p.stem for p in (REPO / "imsm" / "conf" / "experiment").glob("*.yaml"))
TABLES = [e for e in EXPERIMENTS if e.startswith("table")]


def sweep_params(experiment: str) -> dict[str, str]:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    return dict(cfg.hydra.sweeper.params or {})


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
    expected = {f"table{i}{suffix}" for i in range(1, 7) for suffix in ("", "_cpu")}
    assert expected <= set(TABLES)
    for name in expected:
        params = sweep_params(name)
        assert "seed" in params and len(params["seed"].split(",")) >= 2, name  # seeds for the t-test
        cfg = compose_train([f"experiment={name}"])
        assert cfg.experiment_name == name
    assert sweep_params("table1")["seed"] == "1,2,3"


@pytest.mark.parametrize(
    "experiment", [e for e in EXPERIMENTS if e.startswith(("table", "smoke", "replicate"))]
)
def test_every_sweep_value_composes(experiment):
    """Each value of each swept key composes (what Hydra would otherwise find out at that job)."""
    for key, values in sweep_params(experiment).items():
        for value in values.split(","):
            cfg = compose_train([f"experiment={experiment}", f"{key}={value}"])
            if key in ("seed", "gate.rank"):
                assert str(OmegaConf.select(cfg, key)) == value


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
    assert table[0] == "| backbone | target | method | mrpc | cola | Avg | p (Avg) |"
    methods = [line.split("|")[3].strip() for line in table[2:]]
    assert methods == ["Original", "LoRA", "LoRA + IMSM", "IA3", "IA3 + IMSM"]
    for line in table[3:]:  # every trained cell has a mean and a std over the 2 seeds
        assert line.count(" ± ") == 2, line
    assert "missing" not in out and "failed" not in "".join(table)
    assert "Paired t-test p-values" in out
    assert (sweep / "report" / "smoke_forgetting.png").read_bytes()[:4] == b"\x89PNG"
    for suffix in (".csv", ".tex", "_forgetting.md", "_forgetting.csv"):
        assert (sweep / "report" / f"smoke{suffix}").exists()


def test_a_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path, data_dir):
    """FreebaseQA has no training split: that job fails, the MRPC job still runs, the report says which failed."""
    sweep = tmp_path / "sweep"
    proc = run_train(
        [
            "experiment=smoke",
            "dataset=freebaseqa,mrpc",
            "peft=lora",
            "gate=query_aware",
            "seed=1",
            "eval_datasets=[]",
            f"hydra.sweep.dir={sweep}",
        ],
        data_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
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
    assert "| tiny_llama | LoRA + IMSM | 0.00 | failed |" in md  # columns mrpc, freebaseqa
    assert "Failed runs:" in md and "no split given" in md


def test_a_failed_single_run_exits_nonzero_and_records_its_status(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(["backbone=tiny_llama", "dataset=freebaseqa", f"hydra.run.dir={run_dir}"])
    assert proc.returncode != 0 and "no split given" in proc.stderr
    record = json.loads((run_dir / "metrics.json").read_text())
    assert (
        record["status"] == "failed" and record["dataset"] == "freebaseqa" and "DataError" in record["error"]
    )


def test_bad_sweeps_fail_before_any_job(tmp_path):
    proc = run_train(["experiment=table9"])
    assert proc.returncode != 0 and "Could not find 'experiment/table9'" in proc.stderr
    assert "table2_cpu" in proc.stderr  # the available experiments are listed
    sweep = tmp_path / "sweep"
    proc = run_train(["experiment=smoke", "no_such_key=1,2", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode != 0 and "no_such_key" in proc.stderr
    proc = run_train(["experiment=smoke", "peft=lora,nope", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode != 0 and "Could not find 'peft/nope'" in proc.stderr
    assert not [p for p in sweep.iterdir() if p.is_dir()]  # no job directory: nothing ran


def test_speed_job_times_imsm_and_vanilla(tmp_path):
    cfg = compose_train(
        [
            "experiment=table5_cpu",
            "backbone=tiny_llama",
            "speed.new_tokens=4",
            "speed.repeats=1",
            "speed.prompt_length=16",
            f"run_dir={tmp_path}",
        ]
    )
    result = train(cfg)
    speed = json.loads((tmp_path / "metrics.json").read_text())["speed"]
    assert result["status"] == "ok" and result["experiment"] == "table5_cpu"
    assert (
        speed["tokens_per_s"]["imsm"] > 0
        and speed["tokens_per_s"]["vanilla"] > 0
        and speed["new_tokens"] == 4
    )
    with pytest.raises(ValueError, match="no gate to compare"):
        train(
            compose_train(
                ["experiment=table5_cpu", "backbone=tiny_llama", "gate=none", f"run_dir={tmp_path}"]
            )
        )


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
@pytest.mark.parametrize("experiment", [t for t in TABLES if t.endswith("_cpu")])
def test_cpu_table_runs_end_to_end_on_a_tiny_model(experiment, tmp_path, data_dir):
    """Each *_cpu grid, one seed, on tiny_llama with 1 step: every job ok and the report renders."""
    sweep = tmp_path / "sweep"
    extra = (
        ["speed.new_tokens=4", "speed.repeats=1", "speed.prompt_length=16"]
        if experiment.startswith("table5")
        else SHRINK[2:]
    )
    proc = run_train(
        ["-m", f"experiment={experiment}", *SHRINK[:2], *extra, f"hydra.sweep.dir={sweep}"],
        data_dir,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = job_metrics(sweep)
    assert runs and all(r["status"] == "ok" for r in runs), [r.get("error") for r in runs]
    assert report_main([str(sweep)]) == 0
    assert (sweep / "report" / f"{experiment}.md").exists()


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
