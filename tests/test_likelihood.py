"""Likelihood scoring: per-example NLL equal to a computation from plain logits, one pass per stream, choice scoring
equal to scikit-learn, the alias rule, and a trained run's record carrying ΔNLL with CIs and gate quantiles."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, make_imsm
from helpers import compose_train, tiny_overrides, write_gsm
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

from imsm.backbones import load_backbone
from imsm.data.base import Example
from imsm.data.collate import TrainCollator, encode_example
from imsm.likelihood import _choice, choice_targets, likelihood_scores, single_token_choices, teacher_forced
from imsm.model.gate import build_gate
from imsm.model.siamese import IMSMModel
from imsm.train import train

EXAMPLES = [
    Example("Question: what is the capital of France?\nAnswer:", " Paris"),
    Example("Question: who wrote Hamlet?\nAnswer:", " William Shakespeare"),
    Example("2 + 2 =", " 4"),
]


@pytest.fixture(scope="module")
def smollm2_imsm():
    """SmolLM2-135M (fp32) with a LoRA adapter whose B is not zero and a query-aware gate."""
    cfg = OmegaConf.load(REPO / "imsm" / "conf" / "backbone" / "smollm2.yaml")
    backbone, tok = load_backbone(cfg, device="cpu")
    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = IMSMModel(get_peft_model(backbone, lora), build_gate("query_aware", 576, rank=8, dropout=0.0))
    return model.eval(), tok


def plain_nll(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Mean NLL per row over the labelled positions, from full (batch, seq, vocab) logits."""
    lp = F.log_softmax(logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    mask = target != -100
    nll = -lp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    return (nll.sum(1) / mask.sum(1)).tolist()


def test_nll_of_every_stream_equals_plain_logits_on_smollm2(smollm2_imsm):
    model, tok = smollm2_imsm
    metrics, rows = likelihood_scores(model, tok, EXAMPLES, batch_size=2)
    feats = [encode_example(tok, e, 512, 512) for e in EXAMPLES]
    batch = TrainCollator(tok.pad_token_id)(feats)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        mix = model(ids, mask, batch["query_mask"], return_logits=True).logits
        tuned = model.backbone(input_ids=ids, attention_mask=mask).logits
        with model.peft_model.disable_adapter():
            frozen = model.backbone(input_ids=ids, attention_mask=mask).logits
    expected = {"nll": plain_nll(mix, labels), "nll_tuned": plain_nll(tuned, labels)}
    expected["nll_frozen"] = plain_nll(frozen, labels)
    for key, values in expected.items():
        assert [r[key] for r in rows] == pytest.approx(values, abs=1e-4), key
    assert len({round(r["nll"] - r["nll_frozen"], 6) for r in rows}) == 3  # the adapter changed something
    assert [r["answer_tokens"] for r in rows] == [int((labels[i] != -100).sum()) for i in range(3)]
    lik = metrics["likelihood"]
    assert lik["n"] == 3 and lik["nll"]["ci"][0] <= lik["nll"]["mean"] <= lik["nll"]["ci"][1]
    assert metrics["gate"]["n_positions"] == lik["answer_tokens"] and 0 < metrics["gate"]["q50"] < 1


def test_frozen_scores_come_from_the_same_forward_as_the_mix(smollm2_imsm):
    """An IMSM batch costs two decoder passes (frozen + tuned), not a third one for the frozen numbers."""
    model, tok = smollm2_imsm
    calls = []
    handle = model.decoder.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        teacher_forced(model, tok, [(e.prompt, e.target) for e in EXAMPLES], batch_size=8)
    finally:
        handle.remove()
    assert len(calls) == 2


def test_base_stream_scores_the_frozen_model_alone():
    model = make_imsm("query_aware")
    tok = _ToyTokenizer()
    pairs = [("a b c", "d e"), ("c d", "e")]
    base = teacher_forced(model, tok, pairs, streams="base")
    imsm = teacher_forced(model, tok, pairs, streams="imsm")
    for b, m in zip(base, imsm, strict=True):
        assert b.nll == pytest.approx(b.nll_frozen) and b.kl == pytest.approx(0.0, abs=1e-6) and not b.gate
        assert b.nll_frozen == pytest.approx(m.nll_frozen, rel=1e-5) and m.nll != pytest.approx(m.nll_frozen)
        assert len(m.gate) == m.tokens


def test_without_eos_the_answer_tokens_alone_are_scored():
    """``with_eos=False`` (``eval.answer_eos=false``) drops the closing EOS's term and nothing else."""
    model = make_imsm("query_aware")
    tok = _ToyTokenizer()
    examples = [Example("a b c", "d e"), Example("c d", "e")]
    _, with_eos = likelihood_scores(model, tok, examples)
    _, without = likelihood_scores(model, tok, examples, with_eos=False)
    pairs = [(e.prompt, e.target) for e in examples]
    full, cut = teacher_forced(model, tok, pairs), teacher_forced(model, tok, pairs, with_eos=False)
    for w, wo, f, c in zip(with_eos, without, full, cut, strict=True):
        assert wo["answer_tokens"] == w["answer_tokens"] - 1
        assert c.gate == pytest.approx(f.gate[:-1], rel=1e-5)  # the same positions, the EOS one dropped
        assert c.nll_frozen < f.nll_frozen and wo["nll_total"] == pytest.approx(c.nll, rel=1e-6)
        assert wo["p_eos_first"] == pytest.approx(w["p_eos_first"], rel=1e-5)


def test_the_alias_the_frozen_model_finds_most_probable_is_scored():
    model = make_imsm("query_aware")
    tok = _ToyTokenizer()
    example = Example("a b c", "d", gold=["d", "e f", "g"])
    _, rows = likelihood_scores(model, tok, [example], aliases="best")
    assert likelihood_scores(model, tok, [example])[1][0]["answer"] == "d"  # first: the target
    per_alias = teacher_forced(model, tok, [("a b c", a) for a in example.gold])
    best = min(range(3), key=lambda i: per_alias[i].nll_frozen / per_alias[i].tokens)
    assert rows[0]["answer"] == example.gold[best]
    assert rows[0]["nll_frozen"] == pytest.approx(
        per_alias[best].nll_frozen / per_alias[best].tokens, rel=1e-5
    )


def test_choice_scoring_equals_scikit_learn_on_the_same_predictions():
    model = make_imsm("query_aware")
    tok = _ToyTokenizer()
    examples = [Example(f"q {w}", t) for w, t in zip("abcdefgh", ["yes", "no"] * 4, strict=True)]
    metrics, rows = likelihood_scores(model, tok, examples, choice=True)
    scores = [r["choice_score"] for r in rows]
    preds = [r["choice"] for r in rows]
    assert preds == ["yes" if s > 0 else "no" for s in scores]
    y_true = [e.target == "yes" for e in examples]
    y_pred = [p == "yes" for p in preds]
    choice = metrics["choice"]
    assert choice["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert choice["f1"] == pytest.approx(f1_score(y_true, y_pred, zero_division=0))
    assert choice["mcc"] == pytest.approx(matthews_corrcoef(y_true, y_pred))
    assert choice["auroc"] == pytest.approx(roc_auc_score(y_true, scores))
    # yes and no are one token each here: read off the gold pass; the same as scoring both answers separately
    two_pass = [dict(r) for r in rows]
    assert single_token_choices(tok, examples) is not None
    _choice(model, tok, examples, two_pass, "imsm", {})
    assert [r["choice_score"] for r in two_pass] == pytest.approx(scores, abs=1e-5)
    assert choice_targets(Example("p", " Yes")) == (" Yes", " No")
    assert choice_targets(Example("p", "Paris")) is None


def test_a_trained_run_records_delta_nll_with_ci_and_gate_quantiles(tmp_path):
    data = write_gsm(tmp_path / "data")
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(run_dir, data), "eval_datasets=[gsm8k]", "eval.scoring=both"]
    result = train(compose_train([*overrides, "trainer.args.max_steps=1", "dataset.eval_split='test[:2]'"]))
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record == json.loads(json.dumps(result))
    for metrics in (record["metrics"], record["eval_datasets"]["gsm8k"]):
        assert "accuracy" in metrics  # generation's metric is still there
        delta = metrics["likelihood"]["delta_nll"]
        assert delta["ci"][0] <= delta["mean"] <= delta["ci"][1]
        assert set(metrics["gate"]) == {"mean", "q05", "q25", "q50", "q75", "q95", "n_positions"}
    frozen = record["base_metrics"]["likelihood"]  # the frozen model scored alone: no change against itself
    assert (
        frozen["delta_nll"]["mean"] == pytest.approx(0.0, abs=1e-6) and "gate" not in record["base_metrics"]
    )
    row = json.loads((run_dir / "eval" / "gsm8k" / "predictions.jsonl").open().readline())
    assert {"generation", "correct", "nll", "delta_nll", "kl", "p_eos_first", "gate_mean"} <= set(row)


class _ToyTokenizer:
    """Whitespace tokens over the tiny model's 97-word vocabulary: ids 3.. for words, 1 EOS, 0 pad."""

    eos_token_id, pad_token_id = 1, 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [3 + (sum(map(ord, w)) % 90) for w in text.split()]}
