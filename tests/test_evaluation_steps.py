"""Evaluation during training (``eval.at_steps``) and per-dataset scorers (``eval.scoring_by_dataset``)."""

from __future__ import annotations

import json

import pytest
from helpers import compose_train, tiny_overrides, write_gsm
from safetensors.torch import load_file

from imsm.evaluation import EvalSettings
from imsm.train import train


def test_scoring_during_training_leaves_the_training_unchanged(tmp_path, tiny_run):
    """The same tiny run as the session's ``tiny_run``, scored after step 1: the same loss and gate, bit for bit."""
    ref_dir, ref = tiny_run
    data = write_gsm(tmp_path / "data")
    run = tmp_path / "run"
    overrides = [
        *tiny_overrides(run, data),
        "eval_datasets=[gsm8k]",
        "eval.at_steps=[1]",
        "eval.scoring_by_dataset={gsm8k:both}",
    ]
    result = train(compose_train(overrides))
    assert result["train_loss"] == ref["train_loss"]
    new, old = load_file(run / "gate.safetensors"), load_file(ref_dir / "gate.safetensors")
    assert new.keys() == old.keys() and all((new[k] == old[k]).all() for k in new)

    step = json.loads((run / "eval_steps" / "step-1" / "gsm8k" / "metrics.json").read_text())
    assert step["scoring"] == "likelihood"  # during training: likelihood only, whatever the final scorer
    assert step["metrics"]["likelihood"]["n"] == 3
    assert "gate" in step["metrics"]  # an IMSM model's gate values at the answer positions
    assert not (run / "eval_steps" / "step-2").exists()
    final = json.loads((run / "eval" / "gsm8k" / "metrics.json").read_text())
    assert final["scoring"] == "both"
    assert {"accuracy", "likelihood"} <= set(final["metrics"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.scoring_by_dataset={webq:both}", "not evaluated"),
        ("eval.scoring_by_dataset={gsm8k:sample}", "eval.scoring_by_dataset.gsm8k='sample'"),
    ],
)
def test_bad_per_dataset_scorers_are_named_before_training(tmp_path, override, message):
    cfg = compose_train([*tiny_overrides(tmp_path / "run", write_gsm(tmp_path / "data")), override])
    with pytest.raises(ValueError, match=message):
        EvalSettings.from_train_config(cfg)


def test_bad_steps_are_refused_before_training(tmp_path):
    cfg = compose_train(
        [*tiny_overrides(tmp_path / "run", write_gsm(tmp_path / "data")), "eval.at_steps=[0]"]
    )
    with pytest.raises(ValueError, match="eval.at_steps"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
