"""The frozen stream's states cached across epochs (``trainer.cache_frozen``).

The frozen stream M is the pretrained model: the same example gives the same states in every epoch. The training
loss reads only two things from it: its last hidden states (after the final norm) at the positions whose next token
is a label, and, for a gate that reads it, its query summary (the pooled prompt states). The first time an example
is seen both are stored, keyed by the example's index in the training set (``IndexedDataset`` puts it in the batch);
a later batch whose examples are all stored skips the frozen forward. Exact when the frozen forward is
deterministic: a backbone with active dropout (a config's ``attention_dropout`` etc., or an ``nn.Dropout`` outside
the adapter) is refused. peft's ``lora_dropout`` (and LoRAMoE's, LoHa's module dropout) act on the adapter's path
only, which the frozen stream never takes, so they are fine. Also refused: DeepSpeed ZeRO-3, where each frozen
forward gathers the partitioned weights from every rank, so a rank whose batch is cached would leave the others
waiting. Activation checkpointing does not interfere: the frozen stream runs without gradients and is never
recomputed.

Cost, in CPU memory, per example: ``(L + q) * d * itemsize + 8 * n`` bytes (plus ~200 bytes of Python objects),
where L is the example's labelled target tokens (EOS included), q is 1 when the gate reads the query summary
(``query_aware``) and 0 otherwise, d the hidden size, itemsize that of the frozen states' dtype (the backbone's: 2
for bf16, 4 for fp32), n the example's tokens (kept to check an entry belongs to its example; int64).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from imsm.model.siamese import pool_query

if TYPE_CHECKING:
    from imsm.model.siamese import IMSMModel

log = logging.getLogger(__name__)

# backbone config fields that switch dropout on inside the frozen forward (transformers' names across families)
DROPOUT_FIELDS = (
    "attention_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
    "activation_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "ffn_dropout",
)


@dataclass
class FrozenEntry:
    """One example's frozen states: ``tokens`` (n,) its real token ids; ``hidden`` (L, d) at its labelled
    positions, in order; ``query`` (d,) its query summary, or None when the gate does not read it."""

    tokens: torch.Tensor
    hidden: torch.Tensor
    query: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        tensors = [self.tokens, self.hidden] + ([self.query] if self.query is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


class FrozenCache:
    """Frozen states per training example, in CPU memory; ``hits`` / ``misses`` count batches."""

    def __init__(self) -> None:
        self.entries: dict[int, FrozenEntry] = {}
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def frozen_at_labels(
        self,
        model: IMSMModel,
        index: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_mask: torch.Tensor | None,
        rows: torch.Tensor,
        cols: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen states ``IMSMModel.forward`` mixes: stored ones, or a frozen forward that stores them.

        Args:
            model: the siamese model (its frozen stream runs on a miss).
            index: (batch,) each row's index in the training set.
            input_ids, attention_mask: (batch, seq).
            query_mask: (batch, seq), 1 on prompt tokens; None when the gate reads no query summary.
            rows, cols: (n,) the labelled positions (row-major, as ``nonzero`` gives them).

        Returns:
            h_M at the labelled positions (n, d), and q_M of each position's row (n, d) or None.
        """
        keys = index.tolist()
        counts = torch.bincount(rows, minlength=len(keys)).tolist()
        tokens = [ids[mask.bool()] for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]
        entries = [self.entries.get(k) for k in keys]
        if all(e is not None for e in entries):
            self.hits += 1
            for key, entry, ids, count in zip(keys, entries, tokens, counts, strict=True):
                if entry.hidden.shape[0] != count or not torch.equal(entry.tokens, ids):
                    raise ValueError(
                        f"trainer.cache_frozen: training example {key} is not the one cached under its index "
                        f"({count} labelled tokens now, {entry.hidden.shape[0]} cached): the training set changed "
                        "during training"
                    )
            hidden = torch.cat([e.hidden for e in entries]).to(input_ids.device, non_blocking=True)
            if query_mask is None:
                return hidden, None
            query = torch.stack([e.query for e in entries]).to(input_ids.device, non_blocking=True)
            return hidden, query[rows]
        self.misses += 1
        base = model.stream_hidden(input_ids, attention_mask, adapter=False)
        query = None if query_mask is None else pool_query(base, query_mask, model.pooling)
        hidden = base[:, :-1][rows, cols]
        per_row = torch.split(hidden.detach().cpu(), counts)
        queries = query.detach().cpu() if query is not None else [None] * len(keys)
        for key, ids, h, q in zip(keys, tokens, per_row, queries, strict=True):
            # own copies: a view would keep the whole batch's tensor alive after its entry is replaced
            self.entries[key] = FrozenEntry(ids.clone(), h.clone(), None if q is None else q.clone())
        return hidden, None if query is None else query[rows]


def active_dropout(backbone: nn.Module) -> list[str]:
    """Where dropout would act in the frozen forward in training mode: ``field=value`` of the backbone config and
    names of ``nn.Dropout`` modules outside any adapter (peft's ``lora_dropout`` and the like only touch the
    adapter's path)."""
    config = getattr(backbone, "config", None)
    found = [
        f"{field}={getattr(config, field)}"
        for field in DROPOUT_FIELDS
        if isinstance(getattr(config, field, None), int | float) and getattr(config, field) > 0
    ]
    adapter_parts = set()
    for module in backbone.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(
            base, nn.Module
        ):  # a peft tuner layer or a LoRAMoE layer: all but its base layer is adapter
            adapter_parts |= {id(m) for m in module.modules()} - {id(m) for m in base.modules()}
    found += [
        name
        for name, m in backbone.named_modules()
        if isinstance(m, nn.Dropout) and m.p > 0 and id(m) not in adapter_parts
    ]
    return found


def frozen_cache_for(model: IMSMModel, zero3: bool = False, world_size: int = 1) -> FrozenCache | None:
    """A ``FrozenCache`` for ``trainer.cache_frozen=true``, after checking it is exact; None without a gate.

    Raises:
        ValueError: dropout acts in the frozen forward, or DeepSpeed ZeRO-3 partitions the weights.
    """
    if model.gate is None:
        log.warning("trainer.cache_frozen=true with gate=none: there is no frozen stream to cache; ignored")
        return None
    dropout = active_dropout(model.backbone)
    if dropout:
        raise ValueError(
            f"trainer.cache_frozen=true, but dropout acts in the frozen stream ({', '.join(dropout[:4])}): its "
            "states differ in every epoch, so stored ones would not be what the run computes. Set "
            "trainer.cache_frozen=false, or the backbone's dropout to 0."
        )
    if zero3:
        raise ValueError(
            "trainer.cache_frozen=true is not supported under DeepSpeed ZeRO-3: every frozen forward gathers the "
            "partitioned weights from all ranks, and a rank whose batch is cached would skip it. Use "
            "trainer=deepspeed_z2 or ddp, or trainer.cache_frozen=false."
        )
    if world_size > 1:
        log.warning(
            "trainer.cache_frozen=true with %d processes: each process caches the examples it saw, and the "
            "sampler deals them out anew every epoch, so most later batches miss and run the frozen stream",
            world_size,
        )
    return FrozenCache()
