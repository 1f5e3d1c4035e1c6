"""Timing helpers shared by the benchmark script and the speed job (Table 5).

A noisy machine makes absolute times move between runs, so contenders are compared inside one process and
interleaved inside every repeat (A B C C B A ...): a slow spell hits all of them. Each contender's number is the
median over repeats, reported with its min-max spread. A ratio between two contenders is taken per repeat (the two
timed side by side in the same round) and summarised by its median with a distribution-free confidence interval
(``paired_ratio``), so drift between rounds cancels and a verdict near a bar can say "unsettled". Decoding ignores
EOS so every contender generates exactly the same number of tokens, which makes the timing independent of the
weights' values.
"""

from __future__ import annotations

import gc
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from imsm.model.decoding import greedy_steps
from imsm.model.siamese import IMSMModel

# a GSM8K-like sentence repeated: a fixed, realistic prompt that any tokenizer turns into enough tokens
PROMPT_TEXT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " * 8
)


def sync(device: str | torch.device) -> None:
    """Wait for queued CUDA kernels, so a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device) -> float:
    """Wall-clock seconds of one call of ``fn`` (device work included)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def summary(values: list[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "n", "times"}`` of one contender's repeats (``times``: each repeat, in order)."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "times": list(values),
    }


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median of ``values``: ``(low, high, achieved)``.

    The order statistics ``x_(k)`` and ``x_(n+1-k)`` with the largest k for which ``P(Binom(n, 1/2) < k)`` is at
    most ``(1 - confidence) / 2`` cover the median with probability ``achieved`` (>= ``confidence``). With too few
    values for that (n < 6 at 95%) the interval is the whole range and ``achieved`` says how sure it is
    (1 - 2 / 2^n: 0.9375 for 5 values).
    """
    x = sorted(values)
    n = len(x)
    if n == 0:
        raise ValueError("median_interval: no values")
    tail = [math.comb(n, i) / 2**n for i in range(n + 1)]  # P(Binom(n, 1/2) = i)
    k, below = 1, tail[0]  # below: P(Binom < k)
    while k < (n + 1) // 2 and below + tail[k] <= (1 - confidence) / 2:
        below += tail[k]
        k += 1
    return x[k - 1], x[n - k], 1 - 2 * below


def paired_ratio(
    numerator: dict[str, Any], denominator: dict[str, Any], confidence: float = 0.95
) -> dict[str, float]:
    """Per-repeat ratios of two ``alternate`` summaries timed in the same rounds, summarised.

    Round i's ratio is ``numerator.times[i] / denominator.times[i]``: both were timed side by side, so a slow spell
    that hits the round hits both. The median and its order-statistic interval, not ``imsm.metrics.bootstrap_ci``'s
    mean: a round disturbed by something else on the machine should not move the number. Returns ``{"median", "low", "high", "confidence", "n"}`` (``median_interval``).
    """
    a, b = numerator["times"], denominator["times"]
    if len(a) != len(b):
        raise ValueError(f"paired_ratio: {len(a)} and {len(b)} repeats; a pair needs the same rounds")
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    low, high, achieved = median_interval(ratios, confidence)
    return {
        "median": statistics.median(ratios),
        "low": low,
        "high": high,
        "confidence": achieved,
        "n": len(a),
    }


def alternate(
    contenders: dict[str, Callable[[], Any]], repeats: int, device: str | torch.device, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """Time each contender ``repeats`` times, interleaved, after ``warmup`` untimed rounds.

    Rounds alternate their order (A B C, C B A, A B C, ...), so no contender always runs first or right after the
    same neighbour: a drift within a round, or what one contender leaves behind (freed memory, warm caches), does
    not favour one side of a ratio every time.

    Returns ``{name: summary(seconds)}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least one timed repeat")
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for i in range(repeats):
        for name in order if i % 2 == 0 else reversed(order):
            times[name].append(timed(contenders[name], device))
    return {name: summary(v) for name, v in times.items()}


