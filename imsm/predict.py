"""Batched greedy generation over a list of examples, scored by the dataset's metric.

Prompts are sorted by length so each batch pads little, generated with ``IMSMModel.generate`` (two KV caches),
decoded, and returned in the original order with the per-example verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from imsm.backbones import autocast_context
from imsm.data.base import SHRINKABLE, Example, Span
from imsm.data.collate import Truncation, fit_prompt, left_pad
from imsm.metrics import score
from imsm.model.siamese import IMSMModel


def generate_texts(
    model: IMSMModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    max_input_length: int = 512,
    chat_template: bool = False,
    streams: str = "imsm",
    desc: str = "generate",
    autocast: str | None = None,
    shrinkable: Sequence[Span | None] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (original order).

    ``autocast`` ``bf16`` / ``fp16`` runs the matmuls in that precision (``torch.autocast``) over fp32 weights;
    None: the weights' own precision. ``shrinkable``: each prompt's passage span, cut first if it is too long
    (``imsm.data.collate.fit_prompt``).
    """
    stats = Truncation(total=len(prompts))
    spans = shrinkable or [None] * len(prompts)
    encoded = [
        fit_prompt(tokenizer, p, max_input_length, chat_template, stats, span)
        for p, span in zip(prompts, spans, strict=True)
    ]
    stats.report(desc)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    texts: list[str] = [""] * len(prompts)
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start : start + batch_size]
        input_ids, attention_mask = left_pad([encoded[i] for i in idx], tokenizer.pad_token_id)
        with torch.inference_mode(), autocast_context(device, autocast):
            new = model.generate(
                input_ids.to(device),
                attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                streams=streams,
            )
        for i, row in zip(idx, new.tolist(), strict=True):
            if eos in row:
                row = row[: row.index(eos)]
            texts[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return texts


def evaluate_examples(
    model: IMSMModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example], metric: str, **gen: Any
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate for ``examples`` and score them. Returns (metrics, prediction rows)."""
    spans = [e.meta.get(SHRINKABLE) for e in examples]
    texts = generate_texts(model, tokenizer, [e.prompt for e in examples], shrinkable=spans, **gen)
    metrics, correct = score(metric, texts, [e.gold for e in examples])
    rows = [
        {"prompt": e.prompt, "generation": t, "gold": e.gold, "correct": bool(c)}
        for e, t, c in zip(examples, texts, correct, strict=True)
    ]
    return metrics, rows
