"""Exact properties of the siamese model on tiny random Llamas (no weights downloaded)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_imsm

from imsm.data.collate import left_pad
from imsm.model.gate import FixedGate, LowRankGate, build_gate
from imsm.model.siamese import IMSMModel, pool_query

torch.set_grad_enabled(True)


def batch(seed: int = 0, n: int = 3, seq: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    query = torch.zeros_like(ids)
    query[:, :5] = 1
    labels = ids.clone()
    labels[:, :5] = -100
    return ids, mask, query, labels


def reference_logits(model: IMSMModel, ids, mask, adapter: bool) -> torch.Tensor:
    if adapter:
        return model.peft_model(input_ids=ids, attention_mask=mask).logits
    with model.peft_model.disable_adapter():
        return model.peft_model(input_ids=ids, attention_mask=mask).logits


def test_gate_one_is_frozen_model_and_zero_is_peft_model():
    model = make_imsm("fixed")
    ids, mask, query, _ = batch()
    base = reference_logits(model, ids, mask, adapter=False)
    tuned = reference_logits(model, ids, mask, adapter=True)
    assert (base - tuned).abs().max() > 1e-3  # the adapter really changes the model
    model.gate = FixedGate(1.0)
    assert torch.equal(model(ids, mask, query, return_logits=True).logits, base)
    model.gate = FixedGate(0.0)
    assert torch.equal(model(ids, mask, query, return_logits=True).logits, tuned)
    model.gate = None  # plain PEFT through the same code path
    assert torch.equal(model(ids, mask, query, return_logits=True).logits, tuned)


def test_mixing_formula_matches_the_paper():
    model = make_imsm("query_aware")
    ids, mask, query, _ = batch()
    hb = model.stream_hidden(ids, mask, adapter=False)
    ht = model.stream_hidden(ids, mask, adapter=True)
    qb, qt = hb[:, :5].mean(1), ht[:, :5].mean(1)
    gate = model.gate
    x = torch.cat([qb[:, None].expand_as(hb), hb, ht, qt[:, None].expand_as(ht)], -1)
    g = torch.sigmoid(x @ gate.down.weight.T @ gate.up.weight.T)
    expected = model.lm_head(g * hb + (1 - g) * ht)
    got = model(ids, mask, query, return_logits=True).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("gate", "factor"), [("query_aware", 5), ("no_query", 3), ("fixed", 0), ("none", 0)])
def test_trainable_count_is_peft_plus_gate(gate, factor):
    d, r = 32, 8
    model = make_imsm(gate, rank=r, hidden=d)
    peft_count = sum(p.numel() for n, p in model.peft_model.named_parameters() if "lora_" in n)
    counts = model.trainable_parameters()
    assert counts["adapter"] == peft_count
    # LoRA r=4 on q_proj (32->32) and v_proj (32->16: 2 kv heads x 8) in 2 layers: A (4x32) + B (out x 4)
    assert peft_count == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    assert counts["gate"] == factor * d * r
    assert counts["total"] == peft_count + factor * d * r
    model.check_trainable()


def test_only_adapter_and_gate_receive_gradients():
    model = make_imsm("query_aware")
    model.train()
    ids, mask, query, labels = batch()
    model(ids, mask, query, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        trainable = "lora_" in name or name.startswith("gate.")
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_check_trainable_rejects_unfrozen_backbone():
    model = make_imsm("query_aware")
    model.backbone.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(AssertionError, match="embed_tokens"):
        model.check_trainable()


def test_loss_is_response_only_cross_entropy():
    model = make_imsm("query_aware")
    ids, mask, query, labels = batch()
    out = model(ids, mask, query, labels=labels, return_logits=True)
    logits, target = out.logits[:, :-1], labels[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


def test_query_means_ignore_padding_on_either_side():
    model = make_imsm("query_aware")
    lengths = [4, 7, 6]
    prompts = [list(range(10 + i, 10 + i + n)) for i, n in enumerate(lengths)]
    alone = []
    for p in prompts:
        ids = torch.tensor([p])
        h = model.stream_hidden(ids, torch.ones_like(ids), adapter=True)
        alone.append(pool_query(h, torch.ones_like(ids)))
    alone = torch.cat(alone)
    # left padding (generation layout)
    ids, mask = left_pad(prompts, 0)
    h = model.stream_hidden(ids, mask, adapter=True)
    torch.testing.assert_close(pool_query(h, mask), alone, rtol=1e-5, atol=1e-5)
    # right padding (training layout)
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    h = model.stream_hidden(ids, mask, adapter=True)
    torch.testing.assert_close(pool_query(h, mask), alone, rtol=1e-5, atol=1e-5)


def test_max_pooling_and_bad_pooling():
    h = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pool_query(h, mask, "max"), torch.tensor([[3.0, 0.0]]))
    assert torch.equal(pool_query(h, mask, "mean"), torch.tensor([[2.0, -1.0]]))
    with pytest.raises(ValueError, match="pooling"):
        pool_query(h, mask, "median")


def naive_generate(
    model: IMSMModel, prompt: list[int], steps: int, eos: int, streams: str = "imsm"
) -> list[int]:
    """The authors' way: recompute everything over the whole sequence at every step, batch 1."""
    ids = list(prompt)
    out = []
    for _ in range(steps):
        x = torch.tensor([ids])
        mask = torch.ones_like(x)
        query = torch.zeros_like(x)
        query[:, : len(prompt)] = 1
        with torch.no_grad():
            if streams == "base":
                h = model.stream_hidden(x, mask, adapter=False)
            else:
                h = model.mixed_hidden(x, mask, query)
        tok = int(model.lm_head(h[:, -1]).argmax(-1))
        out.append(tok)
        if tok == eos:
            break
        ids.append(tok)
    return out


