"""``imsm_sdpa`` (``imsm.model.attention``): a decoding step's attention on CPU equals ``sdpa``'s.

The function against a float64 reference (grouped and plain heads, every mask form), which calls take the fast path,
and whole models: one decoding step's logits and the greedy tokens of IMSM (fused and in two passes, left padding,
the static cache's full-length mask) with ``imsm_sdpa`` equal those with transformers' ``sdpa``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from test_static_decoding import PROMPTS, greedy, lively_imsm, static
from transformers import DynamicCache

from imsm.model import attention
from imsm.model.attention import (
    NAME,
    attention_implementation,
    decode_attention_forward,
    fast_path_applies,
    single_query_attention,
    use_decode_attention,
)
from imsm.model.families import prepare_backbone


def reference(query, key, value, mask, scale):
    """float64 attention with the key/value heads repeated (transformers' ``repeat_kv``): (batch, 1, heads, d)."""
    group = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(group, 1)
    v = value.double().repeat_interleave(group, 1)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    out = F.scaled_dot_product_attention(query.double(), k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def inputs(batch=3, heads=6, kv_heads=2, length=11, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    return q, k, v


def padding_mask(batch: int, length: int, heads: int = 1) -> torch.Tensor:
    """Row i hides its first i positions (left padding), (batch, heads, 1, length) booleans, True attends."""
    keep = torch.arange(length)[None, :] >= torch.arange(batch)[:, None]
    return keep[:, None, None, :].expand(batch, heads, 1, length).clone()


@pytest.mark.parametrize("kv_heads", [2, 6, 1])  # grouped, one key/value head per head, one for all
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "per_head", "batch_one"])
def test_single_query_attention_equals_the_float64_reference(kv_heads, mask_kind):
    q, k, v = inputs(kv_heads=kv_heads)
    mask = {
        "none": None,
        "bool": padding_mask(3, 11),
        "float": torch.zeros(3, 1, 1, 11).masked_fill(~padding_mask(3, 11), float("-inf")),
        "per_head": padding_mask(3, 11, heads=6),
        "batch_one": padding_mask(3, 11)[2:],  # hides 2 positions of every row: broadcast over the batch
    }[mask_kind]
    got = single_query_attention(q, k, v, mask, scaling=0.3)
    assert got.shape == (3, 1, 6, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(q, k, v, mask, 0.3), rtol=1e-6, atol=1e-6)
    if mask is not None:  # the masked positions really are ignored: changing their keys changes nothing
        k2 = k.clone()
        k2[2, :, :2] += 100.0
        assert torch.equal(single_query_attention(q, k2, v, mask, 0.3)[2], got[2])


def test_single_query_attention_rounds_once_like_the_flash_kernel_in_bf16():
    """bf16 inputs are computed in float32 and rounded at the end: as close to float64 as ``sdpa``'s own kernel,
    where scores rounded to bf16 (transformers' eager attention) would be several times further."""
    q, k, v = (t * 3 for t in inputs(batch=2, heads=9, kv_heads=3, length=200, dim=64, dtype=torch.bfloat16))
    ref = reference(q, k, v, None, 0.125)
    ours = (single_query_attention(q, k, v, None, 0.125).double() - ref).abs().max()
    flash = F.scaled_dot_product_attention(q, k, v, scale=0.125, enable_gqa=True).transpose(1, 2)
    assert ours <= 1.5 * (flash.double() - ref).abs().max() + 1e-3
    assert single_query_attention(q, k, v, None, 0.125).dtype == torch.bfloat16


def test_default_scale_is_one_over_sqrt_d():
    q, k, v = inputs()
    torch.testing.assert_close(
        single_query_attention(q, k, v, None, None), single_query_attention(q, k, v, None, 8**-0.5)
    )


def test_only_single_cpu_queries_without_extras_take_the_fast_path():
    q, k, v = inputs()
    assert fast_path_applies(q, k, None, 0.0, {})
    assert fast_path_applies(q, k, padding_mask(3, 11), 0.0, {"position_ids": None})
    assert not fast_path_applies(torch.randn(3, 6, 4, 8), k, None, 0.0, {})  # prefill / training: 4 queries
    # not CPU (CUDA keeps sdpa's kernels)
    assert not fast_path_applies(q.to("meta"), k.to("meta"), None, 0.0, {})
    assert not fast_path_applies(q, k, None, 0.1, {})  # dropout
    for extra in ({"softcap": 30.0}, {"sinks": torch.zeros(6)}, {"position_bias": torch.zeros(1)}):
        assert not fast_path_applies(q, k, None, 0.0, extra)
    assert not fast_path_applies(q, k, None, 0.0, {"output_attentions": True})
    assert not fast_path_applies(q, torch.randn(3, 4, 11, 8), None, 0.0, {})  # 6 heads over 4 key/value heads


def test_other_calls_go_to_sdpa_unchanged():
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    out, weights = decode_attention_forward(module, q, k, v, None, scaling=0.5)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.5, is_causal=True).transpose(1, 2)
    assert weights is None and torch.equal(out, expected)


