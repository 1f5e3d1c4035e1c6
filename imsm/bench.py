"""Side-by-side benchmark: IMSM vs vanilla PEFT (and vs the authors' naive decoder), ratios from one run.

``make bench`` runs this module on the embedded SmolLM2; ``--quick`` uses tiny_llama; ``--device cuda``
on a GPU. Models come from the run config (``backbone=... peft=... gate=...``, built by ``imsm.model.build``), so
the benchmark times what training builds; ``--peft <method>`` (a conf/peft file, default ``lora``) picks the
method. Contenders alternate inside every repeat (``imsm.timing``), each time is a median over repeats with its
spread (min-max); each ratio is the median of the per-repeat ratios (the pair timed in the same round) with a
distribution-free confidence interval for it (``ratio_intervals`` in the JSON), and a target's verdict is PASS or
MISS only when the whole interval is on one side of the bar (UNSETTLED otherwise). The JSON lands in
``outputs/bench/``. What is measured:

1. training step time (forward + backward + AdamW step), batch 8 x 128 tokens: IMSM (``query_aware``) vs
   vanilla (``gate=none``, same code), fp32 and bf16 autocast; beside them vanilla PEFT through transformers' own
   loss (``peft_model(..., labels=...)``) and the frozen forward alone, whose time over vanilla's is the ratio's
   floor for any exact IMSM step (it must run the frozen model once);
2. greedy decoding tokens/s after a ~100-token prompt, 128 new tokens (EOS ignored), batch 1 and 8: IMSM vs
   vanilla through the same decoder, and vanilla through ``model.generate``; ``imsm_unfused`` is IMSM in two
   passes per step instead of one doubled batch (``imsm.model.fusion``); bf16 decodes the model a bf16 run
   builds (``decode_models``: backbone bf16, adapter and gate fp32);
3. peak memory of each (RSS of a fresh subprocess on CPU; ``torch.cuda.max_memory_allocated`` on GPU);
4. IMSM vs the naive decoder (two model copies, no KV cache, full recomputation each step) at 256 new tokens.

``--lockstep`` times the decoding pair and the cached-training epochs step by step, side by side
(``imsm.timing.lockstep``) instead of whole runs in turn: on a CPU whose speed drifts within seconds it narrows the
intervals of those ratios.

Measured numbers and what was tried: docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModelForCausalLM

from imsm import CONF_DIR
from imsm.backbones import autocast_context, load_tokenizer, resolve_dtype
from imsm.model.attention import attention_implementation
from imsm.model.build import build_model, wrap_backbone
from imsm.model.frozen_cache import FrozenCache, frozen_cache_for
from imsm.model.siamese import IMSMModel, pool_query
from imsm.timing import (
    alternate,
    decode_fn,
    decode_steps_fn,
    lockstep,
    paired_ratio,
    peak_memory_mib,
    prompt_batch,
    sync,
)

REPO = Path(__file__).resolve().parents[1]
NOISE_STD = 0.02  # scale of the noise that moves each adapter off its no-op start (see randomize_adapter)
# AdaLoRA's rank schedule needs the run's optimizer steps; the benchmark's steps never re-allocate ranks
BENCH_TOTAL_STEPS = 1000


def run_config(backbone: str, gate: str, device: str, dtype: str = "fp32", peft: str = "lora") -> DictConfig:
    """The training run's config for this backbone, gate and method (the paper's settings from conf/peft)."""
    overrides = [
        f"backbone={backbone}",
        f"gate={gate}",
        f"peft={peft}",
        f"backbone.dtype={dtype}",
        f"backbone.device={device}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def randomize_adapter(model: IMSMModel, seed: int, std: float = NOISE_STD) -> None:
    """Add seeded normal noise to every adapter parameter that starts constant: the no-op part of its init.

    A fresh adapter changes nothing (LoRA's and LoRAMoE's B = 0, AdaLoRA's E = 0, LoHa's w2_b = 0, IA3's vectors
    = 1), so the tuned stream would equal the frozen one: the benchmark would time an adapter that changes nothing,
    and the naive decoder's check against IMSM (same tokens) would hold trivially. With LoRA this gives every B
    matrix seeded normal values (the other parameters are not constant). The values come from a CPU generator, so
    they are the same on every device.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.peft_model.parameters():
            if p.requires_grad and p.numel() and bool((p == p.reshape(-1)[0]).all()):
                p.add_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))


