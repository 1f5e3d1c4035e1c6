"""Exact properties of the siamese model on tiny random Llamas (no weights downloaded)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from conftest import make_imsm
from helpers import CONF, compose_train
from hydra.utils import get_method
from omegaconf import OmegaConf
from peft import PeftModel

import imsm.model
from imsm.backbones import load_backbone
from imsm.constants import IGNORE_INDEX
from imsm.data.collate import left_pad
from imsm.model.adapters import PEFT, AdapterModel, adapter_kind, peft_type_of, saved_peft_type
from imsm.model.build import build_model, load_model
from imsm.model.decoding import greedy_generate, greedy_steps
from imsm.model.fusion import can_fuse_streams
from imsm.model.gate import (
    GATE_ARGUMENTS,
    GATE_BUILDERS,
    GATE_TYPES,
    FixedGate,
    LowRankGate,
    build_gate,
    gate_from_config,
)
from imsm.model.loramoe import LoRAMoEModel
from imsm.model.siamese import IMSMModel, pool_query, positions_from_mask

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


def test_small_prompts_are_read_as_one_doubled_batch_and_large_ones_stream_by_stream(monkeypatch):
    from imsm.model import decoding

    assert decoding.fuses_prefill(True, 2, 256, rows=16) and not decoding.fuses_prefill(True, 2, 257, rows=16)
    assert not decoding.fuses_prefill(True, 4, 10, rows=3)  # not in one prefill chunk
    assert not decoding.fuses_prefill(False, 1, 10, rows=16)  # two-pass decoding: two prefills
    model = make_imsm("query_aware")
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]], 0)
    kwargs = {"max_new_tokens": 10, "eos_token_id": 96, "pad_token_id": 0}
    calls = []
    real = decoding.prefill_both
    monkeypatch.setattr(decoding, "prefill_both", lambda *a: calls.append(1) or real(*a))
    fused = model.generate(ids, mask, **kwargs)
    assert calls == [1]  # 3 x 6 tokens: one doubled pass
    base, tuned, cache = real(model, ids, mask, positions_from_mask(mask))
    with torch.no_grad():  # its halves are each stream on its own, and its cache holds M's rows first
        torch.testing.assert_close(base, model.stream_hidden(ids, mask, adapter=False), rtol=0, atol=1e-6)
        torch.testing.assert_close(tuned, model.stream_hidden(ids, mask, adapter=True), rtol=0, atol=1e-6)
    assert cache.layers[0].keys.shape[0] == 6
    monkeypatch.setattr(decoding, "FUSED_PREFILL_TOKENS", 0)  # every prompt is "large": two prefills, joined
    assert torch.equal(model.generate(ids, mask, **kwargs), fused) and calls == [1]
    assert torch.equal(model.generate(ids, mask, fuse_streams=False, **kwargs), fused)


def test_greedy_steps_yields_one_token_per_row_at_a_time():
    model = make_imsm("query_aware")
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], 0)
    steps = greedy_steps(model, ids, mask, 7, eos_token_id=-1, pad_token_id=0)
    tokens = [next(steps) for _ in range(7)]
    assert all(t.shape == (2,) for t in tokens)
    with pytest.raises(StopIteration):
        next(steps)
    assert all("forward" not in vars(m) for m in model.peft_model.modules())  # the fused layers are restored
    expected = model.generate(ids, mask, max_new_tokens=7, eos_token_id=-1, pad_token_id=0)
    assert torch.equal(torch.stack(tokens, dim=1), expected)


def test_dora_is_fused():
    """DoRA's magnitude rescaling runs on the tuned half of the doubled batch (tests/test_fusion_methods.py)."""
    from peft import LoraConfig

    model = make_imsm(
        "query_aware",
        peft_config=LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM"
        ),
    )
    assert model.can_fuse_streams()


# --- gates by _target_ (conf/gate/*.yaml) ------------------------------------------------------------------------

GATE_FILES = sorted(p.stem for p in (Path(CONF) / "gate").glob("*.yaml"))


def test_every_gate_type_has_a_file_and_a_builder():
    assert sorted(GATE_TYPES) == GATE_FILES
    assert sorted(GATE_BUILDERS) == sorted(t for t in GATE_TYPES if t != "none")


@pytest.mark.parametrize("gate", GATE_FILES)
def test_gate_file_names_its_builder_with_only_its_own_arguments(gate):
    node = compose_train([f"gate={gate}"]).gate
    assert node.type == gate and isinstance(node.label, str)
    built = gate_from_config(node, 16)
    if gate == "none":
        assert node.module is None and built is None
        return
    module = OmegaConf.to_container(node.module, resolve=True)
    target = module.pop("_target_")
    assert get_method(target) is GATE_BUILDERS[gate]
    assert sorted(module) == sorted(GATE_ARGUMENTS[gate])  # no other gate's keys
    assert built.kind == gate and isinstance(built, (LowRankGate, FixedGate))
    assert isinstance(built.needs_query, bool)


@pytest.mark.parametrize("gate", GATE_FILES)
def test_swept_gate_keys_override_under_every_gate(gate):
    """A sweep crossing ``gate=...`` with ``gate.rank`` / ``gate.lr`` / ``gate.pooling`` composes for every gate,
    and the run-dir name's ``${gate.type}`` resolves."""
    cfg = compose_train([f"gate={gate}", "gate.rank=16", "gate.lr=0.01", "gate.pooling=max"])
    assert (cfg.gate.get("rank"), cfg.gate.get("lr"), cfg.gate.pooling, cfg.gate.type) == (
        16,
        0.01,
        "max",
        gate,
    )
    built = gate_from_config(cfg.gate, 16)
    if gate in ("query_aware", "no_query"):
        assert built.rank == 16 and built.up.weight.shape == (16, 16)


