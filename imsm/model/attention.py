"""Attention for one decoding query on CPU, without PyTorch's CPU flash kernel.

Greedy decoding attends one new query per row to the whole KV cache. On CPU, transformers' ``sdpa`` sends that to
``scaled_dot_product_attention``'s flash kernel, which works in blocks meant for long queries: for SmolLM2-135M's
shapes (9 heads, 3 KV heads, 64 dims, bf16), in one run, one call took 129 us at 228 cached tokens and 555 us at 1,024, against
66 us and 162 us for the same products as two small matrix multiplies, and at batch 2, the doubled batch IMSM
decodes both streams with, 281 and 1,096 us against 106 and 227 (``scripts/decode_attention_bench.py``,
docs/performance.md, "Decoding attention on CPU"). So decoding paid for attention
in proportion to its length, and IMSM paid twice.

``imsm_sdpa`` is transformers' ``sdpa`` with one change: a single query (``q_len == 1``) on CPU is computed as
``softmax(q k^T * scale + mask) v`` in float32 over the key/value heads directly (grouped query attention without
repeating the keys), rounded to the model's dtype once at the end, as the flash kernel does. Everything else (prefill,
training, likelihood scoring, CUDA, dropout, soft-capping, sinks, attention weights) goes to ``sdpa`` unchanged, and
masks are built by ``sdpa``'s own mask function. ``use_decode_attention`` switches a backbone that uses ``sdpa`` to
it (``imsm.model.families``); ``IMSM_DECODE_ATTENTION=sdpa`` keeps transformers' kernel.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "imsm_sdpa"
ENV = "IMSM_DECODE_ATTENTION"  # "sdpa" (or 0 / off / false) keeps transformers' sdpa


def single_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """One query per row attending to its cache, in float32, grouped by key/value head.

    Args:
        query: (batch, heads, 1, d); heads a multiple of ``kv_heads`` (head h reads key/value head h // group).
        key: (batch, kv_heads, kv_len, d).
        value: (batch, kv_heads, kv_len, d_v).
        attention_mask: None, boolean (True attends) or additive float, (batch or 1, 1 or heads, 1, kv_len).
        scaling: the scores' factor; None is 1 / sqrt(d).

    Returns:
        (batch, 1, heads, d_v) in ``query``'s dtype, the layout transformers' attention functions return.
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = dim**-0.5 if scaling is None else scaling
    # heads that share a key/value head become that head's rows: (batch, kv_heads, group, d)
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # (batch, kv_heads, group, kv_len)
    if attention_mask is not None:
        # (batch or 1, 1, 1, kv_len) broadcasts over the grouped heads as it is; one mask per head,
        # (batch, heads, 1, kv_len), becomes (batch, kv_heads, group, kv_len)
        mask = attention_mask
        if mask.shape[1] > 1:
            mask = mask.reshape(mask.shape[0], kv_heads, heads // kv_heads, mask.shape[-1])
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float())  # (batch, kv_heads, group, d_v)
    return out.reshape(batch, 1, heads, value.shape[-1]).to(query.dtype)


def decode_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``single_query_attention`` where it applies, else ``sdpa``."""
    if fast_path_applies(query, key, attention_mask, dropout, kwargs):
        return single_query_attention(query, key, value, attention_mask, scaling), None
    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


def fast_path_applies(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float, kwargs: dict
) -> bool:
    """One query on CPU, no dropout, and none of the extras only ``sdpa`` handles (position bias, soft-capping,
    sinks, returned attention weights)."""
    extras = ("position_bias", "softcap", "sinks", "s_aux")
    return (
        query.shape[2] == 1
        and query.device.type == "cpu"
        and not dropout
        and query.shape[1] % key.shape[1] == 0
        and (attention_mask is None or attention_mask.shape[1] in (1, query.shape[1]))
        and all(kwargs.get(name) is None for name in extras)
        and not kwargs.get("output_attentions", False)
    )


AttentionInterface.register(NAME, decode_attention_forward)
# the same masks as sdpa (boolean, or None where causal suffices)
AttentionMaskInterface.register(NAME, sdpa_mask)


def enabled() -> bool:
    """False when ``IMSM_DECODE_ATTENTION`` asks for transformers' ``sdpa`` (``sdpa``, ``0``, ``off``, ``false``)."""
    return os.environ.get(ENV, "").strip().lower() not in ("sdpa", "0", "off", "false", "no")


def use_decode_attention(model: PreTrainedModel) -> None:
    """Switch ``model`` from ``sdpa`` to ``imsm_sdpa`` (idempotent). Other implementations (``eager``, flash
    attention, a remote-code model's own) are left as the user or the model chose them."""
    config = getattr(model, "config", None)
    if (
        enabled()
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and isinstance(model, PreTrainedModel)
        and model._can_set_attn_implementation()
    ):
        model.set_attn_implementation(NAME)


@contextlib.contextmanager
def attention_implementation(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Run the body with ``model``'s attention set to ``name`` (e.g. ``sdpa``), then restore it (benchmarks' A/B)."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
