"""Teacher-forced likelihood scoring: how probable the gold answer stays, under the model, its tuned stream and the
frozen model, without generating a token.

One forward of each stream over prompt + gold answer (+ EOS, as in training) gives, at every answer position, the
log-probabilities of the mix (the model as evaluated), the tuned stream alone and the frozen model: the frozen
stream an IMSM forward computes anyway is reused, so an IMSM model costs two passes and no third. Per example:

- ``nll`` / ``nll_tuned`` / ``nll_frozen``: gold-answer negative log-likelihood, nats per answer token (``nll_total``:
  per answer); ``delta_nll = nll - nll_frozen``: how much less likely the known answer became (forgetting, > 0);
- ``kl``: KL(frozen || model) per answer token: how far the answer distribution moved, right answer or not;
- ``p_eos_first``: P(EOS) as the first answer token: "stops answering" is told apart from "lost the fact";
- several gold aliases (WebQ, FreebaseQA): ``first`` (default) scores the dataset's target, its first alias;
  ``best`` scores every alias and keeps the one the frozen model finds most probable (lowest NLL per token), at one
  pass per alias. Either way every stream is scored on the same tokens;
- yes/no datasets: choice scoring, ``log p(yes) - log p(no)`` of the answer words (no EOS), as lm-evaluation-harness
  scores small models: accuracy, F1, MCC, AUROC, with no invalid answers;
- an IMSM model's gate value g (the frozen stream's weight, mean over features) at each answer position.

Aggregates are means over examples with 95% bootstrap CIs (``imsm.metrics.bootstrap_ci``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from imsm.backbones import autocast_context
from imsm.constants import IGNORE_INDEX
from imsm.data.base import SHRINKABLE, Example, Span
from imsm.data.collate import TrainCollator, encode_example
from imsm.metrics import YES_NO, bootstrap_ci, choice_metrics
from imsm.model.siamese import STREAMS, IMSMModel

TOKEN_CHUNK = 256  # answer positions whose full-vocabulary log-probabilities are held at once
GATE_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class Scored:
    """Sums over one (prompt, answer) pair's answer tokens."""

    tokens: int = 0
    nll: float = 0.0  # the model as evaluated
    nll_tuned: float = 0.0
    nll_frozen: float = 0.0
    kl: float = 0.0
    p_eos_first: float = 0.0
    p_eos_first_frozen: float = 0.0
    gate: list[float] = field(default_factory=list)  # g per answer position (IMSM only)
    choice_score: float | None = (
        None  # log p(yes) - log p(no) at the first answer position (single-token choices)
    )


ALIAS_RULES = ("first", "best")


def answer_candidates(example: Example, aliases: str = "first") -> list[str]:
    """The answers to score: the target (``first``), or every distinct gold alias when ``gold`` is a list (``best``)."""
    if aliases not in ALIAS_RULES:
        raise ValueError(f"aliases={aliases!r} is not one of {list(ALIAS_RULES)}")
    if aliases == "best" and isinstance(example.gold, list | tuple) and example.gold:
        return list(dict.fromkeys(str(g) for g in example.gold))
    return [example.target]


def choice_targets(example: Example) -> tuple[str, str] | None:
    """``(yes answer, no answer)`` written as the example's own target is (case, spacing); None if not yes/no."""
    word = example.target.strip()
    if word.lower() not in YES_NO:
        return None
    cased = (lambda w: w.capitalize()) if word[:1].isupper() else (lambda w: w)
    return tuple(example.target.replace(word, cased(w)) for w in YES_NO)  # type: ignore[return-value]