def build(
    backbone: str,
    gate: str,
    device: str,
    dtype: str = "fp32",
    seed: int = 0,
    random_init: str | None = None,
    peft: str = "lora",
) -> tuple[IMSMModel, Any]:
    """The run's model (backbone + ``peft``'s adapter + gate, ``imsm.model.build``), moved off its no-op start.

    ``random_init``: a model directory whose config (and tokenizer) are used with random weights: timing does not
    depend on the weights' values (EOS is ignored), and a config is a few KB where the weights are not.
    """
    cfg = run_config(backbone, gate, device, dtype, peft)
    torch.manual_seed(seed)
    if random_init:
        tok = load_tokenizer(random_init)
        config = AutoConfig.from_pretrained(random_init)
        backbone_model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
        model = wrap_backbone(backbone_model.to(device).eval(), cfg, BENCH_TOTAL_STEPS)
    else:
        model, tok = build_model(cfg, total_steps=BENCH_TOTAL_STEPS)
    randomize_adapter(model, seed)
    return model, tok


def decode_models(
    args: argparse.Namespace, precision: str, trained: IMSMModel
) -> tuple[IMSMModel, IMSMModel]:
    """IMSM and vanilla (the same weights, ``gate=none``) as users decode at ``precision``, in eval mode.

    What ``imsm.model.build`` gives for ``backbone.dtype=<precision>``: the backbone in that dtype, the adapter and
    the gate in fp32 (peft's ``autocast_adapter_dtype``; the gate's own precision), not the whole model cast to it.
    fp32 reuses ``trained`` (everything fp32 already); bf16 builds its own model, the same seed and adapter noise.
    Building it again, rather than casting a copy, gives exactly ``build``'s dtypes for every method (LoRAMoE's
    experts are not peft tuner layers, so peft's adapter upcast would miss them).
    """
    if precision == "fp32":
        model = trained
    else:
        model, _ = build(
            args.backbone, "query_aware", args.device, precision, random_init=args.random_init, peft=args.peft
        )
    model.eval()
    return model, IMSMModel(model.peft_model, None)


def train_batch(
    vocab: int, batch: int, seq: int, prompt: int, device: str, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``batch`` rows of ``seq`` random tokens, the first ``prompt`` of each the query (unlabelled)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (batch, seq), generator=g)
    query = torch.zeros_like(ids)
    query[:, :prompt] = 1
    labels = ids.masked_fill(query.bool(), -100)
    return {
        k: v.to(device)
        for k, v in {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "query_mask": query,
            "labels": labels,
        }.items()
    }