def lockstep(
    contenders: dict[str, Callable[[], Iterator[Any]]],
    repeats: int,
    device: str | torch.device,
    warmup: int = 1,
) -> dict[str, dict[str, Any]]:
    """Time contenders that work in steps (a decoder's tokens, a training run's optimiser steps) step by step, side
    by side: each round takes one step of each in turn until all are done.

    On a machine whose speed drifts within seconds, ``alternate``'s rounds (a whole decoding each) see different
    speeds; here consecutive steps of the two sides are a few tens of milliseconds apart, so a slow spell hits
    both sides of a ratio alike. The order alternates at every step (A B, B A, ...). A contender is a factory: each
    call returns a fresh iterator whose every ``next`` is one step; ``warmup`` untimed rounds first.

    Returns ``{name: summary(seconds)}`` (a round's time: the sum of its steps), each with ``first`` (the first
    step's seconds per round: a decoder's prefill) and ``steps`` (steps per round).
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least one timed repeat")
    times: dict[str, list[float]] = {name: [] for name in contenders}
    first: dict[str, list[float]] = {name: [] for name in contenders}
    steps: dict[str, int] = {}
    for r in range(warmup + repeats):
        running = {name: make() for name, make in contenders.items()}
        total, head, count = dict.fromkeys(running, 0.0), {}, dict.fromkeys(running, 0)
        k = 0
        while running:
            order = list(running) if k % 2 == 0 else list(reversed(running))
            for name in order:
                sync(device)
                start = time.perf_counter()
                try:
                    next(running[name])
                except StopIteration:
                    del running[name]
                    continue
                sync(device)
                seconds = time.perf_counter() - start
                total[name] += seconds
                head.setdefault(name, seconds)
                count[name] += 1
            k += 1
        if r >= warmup:
            for name in contenders:
                times[name].append(total[name])
                first[name].append(head.get(name, 0.0))
                steps[name] = count[name]
    return {name: {**summary(v), "first": first[name], "steps": steps[name]} for name, v in times.items()}


def prompt_batch(
    tokenizer: Any, batch: int, length: int, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same prompt of ``length`` tokens repeated ``batch`` times (``PROMPT_TEXT``'s tokens, tiled as needed).

    Returns ``input_ids`` and ``attention_mask``, both (batch, length), no padding.
    """
    text = tokenizer(PROMPT_TEXT)["input_ids"]
    ids = (text * -(-length // len(text)))[:length]
    input_ids = torch.tensor([ids] * batch, device=device)
    return input_ids, torch.ones_like(input_ids)


def decode_fn(
    model: IMSMModel, ids: torch.Tensor, mask: torch.Tensor, new: int, **kw: Any
) -> Callable[[], torch.Tensor]:
    """A callable that greedily decodes exactly ``new`` tokens after ``ids`` (batch, seq) with ``model.generate``.

    ``kw`` goes to ``IMSMModel.generate`` (e.g. ``fuse_streams=False``).
    """
    # eos_token_id=-1: never stops early, so every contender decodes exactly `new` tokens
    return lambda: model.generate(ids, mask, max_new_tokens=new, eos_token_id=-1, pad_token_id=0, **kw)


def decode_steps_fn(
    model: IMSMModel, ids: torch.Tensor, mask: torch.Tensor, new: int, **kw: Any
) -> Callable[[], Iterator[torch.Tensor]]:
    """``decode_fn``'s decoding as a factory of step iterators for ``lockstep`` (the eager decoder,
    ``imsm.model.decoding.greedy_steps``): each ``next`` yields one token per row, the first after the prefill."""
    return lambda: greedy_steps(model, ids, mask, new, eos_token_id=-1, pad_token_id=0, **kw)


def peak_memory_mib(fn: Callable[[], Any], device: str | torch.device, calls: int = 2) -> float:
    """Peak memory (MiB) while ``fn`` runs ``calls`` times; run it in a fresh process so that earlier work is not
    counted.

    CUDA: ``torch.cuda.max_memory_allocated`` since a reset. CPU: the process's peak RSS, sampled every
    millisecond from a thread (what the process held before ``fn`` counts too, e.g. the weights).
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        for _ in range(calls):
            fn()
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil  # a dependency of accelerate; only the CPU path needs it

    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(calls):
            fn()
    finally:
        done.set()
        sampler.join()
    return peak[0] / 2**20
