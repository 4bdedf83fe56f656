"""Every vocabulary and default the library, the CLI and the nodes share, defined once.

Import the names from here; nothing else spells these lists out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Colour correction of the output against the (upsampled) input; see color_fix.py.
COLOR_FIX_METHODS = ("adain", "wavelet", "none")
# How the VAE latent is taken from the posterior: its mean, or one draw (the official scripts).
LATENT_SAMPLING_MODES = ("mode", "sample")
# Weighting of overlapping denoiser tiles; see tiling/denoiser.py.
BLEND_MODES = ("gaussian", "linear")
OUTPUT_TYPES = ("pil", "np", "pt")

# Precision names accepted by load_pipeline, the CLI and the loader node ("auto" is resolved per device).
DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DEVICE_NAMES = ("auto", "cpu", "cuda")

# Weight files: pickles are read with torch.load(weights_only=True), safetensors by their header.
PICKLE_SUFFIXES = (".pkl", ".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
# Single-file base models (an LDM-layout checkpoint).
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".sft", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class TileDefaults:
    """A method's official latent tiling (latent pixels) and colour fix; "auto" resolves to these."""

    color_fix: str = "adain"
    tile_size: int = 96
    tile_overlap: int = 32


# Used by a pipeline that was not built by a registered method (e.g. assembled by hand).
GENERIC_DEFAULTS = TileDefaults()

# Denoiser tiling limits (latent pixels).
MIN_TILE_SIZE = 16
AUTO_TILE_CANDIDATES = (256, 192, 128, 96, 64, 48, 32)  # tried up to the method's default tile
# "auto" runs a latent up to this size (or the method's default tile, if larger) in one piece when memory
# allows: one pass costs less than overlapping tiles at these sizes, and the result is exactly the untiled one.
AUTO_SINGLE_TILE_MAX = 128

# Streamed VAE tiles (image pixels).
DEFAULT_VAE_TILE_SIZE = 512
MIN_VAE_TILE_SIZE = 64
