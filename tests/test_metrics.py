"""Metrics on hand-computed examples: normalisation, yes/no parsing, accuracy / F1 / MCC, EM / token F1, contains."""

from __future__ import annotations

import math

import pytest

from imsm.metrics import (
    METRICS,
    contains,
    contains_answer,
    normalize_answer,
    parse_yes_no,
    score,
    squad,
    squad_set,
    token_f1,
    yes_no_accuracy,
    yes_no_f1,
    yes_no_mcc,
)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("an apple, a pear; the end.", "apple pear end"),
        ("U.S.A.", "usa"),
        ("theatre another", "theatre another"),  # articles only as whole words
        ("  \n ", ""),
        ("The", ""),
    ],
)
def test_normalize_answer_as_squad(text, normalised):
    assert normalize_answer(text) == normalised


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("yes", "yes"),
        ("Yes.", "yes"),
        ("  NO, they are not", "no"),
        ("'Yes' - equivalent", "yes"),
        ("eyes", None),  # no substring tricks
        ("yesterday", None),
        ("nope", None),
        ("The answer is yes", None),  # the first word decides
        ("", None),
        ("...", None),
    ],
)
def test_parse_yes_no_reads_the_first_word_only(text, label):
    assert parse_yes_no(text) == label


def test_mrpc_accuracy_and_f1_with_an_invalid_output():
    golds = ["yes", "yes", "yes", "no", "no", "no"]
    preds = ["yes", "Yes, they are", "no", "No.", "yes", "maybe"]
    # labels (1 = yes): true 1 1 1 0 0 0; predicted 1 1 0 0 1 and the invalid "maybe" counts as wrong (1)
    # TP 2, FN 1, TN 1, FP 2 -> accuracy 3/6; precision 2/4, recall 2/3, F1 = 2PR/(P+R) = 4/7
    summary, correct = yes_no_f1(preds, golds)
    assert correct == [True, True, False, True, False, False]
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["f1"] == pytest.approx(4 / 7)
    assert (summary["invalid"], summary["n"]) == (1, 6)


def test_cola_mcc_hand_computed():
    # TP 2, TN 1, FP 1, FN 1: (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1/6
    summary, correct = yes_no_mcc(["yes", "yes", "no", "yes", "no"], ["yes", "yes", "no", "no", "yes"])
    assert summary["mcc"] == pytest.approx(1 / 6)
    assert summary["accuracy"] == pytest.approx(3 / 5)
    assert correct == [True, True, True, False, False]


def test_mcc_edge_cases():
    golds = ["yes", "no", "yes", "no"]
    assert yes_no_mcc(["yes"] * 4, golds)[0]["mcc"] == 0.0  # one predicted class: undefined, 0 by convention
    assert yes_no_mcc(["Yes", "no", "YES!", "No"], golds)[0]["mcc"] == pytest.approx(1.0)
    # every output invalid = every answer wrong: perfectly anti-correlated, and all four reported
    summary, correct = yes_no_mcc(["eyes", "", "maybe", "n"], golds)
    assert summary["mcc"] == pytest.approx(-1.0)
    assert summary["invalid"] == 4 and not any(correct)


def test_yes_no_accuracy_and_bad_gold():
    summary, correct = yes_no_accuracy(["no", "Yes it is", "eyes"], ["no", "yes", "yes"])
    assert summary == {"accuracy": pytest.approx(2 / 3), "invalid": 1, "n": 3}
    assert correct == [True, True, False]
    with pytest.raises(ValueError, match="gold label 'maybe'"):
        yes_no_accuracy(["yes"], ["maybe"])


def test_f1_without_any_predicted_yes_is_zero():
    summary, _ = yes_no_f1(["no", "no"], ["yes", "no"])
    assert summary["f1"] == 0.0 and summary["accuracy"] == 0.5


@pytest.mark.parametrize(
    ("pred", "gold", "multiset", "set_"),
    [
        ("the Eiffel tower in Paris", "Eiffel Tower", 2 / 3, 2 / 3),  # P 2/4, R 1
        ("x y y", "y y z", 2 / 3, 1 / 2),  # multiset: 2 common of 3 each; set: {y} of {x,y} and {y,z}
        ("the cat cat", "cat", 2 / 3, 1.0),  # repeated token: P 1/2 (multiset) vs 1/1 (set)
        ("Group B", "group b", 1.0, 1.0),
        ("dog", "cat", 0.0, 0.0),
        ("", "the", 1.0, 0.0),  # both empty after normalisation: SQuAD 1, the authors' set variant 0
        ("cat", "", 0.0, 0.0),
    ],
)
def test_token_f1_multiset_and_set(pred, gold, multiset, set_):
    assert token_f1(pred, gold) == pytest.approx(multiset)
    assert token_f1(pred, gold, "set") == pytest.approx(set_)


def test_ropes_exact_match_and_f1_summary():
    preds = ["Group B", "the Eiffel tower in Paris", "less"]
    golds = ["group B.", "Eiffel Tower", ["more", "Less"]]  # a list of golds: best alias counts
    summary, correct = squad(preds, golds)
    assert correct == [True, False, True]
    assert summary["exact_match"] == pytest.approx(2 / 3)
    assert summary["f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert squad_set(["x y y"], ["y y z"])[0]["f1"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("pred", "gold", "right"),
    [
        ("The capital is Paris.", "paris", True),
        (
            "they speak jamaican creole english",
            ["Jamaican Creole English Language", "Jamaican English"],
            False,
        ),
        (
            "they speak Jamaican English, mostly",
            ["Jamaican Creole English Language", "Jamaican English"],
            True,
        ),
        ("the US", ["U.S."], True),
        ("anything at all", ["The"], False),  # an alias that normalises to nothing matches nothing
        ("", ["Lawyer"], False),
        ("a lawyer", ["Lawyer"], True),
    ],
)
def test_contains_any_normalised_alias(pred, gold, right):
    assert contains_answer(pred, gold) is right


def test_contains_summary_and_dispatch():
    summary, correct = contains(["Paris, France", "Lyon"], [["Paris"], ["Marseille"]])
    assert summary == {"accuracy": 0.5, "n": 2} and correct == [True, False]
    assert score("contains", ["Paris"], ["paris"])[0]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="choices"):
        score("bleu", [], [])


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_every_metric_handles_no_examples(metric):
    summary, correct = METRICS[metric]([], [])
    assert correct == [] and summary["n"] == 0
    assert all(not isinstance(v, float) or not math.isnan(v) for v in summary.values())
