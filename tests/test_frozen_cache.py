"""``trainer.cache_frozen``: the frozen stream's states stored in epoch 1 and read in later epochs.

A 3-epoch run of a tiny Llama (LoRA with dropout, query-aware gate with dropout: both draw random numbers in every
step, so a changed order of draws would show) with and without the cache: the same loss at every step and the same
trained adapter and gate (fp32, within ``LOSS_ATOL`` and ``WEIGHT_ATOL``: the cached states were computed in epoch 1's
batches, a recomputation runs in another batch composition, which may round differently), and the frozen forward
runs only in epoch 1. The same with the states in a memory-mapped scratch file (``trainer.cache_frozen=disk``),
which reads back bit for bit what was stored (bf16 too), starts empty and is deleted however training ends.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import TrainingArguments

from imsm.constants import IGNORE_INDEX
from imsm.data.collate import IndexedDataset, TrainCollator
from imsm.model.frozen_cache import (
    DiskStore,
    FrozenCache,
    FrozenEntry,
    active_dropout,
    frozen_cache_for,
    states_file,
)
from imsm.model.gate import build_gate
from imsm.model.siamese import IMSMModel
from imsm.schema import cache_frozen_storage
from imsm.training import IMSMTrainer

# fp32 on CPU, measured: losses (~4.6) differ by at most 4.8e-7 (one ulp), trained weights (<= 0.53) by 8.9e-8
LOSS_ATOL, WEIGHT_ATOL = 1e-5, 1e-6
EPOCHS, BATCH, EXAMPLES = 3, 4, 8  # 2 optimizer steps per epoch


def make_model(gate: str = "query_aware", **backbone_config) -> IMSMModel:
    backbone = tiny_llama(**backbone_config)
    for p in backbone.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    gate_module = None if gate == "none" else build_gate(gate, 32, rank=4, dropout=0.1)
    return IMSMModel(get_peft_model(backbone, config), gate_module)


def examples() -> list[dict[str, list[int]]]:
    """Training features of different lengths (so batches pad differently from epoch to epoch)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(EXAMPLES):
        prompt = torch.randint(3, 97, (4 + i,), generator=g).tolist()
        target = torch.randint(3, 97, (2 + i % 3,), generator=g).tolist() + [2]
        out.append(
            {
                "input_ids": prompt + target,
                "labels": [IGNORE_INDEX] * len(prompt) + target,
                "query_len": [4 + i],
            }
        )
    return out


def make_trainer(tmp_path, cache: bool | str, checkpointing: bool = False) -> IMSMTrainer:
    """A trainer of ``make_model()`` on ``examples()``; its run directory is ``tmp_path / f"cache={cache}"``."""
    args = TrainingArguments(
        output_dir=str(tmp_path / f"cache={cache}" / "checkpoints"),  # as imsm.train: <run_dir>/checkpoints
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
    )
    run_config = OmegaConf.create({"trainer": {"cache_frozen": cache}})
    return IMSMTrainer(
        model=make_model(),
        args=args,
        train_dataset=examples(),
        data_collator=TrainCollator(0),
        run_config=run_config,
    )


def train(
    tmp_path, cache: bool | str, checkpointing: bool = False
) -> tuple[IMSMModel, list[float], list[int]]:
    """(trained model, loss of every step, frozen forwards run in each step)."""
    trainer = make_trainer(tmp_path, cache, checkpointing)
    model = trainer.model
    # frozen[k]: frozen forwards in step k (the decoder runs inside the step, before the step's output exists)
    losses, frozen = [], [0]
    lora_layer = next(m for n, m in model.named_modules() if n.endswith("q_proj"))

    def on_step(_module, _args, out) -> None:
        losses.append(out.loss.item())
        frozen.append(0)

    def on_decoder(_module, _args) -> None:
        if lora_layer.disable_adapters:  # the backbone runs as the frozen model M
            frozen[-1] += 1

    hooks = [model.register_forward_hook(on_step), model.decoder.register_forward_pre_hook(on_decoder)]
    try:
        trainer.train()
    finally:
        for h in hooks:
            h.remove()
    return model, losses, frozen[:-1]


