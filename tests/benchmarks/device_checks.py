"""Checks that need a CUDA GPU (run by hand where one is present; the suite runs the same checks on the CPU):
a batched image equals its unbatched run on CUDA for the three families in true fp32 (TF32 off), and how far the
GPU's default dtype (bf16) moves it.

    python tests/benchmarks/device_checks.py [--tf32]   # one line per family and dtype, exit 1 on a failure

Measured on an H200 (torch 2.11): fp32 batched vs single <= 5e-6 for all three; with TF32 left on (PyTorch lets
cuDNN convolutions use it by default) 2e-3 (OSEDiff), 5e-3 (TSD-SR), 0.31 (TAD-SR: a near-tie VQ code flips); bf16
1e-2, 6e-2, 0.45. Those are reported, not failed: they are the precision's, not the batching's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from onestep_sr import load_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import OSEDIFF_PARITY, TADSR_PARITY, TSDSR_PARITY

FAMILIES = {
    "osediff": lambda **kw: load_pipeline(OSEDIFF_PARITY / "tiny-sd21", OSEDIFF_PARITY / "osediff_tiny.pkl", **kw),
    "tsdsr": lambda **kw: load_pipeline(
        TSDSR_PARITY / "tiny-sd3", TSDSR_PARITY / "lora", embeddings=TSDSR_PARITY / "embeddings", **kw
    ),
    "tadsr": lambda **kw: load_pipeline(
        TADSR_PARITY / "models" / "autoencoder_vq_f4_tiny_A.pth", TADSR_PARITY / "models" / "tadsr_tiny_A.pth", **kw
    ),
}
# a batched image against its own run in true fp32: rounding only (as on the CPU); other precisions are reported
TOLERANCE = {"fp32": 1e-4}


def run(pipe, lqs, upscale, kw, batch_size):
    generators = [torch.Generator().manual_seed(10 + i) for i in range(len(lqs))]
    return pipe(lqs, upscale=upscale, generator=generators, output_type="pt", tile_size=None, vae_tile_size=None,
                batch_size=batch_size, **kw).images  # fmt: skip


def main() -> int:
    # true fp32 convolutions and matmuls unless --tf32 (PyTorch lets cuDNN use TF32 by default)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = "--tf32" in sys.argv
    rng = np.random.default_rng(0)
    lqs = [Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)) for _ in range(6)]
    failures = 0
    for name, load in FAMILIES.items():
        for dtype in ("fp32", "auto"):
            pipe = load(dtype=dtype, device="cuda")
            pipe.set_progress_bar_config(disable=True)
            upscale = 4 if name == "tadsr" else 2
            kw = {} if name == "tadsr" else {"latent_sampling": "sample"}

            single, batched = (run(pipe, lqs, upscale, kw, b) for b in (1, 6))
            diff = max((a - b).abs().max().item() for a, b in zip(single, batched))
            ok = diff <= TOLERANCE.get(dtype, float("inf")) or "--tf32" in sys.argv
            failures += not ok
            print(f"{name:8s} {dtype:5s} ({pipe.unet.dtype if hasattr(pipe, 'unet') else pipe.transformer.dtype}): "
                  f"batched vs single max |diff| {diff:.2e} {'ok' if ok else 'FAIL'}", flush=True)  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