@pytest.mark.parametrize("gate", ["query_aware", "no_query", "fixed", "none"])
def test_cached_batched_generation_equals_naive_recomputation(gate):
    model = make_imsm(gate)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]
    ids, mask = left_pad(prompts, 0)
    eos = 96
    new = model.generate(ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    for row, p in zip(new.tolist(), prompts, strict=True):
        expected = naive_generate(model, p, 12, eos)
        assert row[: len(expected)] == expected
        assert all(t == 0 for t in row[len(expected) :])  # padded after EOS


def test_base_stream_generation_is_the_frozen_model():
    model = make_imsm("query_aware")
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids, mask = left_pad(prompts, 0)
    new = model.generate(ids, mask, max_new_tokens=6, eos_token_id=96, pad_token_id=0, streams="base")
    for row, p in zip(new.tolist(), prompts, strict=True):
        assert row[:6] == naive_generate(model, p, 6, 96, streams="base")[:6]


def test_generation_stops_when_every_row_hit_eos():
    model = make_imsm("fixed")
    ids, mask = left_pad([[5, 6, 7]], 0)
    first = int(model.generate(ids, mask, max_new_tokens=1, eos_token_id=96, pad_token_id=0)[0, 0])
    new = model.generate(ids, mask, max_new_tokens=10, eos_token_id=first, pad_token_id=0)
    assert new.shape == (1, 1)


def test_generate_rejects_right_padding():
    model = make_imsm("fixed")
    ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, torch.tensor([[1, 1, 0]]), max_new_tokens=2, eos_token_id=96, pad_token_id=0)


def test_gate_variants_and_errors():
    g = build_gate("query_aware", 16, rank=8)
    assert isinstance(g, LowRankGate) and g.down.weight.shape == (8, 64) and g.up.weight.shape == (16, 8)
    assert g.down.bias is None and g.up.bias is None
    g = build_gate("no_query", 16, rank=8)
    assert g.down.weight.shape == (8, 32)
    assert build_gate("none", 16) is None
    with pytest.raises(ValueError, match="query_aware"):
        build_gate("bogus", 16)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FixedGate(1.5)


def test_prompt_learning_methods_are_rejected():
    from omegaconf import OmegaConf

    from imsm.model.build import build_peft_config

    peft_cfg = OmegaConf.create(
        {"name": "prefix", "config": {"_target_": "peft.PrefixTuningConfig", "num_virtual_tokens": 4}}
    )
    with pytest.raises(ValueError, match="injected"):
        build_peft_config(peft_cfg, OmegaConf.create({}))


@pytest.mark.parametrize("gate", ["query_aware", "no_query", "fixed"])
def test_fused_doubled_batch_equals_two_streams(gate):
    model = make_imsm(gate)
    assert model.can_fuse_streams()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]
    ids, mask = left_pad(prompts, 0)
    fused = model.generate(ids, mask, max_new_tokens=10, eos_token_id=96, pad_token_id=0, fuse_streams=True)
    plain = model.generate(ids, mask, max_new_tokens=10, eos_token_id=96, pad_token_id=0, fuse_streams=False)
    assert torch.equal(fused, plain)
    for prefill_tokens in (12, 1):  # prompts read in row chunks (2 rows + 1, then row by row), caches joined
        for fuse in (True, False):
            chunked = model.generate(
                ids, mask, max_new_tokens=10, eos_token_id=96, pad_token_id=0, fuse_streams=fuse,
                prefill_tokens=prefill_tokens,
            )  # fmt: skip
            assert torch.equal(chunked, plain), (prefill_tokens, fuse)
    for row, p in zip(fused.tolist(), prompts, strict=True):
        expected = naive_generate(model, p, 10, 96)
        assert row[: len(expected)] == expected


def test_dora_is_not_fused():
    from peft import LoraConfig

    model = make_imsm(
        "query_aware",
        peft_config=LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM"
        ),
    )
    assert not model.can_fuse_streams()
