"""One decoding query's attention on CPU: PyTorch's flash kernel (transformers' ``sdpa``) vs ``imsm_sdpa``'s.

Times one call of each, side by side in every round, over cache lengths and batch 1 / 2 (2: IMSM's doubled batch),
with a backbone's head shapes (default SmolLM2-135M: 9 heads, 3 key/value heads, 64 dims), and prints the median
time per call, the per-round ratio flash / imsm_sdpa with its interval (``imsm.timing.paired_ratio``) and each
kernel's largest error against float64.

    python scripts/decode_attention_bench.py [--dtype bf16] [--lengths 128 228 512 1024] [--rounds 15]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from imsm.backbones import resolve_dtype
from imsm.model.attention import single_query_attention
from imsm.timing import alternate, paired_ratio


def repeat(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    """``fn`` called ``calls`` times in a row."""

    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def kernels_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> dict[str, Callable]:
    """The two kernels on one query (batch, heads, 1, d) and cache (batch, kv_heads, length, d)."""
    return {
        "flash": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True),
        "imsm_sdpa": lambda: single_query_attention(q, k, v, None, scale),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 228, 512, 1024])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=200, help="calls per timing")
    args = p.parse_args()
    dtype = resolve_dtype(args.dtype)
    scale = args.dim**-0.5
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, heads {args.heads}/"
        f"{args.kv_heads}, dim {args.dim}; median us per call, time flash / imsm_sdpa [interval], max error"
    )
    for length in args.lengths:
        for batch in (1, 2):
            g = torch.Generator().manual_seed(length + batch)
            q = (torch.randn(batch, args.heads, 1, args.dim, generator=g) * 2).to(dtype)
            k = (torch.randn(batch, args.kv_heads, length, args.dim, generator=g) * 2).to(dtype)
            v = torch.randn(batch, args.kv_heads, length, args.dim, generator=g).to(dtype)
            kernels = kernels_for(q, k, v, scale)
            group = args.heads // args.kv_heads
            exact = F.scaled_dot_product_attention(
                q.double(),
                k.double().repeat_interleave(group, 1),
                v.double().repeat_interleave(group, 1),
                scale=scale,
            )
            errors = {
                "flash": (kernels["flash"]().double() - exact).abs().max().item(),
                "imsm_sdpa": (kernels["imsm_sdpa"]().double() - exact.transpose(1, 2)).abs().max().item(),
            }
            # each timing runs `calls` calls (one call is tens of microseconds), rounds interleaved by alternate
            batches = {name: repeat(fn, args.calls) for name, fn in kernels.items()}
            res = alternate(batches, args.rounds, "cpu")
            ratio = paired_ratio(res["flash"], res["imsm_sdpa"])
            med = {name: r["median"] / args.calls * 1e6 for name, r in res.items()}
            print(
                f"length {length:5d} batch {batch}: flash {med['flash']:6.0f} us, imsm_sdpa {med['imsm_sdpa']:5.0f} us,"
                f" ratio {ratio['median']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}];"
                f" error flash {errors['flash']:.1e}, imsm_sdpa {errors['imsm_sdpa']:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
