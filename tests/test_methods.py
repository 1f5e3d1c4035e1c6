"""Every PEFT method on every small backbone, AdaLoRA done fully, gate options, and bad input.

The matrix (peft's TEST_CASES idea): each method x backbone x gate trains a few steps through ``train()``, saves,
and reloads with logits identical to the in-memory model. All 24 rows run by default (about 1.5 min on 2 CPU cores:
SmolLM2 rows take one step on two short sequences).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_llama
from helpers import compose_train
from omegaconf import OmegaConf
from peft import AdaLoraConfig, get_peft_model

import imsm.train as train_module
from imsm.backbones import load_backbone
from imsm.data import load_split
from imsm.data.collate import TokenizedDataset, TrainCollator, encode_example
from imsm.model.adalora import (
    AdaLoraCallback,
    active_ranks,
    adalora_schedule,
    freeze_ranknum,
    orthogonal_regularisation,
    training_steps,
)
from imsm.model.build import backbone_targets, build_model, build_peft_config, load_model, save_model
from imsm.training import IMSMTrainer, training_arguments

torch.set_grad_enabled(True)
CONF = str(REPO / "imsm" / "conf")
PAPER_METHODS = ["lora", "adalora", "dora", "ia3"]
GSM_ROWS = [
    {
        "question": f"Tom has {i} apples and buys {i + 1} more. How many?",
        "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}",
    }
    for i in range(12)
]


@pytest.fixture(scope="module")
def gsm_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "gsm8k").mkdir()
    for split in ("train", "test"):
        (root / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM_ROWS))
    return root


def quick(
    run_dir: Path, data_dir: Path, steps: int = 2, batch: int = 4, lengths: tuple[int, int] = (40, 16)
) -> list[str]:
    """A few optimizer steps on short sequences, no evaluation."""
    return [
        f"run_dir={run_dir}",
        f"data_dir={data_dir}",
        "max_train_samples=8",
        f"max_input_length={lengths[0]}",
        f"max_output_length={lengths[1]}",
        f"trainer.args.max_steps={steps}",
        f"trainer.args.per_device_train_batch_size={batch}",
        f"trainer.effective_batch_size={batch}",
        "trainer.args.disable_tqdm=true",
        "trainer.args.logging_steps=1",
        "eval.enabled=false",
    ]


def probe_batch(cfg, data_dir: Path, tokenizer) -> dict[str, torch.Tensor]:
    examples = load_split(cfg.dataset, str(data_dir), "test", 3)
    feats = [encode_example(tokenizer, e, 40, 16) for e in examples]
    batch = TrainCollator(tokenizer.pad_token_id)(feats)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "query_mask")}


MATRIX = [
    (method, backbone, gate)
    for backbone in ("tiny_llama", "tiny_qwen", "smollm2")
    for method in PAPER_METHODS
    for gate in ("query_aware", "none")
]


@pytest.mark.parametrize(("method", "backbone", "gate"), MATRIX)
def test_method_trains_saves_and_reloads_identically(tmp_path, gsm_dir, monkeypatch, method, backbone, gate):
    trained = {}
    real_save = train_module.save_model

    def keep(model, run_dir, cfg=None):  # the in-memory trained model, to compare with its reloaded copy
        trained["model"] = model
        real_save(model, run_dir, cfg)

    monkeypatch.setattr(train_module, "save_model", keep)
    # SmolLM2 (135M): one step on two tiny sequences; the tiny models: two steps of four
    steps, batch, lengths = (1, 2, (24, 8)) if backbone == "smollm2" else (2, 4, (40, 16))
    run = quick(tmp_path / "run", gsm_dir, steps, batch, lengths)
    cfg = compose_train([f"backbone={backbone}", f"peft={method}", f"gate={gate}", *run])
    result = train_module.train(cfg)
    assert result["status"] == "ok" and result["global_steps"] == steps
    assert torch.isfinite(torch.tensor(result["train_loss"]))
    model = trained["model"].eval()
    model.check_trainable()
    d = model.config.hidden_size
    assert result["trainable_parameters"]["gate"] == (5 * d * 8 if gate == "query_aware" else 0)

    reloaded, tokenizer = load_model(tmp_path / "run", device="cpu")
    batch = probe_batch(cfg, gsm_dir, tokenizer)
    with torch.no_grad():
        before = model(**batch, return_logits=True).logits
        after = reloaded(**batch, return_logits=True).logits
    if (
        method == "adalora"
        and json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    ):
        # Pruned ranks are zero rows of lora_E in the trained model but absent from the saved one: the same function,
        # with a shorter inner dimension in its matmuls, so fp32 sums may round differently (seen: 2.4e-7).
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    else:
        assert torch.equal(before, after)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == {"lora": "LORA", "dora": "LORA", "adalora": "ADALORA", "ia3": "IA3"}[method]
    assert saved.get("use_dora", False) == (method == "dora")


# --- the methods' recipes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "optim", "lr", "batch"),
    [
        ("lora", "adamw_torch", 3e-4, 16),
        ("adalora", "adamw_torch", 2e-3, 16),
        ("dora", "adamw_torch", 1e-4, 16),
        ("ia3", "adafactor", 3e-3, 8),
    ],
)
def test_each_method_file_carries_the_papers_recipe(tmp_path, method, optim, lr, batch):
    cfg = compose_train([f"peft={method}"])
    args = training_arguments(cfg, str(tmp_path), world_size=1)
    assert args.optim.value == optim and args.learning_rate == lr and args.num_train_epochs == 3
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == batch
    peft_config = build_peft_config(cfg.peft, cfg.backbone, total_steps=100)
    if method == "lora":
        assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (16, 16, 0.1)
    if method == "dora":
        assert peft_config.use_dora and (peft_config.r, peft_config.lora_alpha) == (16, 32)
    if method == "adalora":
        assert (peft_config.init_r, peft_config.target_r, peft_config.total_step) == (12, 8, 100)
        assert (peft_config.tinit, peft_config.tfinal) == (10, 20)


def test_ia3_trains_with_adafactor_and_the_gate_keeps_its_learning_rate(tmp_path, gsm_dir):
    from transformers.optimization import Adafactor

    cfg = compose_train(["backbone=tiny_llama", "peft=ia3", *quick(tmp_path / "r", gsm_dir)])
    model, tokenizer = build_model(cfg)
    args = training_arguments(cfg, str(tmp_path / "ck"))
    trainer = IMSMTrainer(model=model, args=args, gate_learning_rate=cfg.gate.lr)
    opt = trainer.create_optimizer()
    assert isinstance(opt, Adafactor)
    lrs = {
        ("gate" if any(p is q for q in model.gate.parameters()) else "adapter"): g["lr"]
        for g in opt.param_groups
        for p in g["params"][:1]
    }
    assert lrs == {"gate": 1e-3, "adapter": 3e-3}


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [("tiny_llama", {"k_proj", "v_proj", "down_proj"}), ("qwen1_5", {"q_proj", "v_proj"})],
)
def test_ia3_feedforward_lists_come_from_the_backbone_and_can_be_empty(backbone, expected):
    cfg = compose_train([f"backbone={backbone}", "peft=ia3"])
    config = build_peft_config(cfg.peft, cfg.backbone)
    assert set(config.target_modules) == expected
    assert set(config.feedforward_modules) == ({"down_proj"} if backbone == "tiny_llama" else set())


# The paper's per-method target-module tables, as each backbone resolves them (the Llama3 table is written once, in
# conf/targets/llama.yaml, and included by every Llama-style backbone; llama2 changes LoRA's and AdaLoRA's rows).
QV, LLAMA3_IA3 = ["q_proj", "v_proj"], ["k_proj", "v_proj", "down_proj"]
LLAMA3 = {"lora": QV, "adalora": QV, "ia3": LLAMA3_IA3, "ia3_feedforward": ["down_proj"], "dora": QV}
FFN_LORA = ["gate_proj", "down_proj", "up_proj"]
BACKBONE_TARGETS = {
    "chatglm3": {
        "lora": ["query_key_value"],
        "adalora": ["query_key_value"],
        "ia3": ["query_key_value", "mlp.dense_4h_to_h"],
        "ia3_feedforward": ["mlp.dense_4h_to_h"],
        "dora": ["query_key_value"],
    },
    "llama2": {**LLAMA3, "lora": FFN_LORA, "adalora": FFN_LORA},
    "llama3": LLAMA3,
    "llama3_1": LLAMA3,
    "qwen1_5": {"lora": ["q_proj"], "adalora": ["q_proj"], "ia3": QV, "ia3_feedforward": [], "dora": QV},
    "smollm2": LLAMA3,
    "tiny_llama": LLAMA3,
    "tiny_qwen": LLAMA3,
}


def test_every_backbone_file_has_a_pinned_target_module_table():
    assert set(BACKBONE_TARGETS) == {p.stem for p in (REPO / "imsm" / "conf" / "backbone").glob("*.yaml")}


@pytest.mark.parametrize("backbone", sorted(BACKBONE_TARGETS))
def test_backbone_target_module_tables_resolve_to_the_papers(backbone):
    cfg = compose_train([f"backbone={backbone}"])
    assert OmegaConf.to_container(cfg.backbone.target_modules, resolve=True) == BACKBONE_TARGETS[backbone]
    for method in ("lora", "adalora", "ia3", "dora"):
        peft = compose_train([f"backbone={backbone}", f"peft={method}"]).peft
        assert backbone_targets(peft, cfg.backbone, "target_modules") == BACKBONE_TARGETS[backbone][method]


# --- AdaLoRA, done fully ---------------------------------------------------------------------------------


def test_adalora_schedule_scales_with_the_run():
    assert adalora_schedule({"tinit": 0.1, "tfinal": 0.2}, 1000) == {
        "total_step": 1000,
        "tinit": 100,
        "tfinal": 200,
    }
    assert adalora_schedule({"tinit": 50, "tfinal": 300}, 1000) == {
        "total_step": 1000,
        "tinit": 50,
        "tfinal": 300,
    }
    # tiny runs: still a budgeting phase and a final step that reaches the target budget
    assert adalora_schedule({"tinit": 0.1, "tfinal": 0.2}, 8) == {"total_step": 8, "tinit": 1, "tfinal": 2}
    assert adalora_schedule({"tinit": 0.1, "tfinal": 0.2}, 2) == {"total_step": 2, "tinit": 0, "tfinal": 1}
    assert adalora_schedule({"tinit": 0.1, "tfinal": 0.2}, 1) == {"total_step": 1, "tinit": 0, "tfinal": 0}
    AdaLoraConfig(target_modules=["q_proj"], **adalora_schedule({}, 1))  # peft accepts the degenerate case
    with pytest.raises(ValueError, match="at least one"):
        adalora_schedule({}, 0)


@pytest.mark.parametrize(
    ("n", "batch", "accum", "epochs", "world", "max_steps", "expected"),
    [
        (100, 4, 4, 3, 1, -1, 21),  # 25 batches -> ceil(25 / 4) = 7 steps per epoch, x 3
        (100, 4, 4, 3, 2, -1, 12),  # 13 batches per process -> 4 per epoch
        (8, 4, 1, 3, 1, 5, 5),  # max_steps wins
        (3, 8, 2, 1.5, 1, -1, 2),  # one batch -> one step per epoch, ceil(1.5)
    ],
)
def test_training_steps_is_the_trainers_arithmetic(n, batch, accum, epochs, world, max_steps, expected):
    assert training_steps(n, batch, accum, epochs, world, max_steps) == expected


def test_training_steps_equals_the_trainers_count(tmp_path, gsm_dir):
    cfg = compose_train(
        ["backbone=tiny_llama", "peft=adalora", *quick(tmp_path / "r", gsm_dir, steps=-1, batch=2)]
    )
    cfg.trainer.args.num_train_epochs = 2
    cfg.trainer.effective_batch_size = 4
    result = train_module.train(cfg)
    saved = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    # 8 examples / batch 2 = 4 batches, accumulation 2 -> 2 steps per epoch, 2 epochs
    assert saved["total_step"] == result["global_steps"] == 4


def test_adalora_without_a_step_count_is_an_error():
    cfg = compose_train(["backbone=tiny_llama", "peft=adalora"])
    with pytest.raises(ValueError, match="total number of optimizer steps"):
        build_peft_config(cfg.peft, cfg.backbone)


def adalora_trainer(tmp_path, gsm_dir, steps: int):
    cfg = compose_train(["backbone=tiny_llama", "peft=adalora", *quick(tmp_path / "r", gsm_dir, steps=steps)])
    model, tokenizer = build_model(cfg, total_steps=steps)
    examples = load_split(cfg.dataset, str(gsm_dir), "train", 8)
    data = TokenizedDataset(examples, tokenizer, 40, 16)
    args = training_arguments(cfg, str(tmp_path / "ck"))
    trainer = IMSMTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=TrainCollator(tokenizer.pad_token_id),
        gate_learning_rate=cfg.gate.lr,
    )
    return cfg, model, trainer, TrainCollator(tokenizer.pad_token_id)([data[i] for i in range(2)])


def test_adalora_rank_budget_shrinks_to_the_target_during_training(tmp_path, gsm_dir, monkeypatch):
    steps = 8
    cfg, model, trainer, _ = adalora_trainer(tmp_path, gsm_dir, steps)
    callbacks = [c for c in trainer.callback_handler.callbacks if isinstance(c, AdaLoraCallback)]
    assert len(callbacks) == 1  # the trainer adds it by itself for AdaLoRA
    adalora = model.peft_model.base_model
    calls = []
    real = adalora.update_and_allocate

    def spy(global_step):  # must run after backward (gradients present) and before zero_grad
        grads = [p.grad for n, p in model.peft_model.named_parameters() if ".lora_A." in n]
        calls.append((global_step, all(g is not None and g.abs().sum() > 0 for g in grads)))
        return real(global_step)

    monkeypatch.setattr(adalora, "update_and_allocate", spy)
    trainer.train()
    assert calls == [(i, True) for i in range(steps)]

    n_modules = 2 * 2  # q_proj and v_proj in 2 layers
    budgets = callbacks[0].budgets
    assert budgets[0] == 12 * n_modules  # tinit: nothing pruned after the first step
    assert budgets[-1] == 8 * n_modules  # target_r on average at the end
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False)) and len(set(budgets)) > 2
    assert active_ranks(model.peft_model) == 8 * n_modules
    pattern = model.peft_model.peft_config["default"].rank_pattern
    assert sum(sum(v) for v in pattern.values()) == 8 * n_modules

    # the pruned adapter saves at its new ranks and reloads to the same logits (up to fp32 summation order: the
    # pruned ranks are zeros in memory and absent after reload, so the matmuls' inner dimension differs)
    save_model(model, tmp_path / "r", cfg)
    model.eval()
    reloaded, tokenizer = load_model(tmp_path / "r", device="cpu")
    batch = probe_batch(cfg, gsm_dir, tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**batch, return_logits=True).logits,
            model(**batch, return_logits=True).logits,
            rtol=0,
            atol=1e-5,
        )
    ranks = {n: p.shape[0] for n, p in reloaded.peft_model.named_parameters() if ".lora_E." in n}
    assert sum(ranks.values()) == 8 * n_modules


def test_adalora_regulariser_is_in_the_training_loss(tmp_path, gsm_dir):
    _, model, trainer, batch = adalora_trainer(tmp_path, gsm_dir, 4)
    model.train()
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(batch))
    torch.manual_seed(0)
    plain = model(**batch).loss
    reg = orthogonal_regularisation(model.peft_model)
    assert reg > 0
    torch.testing.assert_close(loss, plain + 0.5 * reg)
    model.zero_grad()
    (0.5 * reg).backward()
    assert all(p.grad is not None for n, p in model.peft_model.named_parameters() if ".lora_A." in n)
    model.eval()  # evaluation loss stays the task loss
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), model(**batch).loss)


def test_orthogonal_regulariser_equals_peft_own():
    backbone = tiny_llama()
    peft_model = get_peft_model(
        backbone, AdaLoraConfig(target_modules=["q_proj", "v_proj"], total_step=10, task_type="CAUSAL_LM")
    )
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        with_reg = peft_model.base_model(input_ids=ids, labels=ids).loss  # AdaLoraModel.forward adds it
        without = peft_model.base_model.model(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(with_reg - without, 0.5 * orthogonal_regularisation(peft_model))


def test_adalora_ranknum_never_trains_on_a_bf16_backbone():
    backbone = tiny_llama().to(torch.bfloat16)
    peft_model = get_peft_model(
        backbone, AdaLoraConfig(target_modules=["q_proj"], total_step=10, task_type="CAUSAL_LM")
    )
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad and ".ranknum." in n]
    assert trainable  # peft 0.21.2 leaves it trainable after moving it to the base layer's dtype ...
    assert freeze_ranknum(peft_model) == len(trainable)  # ... and build_model freezes it
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if ".ranknum." in n)


# --- any other method: one YAML file -----------------------------------------------------------------------


def test_loha_ships_as_one_yaml_file_and_trains(tmp_path, gsm_dir):
    cfg = compose_train(["backbone=tiny_qwen", "peft=loha", *quick(tmp_path / "r", gsm_dir)])
    result = train_module.train(cfg)
    assert result["global_steps"] == 2
    assert json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LOHA"


def test_a_new_method_needs_only_one_yaml_file(tmp_path, gsm_dir):
    """LoKr, unknown to this repository: one file in a config directory on Hydra's search path, no code."""
    (tmp_path / "conf" / "peft").mkdir(parents=True)
    (tmp_path / "conf" / "peft" / "lokr.yaml").write_text(
        "name: lokr\ntargets: lora\nconfig:\n  _target_: peft.LoKrConfig\n  r: 4\n  alpha: 8\n  target_modules: null\n"
        "optimizer:\n  optim: adamw_torch\n  learning_rate: 1.0e-3\nbatch_size: 4\n"
    )
    cfg = compose_train(
        ["backbone=tiny_llama", "peft=lokr", *quick(tmp_path / "r", gsm_dir)], searchpath=tmp_path / "conf"
    )
    result = train_module.train(cfg)
    assert result["global_steps"] == 2 and result["trainable_parameters"]["adapter"] > 0
    model, _ = load_model(tmp_path / "r", device="cpu")
    assert type(model.peft_model.peft_config["default"]).__name__ == "LoKrConfig"


