"""Metrics on hand-computed examples: normalisation, yes/no parsing, accuracy / F1 / MCC, EM / token F1, contains;
choice-score metrics and bootstrap CIs against scikit-learn and the normal approximation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

import imsm.metrics
from imsm.metrics import (
    METRICS,
    bootstrap_ci,
    choice_metrics,
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
    # labels (1 = yes): true 1 1 1 0 0 0; predicted 1 1 0 0 1 and the invalid "maybe" counts as no (0) for F1
    # TP 2, FN 1, TN 2, FP 1 -> precision 2/3, recall 2/3, F1 2/3; but "maybe" is wrong for accuracy: 3/6
    summary, correct = yes_no_f1(preds, golds)
    assert correct == [True, True, False, True, False, False]
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["f1"] == pytest.approx(2 / 3)
    assert (summary["invalid"], summary["invalid_rate"], summary["n"]) == (1, pytest.approx(1 / 6), 6)


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


def test_never_answering_in_format_scores_zero_not_minus_one():
    # every output invalid: all predicted "no" (a constant prediction) -> MCC 0 and F1 0, as the authors' scorer;
    # accuracy 0 even on the two "no" golds, because an invalid answer is wrong whatever the gold
    golds = ["yes", "no", "yes", "no"]
    preds = ["eyes", "", "maybe", "n"]
    summary, correct = yes_no_mcc(preds, golds)
    assert summary == {"mcc": 0.0, "accuracy": 0.0, "invalid": 4, "invalid_rate": 1.0, "n": 4}
    assert correct == [False] * 4
    assert yes_no_f1(preds, golds)[0]["f1"] == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_mixed_invalid_answers_match_sklearn_on_mapped_labels(seed):
    rng = np.random.default_rng(seed)
    golds = rng.choice(["yes", "no"], size=40).tolist()
    preds = rng.choice(["Yes.", "no, not really", "maybe", "eyes", ""], size=40).tolist()
    mapped = [1 if p == "Yes." else 0 for p in preds]  # every invalid answer counts as "no"
    truth = [int(g == "yes") for g in golds]
    right = [p.startswith(("Yes", "no")) and t == m for p, t, m in zip(preds, truth, mapped, strict=True)]
    f1_summary, correct = yes_no_f1(preds, golds)
    mcc_summary, _ = yes_no_mcc(preds, golds)
    assert correct == right
    assert f1_summary["accuracy"] == pytest.approx(sum(right) / 40)
    assert f1_summary["f1"] == pytest.approx(f1_score(truth, mapped, zero_division=0.0))
    assert mcc_summary["mcc"] == pytest.approx(matthews_corrcoef(truth, mapped))
    n_invalid = sum(p not in ("Yes.", "no, not really") for p in preds)
    assert (mcc_summary["invalid"], mcc_summary["invalid_rate"]) == (n_invalid, pytest.approx(n_invalid / 40))


def test_yes_no_accuracy_and_bad_gold():
    summary, correct = yes_no_accuracy(["no", "Yes it is", "eyes"], ["no", "yes", "yes"])
    assert summary == {
        "accuracy": pytest.approx(2 / 3),
        "invalid": 1,
        "invalid_rate": pytest.approx(1 / 3),
        "n": 3,
    }
    assert correct == [True, True, False]
    with pytest.raises(ValueError, match="gold label 'maybe'"):
        yes_no_accuracy(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="2 predictions for 1 golds"):
        yes_no_accuracy(["yes", "no"], ["yes"])


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


# --- choice scores ---------------------------------------------------------------------------------------------


def sklearn_choice(scores, golds):
    truth = [int(g == "yes") for g in golds]
    pred = [int(s > 0) for s in scores]
    return truth, pred


@pytest.mark.parametrize("seed", range(4))
def test_choice_metrics_equal_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=30).round(1)
    scores[:5] = 0.0  # ties: exactly 0 means "no"
    golds = rng.choice(["yes", "no"], size=30).tolist()
    truth, pred = sklearn_choice(scores, golds)
    assert pred[:5] == [0] * 5
    assert choice_metrics(scores.tolist(), golds) == {
        "accuracy": pytest.approx(accuracy_score(truth, pred)),
        "f1": pytest.approx(f1_score(truth, pred, zero_division=0.0)),
        "mcc": pytest.approx(matthews_corrcoef(truth, pred)),
        "auroc": pytest.approx(roc_auc_score(truth, scores)),
        "n": 30,
    }


def test_choice_metrics_hand_computed():
    # predicted yes, no (tie), yes, no; golds yes, yes, no, no: TP 1, FN 1, FP 1, TN 1
    # AUROC: positive scores {2, 0} vs negative {0.5, -1}: pairs won 2>0.5, 2>-1, 0>-1, lost 0<0.5 -> 3/4
    result = choice_metrics([2.0, 0.0, 0.5, -1.0], ["yes", "yes", "no", "no"])
    assert result == {"accuracy": 0.5, "f1": 0.5, "mcc": 0.0, "auroc": 0.75, "n": 4}
    assert all(isinstance(result[k], float) for k in ("accuracy", "f1", "mcc", "auroc"))
    assert isinstance(result["n"], int)


def test_choice_metrics_with_one_class_golds_has_no_auroc():
    result = choice_metrics([1.0, -2.0, 0.0], ["no", "no", "no"])
    truth, pred = sklearn_choice([1.0, -2.0, 0.0], ["no"] * 3)
    assert result["auroc"] is None
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["f1"] == f1_score(truth, pred, zero_division=0.0) == 0.0
    assert result["mcc"] == matthews_corrcoef(truth, pred) == 0.0
    assert choice_metrics([3.0, 1.0], ["yes", "yes"])["f1"] == 1.0


def test_choice_metrics_bad_input():
    assert choice_metrics([], []) == {"accuracy": 0.0, "f1": 0.0, "mcc": 0.0, "auroc": None, "n": 0}
    with pytest.raises(ValueError, match="2 choice scores for 1 golds"):
        choice_metrics([1.0, 2.0], ["yes"])
    with pytest.raises(ValueError, match="gold label 'Yes' of example 1"):
        choice_metrics([1.0, 2.0], ["no", "Yes"])
    with pytest.raises(ValueError, match="example 1 is NaN"):
        choice_metrics([1.0, float("nan")], ["no", "yes"])


# --- bootstrap ---------------------------------------------------------------------------------------------------


def test_bootstrap_is_deterministic_for_a_seed_and_contains_the_mean():
    values = np.random.default_rng(1).exponential(size=200).tolist()  # skewed on purpose
    first, again = bootstrap_ci(values, seed=3), bootstrap_ci(values, seed=3)
    assert first == again
    assert bootstrap_ci(values, seed=4)["ci"] != first["ci"]
    assert first["mean"] == pytest.approx(np.mean(values))
    lo, hi = first["ci"]
    assert lo < first["mean"] < hi
    assert all(isinstance(x, float) for x in (first["mean"], lo, hi))
    narrow = bootstrap_ci(values, seed=3, level=0.5)["ci"]
    assert lo < narrow[0] < narrow[1] < hi


def test_bootstrap_half_width_matches_the_normal_approximation():
    sample = np.random.default_rng(0).normal(loc=2.0, scale=3.0, size=2000)
    lo, hi = bootstrap_ci(sample.tolist(), n_boot=2000)["ci"]
    expected = 1.96 * sample.std(ddof=1) / math.sqrt(sample.size)
    assert (hi - lo) / 2 == pytest.approx(expected, rel=0.15)


def test_bootstrap_edge_cases():
    assert bootstrap_ci([]) == {"mean": None, "ci": None}
    assert bootstrap_ci([2.5]) == {"mean": 2.5, "ci": [2.5, 2.5]}
    with pytest.raises(ValueError, match="level=95"):
        bootstrap_ci([1.0], level=95)
    with pytest.raises(ValueError, match="n_boot=0"):
        bootstrap_ci([1.0], n_boot=0)
    with pytest.raises(ValueError, match="example 2 is NaN"):
        bootstrap_ci([1.0, 2.0, float("nan")])


def test_bootstrap_chunking_does_not_change_the_draws(monkeypatch):
    values = np.random.default_rng(2).normal(size=50).tolist()
    whole = bootstrap_ci(values, n_boot=300, seed=7)
    monkeypatch.setattr(
        imsm.metrics, "MAX_BOOTSTRAP_DRAWS", 50 * 7
    )  # chunks of 7 resamples, the last shorter
    assert bootstrap_ci(values, n_boot=300, seed=7) == whole