@torch.no_grad()
def teacher_forced(
    model: IMSMModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    *,
    streams: str = "imsm",
    batch_size: int = 8,
    max_input_length: int = 512,
    max_output_length: int = 512,
    chat_template: bool = False,
    autocast: str | None = None,
    with_eos: bool = True,
    choice_ids: tuple[int, int] | None = None,
    desc: str = "likelihood",
    shrinkable: list[Span | None] | None = None,
) -> list[Scored]:
    """Score each ``(prompt, answer)`` pair with one forward per stream; returns the pairs' sums, in order.

    ``streams``: ``imsm`` (the model as configured: the mix, or the tuned stream without a gate), ``tuned`` or
    ``base`` (the frozen model alone: only its stream runs, and every number is the frozen model's).
    ``choice_ids``: (yes id, no id): also ``log p(yes) - log p(no)`` at each pair's first answer position.
    """
    if streams not in STREAMS:
        raise ValueError(f"streams={streams!r} is not one of {list(STREAMS)}")
    features = []
    # ``shrinkable``: each pair's passage span, cut first from an over-long prompt (``collate.fit_prompt``)
    for (prompt, answer), span in zip(pairs, shrinkable or [None] * len(pairs), strict=True):
        example = Example(prompt, answer, meta={SHRINKABLE: span} if span else {})
        f = encode_example(tokenizer, example, max_input_length, max_output_length, chat_template)
        if not with_eos:  # choice scoring: the answer words only
            f["labels"][-1] = IGNORE_INDEX
        features.append(f)
    collate = TrainCollator(tokenizer.pad_token_id)
    order = sorted(range(len(pairs)), key=lambda i: len(features[i]["input_ids"]))
    device = next(model.parameters()).device
    results: list[Scored] = [Scored() for _ in pairs]
    model.eval()
    for start in tqdm(
        range(0, len(order), batch_size), desc=desc, unit="batch", disable=len(order) <= batch_size
    ):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([features[i] for i in idx]).items()}
        with autocast_context(device, autocast):
            scored = _score_batch(model, batch, streams, tokenizer.eos_token_id, choice_ids)
        for row, s in zip(idx, scored, strict=True):
            results[row] = s
    return results


def _score_batch(
    model: IMSMModel,
    batch: dict[str, torch.Tensor],
    streams: str,
    eos: int,
    choice_ids: tuple[int, int] | None = None,
) -> list[Scored]:
    ids, mask, query = batch["input_ids"], batch["attention_mask"], batch["query_mask"]
    if streams == "base":
        base, tuned, bq, tq = model.stream_hidden(ids, mask, adapter=False), None, None, None
    else:
        base, tuned, bq, tq = model.streams(ids, mask, query, frozen=True)
    target = batch["labels"][:, 1:]
    rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    gold = target[rows, cols]
    first_col = torch.full((ids.shape[0],), ids.shape[1], device=ids.device).scatter_reduce(
        0, rows, cols, "amin"
    )
    first = cols == first_col[rows]
    at = lambda t: None if t is None else t[:, :-1][rows, cols]  # noqa: E731 - (batch, seq, d) -> (n, d)
    per_row = lambda t: None if t is None else t[rows]  # noqa: E731 - (batch, d) -> (n, d)
    hb, ht, qb, qt = at(base), at(tuned), per_row(bq), per_row(tq)
    mixing = streams == "imsm" and model.gate is not None
    gate = model.gate_values(hb, ht, qb, qt) if mixing else None

    keys = ("nll", "tuned", "frozen", "kl", "eos", "eos_f", "choice")
    stats = {k: torch.zeros(len(gold), device=ids.device) for k in keys}
    for s in range(0, len(gold), TOKEN_CHUNK):
        c = slice(s, s + TOKEN_CHUNK)
        lp_frozen = F.log_softmax(model.lm_head(hb[c]).float(), -1)
        lp_tuned = lp_frozen if ht is None else F.log_softmax(model.lm_head(ht[c]).float(), -1)
        if mixing:
            lp_model = F.log_softmax(
                model.lm_head(model.mix(hb[c], ht[c], _rows(qb, c), _rows(qt, c))).float(), -1
            )
        else:
            lp_model = lp_frozen if streams == "base" else lp_tuned
        g = gold[c].unsqueeze(-1)
        stats["nll"][c] = -lp_model.gather(-1, g).squeeze(-1)
        stats["tuned"][c] = -lp_tuned.gather(-1, g).squeeze(-1)
        stats["frozen"][c] = -lp_frozen.gather(-1, g).squeeze(-1)
        stats["kl"][c] = (lp_frozen.exp() * (lp_frozen - lp_model)).sum(-1)
        stats["eos"][c] = lp_model[:, eos].exp()
        stats["eos_f"][c] = lp_frozen[:, eos].exp()
        if choice_ids is not None:
            stats["choice"][c] = lp_model[:, choice_ids[0]] - lp_model[:, choice_ids[1]]

    n_rows = ids.shape[0]
    sums = {k: torch.zeros(n_rows, device=ids.device).index_add(0, rows, v) for k, v in stats.items()}
    tokens = torch.zeros(n_rows, dtype=torch.long, device=ids.device).index_add(
        0, rows, torch.ones_like(rows)
    )
    eos_first = {
        k: torch.zeros(n_rows, device=ids.device).index_add(0, rows[first], stats[k][first])
        for k in ("eos", "eos_f", "choice")
    }
    out = []
    for r in range(n_rows):
        on_row = rows == r
        out.append(
            Scored(
                tokens=int(tokens[r]),
                nll=float(sums["nll"][r]),
                nll_tuned=float(sums["tuned"][r]),
                nll_frozen=float(sums["frozen"][r]),
                kl=float(sums["kl"][r]),
                p_eos_first=float(eos_first["eos"][r]),
                p_eos_first_frozen=float(eos_first["eos_f"][r]),
                gate=gate[on_row].tolist() if gate is not None else [],
                choice_score=float(eos_first["choice"][r]) if choice_ids is not None else None,
            )
        )
    return out


