"""What this CPU runs fast: the one rule behind `dtype="auto"` on the CPU and the VAE attention kernel choice."""

from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AMX, or an AMD CPU with AVX512-BF16 (Zen 4 and later): where bf16 matrix products and convolutions run
    faster than fp32. Measured, not assumed: on the AMD EPYC this project first ran on, bf16 matrix products ran at
    430-470 GFLOP/s against ~200 in fp32 (an SD2.1 one-step upscale 2.1-2.5x faster in bf16). On an Intel Xeon with
    AVX512-BF16 but no AMX, bf16 is slower than fp32 (matmul 152-173 vs 200-240 GFLOP/s, convolution 176 vs 321;
    the SD2.1 one step at 512 px 0.84x, the ResShift family 0.70-0.75x): the flag alone does not say bf16 is fast."""
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return True
    if not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return "AuthenticAMD" in f.read(4096)
    except OSError:
        return False