# --- gate options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gate", "rank", "pooling", "factor"),
    [("query_aware", 4, "mean", 5), ("query_aware", 16, "max", 5), ("no_query", 8, "max", 3)],
)
def test_gate_rank_and_pooling_are_honoured_and_survive_save(tmp_path, gate, rank, pooling, factor):
    cfg = compose_train(
        ["backbone=tiny_llama", f"gate={gate}", f"gate.rank={rank}", f"gate.pooling={pooling}"]
    )
    model, _ = build_model(cfg)
    assert model.gate.rank == rank and model.pooling == pooling
    assert model.trainable_parameters()["gate"] == factor * 64 * rank
    save_model(model, tmp_path / "r", cfg)
    reloaded, _ = load_model(tmp_path / "r", device="cpu")
    assert reloaded.gate.rank == rank and reloaded.pooling == pooling and reloaded.gate.kind == gate


def test_max_pooling_changes_the_query_aware_mix():
    cfg = compose_train(["backbone=tiny_llama", "gate.pooling=max", "gate.dropout=0"])
    model, _ = build_model(cfg)
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask, query = torch.ones_like(ids), torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        for p in model.peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1)  # make the tuned stream differ from the frozen one
        as_max = model(ids, mask, query, return_logits=True).logits
        model.pooling = "mean"
        as_mean = model(ids, mask, query, return_logits=True).logits
    assert not torch.allclose(as_max, as_mean)