def train_step_fn(
    model: IMSMModel,
    batch: dict,
    autocast: str,
    device: str,
    loss_fn: Callable[[], torch.Tensor] | None = None,
    opt: torch.optim.Optimizer | None = None,
) -> Callable[[], None]:
    """One optimiser step (forward, backward, AdamW) on ``model``'s trainable parameters.

    ``loss_fn``: what computes the loss (default ``model(**batch).loss``, IMSM's own loss at labelled positions);
    ``opt``: the optimiser (default a new AdamW over the trainable parameters).
    """
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    compute = loss_fn or (lambda: model(**batch).loss)

    def step() -> None:
        model.train()
        with autocast_context(device, autocast):
            loss = compute()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def epoch_steps_fn(
    model: IMSMModel,
    batches: list[dict[str, torch.Tensor]],
    epochs: int,
    autocast: str,
    device: str,
    cache: bool,
) -> Callable[[], Iterator[None]]:
    """``epochs`` passes over ``batches``, one optimiser step per batch, as a training run's epochs: a factory of
    iterators whose every ``next`` is one step (``imsm.timing.lockstep``); the iterator returns the filled cache.

    ``cache``: with ``trainer.cache_frozen``'s cache (``imsm.model.frozen_cache``), fresh for each run, so the
    first epoch runs and stores the frozen stream and the later ones read it. Each batch carries its rows' example
    indices, as ``IndexedDataset`` gives them. The model holds the cache only during its own steps, so runs of the
    same model with and without a cache can be stepped in turn.
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    steps = [train_step_fn(model, b, autocast, device, opt=opt) for b in batches]

    def run() -> Iterator[None]:
        frozen = frozen_cache_for(model) if cache else None
        for _ in range(epochs):
            for step in steps:
                model.frozen_cache = frozen
                try:
                    step()
                finally:
                    model.frozen_cache = None
                yield
        return frozen

    return run


def epochs_fn(*args: Any, **kwargs: Any) -> Callable[[], FrozenCache | None]:
    """``epoch_steps_fn``'s run as one call (same arguments) that returns the filled cache (None without)."""
    make = epoch_steps_fn(*args, **kwargs)

    def run() -> FrozenCache | None:
        steps = make()
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    return run


def hf_loss_fn(model: IMSMModel, batch: dict) -> Callable[[], torch.Tensor]:
    """Vanilla PEFT the usual transformers way: ``peft_model(..., labels=...)``, logits at every position."""
    return lambda: (
        model.peft_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    )


def frozen_forward_fn(
    model: IMSMModel, batch: dict, autocast: str, device: str
) -> Callable[[], torch.Tensor]:
    """The frozen stream alone (adapter off, no gradients), the one piece of work IMSM adds to a PEFT step.

    The callable returns its (batch, seq, d) last hidden states.
    """

    def forward() -> torch.Tensor:
        model.train()
        with autocast_context(device, autocast):
            return model.stream_hidden(batch["input_ids"], batch["attention_mask"], adapter=False)

    return forward


def hf_generate_fn(model: IMSMModel, ids: torch.Tensor, mask: torch.Tensor, new: int) -> Callable[[], Any]:
    return lambda: model.peft_model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
    )


