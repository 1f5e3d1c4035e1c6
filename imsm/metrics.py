"""Metrics on generated text, one per dataset family; ``score`` dispatches on the dataset's ``metric`` name.

Each metric takes the generated strings and the golds and returns ``(summary dict, per-example correct list)``,
so predictions files can say which examples were right.

- Text is normalised as in SQuAD: lower case, no punctuation, no articles (a, an, the), single spaces.
- Yes/no answers: the first word of the normalised generation must be ``yes`` or ``no``. Anything else is
  *invalid*: it counts as wrong (as the opposite of the gold label, so accuracy, F1 and MCC all see a mistake) and
  the number of invalid outputs is reported. No substring matching: "eyes" is not "yes".
- ``yes_no_f1`` (MRPC): accuracy and F1 with ``yes`` as the positive class. ``yes_no_mcc`` (CoLA): Matthews
  correlation (and accuracy). ``yes_no_accuracy`` (MultiRC): accuracy.
- ``squad`` (ROPES): exact match and SQuAD's token F1 (multiset overlap); ``squad_set``: the same with the set
  overlap of the paper authors' code (repeated tokens count once; an empty side scores 0).
- ``contains`` (WebQ, FreebaseQA): right when any normalised gold alias is a substring of the normalised generation.
- ``gsm8k_accuracy``: the number after the last "The answer is" (else the last number) equals the gold number.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

ANSWER_MARK = "The answer is"
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
PUNCTUATION = set(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b")
YES_NO = ("yes", "no")

Summary = dict[str, float]
Metric = Callable[[Sequence[str], Sequence[Any]], tuple[Summary, list[bool]]]


# --- GSM8K ----------------------------------------------------------------------------------------------------


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


def accuracy(correct: Sequence[bool]) -> float:
    return float(accuracy_score([True] * len(correct), list(correct))) if correct else 0.0


def gsm8k_accuracy(predictions: Sequence[str], golds: Sequence[Any]) -> tuple[Summary, list[bool]]:
    """Numeric comparison of the extracted answer with the gold number."""
    correct = []
    for pred, gold in zip(predictions, golds, strict=True):
        value, target = extract_gsm8k_answer(pred), parse_number(str(gold))
        correct.append(value is not None and target is not None and abs(value - target) < 1e-6)
    return {"accuracy": accuracy(correct), "n": len(correct)}, correct


# --- normalisation ---------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def as_aliases(gold: Any) -> list[str]:
    """A gold string or list of aliases as a list."""
    return [gold] if isinstance(gold, str) else [str(g) for g in gold]


# --- yes / no ----------------------------------------------------------------------------------------------------


def parse_yes_no(text: str) -> str | None:
    """``yes``/``no`` when the normalised text starts with that word, else None (invalid)."""
    words = normalize_answer(text).split()
    return words[0] if words and words[0] in YES_NO else None


def yes_no_labels(predictions: Sequence[str], golds: Sequence[Any]) -> tuple[list[int], list[int], int]:
    """(gold labels, predicted labels, invalid count), 1 = yes; an invalid prediction becomes the wrong label."""
    y_true, y_pred, invalid = [], [], 0
    for i, (pred, gold) in enumerate(zip(predictions, golds, strict=True)):
        if gold not in YES_NO:
            raise ValueError(f"gold label {gold!r} of example {i} is not one of {list(YES_NO)}")
        truth = int(gold == "yes")
        parsed = parse_yes_no(pred)
        if parsed is None:
            invalid += 1
        y_true.append(truth)
        y_pred.append(1 - truth if parsed is None else int(parsed == "yes"))
    return y_true, y_pred, invalid


def yes_no_accuracy(predictions: Sequence[str], golds: Sequence[Any]) -> tuple[Summary, list[bool]]:
    y_true, y_pred, invalid = yes_no_labels(predictions, golds)
    correct = [t == p for t, p in zip(y_true, y_pred, strict=True)]
    return {"accuracy": accuracy(correct), "invalid": invalid, "n": len(correct)}, correct


def yes_no_f1(predictions: Sequence[str], golds: Sequence[Any]) -> tuple[Summary, list[bool]]:
    """Accuracy and F1 of the ``yes`` class (MRPC)."""
    summary, correct = yes_no_accuracy(predictions, golds)
    y_true, y_pred, _ = yes_no_labels(predictions, golds)
    f1 = float(f1_score(y_true, y_pred, pos_label=1, zero_division=0.0)) if y_true else 0.0
    return {
        "accuracy": summary["accuracy"],
        "f1": f1,
        "invalid": summary["invalid"],
        "n": summary["n"],
    }, correct


def yes_no_mcc(predictions: Sequence[str], golds: Sequence[Any]) -> tuple[Summary, list[bool]]:
    """Matthews correlation (CoLA); 0 when either side has a single class (sklearn's convention)."""
    summary, correct = yes_no_accuracy(predictions, golds)
    y_true, y_pred, _ = yes_no_labels(predictions, golds)
    mcc = float(matthews_corrcoef(y_true, y_pred)) if y_true else 0.0
    return {
        "mcc": mcc,
        "accuracy": summary["accuracy"],
        "invalid": summary["invalid"],
        "n": summary["n"],
    }, correct


# --- extractive QA (ROPES) ---------------------------------------------------------------------------------------


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def token_f1(prediction: str, gold: str, overlap: str = "multiset") -> float:
    """Token F1 of normalised texts. ``multiset``: SQuAD (a repeated token counts as often as it occurs in both;
    two empty texts score 1, one empty text 0). ``set``: the paper authors' variant (distinct tokens; any empty 0).
    """
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if overlap == "multiset":
        if not pred_tokens or not gold_tokens:
            return float(pred_tokens == gold_tokens)
        same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        n_pred, n_gold = len(pred_tokens), len(gold_tokens)
    elif overlap == "set":
        pred_set, gold_set = set(pred_tokens), set(gold_tokens)
        if not pred_set or not gold_set:
            return 0.0
        same, n_pred, n_gold = len(pred_set & gold_set), len(pred_set), len(gold_set)
    else:
        raise ValueError(f"overlap={overlap!r} is not one of ['multiset', 'set']")
    if same == 0:
        return 0.0
    precision, recall = same / n_pred, same / n_gold
    return 2 * precision * recall / (precision + recall)


def squad_scores(
    predictions: Sequence[str], golds: Sequence[Any], overlap: str = "multiset"
) -> tuple[Summary, list[bool]]:
    """Mean exact match and token F1, each the best over a gold's aliases; "correct" means exact match."""
    ems, f1s = [], []
    for pred, gold in zip(predictions, golds, strict=True):
        aliases = as_aliases(gold)
        ems.append(any(exact_match(pred, g) for g in aliases))
        f1s.append(max(token_f1(pred, g, overlap) for g in aliases))
    n = len(ems)
    return {"exact_match": sum(ems) / n if n else 0.0, "f1": sum(f1s) / n if n else 0.0, "n": n}, ems


def squad(predictions: Sequence[str], golds: Sequence[Any]) -> tuple[Summary, list[bool]]:
    return squad_scores(predictions, golds, "multiset")


def squad_set(predictions: Sequence[str], golds: Sequence[Any]) -> tuple[Summary, list[bool]]:
    return squad_scores(predictions, golds, "set")


# --- open QA (WebQ, FreebaseQA) ----------------------------------------------------------------------------------


def contains_answer(prediction: str, gold: Any) -> bool:
    """Any non-empty normalised alias is a substring of the normalised prediction."""
    text = normalize_answer(prediction)
    return any(alias and alias in text for alias in map(normalize_answer, as_aliases(gold)))


def contains(predictions: Sequence[str], golds: Sequence[Any]) -> tuple[Summary, list[bool]]:
    correct = [contains_answer(p, g) for p, g in zip(predictions, golds, strict=True)]
    return {"accuracy": accuracy(correct), "n": len(correct)}, correct


METRICS: dict[str, Metric] = {
    "gsm8k_accuracy": gsm8k_accuracy,
    "yes_no_accuracy": yes_no_accuracy,
    "yes_no_f1": yes_no_f1,
    "yes_no_mcc": yes_no_mcc,
    "squad": squad,
    "squad_set": squad_set,
    "contains": contains,
}


def score(metric: str, predictions: Sequence[str], golds: Sequence[Any]) -> tuple[Summary, list[bool]]:
    """Dispatch on the dataset's ``metric`` name."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choices: {sorted(METRICS)}")
    return METRICS[metric](predictions, golds)
