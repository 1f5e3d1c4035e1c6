"""Metrics on model outputs, one per dataset family; ``score`` dispatches on the dataset's ``metric`` name.

Each text metric takes the generated strings and the golds and returns ``(summary dict, per-example correct
list)``, so predictions files can say which examples were right.

- Text is normalised as in SQuAD: lower case, no punctuation, no articles (a, an, the), single spaces.
- Yes/no answers: the first word of the normalised generation must be ``yes`` or ``no``. Anything else is
  *invalid*: it is wrong for accuracy whatever the gold, and counts as the negative class ``no`` for F1 and MCC
  (as the paper authors' scorer effectively does), so a model that never answers in format gets MCC 0 and F1 0,
  not -1. The count (``invalid``) and the rate (``invalid_rate``) are reported. No substring matching: "eyes"
  is not "yes".
- ``yes_no_f1`` (MRPC): accuracy and F1 with ``yes`` as the positive class. ``yes_no_mcc`` (CoLA): Matthews
  correlation (and accuracy). ``yes_no_accuracy`` (MultiRC): accuracy.
- ``squad`` (ROPES): exact match and SQuAD's token F1 (multiset overlap); ``squad_set``: the same with the set
  overlap of the paper authors' code (repeated tokens count once; an empty side scores 0).
- ``contains`` (WebQ, FreebaseQA): right when any normalised gold alias is a substring of the normalised generation.
- ``gsm8k_accuracy``: the number after the last "The answer is" (else the last number) equals the gold number.

Beyond generated text: ``choice_metrics`` scores yes/no datasets from ``log p(yes) - log p(no)`` (accuracy, F1,
MCC, AUROC), and ``bootstrap_ci`` gives the mean of per-example values with a percentile bootstrap CI.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

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


def check_yes_no_golds(golds: Sequence[Any]) -> list[int]:
    """Gold labels as ints, 1 = yes; a gold that is not ``yes``/``no`` fails naming the example."""
    for i, gold in enumerate(golds):
        if gold not in YES_NO:
            raise ValueError(f"gold label {gold!r} of example {i} is not one of {list(YES_NO)}")
    return [int(gold == "yes") for gold in golds]


def yes_no_labels(
    predictions: Sequence[str], golds: Sequence[Any]
) -> tuple[list[int], list[int], list[bool]]:
    """(gold labels, predicted labels, valid flags), 1 = yes.

    An invalid prediction is labelled 0 (``no``, the negative class) for F1 and MCC; its ``valid`` flag is False,
    so accuracy can count it wrong even where the gold is ``no``.
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} golds")
    y_true = check_yes_no_golds(golds)
    parsed = [parse_yes_no(pred) for pred in predictions]
    y_pred = [int(p == "yes") for p in parsed]
    return y_true, y_pred, [p is not None for p in parsed]


def yes_no_accuracy(predictions: Sequence[str], golds: Sequence[Any]) -> tuple[Summary, list[bool]]:
    """Accuracy (MultiRC); an invalid answer is wrong whatever the gold."""
    y_true, y_pred, valid = yes_no_labels(predictions, golds)
    correct = [v and t == p for t, p, v in zip(y_true, y_pred, valid, strict=True)]
    invalid = valid.count(False)
    return {
        "accuracy": accuracy(correct),
        "invalid": invalid,
        "invalid_rate": invalid / len(valid) if valid else 0.0,
        "n": len(correct),
    }, correct


def yes_no_f1(predictions: Sequence[str], golds: Sequence[Any]) -> tuple[Summary, list[bool]]:
    """Accuracy and F1 of the ``yes`` class (MRPC); an invalid answer counts as ``no`` for F1."""
    summary, correct = yes_no_accuracy(predictions, golds)
    y_true, y_pred, _ = yes_no_labels(predictions, golds)
    f1 = float(f1_score(y_true, y_pred, pos_label=1, zero_division=0.0)) if y_true else 0.0
    return {"accuracy": summary["accuracy"], "f1": f1, **without_accuracy(summary)}, correct


