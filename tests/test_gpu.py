"""The CUDA path (skipped without a GPU): cached generation, bf16 training, the Trainer on the device."""

from __future__ import annotations

import pytest
import torch
from conftest import make_imsm
from test_model import batch

from imsm.data.collate import left_pad

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_cached_generation_equals_naive_and_fused_equals_plain():
    model = make_imsm("query_aware").cuda()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]
    ids, mask = left_pad(prompts, 0)
    ids, mask = ids.cuda(), mask.cuda()
    fused = model.generate(ids, mask, max_new_tokens=10, eos_token_id=96, pad_token_id=0, fuse_streams=True)
    plain = model.generate(ids, mask, max_new_tokens=10, eos_token_id=96, pad_token_id=0, fuse_streams=False)
    assert torch.equal(fused, plain)
    for row, p in zip(fused.tolist(), prompts, strict=True):
        ids1 = torch.tensor([p], device="cuda")
        out = []
        seq = ids1
        for _ in range(10):
            query = torch.zeros_like(seq)
            query[:, : len(p)] = 1
            with torch.no_grad():
                h = model.mixed_hidden(seq, torch.ones_like(seq), query)
            tok = int(model.lm_head(h[:, -1]).argmax(-1))
            out.append(tok)
            if tok == 96:
                break
            seq = torch.cat([seq, torch.tensor([[tok]], device="cuda")], dim=1)
        assert row[: len(out)] == out


def test_cuda_bf16_training_step_updates_only_adapter_and_gate():
    model = make_imsm("query_aware").cuda().to(torch.bfloat16)
    model.gate.float()
    model.train()
    ids, mask, query, labels = (t.cuda() for t in batch())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, mask, query, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n or n.startswith("gate.") for n in grads)
    assert model.gate.down.weight.dtype == torch.float32


def test_cuda_timing_helpers_measure_device_work():
    from imsm.backbones import autocast_context
    from imsm.timing import peak_memory_mib, timed

    x = torch.randn(2048, 2048, device="cuda")
    assert timed(lambda: x @ x, "cuda") > 0
    # 64 MiB allocated inside the measured span must show in the peak
    assert peak_memory_mib(lambda: torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda"), "cuda") >= 64
    with autocast_context(torch.device("cuda", 0), "bf16"):
        assert (x @ x).dtype == torch.bfloat16
