"""The VAE mid-block attention alone: PyTorch SDPA vs this package's chunked matrix products, per dtype (the
measurement behind `vae_attention`'s choice of kernel).

Not part of the test suite. One command (about a minute on 2 cores):

    python tests/benchmarks/benchmark_vae_attention.py [--tokens 4096,16384]

One head of 512 channels (SD's VAE and the VQGAN-f4), random q/k/v, interleaved runs in one process; GFLOP/s counts
the two matrix products (4 tokens^2 channels). 16,384 tokens is the VQGAN-f4 at 512 px output, 65,536 at 1024.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from onestep_sr.pipelines.models.vae_attention import chunked_attention


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    print(f"{'tokens':>7} {'dtype':>5} {'SDPA':>12} {'chunked':>12} {'speed-up':>9}")
    for tokens in [int(t) for t in args.tokens.split(",") if t]:
        for name in [d for d in args.dtypes.split(",") if d]:
            q, k, v = (torch.randn(1, 1, tokens, 512).to(dtypes[name]) for _ in range(3))
            flop = 4 * tokens**2 * 512
            with torch.no_grad():
                sdpa = seconds(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), args.repeats)
                ours = seconds(lambda q=q, k=k, v=v: chunked_attention(q, k, v), args.repeats)
            print(f"{tokens:>7} {name:>5} {flop / sdpa / 1e9:>7.0f} GF/s {flop / ours / 1e9:>7.0f} GF/s "
                  f"{sdpa / ours:>8.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