def yes_no_mcc(predictions: Sequence[str], golds: Sequence[Any]) -> tuple[Summary, list[bool]]:
    """Matthews correlation (CoLA), an invalid answer counting as ``no``; 0 when either side has a single class
    (sklearn's convention), so a model that never answers in format gets 0."""
    summary, correct = yes_no_accuracy(predictions, golds)
    y_true, y_pred, _ = yes_no_labels(predictions, golds)
    return {"mcc": mcc(y_true, y_pred), "accuracy": summary["accuracy"], **without_accuracy(summary)}, correct


def mcc(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """sklearn's Matthews correlation; 0.0 (sklearn's value) when either side holds one class or none, without
    the warning sklearn gives when both do."""
    if len(set(y_true)) < 2 or len(set(y_pred)) < 2:
        return 0.0
    return float(matthews_corrcoef(y_true, y_pred))


def without_accuracy(summary: Summary) -> Summary:
    """The counts of a ``yes_no_accuracy`` summary (``invalid``, ``invalid_rate``, ``n``), in that order."""
    return {k: v for k, v in summary.items() if k != "accuracy"}


# --- choice scoring (likelihood of yes vs no) --------------------------------------------------------------------


def choice_metrics(scores: Sequence[float], golds: Sequence[str]) -> dict[str, float | int | None]:
    """Yes/no metrics from choice scores ``scores[i] = log p(yes) - log p(no)`` of example i.

    The prediction is ``yes`` iff the score is > 0 (a tie is ``no``). Returns ``accuracy``, ``f1`` (``yes``
    positive), ``mcc``, ``auroc`` (of the raw scores; None when the golds hold one class) and ``n``. With no
    examples the scores are 0.0 and ``auroc`` None, as the text metrics do.
    """
    if len(scores) != len(golds):
        raise ValueError(f"{len(scores)} choice scores for {len(golds)} golds")
    y_true = check_yes_no_golds(golds)
    values = np.asarray(scores, dtype=float).reshape(-1)
    if np.isnan(values).any():
        raise ValueError(f"choice score of example {int(np.flatnonzero(np.isnan(values))[0])} is NaN")
    if not y_true:
        return {"accuracy": 0.0, "f1": 0.0, "mcc": 0.0, "auroc": None, "n": 0}
    y_pred = (values > 0).astype(int).tolist()
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1_score(y_true, y_pred, pos_label=1, zero_division=0.0)),
        "mcc": mcc(y_true, y_pred),
        # AUROC is undefined with one class (sklearn raises): None rather than a made-up 0.5
        "auroc": float(roc_auc_score(y_true, values)) if len(set(y_true)) == 2 else None,
        "n": len(y_true),
    }


# --- bootstrap confidence intervals ------------------------------------------------------------------------------

MAX_BOOTSTRAP_DRAWS = 1 << 24  # index draws per chunk (128 MiB of int64): bounds memory for long inputs


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float | list[float] | None]:
    """Mean of per-example ``values`` and its percentile bootstrap CI: ``{"mean": m, "ci": [lo, hi]}``.

    Resamples examples with replacement ``n_boot`` times (indices drawn as ``(n_boot, n)`` arrays from
    ``numpy.random.default_rng(seed)``, in row chunks so memory stays bounded; the chunking does not change the
    draws) and takes the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled means. Empty input:
    mean and ci None; one value v: ci [v, v].
    """
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95")
    data = np.asarray(values, dtype=float).reshape(-1)
    if data.size == 0:
        return {"mean": None, "ci": None}
    if np.isnan(data).any():
        raise ValueError(f"value of example {int(np.flatnonzero(np.isnan(data))[0])} is NaN")
    n = data.size
    rng = np.random.default_rng(seed)
    rows = max(1, MAX_BOOTSTRAP_DRAWS // n)
    means = np.concatenate(
        [
            data[rng.integers(0, n, size=(min(rows, n_boot - done), n))].mean(axis=1)
            for done in range(0, n_boot, rows)
        ]
    )
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(data.mean()), "ci": [float(lo), float(hi)]}


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