def under_attention(backbone: Any, name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with ``backbone``'s attention implementation set to ``name`` (then restored).

    Switching and restoring take ~1.3 ms on SmolLM2 (2026-12-02), inside the timed call: ~0.03% of a decoding run.
    """

    def run() -> Any:
        with attention_implementation(backbone, name):
            return fn()

    return run


class NaiveSiamese:
    """The authors' decoder: two full model copies, no KV cache, both re-run over the whole sequence each step
    (full-vocabulary logits included, as their ``model(input_ids, output_hidden_states=True)`` calls do)."""

    def __init__(self, model: IMSMModel):
        self.model = model
        self.frozen = copy.deepcopy(model.peft_model).unload()  # a second, plain copy of the backbone

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new: int) -> torch.Tensor:
        m, seq, q_len = self.model, ids, ids.shape[1]
        for _ in range(new):
            query = torch.zeros_like(seq)
            query[:, :q_len] = 1
            tuned = m.peft_model(input_ids=seq, output_hidden_states=True, use_cache=False).hidden_states[-1]
            base = self.frozen(input_ids=seq, output_hidden_states=True, use_cache=False).hidden_states[-1]
            h = m.mix(base[:, -1:], tuned[:, -1:], pool_query(base, query), pool_query(tuned, query))
            seq = torch.cat([seq, m.lm_head(h[:, -1]).argmax(-1, keepdim=True)], dim=1)
        return seq[:, q_len:]


def peak_memory(args: argparse.Namespace, contender: str, extra: list[str]) -> float:
    """Peak memory (MiB) of one contender, measured in a fresh process so earlier allocations don't count."""
    cmd = [
        sys.executable,
        "-m",
        __spec__.name,  # this module, however it was started (python -m, the console script, an import)
        "--memory-probe",
        contender,
        "--backbone",
        args.backbone,
        "--peft",
        args.peft,
        "--device",
        args.device,
        *(["--random-init", args.random_init] if args.random_init else []),
        *extra,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return float(out.stdout.strip().splitlines()[-1])


def memory_probe(args: argparse.Namespace) -> None:
    """Run one contender twice and print its peak memory in MiB (the child side of ``peak_memory``).

    The transient peak of loading the weights is outside the measured span (``imsm.timing.peak_memory_mib``).
    """
    kind, gate = args.memory_probe.split(":")
    model, tok = build(args.backbone, gate, args.device, random_init=args.random_init, peft=args.peft)
    if kind == "train":
        batch = train_batch(len(tok), 8, 128, 64, args.device)
        fn = train_step_fn(model, batch, "fp32", args.device)
    else:
        ids, mask = prompt_batch(tok, 1, 100, args.device)
        model.eval()
        fn = decode_fn(model, ids, mask, 128)
    print(peak_memory_mib(fn, args.device))


class Ratios(dict):
    """Ratio name -> its median over the rounds (what the JSON's ``ratios`` holds); ``intervals`` keeps each
    one's ``paired_ratio`` (median, low, high, confidence, n) for the verdict and the JSON's ``ratio_intervals``."""

    def __init__(self) -> None:
        super().__init__()
        self.intervals: dict[str, dict[str, float]] = {}

    def put(self, name: str, numerator: dict, denominator: dict, shift: float = 0.0) -> None:
        """``numerator / denominator`` per round (``+ shift``: the floor is 1 + frozen / vanilla)."""
        ci = paired_ratio(numerator, denominator)
        ci = {k: v + shift if k in ("median", "low", "high") else v for k, v in ci.items()}
        self[name] = ci["median"]
        self.intervals[name] = ci


def report_decode(
    results: dict[str, Any], ratios: Ratios, res: dict[str, dict], precision: str, bsz: int, new: int
) -> None:
    """Store one decoding comparison (``alternate``'s or ``lockstep``'s summaries) and its IMSM/vanilla ratio."""
    toks = {k: bsz * new / v["median"] for k, v in res.items()}
    results[f"decode_{precision}_b{bsz}"] = {"seconds": res, "tokens_per_s": toks}
    # tokens/s of a over b: b's time over a's (the same tokens), per round
    ratios.put(f"decode_tok_s_imsm/vanilla_{precision}_b{bsz}", res["vanilla"], res["imsm"])
    print(
        f"decode {precision} b{bsz}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in toks.items()), flush=True
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    dev = args.device
    results: dict[str, Any] = {
        "backbone": args.backbone,
        "peft": args.peft,
        "device": dev,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": torch.cuda.get_device_name(0)
        if dev.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "random_init": args.random_init,
        "args": {k: v for k, v in vars(args).items() if k != "memory_probe"},  # the command's settings
    }
    imsm, tok = build(args.backbone, "query_aware", dev, random_init=args.random_init, peft=args.peft)
    vanilla = IMSMModel(imsm.peft_model, None)  # same weights, same code, no frozen stream and no gate
    ratios = Ratios()

    # 1. training step; two references beside the pair: vanilla PEFT through transformers' own loss (logits at
    # every position), and the frozen forward alone, IMSM's added work, so the floor of the ratio is printed too
    for precision in [] if args.cache_only else args.train_precisions:
        batch = train_batch(len(tok), 8, args.train_seq, args.train_seq // 2, dev)
        res = alternate(
            {
                "imsm": train_step_fn(imsm, batch, precision, dev),
                "vanilla": train_step_fn(vanilla, batch, precision, dev),
                "vanilla_hf_loss": train_step_fn(vanilla, batch, precision, dev, hf_loss_fn(vanilla, batch)),
                "frozen_forward": frozen_forward_fn(imsm, batch, precision, dev),
            },
            args.repeats,
            dev,
        )
        results[f"train_step_s_{precision}"] = res
        ratios.put(f"train_step_time_imsm/vanilla_{precision}", res["imsm"], res["vanilla"])
        ratios.put(
            f"train_step_floor_(vanilla+frozen_forward)/vanilla_{precision}",
            res["frozen_forward"],
            res["vanilla"],
            shift=1.0,
        )
        ratios.put(f"train_step_time_imsm/hf_peft_loss_{precision}", res["imsm"], res["vanilla_hf_loss"])
        print(
            f"train {precision}: " + ", ".join(f"{k} {v['median']:.3f}s" for k, v in res.items()),
            flush=True,
        )

    # 1b. whole epochs with the frozen states cached (trainer.cache_frozen): only the first epoch runs the frozen
    # stream, so over `epochs` epochs IMSM's extra work is one frozen forward per example, not one per step
    for precision in args.train_precisions if args.cache_epochs else []:
        batches = [
            {**train_batch(len(tok), 8, args.train_seq, args.train_seq // 2, dev, seed=i), "index": rows}
            for i, rows in enumerate(torch.arange(8 * args.cache_batches, device=dev).split(8))
        ]
        imsm.frozen_cache = None
        runs = {"imsm_cached": (imsm, True), "vanilla": (vanilla, False)}
        if not args.cache_only:
            runs["imsm"] = (imsm, False)
        filled = epochs_fn(
            imsm, batches, args.cache_epochs, precision, dev, cache=True
        )()  # warm-up; its size
        if args.lockstep:
            contenders = {
                k: epoch_steps_fn(m, batches, args.cache_epochs, precision, dev, cache=c)
                for k, (m, c) in runs.items()
            }
            res = lockstep(contenders, args.repeats, dev, warmup=0)
        else:
            contenders = {
                k: epochs_fn(m, batches, args.cache_epochs, precision, dev, cache=c)
                for k, (m, c) in runs.items()
            }
            res = alternate(contenders, args.repeats, dev, warmup=0)
        n = args.cache_epochs
        results[f"train_{n}_epochs_s_{precision}"] = {
            **res,
            "batches_per_epoch": args.cache_batches,
            "cache_bytes_per_example": filled.nbytes / len(filled.entries),
        }
        ratios.put(
            f"train_{n}_epochs_time_imsm_cached/vanilla_{precision}", res["imsm_cached"], res["vanilla"]
        )
        if "imsm" in res:
            ratios.put(
                f"train_{n}_epochs_time_imsm_uncached/vanilla_{precision}", res["imsm"], res["vanilla"]
            )
        print(
            f"train {n} epochs x {args.cache_batches} batches {precision}: "
            + ", ".join(f"{k} {v['median']:.2f}s" for k, v in res.items())
            + f"; cache {filled.nbytes / len(filled.entries) / 1024:.1f} KiB per example",
            flush=True,
        )

    # 2. decoding tokens/s. The eager decoder's contenders say static_cache=False (IMSM_STATIC_CACHE would switch
    # generate() to the static path); with --static, IMSM and vanilla also run through a static cache and a compiled step
    # (CUDA graphs on CUDA, imsm.model.static_decoding), so their ratio is measured on equal footing too
    imsm.eval()
    static = args.static
    for precision in args.decode_precisions:
        imsm_d, vanilla_d = decode_models(args, precision, imsm)
        # in lockstep a suspended fused IMSM decoder keeps the shared adapted layers split in halves
        # (greedy_steps): vanilla decodes on its own copy of the same weights
        paired = IMSMModel(copy.deepcopy(imsm_d.peft_model), None) if args.lockstep else vanilla_d
        for bsz in args.batches:
            ids, mask = prompt_batch(tok, bsz, args.prompt_len, dev)
            eager = {"static_cache": False}
            if args.lockstep:
                res = lockstep(
                    {
                        "imsm": decode_steps_fn(imsm_d, ids, mask, args.new_tokens),
                        "vanilla": decode_steps_fn(paired, ids, mask, args.new_tokens),
                    },
                    args.repeats,
                    dev,
                )
                report_decode(results, ratios, res, precision, bsz, args.new_tokens)
                continue
            contenders = {
                "imsm": decode_fn(imsm_d, ids, mask, args.new_tokens, **eager),
                "vanilla": decode_fn(vanilla_d, ids, mask, args.new_tokens, **eager),
            }
            if not args.pair_only:
                contenders |= {
                    "imsm_unfused": decode_fn(
                        imsm_d, ids, mask, args.new_tokens, fuse_streams=False, **eager
                    ),
                    "vanilla_hf_generate": hf_generate_fn(imsm_d, ids, mask, args.new_tokens),
                }
            if args.attention_ab:  # the same decoders with transformers' sdpa for every attention call
                contenders |= {
                    f"{name}_sdpa": under_attention(imsm_d.backbone, "sdpa", contenders[name])
                    for name in ("imsm", "vanilla")
                }
            if static and precision in (args.static_precisions or args.decode_precisions):
                compiled = {
                    "imsm_static": decode_fn(imsm_d, ids, mask, args.new_tokens, static_cache=True),
                    "vanilla_static": decode_fn(vanilla_d, ids, mask, args.new_tokens, static_cache=True),
                }
                compile_s, match = {}, {}
                try:  # the first call compiles this shape and records its CUDA graphs: timed apart
                    for name, fn in compiled.items():
                        sync(dev)
                        start = time.perf_counter()
                        got = fn()
                        sync(dev)
                        compile_s[name] = time.perf_counter() - start
                        # the share of tokens the eager decoder gives too (bf16 kernels may round apart)
                        match[name] = (
                            (got == contenders[name.removesuffix("_static")]()).float().mean().item()
                        )
                except Exception as error:  # a one-shot GPU run keeps its other numbers, and this error
                    static = False
                    results["decode_static_error"] = f"{type(error).__name__}: {error}"
                    print(f"decode static contenders dropped: {results['decode_static_error']}", flush=True)
                else:
                    contenders |= compiled
                    results[f"decode_compile_s_{precision}_b{bsz}"] = compile_s
                    results[f"decode_static_token_match_{precision}_b{bsz}"] = match
                    print(
                        f"compile {precision} b{bsz}: "
                        + ", ".join(
                            f"{k} {compile_s[k]:.1f}s ({match[k]:.0%} tokens as eager)" for k in compiled
                        ),
                        flush=True,
                    )
            res = alternate(contenders, args.repeats, dev)
            report_decode(results, ratios, res, precision, bsz, args.new_tokens)
            tag = f"{precision}_b{bsz}"
            if not args.pair_only:
                ratios.put(f"decode_tok_s_imsm_unfused/vanilla_{tag}", res["vanilla"], res["imsm_unfused"])
                ratios.put(f"decode_tok_s_imsm/hf_generate_{tag}", res["vanilla_hf_generate"], res["imsm"])
            if args.attention_ab:  # above 1: imsm_sdpa's decoding attention is the faster one
                for name in ("imsm", "vanilla"):
                    ratios.put(f"decode_tok_s_{name}/{name}_sdpa_{tag}", res[f"{name}_sdpa"], res[name])
                ratios.put(
                    f"decode_tok_s_imsm_sdpa/vanilla_sdpa_{tag}", res["vanilla_sdpa"], res["imsm_sdpa"]
                )
            if "imsm_static" in res:
                ratios.put(
                    f"decode_tok_s_imsm_static/vanilla_static_{tag}",
                    res["vanilla_static"],
                    res["imsm_static"],
                )
                # above 1: the static path is the faster one for IMSM (then worth IMSM_STATIC_CACHE=cuda)
                ratios.put(f"decode_tok_s_imsm_static/imsm_{tag}", res["imsm"], res["imsm_static"])

    # 3. peak memory, each contender in its own process
    if not args.skip_memory:
        mem = {
            f"{kind}:{gate}": peak_memory(args, f"{kind}:{gate}", [])
            for kind in ("train", "decode")
            for gate in ("query_aware", "none")
        }
        results["peak_memory_mib"] = mem
        for kind in ("train", "decode"):
            ratios[f"peak_memory_imsm/vanilla_{kind}"] = mem[f"{kind}:query_aware"] / mem[f"{kind}:none"]
        print(f"peak memory MiB: {mem}", flush=True)

    # 4. the naive decoder (same dtype fp32), batch 1, long generation
    if args.naive_tokens:
        ids, mask = prompt_batch(tok, 1, args.prompt_len, dev)
        naive = NaiveSiamese(imsm)
        res = alternate(
            {
                "imsm": decode_fn(imsm, ids, mask, args.naive_tokens),
                "naive": lambda: naive.generate(ids, args.naive_tokens),
            },
            max(1, args.repeats // 2),
            dev,
            warmup=0,
        )
        results["naive_vs_imsm_s"] = res
        ratios.put(f"speedup_imsm_vs_naive_{args.naive_tokens}tok", res["naive"], res["imsm"])
    results["ratios"] = dict(ratios)
    results["ratio_intervals"] = ratios.intervals
    return results


TARGETS = {  # ratio name prefix -> (comparison, bar) from the issue
    "train_step_time_imsm/vanilla": ("<=", 1.30),
    "train_3_epochs_time_imsm_cached/vanilla": ("<=", 1.15),
    "decode_tok_s_imsm/vanilla_bf16_b1": (">=", 0.90),
    "decode_tok_s_imsm/vanilla_fp32_b1": (">=", 0.70),
    # the GPU bar (--static is on by default only there): both through the static cache and CUDA graphs
    "decode_tok_s_imsm_static/vanilla_static_bf16_b1": (">=", 0.85),
    "peak_memory_imsm/vanilla": ("<=", 1.15),
    "speedup_imsm_vs_naive": (">=", 10.0),
}


def targets(peft: str) -> dict[str, tuple[str, float]]:
    """``TARGETS`` for this method: LoRA's decoding bar is 0.95, the other methods' 0.90 (issue 19)."""
    if peft != "lora":
        return TARGETS
    return {**TARGETS, "decode_tok_s_imsm/vanilla_bf16_b1": (">=", 0.95)}


def verdict(name: str, value: float, interval: dict[str, float] | None = None, peft: str = "lora") -> str:
    """The target's bar and PASS / MISS when the ratio's whole interval is on one side of it, else UNSETTLED.

    ``interval``: ``{"low", "high", ...}`` (``imsm.timing.paired_ratio``); None: ``value`` alone is compared (a
    measure without repeats, e.g. peak memory). A PASS or MISS whose interval covers the median less than 95% of the
    time (under 6 rounds) carries a question mark and the number of rounds.
    """
    for prefix, (op, bar) in targets(peft).items():
        if name.startswith(prefix):
            low, high = (interval["low"], interval["high"]) if interval else (value, value)
            good = (high <= bar, low <= bar) if op == "<=" else (low >= bar, high >= bar)
            word = "PASS" if good[0] else "UNSETTLED" if good[1] else "MISS"
            if word != "UNSETTLED" and interval and interval.get("confidence", 1.0) < 0.95:
                # under 6 rounds the interval is the whole range, covering the median less often than 95%
                word = f"{word}? (under 95% sure: {interval.get('n', '?')} rounds)"
            return f"{op} {bar:<5} {word}"
    return "(report)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="smollm2")
    p.add_argument("--peft", default="lora", help="the method, a conf/peft file name (lora, dora, ia3, ...)")
    p.add_argument(
        "--quick", action="store_true", help="tiny_llama, fewer repeats: checks the script in seconds"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--naive-tokens", type=int, default=256, help="0 skips the naive decoder's comparison")
    p.add_argument("--train-seq", type=int, default=128)
    p.add_argument(
        "--train-precisions", nargs="*", default=["fp32", "bf16"], help="none (the flag alone) skips training"
    )
    p.add_argument(
        "--cache-epochs",
        type=int,
        default=3,
        help="epochs of the trainer.cache_frozen comparison (IMSM cached vs vanilla vs IMSM uncached); 0 skips it",
    )
    p.add_argument(
        "--cache-batches", type=int, default=2, help="batches (8 x train-seq) per epoch of that comparison"
    )
    p.add_argument(
        "--decode-precisions",
        nargs="*",
        default=["fp32", "bf16"],
        help="none (the flag alone) skips decoding",
    )
    p.add_argument(
        "--static",
        action=argparse.BooleanOptionalAction,
        help="also decode IMSM and vanilla with a static cache and a compiled step (CUDA graphs on CUDA); "
        "default: on for cuda, off on cpu (each variant compiles for tens of seconds there)",
    )
    p.add_argument(
        "--static-precisions",
        nargs="+",
        help="the decode precisions that get the static contenders (default: all); each precision x batch "
        "compiles both models' steps once",
    )
    p.add_argument(
        "--pair-only",
        action="store_true",
        help="decode only IMSM and vanilla (not imsm_unfused, vanilla_hf_generate): shorter rounds, so more of "
        "them in the same time and each pair timed closer together",
    )
    p.add_argument(
        "--attention-ab",
        action="store_true",
        help="also decode IMSM and vanilla with transformers' sdpa attention instead of imsm_sdpa's decoding "
        "attention (imsm.model.attention): the speed-up on this machine and the ratio under each",
    )
    p.add_argument(
        "--lockstep",
        action="store_true",
        help="time the IMSM/vanilla decoding pair and the cached-training epochs step by step, side by side "
        "(imsm.timing.lockstep), not whole runs in turn: a machine whose speed drifts within seconds then hits "
        "both sides alike. Decodes only that pair (vanilla on its own copy of the weights)",
    )
    p.add_argument(
        "--cache-only",
        action="store_true",
        help="training: only the cached epochs, IMSM cached vs vanilla (not the single step, not IMSM uncached): "
        "more rounds of the cache target in the same time",
    )
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument(
        "--random-init", help="model dir: its config and tokenizer with random weights (timing only)"
    )
    p.add_argument("--out", default=str(REPO / "outputs" / "bench"))
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.static is None:
        args.static = args.device.startswith("cuda") and not args.lockstep
    if args.lockstep and (args.static or args.attention_ab):
        p.error("--lockstep times only the IMSM/vanilla pair: drop --static and --attention-ab")
    if args.memory_probe:
        memory_probe(args)
        return
    if args.quick:
        args.backbone, args.repeats = "tiny_llama", min(args.repeats, 3)
        args.new_tokens, args.naive_tokens = 32, 64
    results = run(args)
    print(
        f"\nIMSM vs vanilla PEFT ({args.peft}) on {args.backbone}, {results['machine']}, {args.repeats} repeats "
        "(median of the per-round ratios, [its confidence interval]):"
    )
    for name, value in results["ratios"].items():
        ci = results["ratio_intervals"].get(name)
        span = f"[{ci['low']:.3f}, {ci['high']:.3f}] {ci['confidence']:.0%}" if ci else ""
        print(f"  {name:56} {value:7.3f}  {span:22} {verdict(name, value, ci, args.peft)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    method = "" if args.peft == "lora" else f"{args.peft}_"  # LoRA runs keep their earlier file names
    path = (
        out
        / f"bench_{args.backbone}_{method}{args.device.split(':')[0]}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
