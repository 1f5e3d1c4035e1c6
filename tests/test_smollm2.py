"""The embedded real model: preparation from the GGUF, and cached generation on it."""

from __future__ import annotations

import torch
from conftest import REPO
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from test_model import naive_generate

from imsm.backbones import load_backbone, prepare_smollm2
from imsm.data.collate import left_pad
from imsm.model.gate import build_gate
from imsm.model.siamese import IMSMModel


def test_prepared_copy_is_plain_safetensors():
    path = prepare_smollm2()
    assert (path / "model.safetensors").exists()
    config = (path / "config.json").read_text()
    assert "quantization_config" not in config


def test_cached_generation_equals_naive_on_smollm2():
    cfg = OmegaConf.load(REPO / "imsm" / "conf" / "backbone" / "smollm2.yaml")
    backbone, tok = load_backbone(cfg, device="cpu")
    assert backbone.config.hidden_size == 576
    peft_model = get_peft_model(
        backbone,
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    torch.manual_seed(0)
    model = IMSMModel(peft_model, build_gate("query_aware", 576, rank=8, dropout=0.0)).eval()
    prompts = [tok("The capital of France is")["input_ids"], tok("1, 2, 3, 4,")["input_ids"]]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    new = model.generate(
        ids, mask, max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    for row, p in zip(new.tolist(), prompts, strict=True):
        expected = naive_generate(model, p, 8, tok.eos_token_id)
        assert row[: len(expected)] == expected
