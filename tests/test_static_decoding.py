"""Static-cache decoding (``imsm.model.static_decoding``) gives ``greedy_generate``'s tokens.

The fast tests run the static-cache steps eagerly (``compile=False``): the cache filled from the prefill, the
full-length mask over left padding, the positions, the in-place step state, EOS, the reused buffers. The slow ones
compile the step: with dynamo alone (``compile="eager"``: its tracing and guards, so that one model switching
between plans never runs a stale graph) and with inductor, as on a GPU but without CUDA graphs. The ``gpu`` one runs
the CUDA graphs (``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, get_peft_model
from test_families import tiny_imsm
from test_fusion_methods import METHODS, build

from imsm.data.collate import left_pad
from imsm.model import static_decoding
from imsm.model.decoding import greedy_generate
from imsm.model.gate import build_gate
from imsm.model.siamese import IMSMModel
from imsm.model.static_decoding import LENGTH_MULTIPLE, static_generate, unsupported_reason

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]  # left-padded to 6: rows of 6, 3 and 4 tokens
DECODE = {"max_new_tokens": 10, "eos_token_id": 96, "pad_token_id": 0}
CASES = {  # name -> (gate, generate's arguments)
    "imsm fused": ("query_aware", {}),
    "imsm two passes": ("query_aware", {"fuse_streams": False}),
    "imsm without query, two passes": ("no_query", {"fuse_streams": False}),
    "vanilla": ("none", {}),
    "frozen stream alone": ("query_aware", {"streams": "base"}),
    "tuned stream alone": ("query_aware", {"streams": "tuned"}),
}


def lively_imsm(gate: str) -> IMSMModel:
    """A tiny IMSM model (LoRA on q, v) with large random weights (initializer_range 0.5): its greedy continuations
    change from token to token and between the streams, where the default init repeats the prompt's last token
    (and a wrong position or cache entry would go unnoticed)."""
    backbone = tiny_llama(initializer_range=0.5)
    for p in backbone.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(backbone, lora)
    torch.manual_seed(1)
    return IMSMModel(peft_model, build_gate(gate, 32, rank=4, dropout=0.0)).eval()


def greedy(model: IMSMModel, prompts: list[list[int]], **kwargs) -> torch.Tensor:
    return greedy_generate(model, *left_pad(prompts, 0), **{**DECODE, **kwargs})


def static(model: IMSMModel, prompts: list[list[int]], compile: bool | str = False, **kwargs) -> torch.Tensor:
    return static_generate(model, *left_pad(prompts, 0), compile=compile, **{**DECODE, **kwargs})


@pytest.mark.parametrize("case", list(CASES))
def test_static_cache_steps_give_the_greedy_tokens(case):
    gate, kwargs = CASES[case]
    model = lively_imsm(gate)
    assert model.can_fuse_streams()  # the two-pass cases choose it
    expected = greedy(model, PROMPTS, **kwargs)
    assert expected.shape == (3, 10) and len(set(expected[0].tolist())) > 3  # a continuation, not one token
    assert torch.equal(static(model, PROMPTS, **kwargs), expected)


@pytest.mark.parametrize("method", list(METHODS))
def test_static_cache_steps_for_every_adapter_method(method):
    model = build(method)  # every adapter parameter moved off its no-op start
    for kwargs in ({}, {"fuse_streams": False}):  # the fused layers of imsm.model.fused_layers, or two passes
        assert torch.equal(static(model, PROMPTS, **kwargs), greedy(model, PROMPTS, **kwargs)), kwargs


@pytest.mark.parametrize("model_type", ["qwen2", "gemma"])
def test_static_cache_steps_on_other_decoder_families(model_type):
    model = tiny_imsm(model_type)
    assert unsupported_reason(model) is None
    assert torch.equal(static(model, PROMPTS), greedy(model, PROMPTS))


def test_static_cache_under_autocast_inference_mode_and_in_bf16():
    model = lively_imsm("query_aware")
    # as evaluation decodes (imsm.predict): under inference_mode and autocast, where the keys after RoPE are fp32
    # beside bf16 values, and the buffers are inference tensors
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for kwargs in ({}, {"fuse_streams": False}):
            assert torch.equal(static(model, PROMPTS, **kwargs), greedy(model, PROMPTS, **kwargs))
    # then outside it again, and with bf16 weights (as the benchmark's bf16 rows): buffers of their own
    model.to(torch.bfloat16)
    assert torch.equal(static(model, PROMPTS), greedy(model, PROMPTS))


def test_static_decoding_stops_where_greedy_stops():
    model = lively_imsm("query_aware")
    two = PROMPTS[:2]
    eos = int(greedy(model, two)[0, 2])  # row 0 ends at its third token
    for check_every in (1, 4):  # "all rows ended" tested after every token, or every 4
        expected = greedy(model, two, eos_token_id=eos, stop_check_every=check_every)
        got = static(model, two, eos_token_id=eos, stop_check_every=check_every)
        assert torch.equal(got, expected)
        assert (got[0, 3:] == 0).all()  # padded after its end
    first = int(greedy(model, two[:1], max_new_tokens=1)[0, 0])
    assert static(model, two[:1], eos_token_id=[96, first]).shape == (1, 1)  # every row ended: stop at once


def test_workspace_is_reused_while_the_shapes_stay_and_stale_positions_stay_hidden():
    model = lively_imsm("query_aware")
    static(model, [[5, 6, 7, 8, 9, 10, 11, 12]], max_new_tokens=30)
    key, ws = static_decoding._WORKSPACES[model]
    keys = ws.caches[0].layers[0].keys
    assert keys.shape == (
        2,
        2,
        LENGTH_MULTIPLE,
        8,
    )  # both streams' row, KV heads, 8 + 30 rounded up, head size
    # a shorter prompt, the same bucket: the same buffers, whose positions 3..37 still hold the last run's states
    got = static(model, [[20, 21, 22]])
    assert (
        static_decoding._WORKSPACES[model][1] is ws
        and ws.caches[0].layers[0].keys.data_ptr() == keys.data_ptr()
    )
    assert torch.equal(got, greedy(model, [[20, 21, 22]]))
    static(model, PROMPTS[:2])  # another batch size: new buffers
    assert static_decoding._WORKSPACES[model][0] != key


def test_models_without_a_plain_cache_are_refused_and_generate_picks_its_decoder(monkeypatch):
    glm, mistral, llama = tiny_imsm("chatglm"), tiny_imsm("mistral"), lively_imsm("query_aware")
    assert "chatglm" in unsupported_reason(glm)
    assert "StaticSlidingWindowLayer" in unsupported_reason(mistral)  # its config's sliding_window: 4096
    with pytest.raises(ValueError, match="decode with static_cache=False"):
        static(glm, PROMPTS)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("IMSM_STATIC_CACHE", raising=False)
    # off by default (never measured on a GPU), the argument wins
    assert not static_decoding.chosen(llama, cuda, None) and not static_decoding.chosen(llama, cpu, None)
    assert static_decoding.chosen(llama, cpu, True) and not static_decoding.chosen(llama, cuda, False)
    monkeypatch.setenv("IMSM_STATIC_CACHE", "cuda")  # a run that cannot pass the argument switches it
    assert static_decoding.chosen(llama, cuda, None) and not static_decoding.chosen(llama, cpu, None)
    assert not static_decoding.chosen(glm, cuda, None)
    monkeypatch.setenv("IMSM_STATIC_CACHE", "0")
    assert not static_decoding.chosen(llama, cuda, None) and static_decoding.chosen(llama, cuda, True)
    monkeypatch.setenv("IMSM_STATIC_CACHE", "1")
    assert static_decoding.chosen(llama, cpu, None) and not static_decoding.chosen(glm, cpu, None)
    monkeypatch.delenv("IMSM_STATIC_CACHE")
    # generate(static_cache=True) decodes with the static cache (its steps uncompiled here: compiling is slow)
    monkeypatch.setattr(
        static_decoding, "compiled", lambda *_: (static_decoding.decode_step, static_decoding.stream_pass)
    )
    expected = greedy(llama, PROMPTS)
    assert torch.equal(llama.generate(*left_pad(PROMPTS, 0), static_cache=True, **DECODE), expected)
    assert llama in static_decoding._WORKSPACES
    vanilla = lively_imsm("none")
    assert torch.equal(vanilla.generate(*left_pad(PROMPTS, 0), **DECODE), greedy(vanilla, PROMPTS))
    assert vanilla not in static_decoding._WORKSPACES  # automatic: not on CPU


def test_automatic_mode_falls_back_to_the_eager_decoder_when_compiling_fails(monkeypatch):
    model = lively_imsm("query_aware")

    def fail(*_):
        raise torch._dynamo.exc.TorchDynamoException("no backend here")

    # pretend to be on CUDA, where static_cache=None picks the static path, and let compilation fail
    monkeypatch.setattr(
        static_decoding,
        "chosen",
        lambda m, _device, flag: flag if flag is not None else m not in static_decoding._FAILED,
    )
    monkeypatch.setattr(static_decoding, "compiled", lambda *_: (fail, fail))
    ids, mask = left_pad(PROMPTS, 0)
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        model.generate(ids, mask, static_cache=True, **DECODE)
    with pytest.warns(RuntimeWarning, match="greedy_generate from now on"):
        assert torch.equal(model.generate(ids, mask, **DECODE), greedy(model, PROMPTS))
    assert model in static_decoding._FAILED
    assert torch.equal(
        model.generate(ids, mask, **DECODE), greedy(model, PROMPTS)
    )  # no second try, no warning


@pytest.mark.slow  # dynamo traces each plan (~5-10 s each on 2 busy CPU cores)
def test_traced_steps_follow_plan_switches_on_one_model_and_reuse_their_graph():
    model = lively_imsm("query_aware")
    plans = [{}, {"fuse_streams": False}, {"streams": "base"}, {"streams": "tuned"}]
    for (
        kwargs
    ) in plans:  # the adapter's state differs between them: each needs its own graph, never another's
        assert torch.equal(
            static(model, PROMPTS, compile="eager", **kwargs), greedy(model, PROMPTS, **kwargs)
        )
    # a second call with the same shapes runs the graph compiled before (the fused layers' forwards are the same
    # objects again), also for other prompts of another length (the static length is the same)
    other = [[7, 8, 9, 10], [30, 31], [40, 41, 42]]
    with torch.compiler.set_stance("fail_on_recompile"):
        for kwargs in plans:
            assert torch.equal(
                static(model, other, compile="eager", **kwargs), greedy(model, other, **kwargs)
            )


@pytest.mark.slow  # inductor compiles each variant (~30 s on 2 busy CPU cores)
def test_compiled_steps_give_the_greedy_tokens():
    imsm = lively_imsm("query_aware")
    vanilla = IMSMModel(imsm.peft_model, None)  # as the benchmark's: the same weights, no gate
    two = PROMPTS[:2]  # left-padded batch of 2, 6 and 3 tokens
    tokens = greedy(imsm, two)
    eos = [int(tokens[0, 3]), int(tokens[1, 4])]  # each row ends within 5 tokens
    for name, model, kwargs in [
        ("imsm fused", imsm, {}),
        ("imsm two passes", imsm, {"fuse_streams": False}),
        ("vanilla", vanilla, {}),
        ("imsm fused, EOS", imsm, {"eos_token_id": eos}),
    ]:
        start = time.perf_counter()
        got = model.generate(*left_pad(two, 0), static_cache=True, **{**DECODE, **kwargs})
        print(f"{name}: {time.perf_counter() - start:.1f} s (compilation included)")
        assert torch.equal(got, greedy(model, two, **kwargs)), name
    assert got.shape[1] <= 5  # the last run stopped at EOS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_steps_give_the_greedy_tokens_and_replay_without_recompiling():
    imsm = lively_imsm("query_aware").cuda()
    vanilla = IMSMModel(imsm.peft_model, None)
    ids, mask = (t.cuda() for t in left_pad(PROMPTS, 0))
    tokens = greedy_generate(imsm, ids, mask, **DECODE)
    eos = [int(tokens[0, 3]), int(tokens[1, 4]), int(tokens[2, 2])]  # every row ends within 5 tokens
    cases = [
        ("imsm fused", imsm, {}),
        ("imsm two passes", imsm, {"fuse_streams": False}),
        ("vanilla", vanilla, {}),
        ("imsm fused, EOS", imsm, {"eos_token_id": eos, "stop_check_every": 1}),
    ]
    for name, model, kwargs in cases:
        args = {**DECODE, **kwargs}
        got = model.generate(ids, mask, static_cache=True, **args)  # compiles, records the CUDA graphs
        assert torch.equal(got, greedy_generate(model, ids, mask, **args)), name
    assert got.shape[1] <= 5
    with torch.compiler.set_stance("fail_on_recompile"):  # same shapes: the graphs replay
        for name, model, kwargs in cases:
            args = {**DECODE, **kwargs}
            got = model.generate(ids, mask, static_cache=True, **args)
            assert torch.equal(got, greedy_generate(model, ids, mask, **args)), name


def test_static_cache_reads_large_prompts_stream_by_stream(monkeypatch):
    """Fused decoding reads small prompts as one doubled batch (``prefill_both``) and larger ones stream by stream:
    the static cache is filled right from either."""
    from imsm.model import decoding

    model = lively_imsm("query_aware")
    expected = greedy(model, PROMPTS)
    calls = []
    real = decoding.prefill_both
    monkeypatch.setattr(static_decoding, "prefill_both", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(static(model, PROMPTS), expected) and calls == [1]
    monkeypatch.setattr(decoding, "FUSED_PREFILL_TOKENS", 0)  # every prompt is "large"
    assert torch.equal(static(model, PROMPTS), expected) and calls == [1]
