"""End to end: config composition, training on a tiny model, save -> reload, the CLI, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from helpers import compose_train, tiny_overrides, write_gsm
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from imsm.data import DataError, load_split
from imsm.data.base import Example
from imsm.data.collate import TokenizedDataset, TrainCollator, encode_example
from imsm.model.build import load_model
from imsm.train import train


@pytest.fixture
def gsm_dir(tmp_path: Path) -> Path:
    return write_gsm(tmp_path / "data")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "imsm" / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["backbone", "peft", "gate", "dataset", "trainer", "experiment"])
def test_every_config_option_composes(group):
    for option in group_options(group):
        cfg = compose_train([f"{group}={option}"])
        OmegaConf.to_container(cfg.backbone, resolve=True)
        assert cfg.gate.type in ("query_aware", "no_query", "fixed", "none")
        assert cfg.peft.config._target_.startswith(("peft.", "imsm.model."))  # peft's methods, or LoRAMoE


def test_unknown_option_lists_the_choices():
    with pytest.raises(MissingConfigException) as error:
        compose_train(["gate=bogus"])
    assert "query_aware" in str(error.value) and "no_query" in str(error.value)  # Hydra lists the options


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval_datasets=[webqs]", r"unknown dataset 'webqs'; choices: \['cola'"),
        ("dataset.eval_split='test[:x]'", r"bad split 'test\[:x\]'"),
        (
            "eval.scoring=generation",
            r"eval.scoring='generation': Invalid value 'generation', expected one of \[generate, likelihood, both\]",
        ),
        (
            "eval.autocast=int8",
            r"eval.autocast='int8': Invalid value 'int8', expected one of \[fp32, bf16, fp16\]",
        ),
    ],
)
def test_bad_evaluation_settings_fail_before_training(tmp_path, gsm_dir, override, message):
    run_dir = tmp_path / "run"
    with pytest.raises((DataError, ValueError), match=message):
        train(compose_train([*tiny_overrides(run_dir, gsm_dir), override]))
    assert not run_dir.exists()  # nothing was trained, saved or written


def test_train_saves_a_run_that_reloads_with_identical_logits(tiny_run, gsm_dir):
    run_dir, result = tiny_run
    assert result["status"] == "ok" and result["global_steps"] == 2
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "gate.json",
        "gate.safetensors",
        "config.yaml",
        "metrics.json",
        "eval/gsm8k/predictions.jsonl",
        "eval_base/gsm8k/predictions.jsonl",
    ):
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))  # the file is what train() returned
    assert metrics["metrics"]["n"] == 3 and 0.0 <= metrics["metrics"]["accuracy"] <= 1.0
    assert metrics["trainable_parameters"]["gate"] == 5 * 64 * 8
    preds = [json.loads(line) for line in (run_dir / "eval" / "gsm8k" / "predictions.jsonl").open()]
    assert len(preds) == 3 and set(preds[0]) == {"prompt", "generation", "gold", "correct"}
    cfg = OmegaConf.load(run_dir / "config.yaml")

    # reload: identical logits to a fresh in-memory model built from the same files
    model, tok = load_model(run_dir, device="cpu")
    model.eval()
    ex = load_split(cfg.dataset, str(gsm_dir), "test", 2)
    feats = [encode_example(tok, e, 64, 32) for e in ex]
    batch = TrainCollator(tok.pad_token_id)(feats)
    logits = model(
        batch["input_ids"], batch["attention_mask"], batch["query_mask"], return_logits=True
    ).logits
    again, _ = load_model(run_dir, device="cpu")
    again.eval()
    logits2 = again(
        batch["input_ids"], batch["attention_mask"], batch["query_mask"], return_logits=True
    ).logits
    assert torch.equal(logits, logits2)


def test_vanilla_run_is_a_plain_peft_adapter(tmp_path, gsm_dir):
    """gate=none: no gate file, and plain ``PeftModel.from_pretrained`` gives the run's own logits."""
    from peft import PeftModel

    from imsm.backbones import load_backbone

    run_dir = tmp_path / "run"
    result = train(compose_train([*tiny_overrides(run_dir, gsm_dir, "none"), "eval.enabled=false"]))
    assert result["trainable_parameters"]["gate"] == 0 and not (run_dir / "gate.safetensors").exists()
    model, tok = load_model(run_dir, device="cpu")
    feats = [encode_example(tok, Example(prompt="Tom has 3 apples.", target=" 3"), 64, 32)]
    batch = TrainCollator(tok.pad_token_id)(feats)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], return_logits=True).logits
        plain = PeftModel.from_pretrained(
            load_backbone(OmegaConf.load(run_dir / "config.yaml").backbone, "cpu")[0], run_dir / "adapter"
        )
        assert torch.equal(
            plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, logits
        )


