"""Golden numbers: fixed-init tiny models, exact expected values (torchtune's habit).

They catch numeric drift when peft, transformers or torch change, and any refactor that changes what the model
computes. The values were recorded on CPU, fp32, torch 2.13 / transformers 5.24 / peft 0.21.2, before the redesign;
if a dependency upgrade moves them, check the change is explained before re-recording.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_imsm

from imsm.model.build import load_model

RTOL = 1e-5


def fixed_batch() -> tuple[torch.Tensor, ...]:
    """2 rows: 5 prompt tokens + 3 response tokens, the second row right-padded by one."""
    ids = torch.tensor([[5, 17, 23, 42, 8, 61, 12, 3], [9, 33, 71, 2, 14, 50, 7, 0]])
    attn = torch.tensor([[1] * 8, [1] * 7 + [0]])
    query = torch.tensor([[1] * 5 + [0] * 3] * 2)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 7] = -100
    return ids, attn, query, labels


def test_one_optimizer_step_gives_the_recorded_loss_and_gate_mean():
    torch.manual_seed(0)
    model = make_imsm("query_aware", rank=4, seed=0).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids, attn, query, labels = fixed_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 10  # 2 layers x (q, v) x (A, B) + W_A, W_B
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    loss = model(ids, attn, query, labels).loss
    assert loss.item() == pytest.approx(4.5665764808654785, rel=RTOL)
    loss.backward()
    opt.step()
    with torch.no_grad():
        assert model(ids, attn, query, labels).loss.item() == pytest.approx(4.503674030303955, rel=RTOL)
        base = model.stream_hidden(ids, attn, adapter=False)
        tuned = model.stream_hidden(ids, attn, adapter=True)
        mask = query.unsqueeze(-1).float()
        bq, tq = (base * mask).sum(1) / mask.sum(1), (tuned * mask).sum(1) / mask.sum(1)
        assert model.gate(base, tuned, bq, tq).mean().item() == pytest.approx(0.5125999450683594, rel=RTOL)


@pytest.mark.parametrize("fuse", [True, False])
def test_greedy_tokens_are_the_recorded_ones(fuse):
    model = make_imsm("query_aware", rank=4, seed=0)
    ids = torch.tensor([[0, 0, 5, 17, 23, 42, 8], [9, 33, 71, 2, 14, 50, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    expected = {
        "imsm": [[8] * 10, [7] * 10],
        "base": [[8] * 10, [7] * 10],
        "tuned": [[5] * 10, [7, 7, 7] + [32] * 7],
    }
    for streams, tokens in expected.items():
        out = model.generate(
            ids,
            mask,
            max_new_tokens=10,
            eos_token_id=96,
            pad_token_id=0,
            streams=streams,
            fuse_streams=fuse if streams == "imsm" else None,
        )
        assert out.tolist() == tokens, streams


def test_tiny_run_gives_the_recorded_loss_metrics_and_logits(tiny_run):
    run_dir, result = tiny_run
    assert result["train_loss"] == pytest.approx(10.857254028320312, rel=RTOL)
    assert result["global_steps"] == 2
    assert result["metrics"] == {"accuracy": 0.0, "n": 3}
    assert result["base_metrics"] == {"accuracy": 0.0, "n": 3}
    assert result["eval_datasets"] == {"gsm8k": {"accuracy": 0.0, "n": 3}}
    assert result["trainable_parameters"] == {"adapter": 7168, "gate": 2560, "total": 9728}
    model, _ = load_model(run_dir, device="cpu")
    ids = torch.tensor([[2, 24960, 553, 216, 35, 13855, 284, 34680, 216, 36, 540, 30]])
    query = torch.zeros_like(ids)
    query[:, :8] = 1
    labels = ids.clone()
    labels[:, :8] = -100
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids), query, labels, return_logits=True)
    assert out.loss.item() == pytest.approx(10.852252960205078, rel=RTOL)
    assert out.logits.double().sum().item() == pytest.approx(362.4644574690136, rel=1e-4)
    assert out.logits[0, -1, :3].tolist() == pytest.approx(
        [-0.22250671684741974, 0.33815717697143555, -0.036249320954084396], rel=RTOL, abs=1e-6
    )