def test_gate_arguments_reach_the_module():
    qa = gate_from_config(compose_train(["gate=query_aware", "gate.dropout=0", "gate.rank=3"]).gate, 8)
    assert qa.dropout.p == 0.0 and qa.down.weight.shape == (3, 32)
    fixed = gate_from_config(compose_train(["gate=fixed", "gate.value=0.25"]).gate, 8)
    assert fixed.value == 0.25


def test_gate_config_errors_and_old_flat_configs():
    with pytest.raises(ValueError, match="has no gate.module"):
        gate_from_config(OmegaConf.create({"type": "query_aware", "module": None}), 8)
    wrong = {"type": "fixed", "module": {"_target_": "imsm.model.gate.query_aware_gate", "rank": 2}}
    with pytest.raises(ValueError, match="builds a 'query_aware' gate but gate.type='fixed'"):
        gate_from_config(OmegaConf.create(wrong), 8)
    # a config written before gates named their _target_ (every key, no module) still builds its gate
    flat = {"type": "no_query", "rank": 2, "dropout": 0.0, "lr": None, "pooling": "mean", "value": 0.5}
    g = gate_from_config(OmegaConf.create(flat), 8)
    assert g.kind == "no_query" and g.down.weight.shape == (2, 16) and g.dropout.p == 0.0
    assert gate_from_config(OmegaConf.create({**flat, "type": "none"}), 8) is None


def test_build_gate_passes_each_builder_only_its_arguments():
    fixed = build_gate("fixed", 16, rank=4, dropout=0.3, value=0.2)  # rank / dropout are not the fixed gate's
    assert isinstance(fixed, FixedGate) and fixed.value == 0.2 and not list(fixed.parameters())


# --- layout: decoding, fusion, adapters, save / load on the class --------------------------------------------------


def test_siamese_does_not_import_the_decoder_at_module_level():
    """``imsm.model.decoding`` imports the model; the model imports it only inside ``generate``: no import cycle.
    (The data/model layering is checked in tests/test_packaging.py.)"""
    tree = ast.parse(Path(imsm.model.siamese.__file__).read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level |= {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
    assert "imsm.model.decoding" not in top_level
    assert "imsm.constants.IGNORE_INDEX" in top_level and IGNORE_INDEX == -100


def test_generate_delegates_to_the_decoder():
    model = make_imsm("query_aware")
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], 0)
    kwargs = {"max_new_tokens": 5, "eos_token_id": 96, "pad_token_id": 0}
    assert torch.equal(model.generate(ids, mask, **kwargs), greedy_generate(model, ids, mask, **kwargs))
    with pytest.raises(ValueError, match="streams='both' is not one of"):
        model.generate(ids, mask, streams="both", **kwargs)


def test_fusion_functions_match_the_model_methods():
    model = make_imsm("query_aware")
    assert can_fuse_streams(model.peft_model, model.family) is model.can_fuse_streams() is True


def test_adapter_kinds_by_peft_type(tmp_path):
    assert adapter_kind("LORA") is PEFT and adapter_kind(None) is PEFT
    assert adapter_kind("LORAMOE").load == LoRAMoEModel.from_pretrained
    model = make_imsm("none")
    assert isinstance(model.peft_model, AdapterModel.__mro__[0]) or hasattr(
        model.peft_model, "disable_adapter"
    )
    assert peft_type_of(model.peft_model.peft_config["default"]) == "LORA"
    assert saved_peft_type(tmp_path) is None
    model.peft_model.save_pretrained(tmp_path / "a")
    assert saved_peft_type(tmp_path / "a") == "LORA"


def test_save_and_load_are_methods_of_the_class_and_keep_the_run_format(tmp_path):
    assert "save_pretrained" in vars(IMSMModel) and "from_pretrained" in vars(IMSMModel)
    cfg = compose_train(["backbone=tiny_llama", "gate=query_aware", "gate.rank=4"])
    model, _ = build_model(cfg)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)  # LoRA B starts at zero: make the adapter matter
    run = tmp_path / "run"
    model.save_pretrained(run, cfg)
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter",
        "config.yaml",
        "gate.json",
        "gate.safetensors",
    ]
    assert json.loads((run / "gate.json").read_text()) == {
        "type": "query_aware",
        "pooling": "mean",
        "rank": 4,
        "value": None,
        "dropout": 0.1,
    }
    # an old run: its config.yaml has the flat gate node (every gate key, no module); it must still load
    old = OmegaConf.load(run / "config.yaml")
    old.gate = {"type": "query_aware", "rank": 4, "dropout": 0.1, "lr": 1e-3, "pooling": "mean", "value": 0.5}
    (run / "config.yaml").write_text(OmegaConf.to_yaml(old))
    reloaded, _ = IMSMModel.from_pretrained(run, device="cpu")
    via_alias, _ = load_model(run, device="cpu")
    ids, mask, query, _ = batch()
    with torch.no_grad():
        expected = model(ids, mask, query, return_logits=True).logits
        assert torch.allclose(reloaded(ids, mask, query, return_logits=True).logits, expected, atol=1e-6)
        assert torch.allclose(via_alias(ids, mask, query, return_logits=True).logits, expected, atol=1e-6)
    assert not reloaded.training and reloaded.gate.kind == "query_aware"
    plain = PeftModel.from_pretrained(load_backbone(old.backbone, device="cpu")[0], run / "adapter")
    assert plain.peft_config["default"].peft_type.value == "LORA"
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        IMSMModel.from_pretrained(tmp_path / "empty")
