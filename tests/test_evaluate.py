"""Evaluation on many datasets: the reusable ``evaluate_datasets``, the Hydra app, run directories and the base
model, on a tiny random backbone (the real SmolLM2 only in the slow test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from imsm.data import DataError
from imsm.evaluate import base_model, evaluate
from imsm.evaluation import EvalSettings, evaluate_datasets, results_table
from imsm.model.build import save_model


@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.load(REPO / "imsm" / "conf" / "backbone" / "tiny_llama.yaml")
    cfg.device = "cpu"
    model, tokenizer = base_model(cfg)
    return model, tokenizer, cfg


def evaluate_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "imsm" / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def settings(names: list[str], data_dir, limit: int, **options) -> EvalSettings:
    """The evaluation stage's settings as ``python -m imsm.evaluate`` builds them (batch 2, prompts of 256)."""
    overrides = [f"datasets=[{','.join(names)}]", f"data_dir={data_dir}", f"limit={limit}", "batch_size=2"]
    overrides += ["max_input_length=256", *(f"{k}={'null' if v is None else v}" for k, v in options.items())]
    return EvalSettings.from_evaluate_config(evaluate_config(*overrides))


def test_results_table_has_a_row_per_dataset_and_a_column_per_metric():
    table = results_table(
        {"mrpc": {"accuracy": 0.5, "f1": 0.25, "invalid": 1, "n": 4}, "webq": {"accuracy": 1.0, "n": 2}}
    )
    lines = table.splitlines()
    assert lines[0].split() == ["dataset", "accuracy", "f1", "invalid", "n"]
    assert lines[1].split() == ["mrpc", "0.5000", "0.2500", "1", "4"]
    assert lines[2].split() == ["webq", "1.0000", "-", "-", "2"]


def test_evaluate_datasets_writes_metrics_and_predictions(tiny, data_dir, tmp_path):
    model, tokenizer, _ = tiny
    names = ["webq", "freebaseqa", "multirc", "mrpc"]
    results = evaluate_datasets(
        model, tokenizer, settings(names, data_dir, 3, max_new_tokens=3), tmp_path, "base"
    ).model
    assert list(results) == names
    assert set(results["mrpc"]) == {"accuracy", "f1", "invalid", "invalid_rate", "n"}
    assert set(results["webq"]) == {"accuracy", "n"}
    assert all(m["n"] == 3 for m in results.values())
    assert json.loads((tmp_path / "metrics.json").read_text()) == results
    info = json.loads((tmp_path / "multirc" / "metrics.json").read_text())
    assert (info["split"], info["source"], info["streams"], info["limit"]) == ("yesno", "raw", "base", 3)
    rows = [json.loads(line) for line in (tmp_path / "webq" / "predictions.jsonl").open()]
    assert len(rows) == 3 and set(rows[0]) == {"prompt", "generation", "gold", "correct"}
    assert rows[0]["gold"] == ["Jamaican Creole English Language", "Jamaican English"]


def test_source_override_reads_the_reference_split(tiny, data_dir, tmp_path):
    model, tokenizer, _ = tiny
    evaluate_datasets(
        model,
        tokenizer,
        settings(["multirc"], data_dir, 2, max_new_tokens=1, source="reference"),
        tmp_path,
        "base",
    )
    rows = [json.loads(line) for line in (tmp_path / "multirc" / "predictions.jsonl").open()]
    reference = (data_dir / "imsm-reference" / "multirc" / "data_test.json").open().readline()
    assert rows[0]["prompt"] == json.loads(reference)["input"]


