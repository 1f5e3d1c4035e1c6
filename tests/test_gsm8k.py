"""GSM8K: target construction, prompt, answer extraction (hand-checked), and the real files."""

from __future__ import annotations

import json

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from imsm.data import load_split
from imsm.data.base import DataError
from imsm.data.gsm8k import make_target
from imsm.metrics import extract_gsm8k_answer, gsm8k_accuracy, parse_number

DATASET = OmegaConf.load(REPO / "imsm" / "conf" / "dataset" / "gsm8k.yaml")


def test_target_drops_calculator_annotations_and_states_the_answer():
    answer = "She has 3 * 4 = <<3*4=12>>12 eggs.\nShe sells 12 - 2 = <<12-2=10>>10.\n#### 1,000"
    target, final = make_target(answer)
    assert target == "She has 3 * 4 = 12 eggs.\nShe sells 12 - 2 = 10.\nThe answer is 1,000."
    assert final == "1000"
    with pytest.raises(DataError, match="####"):
        make_target("no final line")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("so 5 + 7 = 12.\nThe answer is 12.", 12.0),
        ("The answer is 3. Wait, The answer is $1,234.", 1234.0),
        ("The answer is -4", -4.0),
        ("The answer is 2.50.", 2.5),
        ("no marker, numbers 3 then 18", 18.0),
        ("The answer is unclear but 7 apples", 7.0),  # marker without a number -> last number in the text
        ("nothing numeric", None),
    ],
)
def test_answer_extraction(text, value):
    assert extract_gsm8k_answer(text) == value


def test_accuracy_compares_numbers_not_strings():
    preds = ["The answer is 1,000.", "The answer is 18", "The answer is 17.", "garbage"]
    summary, correct = gsm8k_accuracy(preds, ["1000", "18.0", "18", "5"])
    assert correct == [True, True, False, False]
    assert summary == {"accuracy": 0.5, "n": 4}
    assert parse_number("$12.") == 12.0 and parse_number("abc") is None


def test_real_files_row_counts_and_reference_prompts(data_dir):
    train = load_split(DATASET, str(data_dir), "train")
    test = load_split(DATASET, str(data_dir), "test")
    assert (len(train), len(test)) == (7473, 1319)
    ref = [json.loads(line) for line in (data_dir / "imsm-reference" / "GSM8K" / "data_test.json").open()]
    assert len(ref) == 1319
    for ex, r in zip(test, ref, strict=True):
        assert ex.prompt == r["input"]
        assert ex.target == r["output"]
