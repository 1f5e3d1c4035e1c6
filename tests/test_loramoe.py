"""LoRAMoE (imsm/model/loramoe/): faithful to the official layer and loss, alone and under IMSM.

Exact checks on a tiny Llama: one expert is LoRA, zero experts' B is the base model, the off switch is the base
model, the balancing constraint against hand-computed values, gradients equal with and without (non-reentrant)
gradient checkpointing, the trainable count against the formula; then the plumbing: task_type from the dataset file
to the batch, training, save / load, the Figure 3 configs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_llama
from helpers import compose_train
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import imsm.train as train_module
from imsm.data import DataError, load_split
from imsm.data.base import Example
from imsm.data.collate import TrainCollator, encode_example
from imsm.dryrun import dry_run
from imsm.model.adapters import AdapterModel, adapter_kind, peft_type_of, saved_peft_type
from imsm.model.build import build_model, build_peft_config, load_model
from imsm.model.gate import build_gate
from imsm.model.loramoe import (
    LoRAMoEConfig,
    LoRAMoELinear,
    LoRAMoEModel,
    cv_squared,
    is_loramoe_adapter,
    localized_balance,
    routing_importance,
)
from imsm.model.siamese import IMSMModel
from imsm.training import IMSMTrainer, training_arguments

torch.set_grad_enabled(True)
CONF = str(REPO / "imsm" / "conf")
FFN = ["gate_proj", "up_proj", "down_proj"]
GSM_ROWS = [
    {
        "question": f"Tom has {i} apples and buys {i + 1} more. How many?",
        "answer": f"{i} + {i + 1}\n#### {2 * i + 1}",
    }
    for i in range(8)
]


def loramoe(seed: int = 0, **config) -> LoRAMoEModel:
    """A tiny Llama (d 32, feed-forward 64, 2 layers) with LoRAMoE on its feed-forward linears."""
    torch.manual_seed(seed + 1)
    return LoRAMoEModel(tiny_llama(seed=seed), LoRAMoEConfig(**{"lora_dropout": 0.0, **config}))


def randomise_experts(model: LoRAMoEModel, scale: float = 0.3) -> None:
    """Non-zero B (fresh experts are a no-op) so the experts change the output."""
    with torch.no_grad():
        for name, p in model.adapter_parameters().items():
            if name.endswith("lora_B"):
                p.normal_(0, scale)


def batch_with_padding() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0], [15, 16, 17, 18, 19, 0]])
    mask = (torch.arange(6) < torch.tensor([[6], [4], [5]])).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_type": torch.tensor([1, 0, 1])}


# --- the layer ------------------------------------------------------------------------------------------------


def test_one_expert_is_lora_given_the_same_a_and_b():
    lora = get_peft_model(
        tiny_llama(seed=3),
        LoraConfig(r=4, lora_alpha=32, lora_dropout=0.0, target_modules=FFN, init_lora_weights=False),
    )
    moe = LoRAMoEModel(
        tiny_llama(seed=3), LoRAMoEConfig(num_experts=1, r=4, lora_alpha=32, lora_dropout=0.0, lbc_weight=0.0)
    )
    lora_params = dict(lora.get_base_model().named_parameters())
    with torch.no_grad():
        for name, p in moe.adapter_parameters().items():
            module = name.removesuffix(".loramoe.lora_A").removesuffix(".loramoe.lora_B")
            if name.endswith(("lora_A", "lora_B")):
                which = "lora_A" if name.endswith("lora_A") else "lora_B"
                p[0].copy_(lora_params[f"{module}.{which}.default.weight"])
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
        got = moe(input_ids=ids).logits
    assert not torch.allclose(
        expected, tiny_llama(seed=3)(input_ids=ids).logits
    )  # the adapter does something
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_zero_b_is_the_base_model_and_the_off_switch_gives_it_back():
    ids = torch.randint(1, 97, (2, 7))
    with torch.no_grad():
        base = tiny_llama(seed=1)(input_ids=ids).logits
        model = loramoe(seed=1).eval()
        assert torch.equal(model(input_ids=ids).logits, base)  # B = 0 at init: exactly the base model
        randomise_experts(model)
        tuned = model(input_ids=ids).logits
        assert not torch.allclose(tuned, base)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, base)
        assert torch.equal(model(input_ids=ids).logits, tuned)  # switched back on


def test_layer_init_and_shapes_follow_the_official_code():
    model = loramoe(num_experts=6, r=4, lora_alpha=32)
    layers = model.routed_layers()
    assert len(layers) == 2 * 3 and all(isinstance(m, LoRAMoELinear) for m in layers)
    down = model.get_base_model().model.layers[0].mlp.down_proj
    experts = down.experts
    assert experts.router.weight.shape == (6, 64) and experts.router.bias is None
    assert experts.lora_A.shape == (6, 4, 64) and experts.lora_B.shape == (6, 32, 4)
    assert experts.scaling == 32 / 4
    assert torch.count_nonzero(experts.lora_B) == 0 and torch.count_nonzero(experts.lora_A[5]) > 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64, per expert as nn.Linear(64, 4)
    assert experts.lora_A.abs().max() <= bound and experts.router.weight.abs().max() <= bound
    assert not down.base_layer.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".loramoe." in n for n in trainable)


def test_router_weights_are_a_dense_softmax_in_fp32_on_a_bf16_backbone():
    model = LoRAMoEModel(tiny_llama().to(torch.bfloat16), LoRAMoEConfig(lora_dropout=0.0))
    with torch.no_grad():
        model(input_ids=torch.randint(1, 97, (2, 5)))
    for layer in model.routed_layers():
        assert layer.experts.lora_A.dtype == torch.float32  # experts in fp32, as peft keeps LoRA
        w = layer.last_routing
        assert w.dtype == torch.float32 and w.shape == (2, 5, 6)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))
        assert (w > 0).all()  # dense: no top-k


def test_each_expert_draws_its_own_dropout_mask():
    torch.manual_seed(0)
    model = LoRAMoEModel(tiny_llama(), LoRAMoEConfig(num_experts=2, lora_dropout=0.5)).train()
    randomise_experts(model)
    experts = model.routed_layers()[0].experts
    with torch.no_grad():  # identical experts: only the dropout can tell them apart
        experts.lora_A[1].copy_(experts.lora_A[0])
        experts.lora_B[1].copy_(experts.lora_B[0])
    x = torch.randn(1, 3, 32)
    seen = []
    experts.lora_A.register_hook(lambda g: seen.append(g))
    experts(x)[1].sum().backward()
    assert not torch.allclose(seen[0][0], seen[0][1])


# --- the localized balancing constraint ------------------------------------------------------------------------


def test_balancing_constraint_on_hand_computed_values():
    q = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # delta 0.5, types [1, 0]: I = [[1.5, 0.5], [0.5, 1.5]], Z = [1.5, 1, 1.5, 6]: mean 2.5, unbiased var 5.5
    assert localized_balance(q, torch.tensor([1, 0]), 0.5).item() == pytest.approx(5.5 / (6.25 + 1e-10))
    # delta 0: the plain importance cv^2, Z = Q: mean 2.5, var (2.25 + 0.25 + 0.25 + 2.25) / 3
    assert localized_balance(q, torch.tensor([1, 0]), 0.0).item() == pytest.approx((5 / 3) / 6.25)
    assert cv_squared(torch.tensor([3.0])).item() == 0.0  # the official special case: a single value
    weights = torch.tensor([[[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]])
    torch.testing.assert_close(
        routing_importance(weights, torch.tensor([[1, 1, 0]])), torch.tensor([[0.8, 1.2]])
    )


def test_balancing_constraint_weights_the_halves_by_task_type():
    favours_first = torch.tensor([[3.0, 3.0, 1.0, 1.0]])
    favours_last = favours_first.flip(-1)
    # type 1 scales the first half up (1 + delta): Z = [3.3, 3.3, 0.9, 0.9], more uneven than type 0's
    loss = {t: localized_balance(favours_first, torch.tensor([t]), 0.1) for t in (0, 1)}
    z = torch.tensor([3.3, 3.3, 0.9, 0.9])
    assert loss[1].item() == pytest.approx((z.var() / z.mean() ** 2).item(), rel=1e-5) and loss[1] > loss[0]
    torch.testing.assert_close(loss[1], localized_balance(favours_last, torch.tensor([0]), 0.1))  # mirrored
    # the minimum: Q proportional to 1 / I, i.e. (1 - delta) / (1 + delta) on the up-weighted half
    at_minimum = torch.tensor([[0.9, 0.9, 1.1, 1.1]])
    assert localized_balance(at_minimum, torch.tensor([1]), 0.1).item() == pytest.approx(0.0, abs=1e-10)


def test_with_delta_zero_the_model_loss_is_the_importance_cv2_of_every_routed_linear():
    model = loramoe(lbc_weight=0.3, lbc_delta=0.0).eval()
    randomise_experts(model)
    batch = batch_with_padding()
    inputs = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0]))
        for layer in model.routed_layers()
    ]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    mask = batch["attention_mask"].float().unsqueeze(-1)
    expected = 0.0
    for layer, x in inputs.items():  # by hand: softmax(router x), summed over each sample's real tokens
        q = (torch.softmax(x @ layer.experts.router.weight.T, -1) * mask).sum(1).flatten()
        expected += q.var() / (q.mean() ** 2 + 1e-10)
    got = model.balance_loss(batch["task_type"], batch["attention_mask"])
    torch.testing.assert_close(got, 0.3 * expected)


def test_loss_gains_the_constraint_only_with_labels_and_task_type():
    model = loramoe().train()
    randomise_experts(model)
    b = batch_with_padding()
    common = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    plain = model(**common, labels=b["labels"]).loss
    with_lbc = model(**common, labels=b["labels"], task_type=b["task_type"]).loss
    lbc = model.balance_loss(b["task_type"], b["attention_mask"])
    assert lbc > 0
    torch.testing.assert_close(with_lbc, plain + lbc)
    assert model(**common, task_type=b["task_type"]).loss is None  # no labels: no loss, no extra term
    nolbc = loramoe(lbc_weight=0.0, lbc_delta=0.0)
    assert nolbc.balance_loss(b["task_type"]).item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_experts": 5}, "num_experts must be even"),
        ({"lbc_delta": 1.0}, "lbc_delta"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"num_experts": 0}, "num_experts"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAMoEConfig(**kwargs)


def test_odd_experts_are_fine_without_the_constraint():
    assert LoRAMoEConfig(num_experts=5, lbc_weight=0.0).num_experts == 5
    with pytest.raises(ValueError, match="even number of experts"):
        localized_balance(torch.ones(2, 5), torch.tensor([0, 1]), 0.1)


def test_bad_task_types_are_clear_errors():
    with pytest.raises(ValueError, match="0 or 1"):
        localized_balance(torch.ones(2, 4), torch.tensor([0, 2]), 0.1)
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        localized_balance(torch.ones(2, 4), torch.tensor([0, 1, 1]), 0.1)


# --- gradient checkpointing -------------------------------------------------------------------------------------


def loss_and_grads(model: LoRAMoEModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout masks in every run
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.adapter_parameters().items()}


def test_non_reentrant_gradient_checkpointing_gives_the_same_gradients():
    batch = batch_with_padding()
    plain = loramoe(lora_dropout=0.05).train()
    randomise_experts(plain)
    loss, grads = loss_and_grads(plain, batch)
    ckpt = loramoe(lora_dropout=0.05).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    ckpt_loss, ckpt_grads = loss_and_grads(ckpt, batch)
    torch.testing.assert_close(ckpt_loss, loss)
    for name, g in grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, msg=name)
    # the constraint really moves the routers: without task_type their gradients differ
    _, no_lbc = loss_and_grads(plain, {k: v for k, v in batch.items() if k != "task_type"})
    router = next(n for n in grads if n.endswith("router.weight"))
    assert not torch.allclose(no_lbc[router], grads[router])


def test_reentrant_gradient_checkpointing_is_refused_instead_of_dropping_the_constraint():
    model = loramoe().train()
    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    with pytest.raises(RuntimeError, match="use_reentrant"):
        model(**batch_with_padding())


# --- parameter counts -----------------------------------------------------------------------------------------


def loramoe_count(shapes: list[tuple[int, int]], layers: int, e: int = 6, r: int = 4) -> int:
    """Per routed linear in -> out: router in x E, experts E r (in + out)."""
    return layers * sum(i * e + e * r * (i + o) for i, o in shapes)


def test_trainable_count_on_llama2_equals_the_formula(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(
        "imsm.model.build.load_backbone", lambda *a, **k: pytest.fail("dry run loaded weights")
    )
    # Llama2-7B, E 6, r 4: gate_proj and up_proj 4096 -> 11008, down_proj 11008 -> 4096
    per_gate_or_up = 4096 * 6 + 6 * 4 * (4096 + 11008)  # 24,576 + 362,496 = 387,072
    per_down = 11008 * 6 + 6 * 4 * (11008 + 4096)  # 66,048 + 362,496 = 428,544
    expected = 32 * (2 * per_gate_or_up + per_down)  # 32 x 1,202,688
    assert expected == 38_486_016 == loramoe_count([(4096, 11008), (4096, 11008), (11008, 4096)], 32)
    cfg = compose_train(
        ["backbone=llama2", "peft=loramoe", "gate=none", "dry_run=true", f"run_dir={tmp_path}"]
    )
    row = dry_run(cfg)
    assert row["trainable_parameters"]["adapter"] == expected
    out = capsys.readouterr().out
    assert "loramoe" in out and "38,486,016" in out


def test_trainable_count_and_checks_under_imsm():
    model = IMSMModel(loramoe(), build_gate("query_aware", 32, rank=8))
    model.check_trainable()
    counts = model.trainable_parameters()
    assert counts["adapter"] == loramoe_count([(32, 64), (32, 64), (64, 32)], 2)
    assert counts["gate"] == 5 * 32 * 8
    # the experts run on the tuned half of the doubled batch (imsm.model.fused_layers)
    assert model.can_fuse_streams()


def test_package_is_laid_out_like_a_peft_tuner_and_keeps_its_names():
    import imsm.model.loramoe as package
    from imsm.model.loramoe import config, layer, model

    assert get_class("imsm.model.loramoe.LoRAMoEConfig") is config.LoRAMoEConfig  # conf/peft/loramoe*.yaml
    assert package.LoRAMoELinear is layer.LoRAMoELinear and package.LoRAMoEModel is model.LoRAMoEModel
    assert all(hasattr(package, name) for name in package.__all__)


def test_saved_adapter_loads_through_the_adapter_registry(tmp_path):
    wrapped = loramoe()
    randomise_experts(wrapped)
    assert isinstance(wrapped, AdapterModel)
    wrapped.save_pretrained(tmp_path / "adapter")
    assert saved_peft_type(tmp_path / "adapter") == "LORAMOE" and is_loramoe_adapter(tmp_path / "adapter")
    loaded = adapter_kind("LORAMOE").load(tiny_llama(seed=0), tmp_path / "adapter")
    assert isinstance(loaded, LoRAMoEModel) and not any(p.requires_grad for p in loaded.parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, wrapped(input_ids=ids).logits)
    fresh = adapter_kind(peft_type_of(LoRAMoEConfig())).attach(tiny_llama(seed=0), LoRAMoEConfig())
    assert isinstance(fresh, LoRAMoEModel) and fresh.adapter_parameters()


def test_the_frozen_stream_records_no_routing():
    model = IMSMModel(loramoe(), build_gate("query_aware", 32, rank=4)).eval()
    b = batch_with_padding()
    with torch.no_grad():
        model.stream_hidden(b["input_ids"], b["attention_mask"], adapter=False)
        assert all(layer.last_routing is None for layer in model.peft_model.routed_layers())
        model(b["input_ids"], b["attention_mask"], (b["labels"] == -100).long() * b["attention_mask"])
    assert all(layer.last_routing.shape == (3, 6, 6) for layer in model.peft_model.routed_layers())


# --- task_type: dataset file -> example -> batch --------------------------------------------------------------


@pytest.fixture(scope="module")
def gsm_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "gsm8k").mkdir()
    for split in ("train", "test"):
        (root / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM_ROWS))
    return root


def test_task_type_goes_from_the_dataset_file_to_the_batch(gsm_dir):
    cfg = compose_train(["dataset=gsm8k"])
    assert cfg.dataset.task_type == 0
    assert compose_train(["dataset=webq"]).dataset.task_type == 1
    examples = load_split(cfg.dataset, str(gsm_dir), "train", 3)
    assert [e.meta["task_type"] for e in examples] == [0, 0, 0]

    class Tok:  # a character tokenizer is enough here
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [3 + ord(c) % 90 for c in text]}

    feats = [encode_example(Tok(), Example("ab", "c", meta={"task_type": t}), 8, 8) for t in (1, 0)]
    assert torch.equal(TrainCollator(0)(feats)["task_type"], torch.tensor([1, 0]))
    assert "task_type" not in TrainCollator(0)([encode_example(Tok(), Example("ab", "c"), 8, 8)])
    with pytest.raises(ValueError, match="some examples of this batch have a task_type"):
        TrainCollator(0)([feats[0], encode_example(Tok(), Example("ab", "c"), 8, 8)])
    bad = OmegaConf.merge(cfg.dataset, {"task_type": 2})
    with pytest.raises(DataError, match=r"task_type=2 .*conf/dataset/gsm8k\.yaml"):
        load_split(bad, str(gsm_dir), "train", 1)


# --- training, save / load, configs ----------------------------------------------------------------------------


def quick(run_dir: Path, data_dir: Path, gate: str, peft: str = "loramoe") -> list[str]:
    return [
        "backbone=tiny_llama",
        f"peft={peft}",
        f"gate={gate}",
        f"run_dir={run_dir}",
        f"data_dir={data_dir}",
        "max_train_samples=8",
        "max_input_length=40",
        "max_output_length=16",
        "trainer.args.max_steps=2",
        "trainer.args.per_device_train_batch_size=4",
        "trainer.effective_batch_size=4",
        "trainer.args.disable_tqdm=true",
        "eval.enabled=false",
    ]


@pytest.mark.parametrize("gate", ["none", "query_aware"])
def test_loramoe_trains_saves_adapter_only_and_reloads_identically(tmp_path, gsm_dir, monkeypatch, gate):
    trained = {}
    real_build = train_module.build_model

    def keep(*args, **kwargs):  # the in-memory model that trains, to compare with its reloaded copy
        trained["model"], tokenizer = real_build(*args, **kwargs)
        return trained["model"], tokenizer

    monkeypatch.setattr(train_module, "build_model", keep)
    cfg = compose_train(quick(tmp_path / "run", gsm_dir, gate))
    result = train_module.train(cfg)
    assert result["status"] == "ok" and result["global_steps"] == 2
    model = trained["model"].eval()
    adapter = tmp_path / "run" / "adapter"
    saved_config = json.loads((adapter / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "LORAMOE" and saved_config["num_experts"] == 6
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(weights) == 3 * 2 * 3 and all(
        ".loramoe." in k for k in weights
    )  # router, A, B x 3 linears x 2
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith("lora_B"))  # it trained

    reloaded, tokenizer = load_model(tmp_path / "run", device="cpu")
    assert isinstance(reloaded.peft_model, LoRAMoEModel)
    assert not any(p.requires_grad for p in reloaded.peft_model.parameters())  # loaded for inference
    examples = load_split(cfg.dataset, str(gsm_dir), "test", 3)
    batch = TrainCollator(tokenizer.pad_token_id)([encode_example(tokenizer, e, 40, 16) for e in examples])
    assert torch.equal(batch["task_type"], torch.zeros(3, dtype=torch.long))
    with torch.no_grad():
        before = model(**batch, return_logits=True).logits
        after = reloaded(**batch, return_logits=True).logits
    assert torch.equal(before, after)
    new = reloaded.generate(batch["input_ids"][:, :6], torch.ones(3, 6, dtype=torch.long), 3, 2, 0)
    assert new.shape[0] == 3


def test_trainer_adds_the_constraint_to_the_training_loss_only(tmp_path, gsm_dir):
    cfg = compose_train(quick(tmp_path / "r", gsm_dir, "query_aware"))
    model, tokenizer = build_model(cfg)
    randomise_experts(model.peft_model)
    trainer = IMSMTrainer(model=model, args=training_arguments(cfg, str(tmp_path / "ck")))
    examples = load_split(cfg.dataset, str(gsm_dir), "train", 4)
    batch = TrainCollator(tokenizer.pad_token_id)([encode_example(tokenizer, e, 40, 16) for e in examples])
    model.train()
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(batch))
    lbc = model.peft_model.balance_loss(batch["task_type"], batch["attention_mask"])
    torch.manual_seed(0)
    plain = model(**batch).loss
    assert lbc > 0
    torch.testing.assert_close(loss, plain + lbc)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), model(**batch).loss)


def test_method_files_carry_the_recipe_and_both_constraint_settings(tmp_path):
    cfg = compose_train(["peft=loramoe"])
    args = training_arguments(cfg, str(tmp_path), world_size=1)
    assert args.learning_rate == 2e-4 and args.lr_scheduler_type.value == "cosine" and args.weight_decay == 0
    assert args.warmup_steps == 0.03
    config = build_peft_config(cfg.peft, cfg.backbone)
    assert isinstance(config, LoRAMoEConfig)
    assert (config.num_experts, config.r, config.lora_alpha, config.lora_dropout) == (6, 4, 32, 0.05)
    assert (config.lbc_weight, config.lbc_delta) == (0.1, 0.1)
    assert config.target_modules == FFN
    official = build_peft_config(compose_train(["peft=loramoe_nolbc"]).peft, cfg.backbone)
    assert (official.lbc_weight, official.lbc_delta, official.num_experts) == (0.0, 0.0, 6)


@pytest.mark.parametrize(("scale", "backbone"), [([], "llama2"), (["scale=cpu"], "smollm2")])
def test_figure3_experiments_compose(scale, backbone):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", ["experiment=fig3", *scale], return_hydra_config=True)
    assert cfg.backbone.name == backbone and cfg.hydra.runtime.choices.experiment == "fig3"
    assert list(cfg.eval_datasets) == ["webq", "freebaseqa", "multirc", "mrpc"]
    params = cfg.hydra.sweeper.params
    assert (params.dataset, params.peft, params.gate) == ("ropes,gsm8k", "lora,loramoe", "none,query_aware")
    # Llama2-7B with LoRAMoE's E input copies per routed linear needs recomputation on one GPU; 135M does not
    assert cfg.trainer.args.activation_checkpointing == (not scale)


def test_loramoe_trains_under_imsm_with_activation_checkpointing(tmp_path, gsm_dir):
    """The trainer's own (non-reentrant) checkpointing keeps the constraint's gradient: no error, finite loss."""
    cfg = compose_train(
        [*quick(tmp_path / "r", gsm_dir, "query_aware"), "trainer.args.activation_checkpointing=true"]
    )
    result = train_module.train(cfg)
    assert result["global_steps"] == 2 and math.isfinite(result["train_loss"])
