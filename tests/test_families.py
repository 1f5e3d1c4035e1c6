"""The last hidden state and head of every architecture family that can be built offline.

For each family a tiny random model: the head applied to ``stream_hidden`` must give the model's own logits with the
adapter on and off, and cached IMSM generation must equal a full recomputation. ChatGLM3's remote code is not
available offline, so its adapter is tested on ``ChatGLMStandIn`` (same module names, shapes, (seq, batch, d) layout
and tuple cache).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from imsm.data.collate import left_pad
from imsm.model.chatglm import ChatGLMFamily, ChatGLMStandIn, ChatGLMStandInConfig
from imsm.model.families import DecoderFamily, SoftcappedHead, family_of, prepare_backbone
from imsm.model.gate import build_gate
from imsm.model.siamese import IMSMModel

VOCAB = 97
SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
}
FAMILIES = {  # model_type -> (extra config, LoRA targets)
    "llama": ({}, ["q_proj", "v_proj"]),
    "qwen2": ({}, ["q_proj", "v_proj"]),
    "mistral": ({"head_dim": 8}, ["q_proj", "v_proj"]),
    "gemma": ({"head_dim": 8}, ["q_proj", "v_proj"]),
    "gemma2": ({"head_dim": 8, "final_logit_softcapping": 5.0}, ["q_proj", "v_proj"]),
    "chatglm": ({}, ["query_key_value"]),
}


def tiny_backbone(model_type: str):
    torch.manual_seed(0)
    extra, _ = FAMILIES[model_type]
    if model_type == "chatglm":
        config = ChatGLMStandInConfig(
            hidden_size=32, num_layers=2, num_attention_heads=4, kv_channels=8, multi_query_group_num=2,
            ffn_hidden_size=48, padded_vocab_size=VOCAB,
        )  # fmt: skip
        return ChatGLMStandIn(config).eval()
    config = AutoConfig.for_model(model_type, **SMALL, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_imsm(model_type: str, gate: str = "query_aware") -> IMSMModel:
    backbone = prepare_backbone(tiny_backbone(model_type))  # as build_model / load_model do
    for p in backbone.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=FAMILIES[model_type][1], init_lora_weights=False)
    torch.manual_seed(1)
    model = IMSMModel(get_peft_model(backbone, lora), build_gate(gate, 32, rank=4, dropout=0.0))
    return model.eval()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_head_of_stream_hidden_is_the_models_own_logits(model_type):
    model = tiny_imsm(model_type)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in one row
    with torch.no_grad():
        for adapter in (True, False):
            hidden = model.stream_hidden(ids, mask, adapter=adapter)
            assert hidden.shape == (2, 7, 32)
            if adapter:
                reference = model.peft_model(input_ids=ids, attention_mask=mask).logits
            else:
                with model.peft_model.disable_adapter():
                    reference = model.peft_model(input_ids=ids, attention_mask=mask).logits
            got = model.lm_head(hidden)
            # compare real positions only (padded rows may differ in how each family masks them)
            torch.testing.assert_close(got[mask.bool()], reference[mask.bool()], rtol=1e-4, atol=1e-4)


def naive_greedy(model: IMSMModel, prompt: list[int], steps: int) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(steps):
        x = torch.tensor([ids])
        query = torch.zeros_like(x)
        query[:, : len(prompt)] = 1
        with torch.no_grad():
            h = model.mixed_hidden(x, torch.ones_like(x), query)
        out.append(int(model.lm_head(h[:, -1]).argmax(-1)))
        ids.append(out[-1])
    return out


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_cached_generation_equals_recomputation(model_type):
    model = tiny_imsm(model_type)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23]]
    ids, mask = left_pad(prompts, 0)
    # ChatGLM's layers see (seq, batch, d), so peft's per-row adapter selection (fused streams) cannot apply
    fuse = None if model.family.batch_first else False
    expected = [naive_greedy(model, prompt, 6) for prompt in prompts]
    # prefill in one forward per stream, in chunks of 2 rows (+ 1), and row by row: the joined caches decode alike
    for prefill_tokens in (None, 10, 1):
        new = model.generate(
            ids, mask, max_new_tokens=6, eos_token_id=VOCAB + 1, pad_token_id=0, fuse_streams=fuse,
            prefill_tokens=prefill_tokens,
        )  # fmt: skip
        assert new.tolist() == expected, prefill_tokens


def test_families_are_chosen_by_model_type():
    assert isinstance(family_of(tiny_backbone("llama")), DecoderFamily)
    glm = tiny_backbone("chatglm")
    family = family_of(glm)
    assert isinstance(family, ChatGLMFamily)
    assert family.head(glm) is glm.transformer.output_layer
    assert family.decoder(glm) is glm.transformer
    head = family_of(tiny_backbone("gemma2")).head(tiny_backbone("gemma2"))
    assert isinstance(head, SoftcappedHead) and head.cap == 5.0


def test_chatglm_config_gets_the_layer_count_dynamic_cache_reads():
    from transformers import DynamicCache

    glm = tiny_backbone("chatglm")
    with pytest.raises(AttributeError):  # like the real remote ChatGLMConfig: only num_layers
        DynamicCache(config=glm.config)
    prepare_backbone(glm)
    assert glm.config.num_hidden_layers == 2
    DynamicCache(config=glm.config)
    assert not family_of(glm).batch_first and family_of(tiny_backbone("llama")).batch_first


def test_chatglm_adapter_transposes_the_seq_first_layout():
    """The stand-in returns (seq, batch, d) like ChatGLM3; the adapter hands IMSM (batch, seq, d)."""
    glm = tiny_backbone("chatglm")
    ids = torch.randint(3, VOCAB, (3, 5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        raw = glm.transformer(ids, attention_mask=mask).last_hidden_state
        assert raw.shape == (5, 3, 32)
        got = ChatGLMFamily().last_hidden(glm, ids, mask, None, None)
    assert torch.equal(got, raw.transpose(0, 1))


def test_chatglm_standin_has_chatglm3_shapes():
    with torch.device("meta"):
        glm = ChatGLMStandIn(ChatGLMStandInConfig())
    layer = glm.transformer.encoder.layers[0]
    assert layer.self_attention.query_key_value.weight.shape == (4608, 4096)
    assert layer.self_attention.query_key_value.bias is not None
    assert layer.mlp.dense_h_to_4h.weight.shape == (2 * 13696, 4096)
    assert layer.mlp.dense_4h_to_h.weight.shape == (4096, 13696)
    assert glm.transformer.output_layer.weight.shape == (65024, 4096)
    assert len(glm.transformer.encoder.layers) == 28 and hasattr(glm.transformer.encoder, "final_layernorm")
