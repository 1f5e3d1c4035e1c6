"""Any peft option is either exact under IMSM or refused before training (imsm.model.guard, issue 21).

Each option of the matrix is attached through ``wrap_backbone`` (the path a run takes) to a tiny Llama with tied
embeddings. Refused options must name themselves. Accepted ones must keep IMSM's invariants after a training step
that moves everything that trains: the frozen stream equals a plain copy of the pretrained model (hidden states and,
through the shared head, logits); the head is still the plain model's; and the doubled-batch fusion, when chosen,
equals the two separate streams (hidden states and greedy tokens), otherwise the model decodes in two passes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from helpers import compose_train
from omegaconf import OmegaConf, open_dict

from imsm.model.build import wrap_backbone
from imsm.model.fusion import adapter_on_second_half, can_fuse_streams
from imsm.model.gate import build_gate
from imsm.model.siamese import positions_from_mask

FUSED, TWO_PASS = "fused", "two passes"
QV = ["q_proj", "v_proj"]

# (case, extra peft.config options, a model with biases?, expected: FUSED | TWO_PASS | the refused option's name)
MATRIX = [
    ("linear (q, v)", {}, False, FUSED),
    ("all-linear", {"target_modules": "all-linear"}, False, FUSED),
    ("embedding", {"target_modules": [*QV, "embed_tokens"]}, False, TWO_PASS),
    ("lm_head in target_modules", {"target_modules": [*QV, "lm_head"]}, False, "target_modules"),
    ("modules_to_save (MLP)", {"modules_to_save": ["down_proj"]}, False, TWO_PASS),
    ("modules_to_save (lm_head)", {"modules_to_save": ["lm_head"]}, False, "modules_to_save"),
    ("modules_to_save (tied embedding)", {"modules_to_save": ["embed_tokens"]}, False, TWO_PASS),
    (
        "trainable_token_indices (tied)",
        {"trainable_token_indices": [3, 4, 5]},
        False,
        "trainable_token_indices",
    ),
    ("bias=none, model with biases", {}, True, FUSED),
    ("bias=all", {"bias": "all"}, True, "bias"),
    ("bias=lora_only", {"bias": "lora_only"}, True, "bias"),
    ("lora_bias", {"lora_bias": True}, False, FUSED),
    ("use_rslora", {"use_rslora": True}, False, FUSED),
    ("use_dora", {"use_dora": True}, False, FUSED),
    ("use_dora, model with biases", {"use_dora": True}, True, FUSED),
    ("init_lora_weights=false", {"init_lora_weights": False}, False, FUSED),
    ("init_lora_weights=gaussian", {"init_lora_weights": "gaussian"}, False, FUSED),
    ("init_lora_weights=orthogonal", {"init_lora_weights": "orthogonal"}, False, FUSED),
    ("init_lora_weights=pissa", {"init_lora_weights": "pissa"}, False, "init_lora_weights"),
    ("init_lora_weights=olora", {"init_lora_weights": "olora"}, False, "init_lora_weights"),
    (
        "rank_pattern / alpha_pattern",
        {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 4}},
        False,
        FUSED,
    ),
    ("layers_to_transform", {"layers_to_transform": [1], "layers_pattern": "layers"}, False, FUSED),
]


def build(options: dict, biased: bool):
    """(IMSM model through ``wrap_backbone``, an untouched copy of the pretrained backbone)."""
    backbone = tiny_llama(attention_bias=True, mlp_bias=True) if biased else tiny_llama()
    plain = copy.deepcopy(backbone)
    cfg = compose_train(
        ["backbone=tiny_llama", "peft=lora", "gate=query_aware", "gate.rank=4", "gate.dropout=0.0"]
    )
    with open_dict(cfg):
        cfg.peft.config.target_modules = QV
        cfg.peft.config.lora_dropout = 0.0
        for key, value in options.items():
            cfg.peft.config[key] = value
    OmegaConf.resolve(cfg)
    torch.manual_seed(1)
    return wrap_backbone(backbone, cfg), plain


def batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    query = torch.zeros_like(ids)
    query[:, :6] = 1
    labels = ids.masked_fill(query.bool(), -100)
    return ids, mask, query, labels


def train_one_step(model) -> None:
    """One large SGD step on everything that trains, so a wrongly trainable base parameter would show."""
    ids, mask, query, labels = batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    model.train()
    model(ids, mask, query, labels).loss.backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize(("case", "options", "biased", "expected"), MATRIX, ids=[m[0] for m in MATRIX])
def test_peft_option_is_exact_or_refused(case, options, biased, expected):
    if expected not in (FUSED, TWO_PASS):
        with pytest.raises(ValueError, match=f"peft.config.{expected}"):
            build(options, biased)
        return
    model, plain = build(options, biased)
    train_one_step(model)
    assert_exact(model, plain, fused=expected == FUSED)


def assert_exact(model, plain, fused: bool) -> None:
    """The frozen stream and head are the pretrained model's; fusion (when chosen) equals the two streams."""
    ids, mask, _, _ = batch()
    with torch.no_grad():
        frozen = model.stream_hidden(ids, mask, adapter=False)
        tuned = model.stream_hidden(ids, mask, adapter=True)
        plain_out = plain(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert torch.allclose(frozen, plain_out.hidden_states[-1], atol=1e-6), (
            "frozen stream != pretrained model"
        )
        assert torch.allclose(model.lm_head(frozen), plain_out.logits, atol=1e-5), (
            "head != the pretrained head"
        )
        assert not torch.allclose(frozen, tuned, atol=1e-4), (
            "the trained adapter changes nothing: a vacuous check"
        )
    assert can_fuse_streams(model.peft_model, model.family) == fused
    if fused:
        with torch.no_grad(), adapter_on_second_half(model.peft_model, ids.shape[0]):
            doubled = torch.cat([mask, mask])
            both = model.family.last_hidden(
                model.backbone, torch.cat([ids, ids]), doubled, positions_from_mask(doubled), None
            )
        assert torch.allclose(both[:2], frozen, atol=1e-5) and torch.allclose(both[2:], tuned, atol=1e-5)
    kwargs = {"max_new_tokens": 6, "eos_token_id": 96, "pad_token_id": 0}
    two_pass = model.generate(ids, mask, fuse_streams=False, **kwargs)
    assert model.generate(ids, mask, **kwargs).tolist() == two_pass.tolist()  # whatever path it picks
    base = model.generate(ids, mask, streams="base", **kwargs)
    assert base.tolist() == plain_greedy(plain, ids, 6).tolist()


def plain_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy tokens of a plain transformers model, recomputed from scratch each step (no cache, no EOS)."""
    out = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=out).logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
    return out[:, ids.shape[1] :]


def test_a_second_adapter_leaves_the_frozen_stream_and_the_fusion_exact():
    """An inactive second adapter: the active one's layers are fused through peft's per-row selection."""
    from peft import LoraConfig

    model, plain = build({}, False)
    model.peft_model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    model.peft_model.set_adapter("default")
    train_one_step(model)
    assert_exact(model, plain, fused=True)


def test_the_gate_runs_in_fp32_under_autocast():
    gate = build_gate("query_aware", 32, rank=4, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    h = [torch.randn(3, 5, 32, generator=g) for _ in range(4)]
    reference = gate(h[0], h[1], h[2], h[3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = gate(h[0], h[1], h[2], h[3])
    assert under.dtype == torch.float32 and torch.equal(under, reference)