# --- bad input ------------------------------------------------------------------------------------------


def test_missing_target_module_lists_the_linear_modules():
    cfg = compose_train(["backbone=tiny_llama", "peft.config.target_modules=[qkv_proj]"])
    with pytest.raises(ValueError, match=r"Linear modules of this backbone.*'down_proj'.*'q_proj'"):
        build_model(cfg)


def test_backbone_without_a_list_for_the_method_says_where_to_add_it():
    cfg = compose_train(["backbone=tiny_llama", "peft=loha"])
    backbone = OmegaConf.create({"name": "custom", "target_modules": {"ia3": ["k_proj"]}})
    with pytest.raises(ValueError, match=r"target_modules\.\{loha, lora\}.*conf/backbone/custom\.yaml"):
        build_peft_config(cfg.peft, backbone)


@pytest.mark.parametrize(
    "node",
    [
        {"_target_": "peft.PrefixTuningConfig", "num_virtual_tokens": 4},
        {"_target_": "peft.PromptTuningConfig", "num_virtual_tokens": 4},
        {"_target_": "peft.AdaptionPromptConfig", "adapter_len": 4, "adapter_layers": 1},
    ],
)
def test_prompt_learning_methods_are_rejected(node):
    peft_cfg = OmegaConf.create({"name": "prompt", "config": node})
    with pytest.raises(ValueError, match="injected into the backbone"):
        build_peft_config(peft_cfg, OmegaConf.create({}))


def test_trust_remote_code_is_on_only_where_a_backbone_file_says_so():
    files = sorted((REPO / "imsm" / "conf" / "backbone").glob("*.yaml"))
    trusted = {p.stem for p in files if OmegaConf.load(p).get("trust_remote_code")}
    assert trusted == {"chatglm3"}


@pytest.mark.parametrize(("backbone", "trust"), [("chatglm3", True), ("llama3", False)])
def test_load_backbone_passes_trust_remote_code_from_the_file_only(monkeypatch, caplog, backbone, trust):
    seen = {}

    class Stop(Exception):
        pass

    def fake_tokenizer(path, trust_remote_code=False):
        seen["tokenizer"] = trust_remote_code
        raise Stop

    monkeypatch.setattr("imsm.backbones.load_tokenizer", fake_tokenizer)
    cfg = compose_train([f"backbone={backbone}"])
    with caplog.at_level(logging.WARNING, logger="imsm.backbones"), pytest.raises(Stop):
        load_backbone(cfg.backbone)
    assert seen["tokenizer"] is trust
    assert ("remote code" in caplog.text) is trust
