"""Settings that used to give a silently wrong run, or a deep torch error, are named before any work (issue 18)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import compose_train, tiny_overrides, write_gsm
from omegaconf import OmegaConf

from imsm.backbones import load_backbone
from imsm.train import train

BAD = [
    ("max_train_samples=0", "max_train_samples=0"),  # used to train on the whole split
    ("max_train_samples=-3", "max_train_samples=-3"),  # used to drop the last three examples
    ("max_eval_samples=0", "max_eval_samples=0"),
    ("max_output_length=0", "max_output_length=0"),  # used to keep all but the last target token
    ("gate.rank=0", "gate.rank=0"),  # used to train a zero-parameter "IMSM" gate that could not be reloaded
    ("gate.rank=-3", "gate.rank=-3"),  # used to fail inside torch
    ("trainer.args.per_device_train_batch_size=0", "per_device_train_batch_size=0"),  # ZeroDivisionError
    ("eval.batch_size=0", "eval.batch_size=0"),
    ("eval.limits={webq:0}", "eval.limits.webq=0"),
    ("trainer.args.max_steps=-1 trainer.args.num_train_epochs=0", "nothing to train"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[b[0] for b in BAD])
def test_out_of_range_settings_are_named_before_any_work(tmp_path, overrides, message):
    cfg = compose_train([*tiny_overrides(tmp_path / "run", write_gsm(tmp_path / "data")), *overrides.split()])
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("[", r"\[")):
        train(cfg)
    assert not (tmp_path / "run").exists()  # nothing written, nothing loaded


WRONG_TYPES = [
    (
        "max_train_samples=ten",
        "max_train_samples='ten': Value 'ten' of type 'str' could not be converted to Integer",
    ),
    ("eval.scoring=likelyhood", "expected one of [generate, likelihood, both]"),
    ("+eval.scorng=both", "eval.scorng: not a setting; did you mean 'scoring'?"),
    ("eval.at_steps=5", "eval.at_steps=5"),
    (
        "+max_train_sample=4",
        "max_train_sample: not a setting of imsm.train; did you mean 'max_train_samples'?",
    ),
    ("eval.on_bad_row=skipp", "expected one of [error, skip]"),
]


@pytest.mark.parametrize(("override", "message"), WRONG_TYPES, ids=[w[0] for w in WRONG_TYPES])
def test_a_wrong_type_choice_or_misspelt_key_is_named_before_any_work(tmp_path, override, message):
    cfg = compose_train([*tiny_overrides(tmp_path / "run", write_gsm(tmp_path / "data")), override])
    with pytest.raises(ValueError, match=re.escape(message)):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_every_shipped_experiment_passes_the_schema():
    from imsm import CONF_DIR
    from imsm.schema import schema_errors

    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        for scale in ([], ["scale=cpu"]):
            cfg = compose_train([f"experiment={path.stem}", *scale])
            assert schema_errors(cfg) == [], (path.stem, scale)


def test_every_problem_is_listed_at_once(tmp_path):
    cfg = compose_train(
        [
            *tiny_overrides(tmp_path / "run", write_gsm(tmp_path / "data")),
            "max_train_samples=0",
            "gate.rank=0",
        ]
    )
    with pytest.raises(ValueError, match=r"(?s)max_train_samples=0.*gate.rank=0"):
        train(cfg)


def test_a_rank_is_not_required_of_gates_without_weights(tmp_path):
    from imsm.checks import check_run_config

    for gate in ("fixed", "none"):  # their files carry rank 0 (unused)
        check_run_config(compose_train([*tiny_overrides(tmp_path / "run", tmp_path, gate=gate)]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid where a GPU is visible")
def test_fp16_without_a_gpu_is_refused_not_run_in_fp32(tmp_path):
    cfg = compose_train(
        [*tiny_overrides(tmp_path / "run", write_gsm(tmp_path / "data")), "trainer.args.fp16=true"]
    )
    with pytest.raises(ValueError, match="trainer.args.fp16=true: fp16 mixed precision needs a CUDA GPU"):
        train(cfg)


def test_a_missing_local_backbone_directory_is_named(tmp_path):
    node = OmegaConf.create(
        {
            "name": "llama3",
            "source": "hub",
            "name_or_path": str(tmp_path / "nope"),
            "dtype": "fp32",
            "device": "cpu",
        }
    )
    with pytest.raises(FileNotFoundError, match=r"backbone.name_or_path='.*nope' does not exist"):
        load_backbone(node)


def test_an_unloadable_hub_id_names_the_backbone_and_the_setting(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read once, at import
    node = OmegaConf.create(
        {"name": "llama3", "source": "hub", "name_or_path": "no-such-org/no-such-model", "dtype": "fp32"}
    )
    with pytest.raises(
        OSError,
        match=r"backbone llama3: could not load 'no-such-org/no-such-model' \(backbone.name_or_path\)",
    ):
        load_backbone(node)


def test_an_evaluation_failure_keeps_what_training_computed(tmp_path, monkeypatch):
    """The failed record keeps the loss, steps and times; the entry point's handler does not overwrite it."""
    import json

    import imsm.train as train_module
    from imsm.train import record_failure

    def broken(*args, **kwargs):
        raise RuntimeError("disk full while writing predictions")

    monkeypatch.setattr(train_module, "evaluate_datasets", broken)
    cfg = compose_train(tiny_overrides(tmp_path / "run", write_gsm(tmp_path / "data")))
    with pytest.raises(RuntimeError, match="disk full") as caught:
        train(cfg)
    record_failure(cfg, caught.value, 1.0)  # what hydra_main does next
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and "disk full" in record["error"]
    assert record["global_steps"] == 2 and record["train_loss"] > 0 and record["train_seconds"] > 0
    assert (tmp_path / "run" / "gate.safetensors").exists()  # the trained model was saved before evaluating


def test_a_saved_run_asking_for_remote_code_is_refused_unless_the_caller_asks(tmp_path, tiny_run):
    """A run directory someone sent must not run code: ``backbone.trust_remote_code`` in its config is refused."""
    import shutil

    from imsm.model.build import load_model

    run = tmp_path / "sent"
    shutil.copytree(tiny_run[0], run)
    config = OmegaConf.load(run / "config.yaml")
    config.backbone.trust_remote_code = True
    OmegaConf.save(config, run / "config.yaml")
    with pytest.raises(PermissionError, match=r"config.yaml sets backbone.trust_remote_code: true"):
        load_model(run, device="cpu")
    model, _ = load_model(run, device="cpu", trust_remote_code=True)  # asked for on the caller's own terms
    assert model.gate is not None
