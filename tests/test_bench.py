"""The benchmark script: it runs end to end, and its naive decoder decodes what IMSM decodes."""

from __future__ import annotations

import json
import math

import torch
from conftest import make_imsm

from imsm import bench


def test_naive_decoder_gives_the_same_tokens_as_imsm():
    # the speed-up is only meaningful if both decoders produce the same greedy continuation
    model = make_imsm("query_aware")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    fast = model.generate(ids, torch.ones_like(ids), max_new_tokens=10, eos_token_id=-1, pad_token_id=0)
    assert bench.NaiveSiamese(model).generate(ids, 10).tolist() == fast.tolist()


def test_training_references_time_what_they_say():
    model = make_imsm("query_aware")
    batch = bench.train_batch(97, 2, 12, 6, "cpu")
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    before = [p.detach().clone() for p in lora]
    bench.train_step_fn(model, batch, "fp32", "cpu", bench.hf_loss_fn(model, batch))()
    # the HF-loss step trains LoRA
    assert all(not torch.equal(a, b) for a, b in zip(before, lora, strict=True))
    gate = [p.detach().clone() for p in model.gate.parameters()]
    frozen = bench.frozen_forward_fn(model, batch, "fp32", "cpu")()
    assert all(torch.equal(a, b) for a, b in zip(gate, model.gate.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())  # no gradients: the frozen stream alone
    assert not frozen.requires_grad
    # it is the frozen model: the last hidden state of a plain copy of the backbone with the adapter removed
    plain = bench.NaiveSiamese(model).frozen
    expected = plain(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(frozen, expected)
    tuned = model.stream_hidden(batch["input_ids"], batch["attention_mask"], adapter=True)
    assert not torch.allclose(frozen, tuned)  # and the adapter was really off


def test_quick_benchmark_writes_every_ratio(tmp_path, capsys):
    bench.main(["--quick", "--skip-memory", "--repeats", "1", "--batches", "1", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("bench_tiny_llama_cpu_*.json")
    ratios = json.loads(path.read_text())["ratios"]
    for precision in ("fp32", "bf16"):
        for name in (
            "train_step_time_imsm/vanilla",
            "train_step_floor_(vanilla+frozen_forward)/vanilla",
            "train_step_time_imsm/hf_peft_loss",
            "decode_tok_s_imsm/vanilla",
            "decode_tok_s_imsm/hf_generate",
        ):
            key = f"{name}_{precision}" if name.startswith("train") else f"{name}_{precision}_b1"
            assert math.isfinite(ratios[key]) and ratios[key] > 0, key
    assert ratios["train_step_floor_(vanilla+frozen_forward)/vanilla_fp32"] > 1.0
    assert ratios["speedup_imsm_vs_naive_64tok"] > 0
    out = capsys.readouterr().out
    assert "train_step_time_imsm/vanilla_fp32" in out and ("PASS" in out or "MISS" in out)