def cost(features: dict[str, list[int]], itemsize: int = 4) -> int:
    """(L + q) * d * itemsize + 8 * n bytes: L labelled tokens, q = 1 (query-aware gate), d = 32, n tokens."""
    labelled = sum(t != IGNORE_INDEX for t in features["labels"])
    return (labelled + 1) * 32 * itemsize + 8 * len(features["input_ids"])


def trained(model: IMSMModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow  # two training runs (~5 s on an idle 2-core CPU); the skip alone: test_cost_per_example...
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation checkpointing"])
@pytest.mark.parametrize("storage", [True, "disk"], ids=["memory", "disk"])
def test_cached_frozen_states_give_the_same_training_and_skip_the_frozen_forward_after_epoch_one(
    tmp_path, checkpointing, storage
):
    plain_model, plain_losses, plain_frozen = train(tmp_path, cache=False, checkpointing=checkpointing)
    model, losses, frozen = train(tmp_path, cache=storage, checkpointing=checkpointing)
    assert model.backbone.is_activation_checkpointing == checkpointing
    steps = EPOCHS * EXAMPLES // BATCH
    assert len(losses) == len(plain_losses) == steps
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=0, atol=LOSS_ATOL)
    assert plain_frozen == [1] * steps
    assert frozen == [1, 1] + [0] * (steps - 2)  # epoch 1 fills the cache; epochs 2 and 3 read it
    cache = model.frozen_cache
    kept = 0 if storage == "disk" else EXAMPLES  # the file and its index are gone after training
    assert (cache.misses, cache.hits, len(cache.entries)) == (2, steps - 2, kept)
    after, before = trained(model), trained(plain_model)
    assert after.keys() == before.keys() and any(n.startswith("gate.") for n in after)
    for name in after:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=WEIGHT_ATOL, msg=name)
    assert plain_model.frozen_cache is None


def test_cost_per_example_is_the_formula_and_epochs_two_and_three_skip_the_frozen_forward(tmp_path):
    """(L + q) * d * itemsize + 8 * n bytes (``cost``), fp32."""
    model, losses, frozen = train(tmp_path, cache=True)
    assert frozen == [1, 1, 0, 0, 0, 0] and all(map(math.isfinite, losses))
    for i, features in enumerate(examples()):
        assert model.frozen_cache.entries[i].nbytes == cost(features)
    assert model.frozen_cache.nbytes == sum(map(cost, examples()))


def test_the_disk_cache_trains_from_its_file_and_deletes_it_after_training(tmp_path, monkeypatch):
    """Epochs 2 and 3 read the file (the same cost as in memory, plus alignment); it is gone after training."""
    seen: list[tuple[int, int, int]] = []  # at close: (file size on disk, file_bytes, nbytes)
    close = DiskStore.close

    def recording_close(store: DiskStore) -> None:
        if store.path.exists():
            seen.append((store.path.stat().st_size, store.file_bytes, store.nbytes))
        close(store)

    monkeypatch.setattr(DiskStore, "close", recording_close)
    model, losses, frozen = train(tmp_path, cache="disk")
    assert frozen == [1, 1, 0, 0, 0, 0] and all(map(math.isfinite, losses))
    cache = model.frozen_cache
    assert isinstance(cache.entries, DiskStore) and (cache.misses, cache.hits) == (2, 4)
    assert cache.entries.path == states_file(tmp_path / "cache=disk", 0)
    ((size, file_bytes, nbytes),) = seen
    assert nbytes == sum(map(cost, examples())) and size == file_bytes
    assert nbytes <= file_bytes <= nbytes + 48 * EXAMPLES  # each tensor padded to 16 bytes
    assert not (tmp_path / "cache=disk" / "frozen_cache").exists() and len(cache.entries) == 0


