"""Examples -> token ids -> padded batches that carry everything the model needs.

Prompt and target are tokenised separately and joined with nothing between them (as the paper's code does), EOS
appended. The prompt gets the tokenizer's own special tokens (BOS where it has one); the target gets none. A prompt
longer than ``max_input_length`` is cut by ``fit_prompt``: where its dataset marked a passage (``SHRINKABLE`` in
``Example.meta``: MultiRC, ROPES) the passage loses its tail, so the question survives wherever the template puts
it; otherwise (or when even the whole passage is not enough) the prompt keeps its *last* tokens, where most templates
put the question and the answer cue. Truncations are counted, never silent.

Training batches are right-padded: ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt and pad),
``query_mask`` (1 on prompt tokens), ``task_type`` (one per row, from the dataset's setting) when set, and ``index``
(each row's position in the training set) when the dataset is an ``IndexedDataset`` (``trainer.cache_frozen``).
Generation batches are left-padded prompts (all real tokens are query).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from imsm.constants import IGNORE_INDEX
from imsm.data.base import SHRINKABLE, Example, Span

log = logging.getLogger(__name__)


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat_template: bool) -> str:
    """The prompt text as the model sees it: raw (paper default) or wrapped in the tokenizer's chat template."""
    if not chat_template:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


@dataclass
class Truncation:
    """Counts of truncated prompts and targets, reported after tokenisation."""

    prompts: int = 0
    targets: int = 0
    total: int = 0

    def report(self, what: str) -> None:
        if self.prompts or self.targets:
            log.warning(
                "%s: %d of %d prompts and %d targets were longer than the max length and truncated",
                what,
                self.prompts,
                self.total,
                self.targets,
            )


def fit_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_length: int,
    chat_template: bool = False,
    stats: Truncation | None = None,
    shrinkable: Span | None = None,
) -> list[int]:
    """The prompt's token ids, at most ``max_length`` of them.

    An over-long prompt first loses the tail of its ``shrinkable`` span (characters of ``prompt``, the dataset's
    ``Example.meta[SHRINKABLE]``): the tokens inside it are dropped from its end, so the text before and after it
    (the instruction, the question, the answer cue) stays whole and the prompt is exactly ``max_length`` tokens.
    Without a span, or if dropping the whole span is not enough, it keeps its last ``max_length`` tokens.
    """
    text = format_prompt(tokenizer, prompt, chat_template)
    ids = tokenizer(text, add_special_tokens=not chat_template)["input_ids"]
    if len(ids) <= max_length:
        return ids
    if stats is not None:
        stats.prompts += 1
    span = span_in(text, prompt, shrinkable) if shrinkable and tokenizer.is_fast else None
    if span is not None:
        encoded = tokenizer(text, add_special_tokens=not chat_template, return_offsets_mapping=True)
        ids = drop_span_tail(encoded["input_ids"], encoded["offset_mapping"], span, len(ids) - max_length)
    return ids[-max_length:]


def span_in(text: str, prompt: str, span: Span) -> Span | None:
    """``span`` (characters of ``prompt``) in ``text``, the prompt as formatted (the chat template may wrap it)."""
    start, end = span
    if text == prompt:
        return start, end
    at = text.find(prompt.strip())
    if at < 0:
        return None
    shift = at - (len(prompt) - len(prompt.lstrip()))
    return start + shift, end + shift


def drop_span_tail(ids: list[int], offsets: list[tuple[int, int]], span: Span, excess: int) -> list[int]:
    """``ids`` without the last ``excess`` tokens that lie inside ``span`` (all of them if there are fewer).

    Tokens are chosen by their character offsets; a character split over several byte tokens is dropped whole, so
    the cut never leaves half a character (the prompt may then be a token shorter).
    """
    inside = [i for i, (s, e) in enumerate(offsets) if span[0] <= s and e <= span[1] and s < e]
    cut = max(len(inside) - excess, 0)
    while 0 < cut < len(inside) and offsets[inside[cut - 1]] == offsets[inside[cut]]:
        cut -= 1
    dropped = set(inside[cut:])
    return [t for i, t in enumerate(ids) if i not in dropped]


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    max_input_length: int,
    max_output_length: int,
    chat_template: bool = False,
    stats: Truncation | None = None,
) -> dict[str, list[int]]:
    """``{"input_ids", "labels", "query_len"}`` for one training example, and ``task_type`` when it has one."""
    prompt_ids = fit_prompt(
        tokenizer, example.prompt, max_input_length, chat_template, stats, example.meta.get(SHRINKABLE)
    )
    target_ids = tokenizer(example.target, add_special_tokens=False)["input_ids"]
    if len(target_ids) > max_output_length - 1:
        target_ids = target_ids[: max_output_length - 1]
        if stats is not None:
            stats.targets += 1
    target_ids = target_ids + [tokenizer.eos_token_id]
    if stats is not None:
        stats.total += 1
    features = {
        "input_ids": prompt_ids + target_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
        "query_len": [len(prompt_ids)],
    }
    if example.meta.get("task_type") is not None:  # the dataset's task_type (LoRAMoE's balancing constraint)
        features["task_type"] = [int(example.meta["task_type"])]
    return features


class TokenizedDataset(Dataset):
    """Training examples tokenised once, up front (they are small; a ``datasets.Dataset`` would add nothing)."""

    def __init__(
        self,
        examples: list[Example],
        tokenizer: PreTrainedTokenizerBase,
        max_input_length: int,
        max_output_length: int,
        chat_template: bool = False,
        name: str = "train",
    ):
        self.stats = Truncation()
        self.features = [
            encode_example(tokenizer, ex, max_input_length, max_output_length, chat_template, self.stats)
            for ex in examples
        ]
        self.stats.report(name)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.features[i]


class IndexedDataset(Dataset):
    """A training set whose items also carry their position, ``{..., "index": [i]}``: the key under which
    ``imsm.model.frozen_cache`` stores each example's frozen states (the collator makes it an ``index`` tensor)."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {**self.data[i], "index": [i]}


@dataclass
class TrainCollator:
    """Right-pads features into ``input_ids, attention_mask, labels, query_mask`` (all (batch, seq)), plus
    ``task_type`` (batch,) when the examples carry one (LoRAMoE's balancing constraint reads it) and ``index``
    (batch,) when they carry their position (``IndexedDataset``)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    extra_keys: tuple[str, ...] = field(default_factory=tuple)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(features)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        query_mask = torch.zeros((n, length), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            attention_mask[i, :k] = 1
            query_mask[i, : f["query_len"][0]] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "query_mask": query_mask,
        }
        types = [f.get("task_type") for f in features]
        if any(t is not None for t in types):
            if any(t is None for t in types):
                raise ValueError(
                    "TrainCollator: some examples of this batch have a task_type and others none; set task_type "
                    "in every conf/dataset file of the mix (1 world-knowledge QA, 0 other)"
                )
            batch["task_type"] = torch.tensor([t[0] for t in types], dtype=torch.long)
        if all("index" in f for f in features):
            batch["index"] = torch.tensor([f["index"][0] for f in features], dtype=torch.long)
        return batch


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists for generation. Returns ``input_ids, attention_mask``, both (batch, max_len)."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, length - len(p) :] = torch.tensor(p)
        attention_mask[i, length - len(p) :] = 1
    return input_ids, attention_mask