def test_backbones_on_sdpa_are_switched_and_others_left_alone(monkeypatch):
    model = tiny_llama()
    assert model.config._attn_implementation == "sdpa"
    prepare_backbone(model)
    assert model.config._attn_implementation == NAME
    prepare_backbone(model)  # idempotent
    assert model.config._attn_implementation == NAME
    eager = tiny_llama(attn_implementation="eager")
    use_decode_attention(eager)
    assert eager.config._attn_implementation == "eager"
    monkeypatch.setenv(attention.ENV, "sdpa")
    kept = tiny_llama()
    prepare_backbone(kept)
    assert kept.config._attn_implementation == "sdpa"
    with attention_implementation(model, "sdpa"):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == NAME


@pytest.fixture
def fast_calls(monkeypatch) -> list[int]:
    """Counts the calls that took the fast path (so an equality below is not sdpa against itself)."""
    calls = []
    original = attention.single_query_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "single_query_attention", counted)
    return calls


def step_logits(model, name: str) -> torch.Tensor:
    """Prefill three left-padded prompts, then one decoding step with the cache: its (3, 1, vocab) logits."""
    ids = torch.tensor([[0, 0, 5, 6, 7], [0, 8, 9, 10, 11], [12, 13, 14, 15, 16]])
    mask = (ids != 0).long()
    with attention_implementation(model, name), torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        step_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        out = model(
            input_ids=torch.tensor([[20], [21], [22]]), attention_mask=step_mask, cache=cache, use_cache=True
        )
    return out.logits.float()


def test_a_decoding_step_gives_sdpas_logits(fast_calls):
    """float32: equal to rounding; bf16: no further from the float32 logits than ``sdpa``'s bf16 logits are."""
    model = tiny_llama(initializer_range=0.5)
    exact = step_logits(model, "sdpa")
    torch.testing.assert_close(step_logits(model, NAME), exact, rtol=1e-5, atol=1e-5)
    assert fast_calls == [3, 3]  # the step's two layers; the prefill went to sdpa
    model.to(torch.bfloat16)
    ulp = exact.abs().max() * 2**-8
    ours, theirs = ((step_logits(model, name) - exact).abs().max() for name in (NAME, "sdpa"))
    assert ours <= 1.5 * theirs + ulp, (ours, theirs)


@pytest.mark.parametrize("kwargs", [{}, {"fuse_streams": False}, {"streams": "base"}])
def test_imsm_decodes_the_same_tokens(kwargs, fast_calls):
    """Greedy tokens of IMSM (the doubled batch, two passes, the frozen stream) with left padding, eager and with
    the static cache's full-length mask: the same under ``imsm_sdpa`` as under ``sdpa``."""
    model = lively_imsm("query_aware")
    expected = greedy(model, PROMPTS, **kwargs)
    assert len(set(expected[0].tolist())) > 3
    prepare_backbone(model.backbone)
    assert model.backbone.config._attn_implementation == NAME
    assert torch.equal(greedy(model, PROMPTS, **kwargs), expected)
    assert fast_calls and len(fast_calls) % 2 == 0  # every step's two layers
    assert torch.equal(static(model, PROMPTS, **kwargs), expected)