def test_the_disk_cache_file_is_deleted_when_training_fails(tmp_path):
    trainer = make_trainer(tmp_path, "disk")
    path = states_file(tmp_path / "cache=disk", 0)
    sizes = []

    def fail_in_epoch_two(_module, _args, _out) -> None:
        sizes.append(path.stat().st_size)
        if trainer.model.frozen_cache.hits:
            raise RuntimeError("killed in epoch 2")

    trainer.model.register_forward_hook(fail_in_epoch_two)
    with pytest.raises(RuntimeError, match="killed in epoch 2"):
        trainer.train()
    assert sizes[-1] > 0 and not path.parent.exists()


def random_bf16(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Any 16-bit pattern (NaN payloads, infinities, subnormals, -0 included) as bf16."""
    return torch.randint(-(2**15), 2**15, shape, generator=generator, dtype=torch.int16).view(torch.bfloat16)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))  # NaN != NaN under torch.equal of values


def test_bf16_states_round_trip_bit_for_bit_through_the_file(tmp_path):
    """Entries of every size (no labels, no query included), read back between writes (the file grows)."""
    g = torch.Generator().manual_seed(0)
    store = DiskStore(tmp_path / "states.bin")
    store.open()
    written: dict[int, FrozenEntry] = {}
    for key, labels in enumerate([3, 0, 1, 7, 2]):
        tokens = torch.randint(0, 50_000, (labels + 5,), generator=g)
        query = None if key == 2 else random_bf16(48, generator=g)
        written[key] = FrozenEntry(tokens, random_bf16(labels, 48, generator=g), query)
        store.put(key, written[key])
        for k, entry in written.items():  # every earlier entry, through a mapping of the grown file
            back = store[k]
            assert torch.equal(back.tokens, entry.tokens)
            assert_same_bits(back.hidden, entry.hidden)
            if entry.query is None:
                assert back.query is None
            else:
                assert_same_bits(back.query, entry.query)
    assert store.nbytes == sum(e.nbytes for e in written.values())
    assert (tmp_path / "states.bin").stat().st_size == store.file_bytes
    store.close()
    assert not (tmp_path / "states.bin").exists() and len(store) == 0


def test_a_bf16_model_reads_back_the_frozen_states_it_stored(tmp_path):
    """The miss computes h_M and q_M in bf16 and stores them; the hit returns the same bits from the file."""
    model = make_model().to(torch.bfloat16).train()
    cache = FrozenCache(DiskStore(tmp_path / "states.bin"))
    cache.open()
    batch = TrainCollator(0)([{**f, "index": [i]} for i, f in enumerate(examples()[:3])])
    rows, cols = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    args = (
        model,
        batch["index"],
        batch["input_ids"],
        batch["attention_mask"],
        batch["query_mask"],
        rows,
        cols,
    )
    computed, stored = cache.frozen_at_labels(*args), cache.frozen_at_labels(*args)
    assert (cache.misses, cache.hits) == (1, 1) and computed[0].dtype == torch.bfloat16
    for a, b in zip(computed, stored, strict=True):
        assert_same_bits(a, b)
    cache.close()


def test_a_stale_states_file_is_deleted_not_read(tmp_path):
    path = states_file(tmp_path, 0)
    path.parent.mkdir()
    path.write_bytes(bytes(range(256)) * 64)  # a killed job's states
    store = DiskStore(path)
    store.open()
    assert path.stat().st_size == 0 and len(store) == 0
    entry = FrozenEntry(torch.arange(6), torch.full((2, 32), 0.5), torch.ones(32))
    store.put(0, entry)
    back = store[0]
    assert torch.equal(back.tokens, entry.tokens) and torch.equal(back.hidden, entry.hidden)
    assert torch.equal(back.query, entry.query) and path.stat().st_size == store.file_bytes
    store.close()
    assert not path.parent.exists()


def test_cache_frozen_takes_four_values_and_a_misspelt_one_is_refused_naming_them(tmp_path):
    values = [False, True, "false", "true", "memory", "disk"]
    assert [cache_frozen_storage(v) for v in values] == [None, "memory", None, "memory", "memory", "disk"]
    message = "trainer.cache_frozen='dsik': expected one of [false, true, memory, disk]; did you mean 'disk'?"
    with pytest.raises(ValueError, match=re.escape(message)):
        make_trainer(tmp_path, "dsik")
    from helpers import compose_train, tiny_overrides, write_gsm

    from imsm.train import train as train_run

    run = tmp_path / "run"
    cfg = compose_train([*tiny_overrides(run, write_gsm(tmp_path / "data")), "trainer.cache_frozen=dsik"])
    with pytest.raises(ValueError, match=re.escape(message)):
        train_run(cfg)  # before any work
    assert not run.exists()


def test_a_changed_example_under_a_cached_index_is_refused():
    model = make_model().train()
    model.frozen_cache = FrozenCache()
    features = examples()[:2]
    batch = TrainCollator(0)([{**f, "index": [i]} for i, f in enumerate(features)])
    model(**batch)
    swapped = TrainCollator(0)([{**f, "index": [1 - i]} for i, f in enumerate(features)])
    with pytest.raises(ValueError, match="training example 1 is not the one cached"):
        model(**swapped)


def test_the_collator_carries_the_index_of_an_indexed_dataset():
    data = IndexedDataset(examples())
    assert (
        len(data) == EXAMPLES
        and data[5]["index"] == [5]
        and data[5]["input_ids"] == examples()[5]["input_ids"]
    )
    assert TrainCollator(0)([data[3], data[1]])["index"].tolist() == [3, 1]
    assert "index" not in TrainCollator(0)(examples()[:2])  # a plain training set: no index, as before


def test_dropout_in_the_frozen_stream_is_refused_and_adapter_dropout_is_not():
    assert active_dropout(make_model().backbone) == []  # lora_dropout=0.1 acts on the adapter's path only
    with pytest.raises(ValueError, match=r"attention_dropout=0\.1"):
        frozen_cache_for(make_model(attention_dropout=0.1))
    model = make_model()
    model.backbone.model.layers[0].extra = nn.Dropout(0.2)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.extra"):
        frozen_cache_for(model)


def test_zero3_is_refused_and_no_gate_is_ignored(caplog):
    with pytest.raises(ValueError, match="ZeRO-3"):
        frozen_cache_for(make_model(), zero3=True)
    with caplog.at_level(logging.WARNING):
        assert frozen_cache_for(make_model("none")) is None
    assert "gate=none" in caplog.text


@pytest.mark.slow  # a whole tiny run through imsm.train (~10 s)
@pytest.mark.parametrize("value", ["true", "disk"])
def test_the_run_config_switches_the_cache_on_through_train(tmp_path, monkeypatch, value):
    """``trainer.cache_frozen=true|disk`` on the command line reaches the trainer; train.py passes nothing else;
    ``disk``'s file is in the run directory while training and gone after."""
    from helpers import compose_train, tiny_overrides, write_gsm

    import imsm.training
    from imsm.train import train as train_run

    made: list[FrozenCache] = []
    disk_files: list[Path | None] = []

    def recording(*args, **kwargs):
        made.append(frozen_cache_for(*args, **kwargs))
        disk_files.append(getattr(made[-1].entries, "path", None))
        return made[-1]

    monkeypatch.setattr(imsm.training, "frozen_cache_for", recording)
    overrides = tiny_overrides(tmp_path / "run", write_gsm(tmp_path / "data"))
    overrides = [o for o in overrides if not o.startswith("trainer.args.max_steps")]
    cfg = compose_train(
        [*overrides, f"trainer.cache_frozen={value}", "trainer.args.num_train_epochs=2", "eval.enabled=false"]
    )
    result = train_run(cfg)
    assert result["global_steps"] == 4  # 8 examples, batch 4, 2 epochs
    (cache,) = made
    assert (cache.misses, cache.hits, len(cache.entries)) == (2, 2, 8 if value == "true" else 0)
    assert disk_files == [states_file(tmp_path / "run", 0) if value == "disk" else None]
    assert not (tmp_path / "run" / "frozen_cache").exists()
