"""KV-cached greedy decoding of the siamese model, kept apart from the model (as nanochat's engine beside its GPT).

Both streams read the prompts once (prefill, in row chunks), each into its own KV cache; the query summaries are
computed once from the prefill, since the prompt never changes. Each step then runs one token per row through each
stream (or through both at once as a doubled batch, ``imsm.model.fusion``), mixes the two last states with the gate
and takes the head's argmax. ``IMSMModel.generate`` is the public entry point and delegates here.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from imsm.model.fusion import adapter_on_second_half, can_fuse_streams
from imsm.model.siamese import STREAMS, pool_query, positions_from_mask

if TYPE_CHECKING:
    from imsm.model.siamese import IMSMModel


def prefill(
    model: IMSMModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    *,
    adapter: bool,
    rows: int,
) -> tuple[torch.Tensor, object]:
    """One stream over the prompts, ``rows`` at a time.

    Args:
        input_ids, attention_mask, positions: (batch, prompt_len), left-padded.
        adapter: False for the frozen stream M, True for M'.
        rows: rows per chunk.

    Returns:
        The stream's (batch, prompt_len, d) states and one cache holding every row.
    """
    hidden, caches = [], []
    for start in range(0, input_ids.shape[0], rows):
        chunk = slice(start, start + rows)
        caches.append(DynamicCache(config=model.config))
        hidden.append(
            model.stream_hidden(
                input_ids[chunk],
                attention_mask[chunk],
                adapter=adapter,
                position_ids=positions[chunk],
                cache=caches[-1],
            )
        )
    return torch.cat(hidden), model.family.concat_caches(caches)


# Prompts of at most this many tokens per stream (batch x prompt length) are read by both streams as one doubled
# batch. Small prefills leave a CPU's matrix kernels underused: on 2 cores (SmolLM2-135M, LoRA, 6-30 interleaved
# rounds) one doubled pass took 0.76 of two passes' time at 1 x 100 tokens in bf16, 0.85 in fp32, 0.92 at 1 x 400
# bf16, and 1.03 at 8 x 100, where each pass is already large (docs/performance.md, "Timed in lockstep").
FUSED_PREFILL_TOKENS = 512


def fuses_prefill(fuse: bool, batch: int, prompt_len: int, rows: int) -> bool:
    """Whether a fused decoder reads the prompts as one doubled batch: small prompts (``FUSED_PREFILL_TOKENS``)
    that fit in one prefill chunk (``rows`` rows)."""
    return fuse and batch <= rows and batch * prompt_len <= FUSED_PREFILL_TOKENS


def prefill_both(
    model: IMSMModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Both streams over the prompts as one doubled batch (``adapter_on_second_half``).

    Args:
        input_ids, attention_mask, positions: (batch, prompt_len), left-padded.

    Returns:
        M's and M''s (batch, prompt_len, d) states, and one cache of 2 x batch rows, M's first: the layout the
        fused decoding steps read.
    """
    cache = DynamicCache(config=model.config)
    with adapter_on_second_half(model.peft_model, input_ids.shape[0]):
        base, tuned = doubled_pass(
            model, input_ids, torch.cat([attention_mask, attention_mask]), positions, cache
        )
    return base, tuned, cache


