"""Fused decoding (both streams as one doubled batch, ``imsm.model.fusion``) equals two passes, for every method.

Each method is attached to a tiny Llama (DoRA and IA3 also with biases) and every adapter parameter is moved away
from its no-op initialisation, so the tuned stream really differs from the frozen one. Greedy decoding with the KV cache, a
left-padded batch of 3 prompts of different lengths: the fused tokens are the two-pass tokens, and the logits the
head computes at every step agree within ``LOGITS_ATOL`` (fp32; only the matmuls' row count differs between the
paths: 2b rows in one call instead of b rows in two calls). Anything the fusion cannot split exactly runs in two
passes, and forcing the fusion on it raises.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model

from imsm.data.collate import left_pad
from imsm.model.chatglm import ChatGLMFamily
from imsm.model.fusion import adapter_on_second_half, can_fuse_streams
from imsm.model.gate import build_gate
from imsm.model.loramoe import LoRAMoEConfig, LoRAMoEModel
from imsm.model.siamese import IMSMModel, positions_from_mask

LOGITS_ATOL = 1e-5  # fp32 logits of order 1; the largest difference measured on CPU was below 1e-6
QV_DOWN = ["q_proj", "v_proj", "down_proj"]
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]
DECODE = {"max_new_tokens": 10, "eos_token_id": 96, "pad_token_id": 0}

METHODS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=QV_DOWN, init_lora_weights=False),
    "dora": lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=QV_DOWN, use_dora=True, init_lora_weights=False
    ),
    "adalora": lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=QV_DOWN),
    # k, v: the output scaled; down_proj: a feed-forward module, its input scaled
    "ia3": lambda: IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
    "loha": lambda: LoHaConfig(r=4, alpha=4, target_modules=QV_DOWN, init_weights=False),
    "loramoe": lambda: LoRAMoEConfig(num_experts=2, r=2, lora_alpha=4, lora_dropout=0.0),
}


def build(method: str, biased: bool = False, seed: int = 0) -> IMSMModel:
    """A tiny IMSM model with ``method``'s adapter, every adapter parameter moved by seeded noise (eval mode)."""
    backbone = tiny_llama(seed=seed, **({"attention_bias": True, "mlp_bias": True} if biased else {}))
    for p in backbone.parameters():
        p.requires_grad_(False)
    config = METHODS[method]()
    torch.manual_seed(seed + 1)
    peft_model = LoRAMoEModel(backbone, config) if method == "loramoe" else get_peft_model(backbone, config)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:  # the adapter's (AdaLoRA's ranknum is a constant and stays)
                p.add_(1.0 * torch.randn(p.shape, generator=g))
    model = IMSMModel(peft_model, build_gate("query_aware", 32, rank=4, dropout=0.0))
    return model.eval()


def decode_with_logits(model: IMSMModel, fuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens (3, n) and the head's logits at every step (n, 3, vocab)."""
    ids, mask = left_pad(PROMPTS, 0)
    logits = []
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: logits.append(out))
    try:
        tokens = model.generate(ids, mask, fuse_streams=fuse, **DECODE)
    finally:
        handle.remove()
    return tokens, torch.stack(logits)


# biases matter where the adapter touches the base output: DoRA rescales it without its bias, IA3 scales it whole
CASES = [(m, False) for m in METHODS] + [("dora", True), ("ia3", True)]


@pytest.mark.parametrize(
    ("method", "biased"), CASES, ids=[m + (" with biases" if b else "") for m, b in CASES]
)
def test_fused_decoding_equals_two_passes(method, biased):
    model = build(method, biased)
    assert model.can_fuse_streams()
    fused, fused_logits = decode_with_logits(model, fuse=True)
    two_pass, two_pass_logits = decode_with_logits(model, fuse=False)
    assert torch.equal(fused, two_pass)
    assert fused_logits.shape == two_pass_logits.shape
    assert torch.allclose(fused_logits, two_pass_logits, rtol=0, atol=LOGITS_ATOL), (
        (fused_logits - two_pass_logits).abs().max().item()
    )
    assert model.generate(*left_pad(PROMPTS, 0), **DECODE).tolist() == fused.tolist()  # fused by default


@pytest.mark.parametrize("method", list(METHODS))
def test_doubled_batch_halves_are_the_frozen_and_the_tuned_stream(method):
    """The prompts through the doubled batch (no cache): rows [:b] frozen, rows [b:] tuned, and they differ."""
    model = build(method)
    ids, mask = left_pad(PROMPTS, 0)
    with torch.no_grad():
        frozen = model.stream_hidden(ids, mask, adapter=False)
        tuned = model.stream_hidden(ids, mask, adapter=True)
        doubled = torch.cat([mask, mask])
        with adapter_on_second_half(model.peft_model, ids.shape[0]):
            both = model.family.last_hidden(
                model.backbone, torch.cat([ids, ids]), doubled, positions_from_mask(doubled), None
            )
    real = mask.bool()
    assert not torch.allclose(frozen[real], tuned[real], atol=1e-3), (
        "the adapter changes nothing: a vacuous check"
    )
    assert torch.allclose(both[:3][real], frozen[real], rtol=0, atol=1e-5)
    assert torch.allclose(both[3:][real], tuned[real], rtol=0, atol=1e-5)
    assert all("forward" not in vars(m) for m in model.peft_model.modules())  # the layers are restored


def test_merged_adapter_is_not_fused():
    """Merged weights carry the adapter into the frozen rows too: never split. (peft unmerges them as soon as the
    frozen stream runs inside ``disable_adapter()``, so decoding still gives the two-pass tokens.)"""
    model = build("lora")
    expected = model.generate(*left_pad(PROMPTS, 0), fuse_streams=False, **DECODE)
    model.peft_model.merge_adapter()
    assert not model.can_fuse_streams()
    with pytest.raises(ValueError, match="cannot split"), adapter_on_second_half(model.peft_model, 3):
        pass
    assert torch.equal(model.generate(*left_pad(PROMPTS, 0), **DECODE), expected)


def test_a_method_without_a_split_decodes_in_two_passes_and_forcing_it_raises():
    backbone = tiny_llama()
    config = LoKrConfig(r=4, alpha=4, target_modules=QV_DOWN, init_weights=False)
    model = IMSMModel(
        get_peft_model(backbone, config), build_gate("query_aware", 32, rank=4, dropout=0.0)
    ).eval()
    assert not model.can_fuse_streams()
    assert model.generate(*left_pad(PROMPTS, 0), **DECODE).shape[0] == 3  # two passes, chosen by itself
    with pytest.raises(ValueError, match=r"cannot split \['Linear'\]"):
        model.generate(*left_pad(PROMPTS, 0), fuse_streams=True, **DECODE)


def test_seq_first_family_is_not_fused():
    model = build("ia3")
    assert can_fuse_streams(model.peft_model, model.family)
    assert not can_fuse_streams(model.peft_model, ChatGLMFamily())