def _rows(t: torch.Tensor | None, c: slice) -> torch.Tensor | None:
    return None if t is None else t[c]


def likelihood_scores(
    model: IMSMModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    *,
    streams: str = "imsm",
    choice: bool = False,
    aliases: str = "first",
    with_eos: bool = True,
    **options: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score ``examples`` by likelihood; returns (metrics: ``likelihood`` [+ ``choice``] [+ ``gate``], rows).

    ``aliases``: ``first`` scores each example's target (one pass), ``best`` every gold alias, keeping the one the
    frozen model finds most probable (one pass per alias). ``with_eos``: the answer's NLL includes the EOS that ends
    it (as in training) or covers the answer's own tokens only. ``options`` go to ``teacher_forced`` (batch size,
    lengths, chat template, autocast, desc).
    """
    candidates = [answer_candidates(e, aliases) for e in examples]
    pairs = [(e.prompt, a) for e, answers in zip(examples, candidates, strict=True) for a in answers]
    spans = [e.meta.get(SHRINKABLE) for e, answers in zip(examples, candidates, strict=True) for _ in answers]
    same_pass = single_token_choices(tokenizer, examples) if choice else None
    scored = teacher_forced(
        model,
        tokenizer,
        pairs,
        streams=streams,
        choice_ids=same_pass,
        with_eos=with_eos,
        shrinkable=spans,
        **options,
    )
    rows, chosen, k = [], [], 0
    for e, answers in zip(examples, candidates, strict=True):
        group = scored[k : k + len(answers)]
        k += len(answers)
        best = min(range(len(answers)), key=lambda i: group[i].nll_frozen / max(group[i].tokens, 1))
        s = group[best]
        chosen.append(s)
        n = max(s.tokens, 1)
        row = {
            "prompt": e.prompt,
            "gold": e.gold,
            "answer": answers[best],
            "answer_tokens": s.tokens,
            "nll": s.nll / n,
            "nll_total": s.nll,
            "nll_tuned": s.nll_tuned / n,
            "nll_frozen": s.nll_frozen / n,
            "delta_nll": (s.nll - s.nll_frozen) / n,
            "kl": s.kl / n,
            "p_eos_first": s.p_eos_first,
            "p_eos_first_frozen": s.p_eos_first_frozen,
        }
        if s.gate:
            row["gate_mean"] = float(np.mean(s.gate))
        rows.append(row)
    metrics: dict[str, Any] = {"likelihood": aggregate(rows, sum(s.tokens for s in chosen))}
    gates = [g for s in chosen for g in s.gate]
    if gates:
        q = np.quantile(gates, GATE_QUANTILES)
        metrics["gate"] = {
            "mean": float(np.mean(gates)),
            **{f"q{int(p * 100):02d}": float(v) for p, v in zip(GATE_QUANTILES, q, strict=True)},
            "n_positions": len(gates),
        }
    if (
        choice and same_pass is not None
    ):  # yes and no are one token each: read both off the gold answer's pass
        metrics["choice"] = _choice_metrics(examples, rows, [s.choice_score for s in chosen])
    elif choice:
        metrics["choice"] = _choice(model, tokenizer, examples, rows, streams, options)
    return metrics, rows


def single_token_choices(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example]
) -> tuple[int, int] | None:
    """(yes id, no id) when every example's yes and no answers are one token each, the same for all; else None."""
    found = set()
    for e in examples:
        targets = choice_targets(e)
        if targets is None:
            return None
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
        if any(len(i) != 1 for i in ids):
            return None
        found.add((ids[0][0], ids[1][0]))
    return found.pop() if len(found) == 1 else None