def test_unknown_dataset_fails_before_generating(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset 'boolq'; choices: \['cola', 'freebaseqa'"):
        settings(["mrpc", "boolq"], tmp_path, 2)
    with pytest.raises(
        ValueError, match=r"eval.scoring='likelihod' is not one of \['both', 'generate', 'likelihood'\]"
    ):
        settings(["mrpc"], tmp_path, 2, scoring="likelihod")


def test_hydra_app_on_the_base_model_prints_the_table(data_dir, tmp_path, capsys):
    cfg = evaluate_config(
        "model=base",
        "backbone=tiny_llama",
        "backbone.device=cpu",
        "datasets=[cola,ropes]",
        "limit=2",
        "max_new_tokens=2",
        f"data_dir={data_dir}",
        f"out_dir={tmp_path}",
    )
    assert cfg.backbone.name == "tiny_llama"
    results = evaluate(cfg)
    assert set(results["cola"]) == {"mcc", "accuracy", "invalid", "invalid_rate", "n"}
    assert set(results["ropes"]) == {"exact_match", "f1", "n"}
    out = capsys.readouterr().out
    assert "base model, limit=2" in out and "cola" in out and "exact_match" in out
    assert (tmp_path / "ropes" / "predictions.jsonl").exists()


def test_default_config_is_the_forgetting_row_on_smollm2():
    cfg = evaluate_config()
    assert cfg.backbone.name == "smollm2" and cfg.model == "run"
    assert list(cfg.datasets) == ["webq", "freebaseqa", "multirc", "mrpc"]
    with pytest.raises(ValueError, match="model=run needs run_dir"):
        evaluate(cfg)
    with pytest.raises(ValueError, match=r"model='best' is not one of \['run', 'base'\]"):
        evaluate(evaluate_config("model=best"))


def test_run_directory_is_loaded_and_its_tuned_stream_used(tiny, data_dir, tmp_path):
    """A fresh LoRA adapter is a no-op (B = 0), so the saved run's tuned stream generates what the base model does."""
    model, _, backbone_cfg = tiny
    run_dir = tmp_path / "run"
    save_model(model, run_dir, OmegaConf.create({"backbone": OmegaConf.to_container(backbone_cfg)}))
    common = ["datasets=[webq]", "limit=2", "max_new_tokens=3", f"data_dir={data_dir}"]
    evaluate(
        evaluate_config(
            "model=base", "backbone=tiny_llama", "backbone.device=cpu", f"out_dir={tmp_path / 'b'}", *common
        )
    )
    evaluate(evaluate_config(f"run_dir={run_dir}", "streams=tuned", f"out_dir={tmp_path / 't'}", *common))

    def generations(out: Path) -> list[str]:
        return [json.loads(line)["generation"] for line in (out / "webq" / "predictions.jsonl").open()]

    assert generations(tmp_path / "t") == generations(tmp_path / "b")
    assert json.loads((tmp_path / "t" / "webq" / "metrics.json").read_text())["streams"] == "tuned"


@pytest.mark.slow
def test_smollm2_base_model_smoke(data_dir, tmp_path, capsys):
    """The real embedded model, zero-shot, on two examples of each forgetting dataset."""
    cfg = evaluate_config(
        "model=base", "backbone.device=cpu", "limit=2", f"data_dir={data_dir}", f"out_dir={tmp_path}"
    )
    results = evaluate(cfg)
    assert list(results) == ["webq", "freebaseqa", "multirc", "mrpc"]
    assert "webq" in capsys.readouterr().out


def test_generation_can_run_under_bf16_autocast(tiny, data_dir, tmp_path):
    """``autocast=bf16`` runs the linear layers in bf16 over the fp32 weights; a bad value lists the choices."""
    model, tokenizer, _ = tiny
    dtypes = set()
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))
    try:
        results = evaluate_datasets(
            model, tokenizer, settings(["mrpc"], data_dir, 2, autocast="bf16"), tmp_path, "base"
        ).model
    finally:
        handle.remove()
    assert dtypes == {torch.bfloat16} and results["mrpc"]["n"] == 2
    assert next(model.parameters()).dtype == torch.float32
    assert json.loads((tmp_path / "mrpc" / "metrics.json").read_text())["autocast"] == "bf16"
    with pytest.raises(ValueError, match=r"autocast='int8' is not one of \[null, fp32, bf16, fp16\]"):
        settings(["mrpc"], data_dir, 1, autocast="int8")
