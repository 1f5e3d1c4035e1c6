"""The benchmark script, the speed job and their timing helpers.

The benchmark runs end to end on the model training builds, its naive decoder decodes what IMSM decodes, and the
speed job writes its metrics from the library entry point.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, make_imsm
from helpers import compose_train
from transformers import LlamaConfig

from imsm import bench, speed, timing
from imsm.backbones import autocast_context, load_tokenizer, prepare_smollm2


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


@pytest.mark.slow  # subprocess run(s), over 7 s: .ci/run runs the slow tests too
def test_quick_benchmark_writes_every_ratio(tmp_path, capsys):
    bench.main(
        [
            "--quick",
            "--device",
            "cpu",
            "--skip-memory",
            "--repeats",
            "1",
            "--batches",
            "1",
            "--attention-ab",
            "--out",
            str(tmp_path),
        ]
    )
    (path,) = tmp_path.glob("bench_tiny_llama_cpu_*.json")
    ratios = json.loads(path.read_text())["ratios"]
    assert json.loads(path.read_text())["args"]["attention_ab"] is True  # the command's settings are kept
    for precision in ("fp32", "bf16"):
        for name in (
            "train_step_time_imsm/vanilla",
            "train_step_floor_(vanilla+frozen_forward)/vanilla",
            "train_step_time_imsm/hf_peft_loss",
            "train_3_epochs_time_imsm_cached/vanilla",
            "train_3_epochs_time_imsm_uncached/vanilla",
            "decode_tok_s_imsm/vanilla",
            "decode_tok_s_imsm/hf_generate",
            "decode_tok_s_imsm/imsm_sdpa",  # --attention-ab
            "decode_tok_s_vanilla/vanilla_sdpa",
            "decode_tok_s_imsm_sdpa/vanilla_sdpa",
        ):
            key = f"{name}_{precision}" if name.startswith("train") else f"{name}_{precision}_b1"
            assert math.isfinite(ratios[key]) and ratios[key] > 0, key
    assert ratios["train_step_floor_(vanilla+frozen_forward)/vanilla_fp32"] > 1.0
    assert ratios["speedup_imsm_vs_naive_64tok"] > 0
    intervals = json.loads(path.read_text())["ratio_intervals"]
    assert set(intervals) == set(
        ratios
    )  # every timed ratio has its interval (one repeat: low = median = high)
    for key, ci in intervals.items():
        assert ci["low"] <= ratios[key] == ci["median"] <= ci["high"] and ci["n"] == 1, key
    out = capsys.readouterr().out
    assert "train_step_time_imsm/vanilla_fp32" in out and ("PASS" in out or "MISS" in out)


def test_cached_epochs_run_the_frozen_stream_in_the_first_epoch_only_and_train_as_uncached():
    batches = [
        {**bench.train_batch(97, 2, 12, 6, "cpu", seed=i), "index": torch.tensor([2 * i, 2 * i + 1])}
        for i in range(2)
    ]
    assert not torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])  # distinct examples per batch
    trained = {}
    for cache in (True, False):
        model = make_imsm("query_aware")
        calls = []
        model.backbone.get_decoder().register_forward_hook(lambda *a, calls=calls: calls.append(1))
        filled = bench.epochs_fn(model, batches, 3, "fp32", "cpu", cache=cache)()
        assert model.frozen_cache is None  # the cache does not outlive the run
        trained[cache] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        # every step runs the tuned stream; the frozen one runs in every step uncached, in epoch 1 only cached
        assert len(calls) == 6 + (2 if cache else 6)
        if cache:
            assert (filled.misses, filled.hits, len(filled.entries)) == (2, 4, 4)
            assert filled.nbytes > 0
        else:
            assert filled is None
    for a, b in zip(trained[True], trained[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def lora_b(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.peft_model.named_parameters() if "lora_B" in n}


def test_bench_builds_the_training_runs_model_with_a_seeded_nonzero_lora_b():
    cfg = bench.run_config("tiny_llama", "query_aware", "cpu")
    model, tok = bench.build("tiny_llama", "query_aware", "cpu", seed=3)
    lora = model.peft_model.peft_config["default"]
    # LoRA, gate and target modules are the run config's (conf/peft/lora.yaml, conf/gate, conf/backbone), not a copy
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (
        cfg.peft.config.r,
        cfg.peft.config.lora_alpha,
        0.1,
    )
    assert set(lora.target_modules) == set(cfg.backbone.target_modules.lora)
    assert model.gate.kind == "query_aware" and model.gate.rank == cfg.gate.rank
    b = lora_b(model)
    assert b and all(v.abs().sum() > 0 for v in b.values())  # the adapter is not a no-op
    again = lora_b(bench.build("tiny_llama", "query_aware", "cpu", seed=3)[0])
    other = lora_b(bench.build("tiny_llama", "query_aware", "cpu", seed=4)[0])
    assert all(torch.equal(b[n], again[n]) for n in b)  # seeded
    assert not all(torch.equal(b[n], other[n]) for n in b)
    ids = torch.tensor([tok("two streams differ")["input_ids"]])
    mask = torch.ones_like(ids)
    tuned = model.stream_hidden(ids, mask, adapter=True)
    assert not torch.allclose(tuned, model.stream_hidden(ids, mask, adapter=False))
    vanilla, _ = bench.build("tiny_llama", "none", "cpu", dtype="bf16")
    assert vanilla.gate is None and next(vanilla.peft_model.parameters()).dtype == torch.bfloat16


def test_bench_decodes_what_users_run_at_each_precision():
    """bf16 decoding times ``build``'s bf16 model (backbone bf16, adapter and gate fp32), not the fp32 model cast
    whole; vanilla is the same weights without the gate."""
    args = SimpleNamespace(backbone="tiny_llama", device="cpu", random_init=None, peft="lora")
    trained, _ = bench.build("tiny_llama", "query_aware", "cpu")
    imsm_d, vanilla_d = bench.decode_models(args, "bf16", trained)
    dtypes = {n: p.dtype for n, p in imsm_d.peft_model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert imsm_d.gate.down.weight.dtype == torch.float32 and not imsm_d.training
    assert vanilla_d.gate is None and vanilla_d.peft_model is imsm_d.peft_model
    assert bench.decode_models(args, "fp32", trained)[0] is trained  # already fp32 throughout


SLOW = pytest.mark.slow  # ~1.5 s each on an idle 2-core CPU; the fusion itself: tests/test_fusion_methods.py


@pytest.mark.parametrize(
    "method",
    ["adalora", "ia3", "loramoe", pytest.param("dora", marks=SLOW), pytest.param("loha", marks=SLOW)],
)
def test_bench_builds_every_method_off_its_no_op_start_and_fused(method):
    """``--peft <method>``: the run config's adapter, moved off its no-op start; IMSM decodes it as one doubled
    batch, and the naive decoder (a plain copy of the backbone beside it) gives the same tokens."""
    model, _ = bench.build("tiny_llama", "query_aware", "cpu", peft=method)
    assert model.peft_model.peft_config[model.peft_model.active_adapter].peft_type.value == (
        "LORA" if method == "dora" else method.upper()
    )
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    mask = torch.ones_like(ids)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(
            model.stream_hidden(ids, mask, adapter=True), model.stream_hidden(ids, mask, adapter=False)
        )
    assert model.can_fuse_streams()
    fast = model.generate(ids, mask, max_new_tokens=4, eos_token_id=-1, pad_token_id=0)
    assert bench.NaiveSiamese(model).generate(ids, 4).tolist() == fast.tolist()


def test_random_init_takes_the_architecture_from_a_config_directory(tmp_path):
    arch = LlamaConfig(
        vocab_size=len(load_tokenizer(prepare_smollm2())),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    arch.save_pretrained(tmp_path)
    load_tokenizer(prepare_smollm2()).save_pretrained(tmp_path)
    model, tok = bench.build("smollm2", "query_aware", "cpu", random_init=str(tmp_path))
    assert model.backbone.config.hidden_size == 48 and model.backbone.config.num_hidden_layers == 3
    assert model.gate is not None and len(tok) == arch.vocab_size
    assert lora_b(model) and all(v.abs().sum() > 0 for v in lora_b(model).values())


def test_alternate_interleaves_contenders_after_warmup(monkeypatch):
    calls: list[str] = []
    clock = iter(range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))
    res = timing.alternate(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, "cpu", warmup=2
    )
    assert calls == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b"]  # 2 untimed rounds, then A B, B A, A B
    assert res["a"] == {
        "median": 1.0,
        "min": 1.0,
        "max": 1.0,
        "n": 3,
        "times": [1.0, 1.0, 1.0],
    }  # each call: one tick of the fake clock
    with pytest.raises(ValueError, match="repeats=0"):
        timing.alternate({"a": lambda: None}, 0, "cpu")


def test_median_interval_is_the_order_statistics_interval_of_the_binomial_tables():
    # n, (k, n + 1 - k) 1-based, coverage 1 - 2 P(Binom(n, 1/2) < k): the classical sign-test table at 95%
    for n, (lo, hi), coverage in [
        (5, (1, 5), 1 - 2 / 32),  # too few values for 95%: the whole range, and how sure it is
        (6, (1, 6), 1 - 2 / 64),
        (9, (2, 8), 1 - 2 * 10 / 512),
        (20, (6, 15), 1 - 2 * sum(math.comb(20, i) for i in range(6)) / 2**20),
    ]:
        values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose
        assert timing.median_interval(values) == (lo, hi, pytest.approx(coverage)), n
    assert timing.median_interval([3.0]) == (3.0, 3.0, 0.0)
    with pytest.raises(ValueError, match="no values"):
        timing.median_interval([])


def test_paired_ratio_compares_the_rounds_side_by_side():
    # round 3 is slow for both contenders: its ratio is still 1.25 and the drift does not widen the interval
    a = timing.summary([1.25, 2.5, 12.5, 1.25, 2.5, 1.25])
    b = timing.summary([1.0, 2.0, 10.0, 1.0, 2.0, 1.0])
    assert timing.paired_ratio(a, b) == {
        "median": pytest.approx(1.25),
        "low": pytest.approx(1.25),
        "high": pytest.approx(1.25),
        "confidence": pytest.approx(1 - 2 / 64),
        "n": 6,
    }
    assert (a["min"], a["max"]) == (1.25, 12.5)  # each contender's own spread is wide; the pair's is not
    with pytest.raises(ValueError, match="same rounds"):
        timing.paired_ratio(timing.summary([1.0]), b)


def test_verdict_says_unsettled_when_the_interval_straddles_the_bar():
    name = "decode_tok_s_imsm/vanilla_bf16_b1"
    ci = {"low": 0.91, "high": 0.97}
    assert bench.verdict(name, 0.94, ci, peft="ia3").endswith("PASS")  # bar 0.90
    assert bench.verdict(name, 0.94, ci, peft="lora").endswith("UNSETTLED")  # LoRA's bar is 0.95
    assert bench.verdict(name, 0.85, {"low": 0.80, "high": 0.89}, peft="ia3").endswith("MISS")
    assert bench.verdict("train_step_time_imsm/vanilla_fp32", 1.2, {"low": 1.1, "high": 1.31}).endswith(
        "UNSETTLED"
    )
    assert bench.verdict("peak_memory_imsm/vanilla_train", 1.1).endswith("PASS")  # no interval: the value
    assert bench.verdict("decode_tok_s_imsm/hf_generate_bf16_b1", 0.5, ci) == "(report)"
    few = {"low": 0.96, "high": 0.98, "confidence": 1 - 2 / 2**5, "n": 5}  # 5 rounds: the whole range, 94%
    assert bench.verdict(name, 0.97, few).endswith("PASS? (under 95% sure: 5 rounds)")
    assert bench.verdict(name, 0.97, {**few, "confidence": 1 - 2 / 2**6, "n": 6}).endswith("PASS")


def test_decode_fn_ignores_eos_and_prompt_batch_repeats_one_prompt():
    tok = load_tokenizer(prepare_smollm2())
    ids, mask = timing.prompt_batch(tok, 3, 20, "cpu")
    assert ids.shape == mask.shape == (3, 20) and bool(mask.all()) and torch.equal(ids[0], ids[2])
    long, _ = timing.prompt_batch(tok, 1, 1000, "cpu")  # longer than the text: its tokens again
    assert long.shape == (1, 1000) and torch.equal(long[0, :20], ids[0])
    model = make_imsm("query_aware")
    out = timing.decode_fn(model, ids % 97, mask, 7)()
    assert out.shape == (3, 7)  # exactly `new` tokens whatever the model emits


def test_autocast_context_is_nothing_for_fp32_and_autocast_for_half_precisions():
    with autocast_context("cpu", None):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match=r"autocast='fp8' is not one of \[null, fp32, bf16, fp16\]"):
        autocast_context("cpu", "fp8")


def test_speed_job_writes_tokens_per_second(tmp_path):
    cfg = compose_train(["backbone=tiny_llama", f"run_dir={tmp_path}", "speed={new_tokens: 4, repeats: 1}"])
    cfg = speed.with_speed_defaults(cfg)
    assert cfg.speed.batch_size == speed.DEFAULT_SPEED["batch_size"] and cfg.speed.new_tokens == 4
    result = speed.speed_run(cfg, tmp_path, {"backbone": "tiny_llama"})
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["status"] == "ok" and written["backbone"] == "tiny_llama"
    sp = written["speed"]
    assert sp["new_tokens"] == 4 and sp["repeats"] == 1 and sp["seconds"]["imsm"]["n"] == 1
    assert sp["imsm/vanilla"] == pytest.approx(sp["tokens_per_s"]["imsm"] / sp["tokens_per_s"]["vanilla"])
    ci = sp["imsm/vanilla_interval"]  # one repeat: the interval is that round's ratio
    assert ci["n"] == 1 and ci["low"] == ci["median"] == ci["high"] == sp["imsm/vanilla"]
    assert result["speed"] == sp
    with pytest.raises(ValueError, match="gate='none' has no gate"):
        speed.speed_run(
            compose_train(["backbone=tiny_llama", "gate=none", "speed={repeats: 1}"]), tmp_path, {}
        )


@pytest.mark.slow  # a fresh interpreter; speed_run itself is tested in-process (above, and in test_sweeps)
def test_speed_entry_point_runs_one_job(tmp_path):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "imsm.speed",
        "backbone=tiny_llama",
        f"run_dir={tmp_path}",
        "speed={new_tokens: 2, repeats: 1}",
    ]
    subprocess.run(
        [*cmd, f"hydra.run.dir={tmp_path / 'hydra'}"], check=True, cwd=REPO, env=env, capture_output=True
    )
    written = json.loads((tmp_path / "metrics.json").read_text())
    # the training job's record (its choices and setup) with the speed section
    assert (
        written["backbone"] == "tiny_llama" and written["peft"] == "lora" and written["gate"] == "query_aware"
    )
    assert written["setup"]["speed"] == {**speed.DEFAULT_SPEED, "new_tokens": 2, "repeats": 1}
    assert written["speed"]["new_tokens"] == 2


def test_lockstep_takes_one_step_of_each_contender_in_turn(monkeypatch):
    calls: list[str] = []
    clock = iter(range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))

    def steps(name: str, n: int):
        def run():
            for _ in range(n):
                calls.append(name)
                yield

        return run

    res = timing.lockstep({"a": steps("a", 3), "b": steps("b", 2)}, 2, "cpu", warmup=1)
    # per round: A B, B A, then A alone (B is done); 1 untimed round, then 2 timed
    assert calls == ["a", "b", "b", "a", "a"] * 3
    assert res["a"]["times"] == [3.0, 3.0] and res["b"]["times"] == [2.0, 2.0]  # one tick per step, summed
    assert res["a"]["first"] == [1.0, 1.0] and (res["a"]["steps"], res["b"]["steps"]) == (3, 2)
    with pytest.raises(ValueError, match="repeats=0"):
        timing.lockstep({"a": steps("a", 1)}, 0, "cpu")


def test_lockstepped_decoders_give_the_tokens_each_gives_alone():
    """IMSM (fused: its adapted layers split while suspended) beside vanilla on a copy of the weights, as the
    bench's --lockstep runs them: stepping them in turn changes no token."""
    import copy

    from test_static_decoding import PROMPTS, lively_imsm

    from imsm.data.collate import left_pad
    from imsm.model.siamese import IMSMModel

    model = lively_imsm(
        "query_aware"
    )  # continuations that change from token to token and between the streams
    vanilla = IMSMModel(copy.deepcopy(model.peft_model), None)
    ids, mask = left_pad(PROMPTS, 0)
    tokens: dict[str, list] = {"imsm": [], "vanilla": []}

    def recorded(name, m):
        make = timing.decode_steps_fn(m, ids, mask, 9)
        return lambda: (tokens[name].append(t) or t for t in make())

    timing.lockstep({"imsm": recorded("imsm", model), "vanilla": recorded("vanilla", vanilla)}, 1, "cpu", 0)
    for name, m in (("imsm", model), ("vanilla", vanilla)):
        alone = timing.decode_fn(m, ids, mask, 9)()
        assert torch.equal(torch.stack(tokens[name], dim=1), alone), name
    assert not torch.equal(torch.stack(tokens["imsm"], 1), torch.stack(tokens["vanilla"], 1))  # not vacuous


def test_cached_and_uncached_epochs_of_one_model_can_be_stepped_in_turn():
    batches = [
        {**bench.train_batch(97, 2, 12, 6, "cpu", seed=i), "index": torch.tensor([2 * i, 2 * i + 1])}
        for i in range(2)
    ]
    model = make_imsm("query_aware")
    calls = []
    model.backbone.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    runs = {c: bench.epoch_steps_fn(model, batches, 3, "fp32", "cpu", cache=c)() for c in (True, False)}
    for _ in range(6):
        next(runs[True])
        assert model.frozen_cache is None  # held only during the cached run's own step
        next(runs[False])
    with pytest.raises(StopIteration) as done:
        next(runs[True])
    filled = done.value.value
    assert (filled.misses, filled.hits, len(filled.entries)) == (2, 4, 4)
    assert len(calls) == 12 + 2 + 6  # tuned in every step; frozen in epoch 1 cached, in every step uncached
