"""Hydra launchers other than the basic one: joblib (parallel local jobs) and submitit (SLURM, or its local executor).

Each job then runs in another process (a joblib worker, a submitit subprocess or SLURM task), so what the sweep
reports is checked end to end: every job writes its own ``metrics.json``, and ``imsm.cli.SweepStatus`` (a Hydra
callback in the launching process) makes the sweep exit 1 when one failed. Real SLURM is not tested here:
``hydra/launcher=submitit_local`` runs the same submitit code path with local subprocesses instead of ``sbatch``.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pytest
from conftest import REPO
from helpers import TINY_RUN, write_gsm
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from multiproc import Finished, launch_env, run_command, train_cmd

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason='needs pip install -e ".[joblib]"')
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='needs pip install -e ".[slurm]"')

CONF = str(REPO / "imsm" / "conf")
# two tiny jobs take 15-55 s on 2 shared cores, most of it importing torch in each process
TIMEOUT = 240
TINY = [*TINY_RUN, "seed=1"]  # tests/helpers.py's tiny run, seed 1 (the job directories' names say s1)
FAILED = "1 job(s) of the sweep failed:"
# FreeBaseQA has no training split: that job fails at once (imsm.data raises DataError), the GSM8K one trains
ONE_FAILS = "dataset=freebaseqa,gsm8k"


def sweep(launcher: list[str], overrides: list[str], sweep_dir: Path, data_dir: Path) -> Finished:
    """``python -m imsm.train -m`` with ``launcher`` overrides, one thread per process, output in ``sweep_dir``."""
    command = ["-m", *launcher, *TINY, *overrides, f"data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}"]
    return run_command(train_cmd(command), TIMEOUT, launch_env())


def records(sweep_dir: Path) -> dict[str, dict]:
    """Each job's ``metrics.json`` by its sweep subdirectory name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))}


def failure_summary(output: str) -> list[str]:
    """SweepStatus's lines: the count, then one line per failed job."""
    lines = output.splitlines()
    assert FAILED in lines, output[-3000:]
    start = lines.index(FAILED)
    return lines[start : start + 2]


def compose_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_the_launcher_keys_the_readme_names_exist():
    """The README's SLURM command composes (a misspelt key is refused before any job), as does joblib's."""
    slurm = {
        "partition": "gpu",
        "gpus_per_node": 1,
        "tasks_per_node": 1,
        "cpus_per_task": 8,
        "mem_gb": 64,
        "timeout_min": 720,
        "max_num_timeout": 3,
    }
    cfg = compose_hydra(
        [
            "experiment=table3",
            "hydra.sweep.dir=multirun/table3",  # fixed: the same command again finds the finished jobs
            "hydra/launcher=submitit_slurm",
            *(f"hydra.launcher.{k}={v}" for k, v in slurm.items()),
        ]
    )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert {k: cfg.hydra.launcher[k] for k in slurm} == slurm
    assert cfg.hydra.launcher.submitit_folder == "multirun/table3/.submitit/%j"  # its logs: under the sweep
    assert compose_hydra(["hydra/launcher=submitit_local"]).hydra.launcher._target_.endswith("LocalLauncher")
    assert compose_hydra(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]).hydra.launcher.n_jobs == 2
    with pytest.raises(ConfigCompositionException, match="gpus"):
        compose_hydra(["hydra/launcher=submitit_slurm", "hydra.launcher.gpus=1"])


@pytest.mark.slow
def test_joblib_runs_the_jobs_in_parallel_processes(tmp_path):
    data, sweep_dir = write_gsm(tmp_path / "data"), tmp_path / "sweep"
    proc = sweep(
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], ["gate=none,query_aware"], sweep_dir, data
    )
    assert proc.returncode == 0, proc.output[-3000:]
    assert "Joblib.Parallel(n_jobs=2,backend=loky,prefer=processes" in proc.output  # worker processes
    runs = records(sweep_dir)
    assert {r["gate"]: r["status"] for r in runs.values()} == {"none": "ok", "query_aware": "ok"}, runs


