"""logger=wandb: an offline run directory with the config, training curves, final metrics and predictions."""

from __future__ import annotations

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
    summary = logged["summary"]
    assert summary["eval/gsm8k/accuracy"] == result["metrics"]["accuracy"]
    assert summary["original/eval/gsm8k/n"] == 3 and summary["status"] == "ok"
    assert summary["predictions/nrows"] == 3  # the predictions table (3 evaluation examples)
    assert summary["trainable_parameters"] == result["trainable_parameters"]["total"]
    tables = list(Path(offline[0]).rglob("predictions_*.table.json"))
    assert len(tables) == 1


def test_logger_none_writes_no_wandb_directory(tmp_path, gsm_dir):
    run_dir = tmp_path / "run"
    cfg = compose_train([*tiny_overrides(run_dir, gsm_dir), "trainer.args.max_steps=1"])
    assert OmegaConf.select(cfg, "logger.name") == "none"
    train(cfg)
    assert not (run_dir / "wandb").exists()
