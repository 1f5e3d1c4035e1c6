"""Greedy decoding with fixed shapes: a static KV cache and one compiled step, for GPUs where each step is launch-bound.

A small model decoding a handful of rows spends most of each step launching kernels (hundreds per layer stack),
not computing, and IMSM launches about twice vanilla's. Here every tensor a step touches keeps one shape and one
address for the whole run: transformers' ``StaticCache`` holds ``cache_len`` positions (prompt + new tokens, rounded
up to ``LENGTH_MULTIPLE`` so prompts of similar length share a compiled step), the attention mask covers all of
them, and the step's state (last token, position, finished rows, the output) lives in buffers updated in place.
The step (each stream one token per row, as one doubled batch when fusable; the gate mix; the head's argmax) is
then ``torch.compile``d, with CUDA graphs on CUDA (``mode="reduce-overhead"``): one graph replay per token (two
when the streams cannot fuse: peft's ``disable_adapter`` switch stays outside the graphs). Each new batch size,
static length, dtype or plan compiles once (tens of seconds on a GPU for a 135M model, est.); later calls replay.

The prompts are read as in ``imsm.model.decoding`` (each stream in row chunks through a ``DynamicCache``, not
compiled: prompt shapes vary) and copied into the static cache, so the first token and the query summaries are
exactly the eager decoder's; the tokens are the same (the attention of a step spans the whole static length with
the unfilled positions masked, and the compiled kernels may round differently in the last bit).

The buffers are kept per model and reused while the shapes stay (``Workspace``): CUDA graphs replay on fixed
addresses, and fresh buffers on every call would re-record them. Only plain transformers decoders (family
``GENERIC``) whose layers all cache every position are supported (``unsupported_reason``); ChatGLM (its own tuple
cache, (seq, batch, d) layers) and sliding-window or hybrid caches decode with ``greedy_generate``.
``IMSMModel.generate(static_cache=...)`` chooses between the two (``chosen``): by default the eager decoder, until
this path has been measured faster on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from imsm.model.decoding import (
    check_inputs,
    fuses_prefill,
    prefill,
    prefill_both,
    step_settings,
    stream_plan,
)
from imsm.model.families import GENERIC
from imsm.model.fusion import adapter_on_second_half, fused_layers
from imsm.model.siamese import pool_query, positions_from_mask

if TYPE_CHECKING:
    from imsm.model.siamese import IMSMModel

# static length granularity: prompts of similar length reuse one compiled step instead of compiling their own
LENGTH_MULTIPLE = 256
# compiled variants of the step (one per model structure, batch, static length, dtype); dynamo's default of 8 per
# function would send a benchmark's 9th variant (or an evaluation's) back to eager without a word
RECOMPILE_LIMIT = 64
EOS_SLOTS = 8  # end ids a step compares with (more compile a step of their own)
# the automatic choice: unset or "0" never, "cuda" on CUDA devices, "1" on every device
ENV_SWITCH = "IMSM_STATIC_CACHE"


@dataclass(frozen=True)
class Plan:
    """What one decoding run computes.

    Attributes:
        streams: the streams it runs, in cache order: ``("base", "tuned")`` for IMSM, one of them otherwise.
        mixing: mix M and M' with the gate (else the one stream's state goes to the head).
        fuse: both streams as one doubled batch (one cache of 2b rows, M's first).
        query: the gate reads the query summaries.
    """

    streams: tuple[str, ...]
    mixing: bool
    fuse: bool
    query: bool


def unsupported_reason(model: IMSMModel) -> str | None:
    """Why ``model`` cannot decode with a static cache, or None when it can."""
    if model.family is not GENERIC:
        return (
            f"family {model.family.name!r} ({model.config.model_type}) is not a plain transformers decoder "
            "(it keeps its own cache)"
        )
    layers = StaticCache(config=model.config, max_cache_len=1).layers
    kinds = sorted({type(layer).__name__ for layer in layers if type(layer) is not StaticLayer})
    if kinds:
        return (
            f"{model.config.model_type} caches some layers as {kinds}, not all as full-attention StaticLayer"
        )
    return None


class Workspace:
    """Everything the compiled step reads and writes, at fixed addresses, for one plan, batch and static length.

    Attributes:
        caches: one ``StaticCache`` per pass of a step: [doubled batch] fused, else one per stream of the plan.
        mask: (rows, cache_len) bool attention mask over every cache position (rows = 2 * batch fused).
        tokens: (batch,) each row's last emitted token, the next step's input.
        positions: (batch, 1) the position id of that token.
        finished: (batch,) bool, the row emitted an end token.
        out: (batch, cache_len) the emitted tokens; ``step`` (a 1-element long tensor) is the next column.
        base_query, tuned_query: (batch, d) query summaries of M and M' (``plan.query``), else None.
        pad: () the id a row emits after its end.
    """

    def __init__(
        self,
        model: IMSMModel,
        plan: Plan,
        batch: int,
        cache_len: int,
        prefill: DynamicCache,
        hidden: torch.Tensor,
    ):
        """``prefill``: a prefill chunk's cache, the layers' heads, head sizes and dtypes (under autocast, keys
        after RoPE may be fp32 beside bf16 values); ``hidden``: its (rows, prompt_len, d) states, the summaries'."""
        device, rows = hidden.device, 2 * batch if plan.fuse else batch
        self.caches = []
        for _ in range(1 if plan.fuse else len(plan.streams)):
            cache = StaticCache(config=model.config, max_cache_len=cache_len)
            for layer, src in zip(cache.layers, prefill.layers, strict=True):
                k, v = src.keys, src.values  # (chunk rows, kv_heads, prompt_len, head_dim)
                layer.lazy_initialization(
                    k.new_empty(rows, k.shape[1], 0, k.shape[3]), v.new_empty(rows, v.shape[1], 0, v.shape[3])
                )
            self.caches.append(cache)
        self.mask = torch.ones(rows, cache_len, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out = torch.zeros(batch, cache_len, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.pad = torch.zeros((), dtype=torch.long, device=device)
        summary = (batch, hidden.shape[-1])
        self.base_query = hidden.new_zeros(summary) if plan.query else None
        self.tuned_query = hidden.new_zeros(summary) if plan.query else None
        buffers = (self.mask, self.tokens, self.positions, self.finished, self.out, self.step, self.pad)
        for t in (*buffers, self.base_query, self.tuned_query):
            if t is not None:  # CUDA graphs read and write them in place instead of copying them in each step
                torch._dynamo.mark_static_address(t)

    def fill_cache(self, index: int, rows: slice, prefill: DynamicCache, prompt_len: int) -> None:
        """Copy a prefill cache (its rows of the batch) into ``caches[index]`` at ``rows``, positions [0, prompt_len)."""
        for layer, src in zip(self.caches[index].layers, prefill.layers, strict=True):
            layer.keys[rows, :, :prompt_len] = src.keys
            layer.values[rows, :, :prompt_len] = src.values
            # past the prompt: an earlier run's states, hidden by the causal mask until a step overwrites them
            layer.cumulative_length.fill_(prompt_len)


# model -> (shapes, its workspace): one per model, so alternating contenders (distinct models) keep theirs
_WORKSPACES: weakref.WeakKeyDictionary[IMSMModel, tuple[tuple, Workspace]] = weakref.WeakKeyDictionary()


def workspace_for(
    model: IMSMModel, plan: Plan, batch: int, cache_len: int, prefill: DynamicCache, hidden: torch.Tensor
) -> Workspace:
    """The model's workspace for these shapes: the last call's when it had the same ones, else a new one."""
    layers = tuple(
        (*layer.keys.shape[1::2], layer.keys.dtype, layer.values.dtype) for layer in prefill.layers
    )
    # inference tensors (torch.inference_mode, as evaluation decodes) cannot be updated outside that mode
    key = (plan, batch, cache_len, layers, hidden.shape[-1], hidden.dtype, hidden.device)
    key += (torch.is_inference_mode_enabled(),)
    held = _WORKSPACES.get(model)
    if held is None or held[0] != key:
        _WORKSPACES.pop(model, None)  # the old buffers go before the new ones are allocated
        held = (key, Workspace(model, plan, batch, cache_len, prefill, hidden))
        _WORKSPACES[model] = held
    return held[1]


def stream_pass(
    model: IMSMModel, cache: StaticCache, mask: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """The last state of one stream for ``tokens`` (batch,) at ``positions`` (batch, 1): (batch, d).

    The caller picks the stream: the backbone runs with the adapter as it is switched at the call (inside
    ``IMSMModel.frozen()`` for M). Its keys and values go to ``cache`` at the next position.
    """
    return model.family.last_hidden(model.backbone, tokens.unsqueeze(1), mask, positions, cache)[:, -1]


def decode_step(
    model: IMSMModel,
    plan: Plan,
    cache: StaticCache,
    mask: torch.Tensor,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    finished: torch.Tensor,
    out: torch.Tensor,
    step: torch.Tensor,
    base_hidden: torch.Tensor | None,
    base_query: torch.Tensor | None,
    tuned_query: torch.Tensor | None,
    eos: torch.Tensor,
    pad: torch.Tensor,
) -> None:
    """One token per row, every state updated in place (the ``Workspace`` buffers; shapes there).

    Fused: both streams as one doubled batch (inside ``adapter_on_second_half``: rows [:batch] M, [batch:] M').
    Otherwise one stream through ``cache`` as the adapter is switched at the call; when mixing it is M' and M's
    state of this step is ``base_hidden`` (batch, d), computed before by ``stream_pass`` inside ``frozen()``:
    peft's ``disable_adapter`` cannot be traced without graph breaks. Then the (mixed) state gives the next token
    through the head; a finished row emits ``pad``.
    """
    batch = tokens.shape[0]
    if plan.fuse:
        both = stream_pass(model, cache, mask, torch.cat([tokens, tokens]), torch.cat([positions, positions]))
        base_hidden, hidden = both[:batch], both[batch:]
    else:
        hidden = stream_pass(model, cache, mask, tokens, positions)
    h = model.mix(base_hidden, hidden, base_query, tuned_query) if plan.mixing else hidden
    next_tok = torch.where(finished, pad, model.lm_head(h).argmax(-1))
    out.index_copy_(1, step, next_tok.unsqueeze(1))
    tokens.copy_(next_tok)
    finished.logical_or_(torch.isin(next_tok, eos))
    positions.add_(1)
    step.add_(1)


# models whose step failed to compile under ``static_cache=None``: they decode with greedy_generate from then on
_FAILED: weakref.WeakSet[IMSMModel] = weakref.WeakSet()


def chosen(model: IMSMModel, device: torch.device, static_cache: bool | None) -> bool:
    """Whether ``IMSMModel.generate`` decodes with ``static_generate``: ``static_cache`` when given. None
    (automatic): off, unless the ``IMSM_STATIC_CACHE`` environment variable (for runs that cannot pass the
    argument, such as evaluation) says "cuda" (on CUDA devices) or "1" (every device); then for a model that
    ``unsupported_reason`` accepts and that has not failed to compile before.

    Off by default because it has never run on a GPU: whether it is faster there than the eager decoder (with a
    compilation per batch size and length bucket) is what ``scripts/gpu_check.sh`` measures (``imsm_static`` vs
    ``imsm`` in the bench). On a 2-core CPU (SmolLM2-135M, bf16, batch 1, 2026-12-02) it decoded LoRA, AdaLoRA,
    IA3, LoHa and LoRAMoE 1.3-1.6x faster than the eager decoder after 13-97 s of compiling per variant, but DoRA
    0.83x (docs/performance.md): not a default there either; ``IMSM_STATIC_CACHE=1`` for long CPU runs.
    """
    if static_cache is not None:
        return static_cache
    switch = os.environ.get(ENV_SWITCH, "0")
    if not (switch == "1" or (switch == "cuda" and device.type == "cuda")):
        return False
    return model not in _FAILED and unsupported_reason(model) is None


def give_up(model: IMSMModel, error: Exception) -> None:
    """Record that ``model``'s step failed to compile (automatic mode: warn once, then the eager decoder)."""
    _FAILED.add(model)
    warnings.warn(
        f"static-cache decoding failed to compile ({type(error).__name__}: {error}); this model decodes with "
        "greedy_generate from now on (static_cache=True raises instead)",
        RuntimeWarning,
        stacklevel=3,
    )


@functools.cache
def compiled(
    device_type: str, backend: str = "inductor"
) -> tuple[Callable[..., None], Callable[..., torch.Tensor]]:
    """``decode_step`` and ``stream_pass`` compiled for static shapes: with CUDA graphs on CUDA (inductor's
    ``reduce-overhead``), inductor's default mode elsewhere; ``backend`` another ``torch.compile`` backend."""
    mode = "reduce-overhead" if device_type == "cuda" and backend == "inductor" else None
    return (
        torch.compile(decode_step, backend=backend, mode=mode, dynamic=False),
        torch.compile(stream_pass, backend=backend, mode=mode, dynamic=False),
    )


@contextlib.contextmanager
def fused_streams(model: IMSMModel, batch: int) -> Iterator[None]:
    """``adapter_on_second_half``, with the same ``forward`` object in each layer on every entry.

    Dynamo guards on the identity of a module's instance ``forward``: the fresh ``functools.partial`` objects that
    ``adapter_on_second_half`` installs would recompile the step on every call. Each layer keeps its own per batch
    size (a reference cycle through the layer, which the garbage collector frees with the model).
    """
    layers = fused_layers(model.peft_model)  # before entering: inside, the layers no longer count as fusable
    with adapter_on_second_half(model.peft_model, batch):
        for m in layers or []:
            forwards = m.__dict__.setdefault("_imsm_static_half_forwards", {})
            if batch not in forwards:
                forwards[batch] = vars(m)["forward"]
            m.forward = forwards[batch]  # popped again on leaving, as the one it replaces
        yield


def read_prompts(
    model: IMSMModel,
    plan: Plan,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    cache_len: int,
    rows: int,
) -> tuple[dict[str, torch.Tensor], Workspace]:
    """Each stream of ``plan`` over the prompts, eagerly (their shapes vary), into the model's workspace.

    Read as ``greedy_generate`` reads them (``imsm.model.decoding``: small prompts as one doubled batch when fused,
    else ``rows`` rows at a time into a ``DynamicCache``), then copied into the static cache (fused: M's rows first,
    then M''s).

    Args:
        input_ids, attention_mask, positions: (batch, prompt_len), left-padded.

    Returns:
        Each stream's (batch, prompt_len, d) states by name, and the workspace.
    """
    batch, prompt_len = input_ids.shape
    if fuses_prefill(plan.fuse, batch, prompt_len, rows):
        base, tuned, cache = prefill_both(model, input_ids, attention_mask, positions)
        ws = workspace_for(model, plan, batch, cache_len, cache, base)
        ws.fill_cache(0, slice(0, 2 * batch), cache, prompt_len)
        return {"base": base, "tuned": tuned}, ws
    hidden: dict[str, torch.Tensor] = {}
    ws: Workspace | None = None
    for s, name in enumerate(plan.streams):
        hidden[name], cache = prefill(
            model, input_ids, attention_mask, positions, adapter=name == "tuned", rows=rows
        )
        if ws is None:
            ws = workspace_for(model, plan, batch, cache_len, cache, hidden[name])
        at = s * batch if plan.fuse else 0
        ws.fill_cache(0 if plan.fuse else s, slice(at, at + batch), cache, prompt_len)
    return hidden, ws


@torch.no_grad()
def static_generate(
    model: IMSMModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
    streams: str = "imsm",
    fuse_streams: bool | None = None,
    stop_check_every: int | None = None,
    prefill_tokens: int | None = None,
    compile: bool | str = True,
) -> torch.Tensor:
    """``greedy_generate`` with a static cache and a compiled step; same arguments, same tokens.

    Args:
        compile: compile the step (``compiled``); False runs the same static-cache steps eagerly; a string is
            another ``torch.compile`` backend (``"eager"``: dynamo's tracing and guards without code generation).

    Returns:
        (batch, n_new) new token ids, n_new <= max_new_tokens, ``pad_token_id`` after each row's EOS.

    Raises:
        ValueError: for a model that ``unsupported_reason`` refuses, an unknown ``streams``, right padding.
    """
    check_inputs(streams, attention_mask)
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"static cache: {reason}; decode with static_cache=False")
    mixing, fuse = stream_plan(model, streams, fuse_streams)
    plan = Plan(
        streams=("base", "tuned") if mixing else ("base",) if streams == "base" else ("tuned",),
        mixing=mixing,
        fuse=fuse,
        query=mixing and getattr(model.gate, "needs_query", False),
    )
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    check_every, rows = step_settings(device, prompt_len, stop_check_every, prefill_tokens)
    cache_len = -(-(prompt_len + max_new_tokens) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    positions = positions_from_mask(attention_mask)

    hidden, ws = read_prompts(model, plan, input_ids, attention_mask, positions, cache_len, rows)
    base, tuned = hidden.get("base"), hidden.get("tuned")

    # the positions still to decode are True: each step's causal mask hides those not written yet
    ws.mask[:, prompt_len:] = True
    ws.mask[:, :prompt_len] = torch.cat([attention_mask, attention_mask]) if plan.fuse else attention_mask
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    # repeated to a fixed length (isin is the same): another number of end ids would compile the step again
    eos = torch.tensor((eos_ids * EOS_SLOTS)[: max(EOS_SLOTS, len(eos_ids))], device=device)
    ws.pad.fill_(pad_token_id)
    bq = tq = None
    if plan.query:  # computed once: the prompt never changes
        bq = pool_query(base, attention_mask, model.pooling)
        tq = pool_query(tuned, attention_mask, model.pooling)
        ws.base_query.copy_(bq)
        ws.tuned_query.copy_(tq)
    # the first token, from the prompts' last states, eagerly as in greedy_generate
    h = model.mix(base[:, -1], tuned[:, -1], bq, tq) if mixing else hidden[plan.streams[0]][:, -1]
    first = model.lm_head(h).argmax(-1)
    ws.tokens.copy_(first)
    ws.out[:, 0] = first
    ws.finished.copy_(torch.isin(first, eos))
    ws.positions.copy_(positions[:, -1:] + 1)
    ws.step.fill_(1)

    if compile:
        step_fn, pass_fn = compiled(device.type, "inductor" if compile is True else compile)
    else:
        step_fn, pass_fn = decode_step, stream_pass
    if plan.fuse:
        around = fused_streams(model, batch)
    else:  # M alone runs with the adapter off throughout (M beside M' switches it each step, below)
        around = model.frozen() if plan.streams == ("base",) else contextlib.nullcontext()
    limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
    n = 1
    with around, torch._dynamo.config.patch(recompile_limit=limit):
        while n < max_new_tokens and not (n % check_every == 0 and bool(ws.finished.all())):
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are done with
            base_hidden = None
            if mixing and not plan.fuse:
                with model.frozen():
                    base_hidden = pass_fn(model, ws.caches[0], ws.mask, ws.tokens, ws.positions)
            step_fn(
                model,
                plan,
                ws.caches[-1],
                ws.mask,
                ws.tokens,
                ws.positions,
                ws.finished,
                ws.out,
                ws.step,
                base_hidden,
                ws.base_query,
                ws.tuned_query,
                eos,
                ws.pad,
            )
            n += 1
    return ws.out[:, :n].clone()
