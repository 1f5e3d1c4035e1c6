"""logger=wandb: an offline run directory with the config, training curves, final metrics and predictions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import compose_train, tiny_overrides, write_gsm
from omegaconf import OmegaConf
from wandb_log import read_offline_run

from imsm import tracking
from imsm.train import train


@pytest.fixture
def gsm_dir(tmp_path: Path) -> Path:
    return write_gsm(tmp_path / "data")


@pytest.fixture
def no_wandb_account(tmp_path, monkeypatch):
    """No API key anywhere (HOME without .netrc), wandb's own files kept inside tmp_path."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_mode_follows_the_api_key_unless_set(no_wandb_account, monkeypatch):
    assert tracking.resolve_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.resolve_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode(None) == "disabled"
    assert tracking.resolve_mode("offline") == "offline"  # logger.mode wins


def test_netrc_entry_counts_as_an_api_key(no_wandb_account, tmp_path):
    netrc = tmp_path / "home" / ".netrc"
    netrc.parent.mkdir(parents=True)
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert tracking.has_api_key()


def test_only_the_main_process_logs(monkeypatch, tmp_path):
    cfg = compose_train(["logger=wandb"])
    monkeypatch.setenv("RANK", "1")
    assert tracking.start(cfg, tmp_path) is None
    assert tracking.start(compose_train(["logger=none"]), tmp_path) is None


@pytest.mark.slow  # ~17 s (a tiny training run + wandb's offline writer); .ci/run runs the slow tests too
def test_offline_run_is_written_and_reads_back(tmp_path, gsm_dir, no_wandb_account):
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [
            *tiny_overrides(run_dir, gsm_dir),
            "logger=wandb",
            "trainer.args.logging_steps=1",
            "experiment_name=smoke",
            "seed=7",
            "eval.every_n_steps=1",  # the forgetting curve: likelihood probes after steps 1 and 2
        ]
    )
    result = train(cfg)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())

    logged = read_offline_run(run_dir / "wandb")
    assert logged["run"] == {
        "name": "tiny_llama_lora_query_aware_r8_gsm8k_s7",
        "group": "smoke",
        "project": "imsm",
    }
    assert logged["config"]["backbone"]["name"] == "tiny_llama" and logged["config"]["seed"] == 7
    losses = [h["train/loss"] for h in logged["history"] if "train/loss" in h]
    assert len(losses) == 2  # max_steps=2, logging_steps=1: the training curve
    gates = [h["train/gate_mean"] for h in logged["history"] if "train/gate_mean" in h]
    assert len(gates) == 2 and all(0 < g < 1 for g in gates)  # the gate, beside the loss
    probes = [h for h in logged["history"] if "probe/gsm8k/lik_nll" in h]
    assert [h["train/global_step"] for h in probes] == [1, 2]
    models = [a for a in logged["artifacts"] if a["type"] == "model"]  # besides the predictions table
    assert len(models) == 1
    assert {"adapter/adapter_model.safetensors", "gate.safetensors", "config.yaml"} <= set(models[0]["files"])
    summary = logged["summary"]
    assert summary["eval/gsm8k/accuracy"] == result["metrics"]["accuracy"]
    assert summary["original/eval/gsm8k/n"] == 3 and summary["status"] == "ok"
    assert summary["predictions/nrows"] == 3  # the predictions table (3 evaluation examples)
    assert summary["trainable_parameters"] == result["trainable_parameters"]["total"]
    tables = list(Path(offline[0]).rglob("predictions_*.table.json"))
    assert len(tables) == 1


def test_an_ad_hoc_multirun_is_one_group_and_report_to_is_refused(tmp_path, gsm_dir):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from imsm import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train", ["logger=wandb", f"hydra.sweep.dir={tmp_path}/sweep"], return_hydra_config=True
        )
    cfg.hydra.mode = "MULTIRUN"
    HydraConfig.instance().set_config(cfg)
    try:
        assert tracking.sweep_group() == f"{tmp_path}/sweep"
        assert cfg.logger.group is None  # no experiment: the sweep directory groups its jobs
    finally:
        HydraConfig.instance().cfg = None
    bad = compose_train([*tiny_overrides(tmp_path / "run", gsm_dir), "trainer.args.report_to=wandb"])
    with pytest.raises(ValueError, match=r"report_to='wandb': imsm logs to W&B itself .*logger=wandb"):
        train(bad)


def test_logger_none_writes_no_wandb_directory(tmp_path, gsm_dir):
    run_dir = tmp_path / "run"
    cfg = compose_train([*tiny_overrides(run_dir, gsm_dir), "trainer.args.max_steps=1"])
    assert OmegaConf.select(cfg, "logger.name") == "none"
    train(cfg)
    assert not (run_dir / "wandb").exists()


@pytest.mark.slow  # two tiny jobs in a subprocess multirun with wandb's offline writer (~25 s)
def test_an_ad_hoc_multirun_reads_back_as_one_group(tmp_path, gsm_dir, no_wandb_account):
    """``-m gate=none,query_aware logger=wandb`` without an experiment: both offline runs carry the sweep's group."""
    import os

    from multiproc import launch_env, run_command

    sweep = tmp_path / "sweep"
    overrides = [
        "-m",
        "backbone=tiny_llama",
        "gate=none,query_aware",
        "logger=wandb",
        f"data_dir={gsm_dir}",
        "max_train_samples=4",
        "eval.enabled=false",
        "trainer.args.max_steps=1",
        "trainer.args.per_device_train_batch_size=2",
        "trainer.effective_batch_size=2",
        f"hydra.sweep.dir={sweep}",
    ]
    env = launch_env(**{k: os.environ[k] for k in os.environ if k.startswith(("WANDB_", "HOME", "NETRC"))})
    done = run_command([sys.executable, "-m", "imsm.train", *overrides], timeout=240, env=env)
    assert done.returncode == 0, done.output[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "wandb").is_dir())
    assert len(jobs) == 2
    groups = {read_offline_run(job / "wandb")["run"].get("group") for job in jobs}
    assert groups == {str(sweep)}
