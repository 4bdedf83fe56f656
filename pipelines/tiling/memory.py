"""How much memory a run needs, estimated before anything is converted or allocated.

One estimator for everything that asks: the pipelines refuse a run that cannot fit (with the
numbers and what to change), and the ComfyUI nodes ask ComfyUI's model management for the same
amount before a run. The estimate follows the tiling plan the run will use:

- images: the input, the upsampled input, the padded model input, the decoded output and the
  colour fix's temporaries, all float32 RGB at output size (12 planes of 3 x H x W x 4 bytes);
- the VAE: streamed, two feature maps of its full-resolution width (the block input and output;
  the resnets write in place) plus the last upsampler's map (stored while it is under 1 GiB, else
  recomputed per region); untiled, every intermediate of diffusers' graph (8 maps);
- the denoiser: one tile's workspace (`DenoiserFacts.tile_bytes`, measured on SD2.1's UNet).

The peak is the images plus the larger of the VAE and the denoiser (they never run at once).
Calibrated on this project's benchmarks (README): OSEDiff bf16 at 2048 px measured 3.0 GB of work
(peak RSS less the weights), estimated 3.8 GB; at 1024 px measured 1.2 GB, estimated 1.2 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .streamed_vae import LAZY_UPSAMPLE_BYTES

IMAGE_PLANES = 12  # float32 RGB images at output size alive at the peak (see the module docstring)
STREAMED_VAE_MAPS = 2
UNTILED_VAE_MAPS = 8


def available_memory(device: torch.device) -> int:
    """Bytes free for work: CUDA free memory, or the OS's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return 8 << 30


def format_bytes(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.0f} MiB"


@dataclass(frozen=True)
class VAEFacts:
    """What the estimate needs to know about a pipeline's VAE."""

    widths: tuple[int, ...]  # block_out_channels, full resolution first
    dtype: torch.dtype

    @classmethod
    def of(cls, vae) -> VAEFacts:
        return cls(tuple(int(c) for c in vae.config.block_out_channels), vae.dtype)


@dataclass(frozen=True)
class RunEstimate:
    """Working memory of one image's run, in bytes, by stage (weights not included: they are resident)."""

    output_hw: tuple[int, int]
    images: int
    vae: int
    denoiser: int

    @property
    def peak(self) -> int:
        return self.images + max(self.vae, self.denoiser)

    def scaled(self, images: int) -> RunEstimate:
        """The estimate for `images` such images run as one batch (every stage's maps scale with the batch)."""
        return RunEstimate(self.output_hw, self.images * images, self.vae * images, self.denoiser * images)


def estimate_run(output_hw: tuple[int, int], vae: VAEFacts, vae_streamed: bool, denoiser_bytes: int) -> RunEstimate:
    pixels = output_hw[0] * output_hw[1]
    images = IMAGE_PLANES * 3 * pixels * 4
    itemsize = vae.dtype.itemsize
    if vae_streamed:
        upsampled = vae.widths[1] if len(vae.widths) > 1 else vae.widths[0]
        vae_bytes = STREAMED_VAE_MAPS * vae.widths[0] * pixels * itemsize
        vae_bytes += min(upsampled * pixels * itemsize, LAZY_UPSAMPLE_BYTES)
    else:
        vae_bytes = UNTILED_VAE_MAPS * vae.widths[0] * pixels * itemsize
    return RunEstimate(tuple(output_hw), images, vae_bytes, int(denoiser_bytes))


class InsufficientMemoryError(MemoryError):
    """A run refused before it started: its estimated peak exceeds the memory free on its device."""


def fits(estimate: RunEstimate, device: torch.device) -> bool:
    return estimate.peak <= available_memory(device)


def check_fits(estimate: RunEstimate, device: torch.device, what: str) -> None:
    free = available_memory(device)
    if estimate.peak <= free:
        return
    h, w = estimate.output_hw
    where = "GPU memory free" if device.type == "cuda" else "RAM available"
    parts = f"images {format_bytes(estimate.images)}, VAE {format_bytes(estimate.vae)}, "
    parts += f"denoiser {format_bytes(estimate.denoiser)}"
    raise InsufficientMemoryError(
        f"{what}: a {w}x{h} output needs about {format_bytes(estimate.peak)} of working memory ({parts}) but only "
        f"{format_bytes(free)} of {where}. Use a smaller upscale factor or a smaller input (or split it: Tile Split "
        "-> Upscale -> Tile Stitch), a smaller tile_size, a tiled VAE (vae_tile_size), or bf16/fp16."
    )