LIKELIHOOD_KEYS = (
    "nll",
    "nll_total",
    "nll_tuned",
    "nll_frozen",
    "delta_nll",
    "kl",
    "p_eos_first",
    "p_eos_first_frozen",
)


def aggregate(rows: list[dict[str, Any]], answer_tokens: int) -> dict[str, Any]:
    """Mean and 95% bootstrap CI over examples of each per-example measure."""
    out: dict[str, Any] = {"n": len(rows), "answer_tokens": answer_tokens}
    for key in LIKELIHOOD_KEYS:
        out[key] = bootstrap_ci([r[key] for r in rows])
    return out


def _choice(
    model: IMSMModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    rows: list[dict[str, Any]],
    streams: str,
    options: dict[str, Any],
) -> dict[str, Any]:
    """``log p(yes) - log p(no)`` per example (answer words, no EOS) -> accuracy / F1 / MCC / AUROC; rows get it."""
    targets = [choice_targets(e) for e in examples]
    keep = [i for i, t in enumerate(targets) if t is not None]
    pairs = [(examples[i].prompt, answer) for i in keep for answer in targets[i]]  # type: ignore[union-attr]
    spans = [examples[i].meta.get(SHRINKABLE) for i in keep for _ in targets[i]]  # type: ignore[union-attr]
    opts = {**options, "desc": f"{options.get('desc', 'likelihood')} (yes/no)"}
    scored = teacher_forced(
        model, tokenizer, pairs, streams=streams, with_eos=False, shrinkable=spans, **opts
    )
    scores: list[float | None] = [None] * len(examples)
    for j, i in enumerate(keep):
        yes, no = scored[2 * j], scored[2 * j + 1]
        scores[i] = -yes.nll + no.nll  # log p(yes) - log p(no)
    return _choice_metrics(examples, rows, scores)


def _choice_metrics(
    examples: list[Example], rows: list[dict[str, Any]], scores: list[float | None]
) -> dict[str, Any]:
    """Each row gets its ``choice_score`` and ``choice``; accuracy / F1 / MCC / AUROC over the scored examples."""
    kept, golds = [], []
    for e, row, score in zip(examples, rows, scores, strict=True):
        if score is None:
            continue
        row["choice_score"], row["choice"] = score, "yes" if score > 0 else "no"
        kept.append(score)
        golds.append(e.target.strip().lower())
    return choice_metrics(kept, golds)