def doubled_pass(
    model: IMSMModel,
    input_ids: torch.Tensor,
    doubled_mask: torch.Tensor,
    positions: torch.Tensor,
    cache: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both streams in one pass of the doubled batch, inside ``adapter_on_second_half``.

    Args:
        input_ids, positions: (batch, seq), each stream's (the same for both).
        doubled_mask: (2 x batch, kv_len), M's rows first.
        cache: the doubled batch's cache (2 x batch rows, M's first).

    Returns:
        M's and M''s (batch, seq, d) states.
    """
    both = model.stream_hidden(
        torch.cat([input_ids, input_ids]),
        doubled_mask,
        adapter=True,
        position_ids=torch.cat([positions, positions]),
        cache=cache,
    )
    batch = input_ids.shape[0]
    return both[:batch], both[batch:]


def check_inputs(streams: str, attention_mask: torch.Tensor) -> None:
    """Refuse an unknown ``streams`` and right-padded prompts (``attention_mask`` (batch, prompt_len))."""
    if streams not in STREAMS:
        raise ValueError(f"streams={streams!r} is not one of {list(STREAMS)}")
    if attention_mask[:, -1].min() == 0:
        raise ValueError("generate() needs left-padded prompts (the last column must be real tokens)")


def stream_plan(model: IMSMModel, streams: str, fuse_streams: bool | None) -> tuple[bool, bool]:
    """``(mixing, fuse)``: whether M and M' are mixed by the gate, and whether they run as one doubled batch
    (``fuse_streams``, or when None whenever ``can_fuse_streams`` holds)."""
    mixing = streams == "imsm" and model.gate is not None
    fuse = mixing and (
        can_fuse_streams(model.peft_model, model.family) if fuse_streams is None else fuse_streams
    )
    return mixing, fuse


def step_settings(
    device: torch.device, prompt_len: int, stop_check_every: int | None, prefill_tokens: int | None
) -> tuple[int, int]:
    """``(check_every, rows)``: steps between checks that every row has ended (8 on CUDA: each check waits for the
    device, 1 elsewhere), and prompt rows per prefill chunk (about ``prefill_tokens`` tokens: 32768 on CUDA, 4096
    elsewhere)."""
    check_every = stop_check_every or (8 if device.type == "cuda" else 1)
    rows = max(1, (prefill_tokens or (32768 if device.type == "cuda" else 4096)) // prompt_len)
    return check_every, rows


@torch.no_grad()
def greedy_steps(
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
) -> Iterator[torch.Tensor]:
    """Batched greedy decoding with a KV cache per stream, one new token per row at a time; the arguments are
    ``IMSMModel.generate``'s.

    The first item costs the prefill, each later one a decoding step. Stepping it by hand lets a benchmark time two
    decoders step by step, side by side (``imsm.timing.lockstep``). While it is suspended a fused decoder keeps its
    model's adapted layers split in halves (``adapter_on_second_half``): step one model at a time, or give the other
    decoder its own copy of the weights.

    Yields:
        (batch,) the next token of each row, ``pad_token_id`` after the row's EOS; at most ``max_new_tokens`` items.
    """
    check_inputs(streams, attention_mask)
    mixing, fuse = stream_plan(model, streams, fuse_streams)
    device = input_ids.device
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    batch, prompt_len = input_ids.shape
    check_every, rows = step_settings(device, prompt_len, stop_check_every, prefill_tokens)

    # One attention mask for the whole run, sliced per step (no re-allocation in the loop).
    full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, max_new_tokens)], dim=1)
    positions = positions_from_mask(attention_mask)
    if fuse:
        full_mask = torch.cat([full_mask, full_mask])
        hooks = adapter_on_second_half(model.peft_model, batch)
    else:
        hooks = contextlib.nullcontext()
    # Small prompts: both streams as one doubled batch. Larger ones: each stream on its own (in row chunks), the
    # caches then joined when fused, as a doubled batch saves nothing once a pass is large (FUSED_PREFILL_TOKENS).
    if fuses_prefill(fuse, batch, prompt_len, rows):
        base, tuned, both_cache = prefill_both(model, input_ids, attention_mask, positions)
        caches = {"both": both_cache}
    else:
        fill = functools.partial(prefill, model, input_ids, attention_mask, positions, rows=rows)
        base, base_cache = fill(adapter=False) if mixing or streams == "base" else (None, None)
        tuned, tuned_cache = fill(adapter=True) if streams != "base" else (None, None)
        caches = (
            {"both": model.family.concat_caches([base_cache, tuned_cache])}
            if fuse
            else {"base": base_cache, "tuned": tuned_cache}
        )

    def step(
        ids: torch.Tensor, length: int, pos: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(batch, 1, d) states of both streams for one new token per row (None for a stream that does not run)."""
        if fuse:
            return doubled_pass(model, ids, full_mask[:, :length], pos, caches["both"])
        out = {}
        for name, adapter in (("base", False), ("tuned", True)):
            if caches[name] is not None:
                out[name] = model.stream_hidden(
                    ids, full_mask[:, :length], adapter=adapter, position_ids=pos, cache=caches[name]
                )
        return out.get("base"), out.get("tuned")

    with hooks:
        bq = tq = None
        if mixing and getattr(model.gate, "needs_query", False):
            bq = pool_query(base, attention_mask, model.pooling)  # computed once: the prompt never changes
            tq = pool_query(tuned, attention_mask, model.pooling)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        pad = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)
        last_pos = positions[:, -1:]
        for i in range(max_new_tokens):
            if mixing:
                h = model.mix(base[:, -1], tuned[:, -1], bq, tq)
            else:
                h = (base if streams == "base" else tuned)[:, -1]
            next_tok = torch.where(finished, pad, model.lm_head(h).argmax(-1))
            yield next_tok
            finished |= torch.isin(next_tok, eos)
            if i + 1 == max_new_tokens or ((i + 1) % check_every == 0 and bool(finished.all())):
                break
            last_pos = last_pos + 1
            base, tuned = step(next_tok.unsqueeze(1), prompt_len + i + 1, last_pos)


def greedy_generate(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``greedy_steps`` (same arguments) run to the end, its tokens stacked: (batch, n_new), n_new <=
    max_new_tokens, ``pad_token_id`` after each row's EOS."""
    return torch.stack(list(greedy_steps(*args, **kwargs)), dim=1)