@pytest.mark.slow
def test_joblib_sweep_with_a_failed_job_exits_1_after_every_job(tmp_path):
    """The job fails in a worker process; the callback in the launching process still finds it and exits 1."""
    data, sweep_dir = write_gsm(tmp_path / "data"), tmp_path / "sweep"
    proc = sweep(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], [ONE_FAILS], sweep_dir, data)
    assert proc.returncode == 1, proc.output[-3000:]
    summary = failure_summary(proc.output)
    assert "freebaseqa_s1: DataError: freebaseqa: no split given" in summary[1], summary
    by_target = {r["dataset"]: r["status"] for r in records(sweep_dir).values()}
    assert by_target == {"freebaseqa": "failed", "gsm8k": "ok"}


@pytest.mark.slow
def test_joblib_sweep_with_a_refused_run_directory_exits_1(tmp_path):
    """Another process holds the job's run directory lock: the job is refused, and the sweep should say so."""
    data, sweep_dir = write_gsm(tmp_path / "data"), tmp_path / "sweep"
    run_dir = sweep_dir / "0_tiny_llama_lora_query_aware_gsm8k_s1"  # hydra.sweep.subdir of the only job
    run_dir.mkdir(parents=True)
    with open(run_dir / ".imsm.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = sweep(["hydra/launcher=joblib"], ["gate=query_aware"], sweep_dir, data)
    assert "RunDirError" in proc.output and "is in use by another imsm job" in proc.output, proc.output[
        -3000:
    ]
    assert proc.returncode == 1 and "RunDirError" in failure_summary(proc.output)[1]


@pytest.fixture(scope="module")
def submitit_sweep(tmp_path_factory) -> tuple[list[str], Path, Path, Finished]:
    """One sweep under submitit's local executor: a failing FreeBaseQA job and a GSM8K job that trains."""
    root = tmp_path_factory.mktemp("submitit")
    data, sweep_dir = write_gsm(root / "data"), root / "sweep"
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]
    return launcher, data, sweep_dir, sweep(launcher, [ONE_FAILS], sweep_dir, data)


def job_logs(sweep_dir: Path) -> dict[Path, str]:
    """submitit's per-job logs: ``<sweep>/.submitit/<job id>/<job id>_<task>_log.{out,err}``."""
    return {p: p.read_text() for p in sorted((sweep_dir / ".submitit").glob("*/*_log.*"))}


@pytest.mark.slow
def test_submitit_local_records_each_job_and_exits_1_when_one_failed(submitit_sweep):
    _, _, sweep_dir, proc = submitit_sweep
    assert proc.returncode == 1, proc.output[-3000:]
    assert "Submitit 'local' sweep output dir" in proc.output
    summary = failure_summary(proc.output)
    assert "freebaseqa_s1: DataError: freebaseqa: no split given" in summary[1], summary
    runs = records(sweep_dir)
    assert {r["dataset"]: r["status"] for r in runs.values()} == {"freebaseqa": "failed", "gsm8k": "ok"}
    # the jobs' own output is in submitit's logs, not on the console: one .out and one .err per job
    logs = job_logs(sweep_dir)
    outs = [text for path, text in logs.items() if path.name.endswith("_log.out")]
    assert len(outs) == 2 and len(logs) == 4, list(logs)
    assert any("run dir: " in text and "gsm8k" in text for text in outs)
    assert any("DataError: freebaseqa: no split given" in text for text in outs)


@pytest.mark.slow
def test_submitit_local_rerun_runs_only_the_unfinished_job(submitit_sweep):
    """The same command again: the finished GSM8K job is recognised (nothing rewritten), the failed one is retried."""
    launcher, data, sweep_dir, first = submitit_sweep
    assert first.returncode == 1, first.output[-3000:]
    ok_dir = next(sweep_dir.glob("*_gsm8k_s1"))

    def results() -> dict[Path, bytes]:  # Hydra's record and log are rewritten by every launch
        skip = {".hydra", "train.log", ".imsm.lock"}
        return {p: p.read_bytes() for p in ok_dir.rglob("*") if p.is_file() and not skip & set(p.parts)}

    before, logs_before = results(), set(job_logs(sweep_dir))
    again = sweep(launcher, [ONE_FAILS], sweep_dir, data)
    assert again.returncode == 1 and "freebaseqa" in failure_summary(again.output)[1], again.output[-3000:]
    assert results() == before
    new_logs = {p: t for p, t in job_logs(sweep_dir).items() if p not in logs_before}
    assert len(new_logs) == 4 and any("nothing to do" in t for t in new_logs.values()), list(new_logs)