def test_trained_model_logits_survive_save_and_load(tmp_path, gsm_dir):
    """The in-memory trained model and its reloaded copy agree exactly."""
    from hydra.utils import instantiate  # noqa: F401  (compose below resolves _target_ lazily)

    from imsm.model.build import build_model, save_model

    cfg = compose_train(tiny_overrides(tmp_path / "r", gsm_dir))
    model, tok = build_model(cfg)
    with torch.no_grad():  # make adapter and gate non-trivial, as after training
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    save_model(model, tmp_path / "r", cfg)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    query = torch.tensor([[1, 1, 1, 0, 0]])
    before = model(ids, mask, query, return_logits=True).logits
    after = load_model(tmp_path / "r", device="cpu")[0](ids, mask, query, return_logits=True).logits
    assert torch.equal(before, after)


@pytest.mark.slow  # subprocess run(s), over 7 s: .ci/run runs the slow tests too
def test_cli_trains_tiny_model_quickly(tmp_path, gsm_dir):
    env = dict(os.environ, IMSM_DATA_DIR=str(gsm_dir))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "imsm.train",
            "backbone=tiny_llama",
            "dataset=gsm8k",
            "trainer.args.max_steps=2",
            "max_train_samples=8",
            "max_eval_samples=2",
            "eval.max_new_tokens=4",
            f"hydra.run.dir={tmp_path}/cli",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable: adapter" in proc.stdout and "run dir:" in proc.stdout
    record = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    # the command line's choices are recorded: the report groups runs by the ones that vary
    assert record["choices"]["backbone"] == "tiny_llama" and record["choices"]["max_train_samples"] == "8"


def test_missing_data_file_names_the_path_and_the_setting(tmp_path):
    cfg = compose_train([])
    with pytest.raises(DataError, match=r"gsm8k/train\.jsonl.*IMSM_DATA_DIR"):
        load_split(cfg.dataset, str(tmp_path), "train")
    with pytest.raises(DataError, match="No data directory"):
        load_split(cfg.dataset, None, "train")


def test_truncation_is_counted(tmp_path):
    from imsm.backbones import load_tokenizer, prepare_smollm2

    tok = load_tokenizer(prepare_smollm2())
    examples = [Example(prompt="word " * 50, target="answer " * 20), Example(prompt="short", target="ok")]
    ds = TokenizedDataset(examples, tok, max_input_length=10, max_output_length=5)
    assert (ds.stats.prompts, ds.stats.targets, ds.stats.total) == (1, 1, 2)
    f = ds[0]
    assert f["query_len"] == [10] and len(f["input_ids"]) == 15 and f["input_ids"][-1] == tok.eos_token_id
    assert f["labels"][:10] == [-100] * 10 and f["labels"][10:] == f["input_ids"][10:]


def test_prompt_and_target_join_with_nothing_between():
    from imsm.backbones import load_tokenizer, prepare_smollm2

    tok = load_tokenizer(prepare_smollm2())
    ex = Example(prompt="Question: 2+2?\nAnswer:", target=" 4")
    f = encode_example(tok, ex, 64, 64)
    assert f["input_ids"] == tok("Question: 2+2?\nAnswer:")["input_ids"] + tok(
        " 4", add_special_tokens=False
    )["input_ids"] + [tok.eos_token_id]


def test_train_evaluates_the_forgetting_datasets(tiny_run):
    """eval_datasets adds a row per dataset (trained and frozen), written under eval/ and eval_base/."""
    run_dir, result = tiny_run
    assert result["eval_datasets"]["gsm8k"]["n"] == 3
    assert result["base_eval_datasets"]["gsm8k"]["n"] == 3
    for sub in ("eval", "eval_base"):
        assert (run_dir / sub / "gsm8k" / "predictions.jsonl").exists()
        assert json.loads((run_dir / sub / "metrics.json").read_text())["gsm8k"]["n"] == 3


def test_eval_limits_override_max_eval_samples_per_dataset(tmp_path, gsm_dir):
    """``eval.limits`` sets one dataset's evaluation size (here the target's and its forgetting row) and is recorded."""
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(run_dir, gsm_dir), "eval_datasets=[gsm8k]", "trainer.args.max_steps=1"]
    result = train(compose_train([*overrides, "eval.limits={gsm8k: 2}", "eval.compare_base=false"]))
    assert result["metrics"]["n"] == 2 and result["eval_datasets"]["gsm8k"]["n"] == 2
    assert result["setup"]["eval_limits"] == {"gsm8k": 2}
    assert json.loads((run_dir / "eval" / "gsm8k" / "metrics.json").read_text())["limit"] == 2
