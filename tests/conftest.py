"""Shared fixtures: tiny random models built offline, the real data directory when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from imsm.model.gate import build_gate
from imsm.model.siamese import IMSMModel

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("IMSM_DATA_DIR") or REPO.parent / "shared" / "data")


def tiny_llama(vocab: int = 97, hidden: int = 32, seed: int = 0, **config) -> LlamaForCausalLM:
    """A random 2-layer Llama with tied embeddings; ``config``: more ``LlamaConfig`` fields (e.g. attention_bias)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        **config,
    )
    return LlamaForCausalLM(cfg).eval()


def make_imsm(
    gate: str = "query_aware", rank: int = 4, seed: int = 0, peft_config=None, hidden: int = 32
) -> IMSMModel:
    """Tiny siamese model whose adapter is *not* a no-op (random LoRA B), so both streams differ."""
    backbone = tiny_llama(hidden=hidden, seed=seed)
    for p in backbone.parameters():
        p.requires_grad_(False)
    config = peft_config or LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(backbone, config)
    torch.manual_seed(seed + 1)
    g = build_gate(gate, hidden, rank=rank, dropout=0.0)
    model = IMSMModel(peft_model, g)
    model.eval()
    return model


@pytest.fixture
def data_dir() -> Path:
    if not (DATA_DIR / "SOURCES.md").exists():
        pytest.skip(f"real data directory not found at {DATA_DIR} (set IMSM_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """One trained tiny_llama IMSM run (query-aware gate, GSM8K fixture, 2 steps), shared by the tests that only
    read a finished run: reload, evaluate, report, golden numbers. Returns (run_dir, the metrics dict)."""
    from helpers import compose_train, tiny_overrides, write_gsm

    from imsm.train import train

    root = tmp_path_factory.mktemp("tiny_run")
    data = write_gsm(root / "data")
    result = train(compose_train([*tiny_overrides(root / "run", data), "eval_datasets=[gsm8k]"]))
    return root / "run", result
