"""Metrics on generated text: GSM8K answer extraction and accuracy (more datasets add theirs here).

Each metric takes the generated strings and the golds and returns ``(summary dict, per-example correct list)``,
so predictions files can say which examples were right.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from sklearn.metrics import accuracy_score

ANSWER_MARK = "The answer is"
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def parse_number(text: str) -> float | None:
    """A number written with commas, ``$`` or a trailing ``.``: ``"$1,234."`` -> 1234.0; None if not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def extract_gsm8k_answer(text: str) -> float | None:
    """The number after the last "The answer is", else the last number in the text, else None."""
    if ANSWER_MARK in text:
        tail = text.rsplit(ANSWER_MARK, 1)[1]
        found = NUMBER.search(tail)
        if found is not None:
            return parse_number(found.group())
    numbers = NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def gsm8k_accuracy(predictions: Sequence[str], golds: Sequence[Any]) -> tuple[dict[str, float], list[bool]]:
    """Numeric comparison of the extracted answer with the gold number."""
    correct = []
    for pred, gold in zip(predictions, golds, strict=True):
        value, target = extract_gsm8k_answer(pred), parse_number(str(gold))
        correct.append(value is not None and target is not None and abs(value - target) < 1e-6)
    acc = float(accuracy_score([True] * len(correct), correct)) if correct else 0.0
    return {"accuracy": acc, "n": len(correct)}, correct


METRICS: dict[str, Callable[[Sequence[str], Sequence[Any]], tuple[dict[str, float], list[bool]]]] = {
    "gsm8k_accuracy": gsm8k_accuracy,
}


def score(
    metric: str, predictions: Sequence[str], golds: Sequence[Any]
) -> tuple[dict[str, float], list[bool]]:
    """Dispatch on the dataset's ``metric`` name."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choices: {sorted(METRICS)}")
    return METRICS[metric](predictions, golds)
