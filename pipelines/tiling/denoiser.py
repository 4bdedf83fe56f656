"""Latent tiling for the one-step denoiser: overlapping tiles, weighted blending of the model output.

The model runs once, so blending its output (eps / v / velocity) and applying the one-step
formula once on the full latent is the same as blending per-tile x0 (the formula is affine
in the model output with image-wide coefficients), but cheaper and exactly like upstream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from ..options import BLEND_MODES


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile` overlapping by at least `overlap`; the last one is
    snapped to the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    starts = [i * stride for i in range(count - 1)] + [length - tile]
    return sorted(set(starts))


def tile_regions(height: int, width: int, tile: int, overlap: int) -> Iterator[tuple[int, int, int, int]]:
    th, tw = min(tile, height), min(tile, width)
    for r in tile_starts(height, th, overlap):
        for c in tile_starts(width, tw, overlap):
            yield r, r + th, c, c + tw


def blend_weights(height: int, width: int, mode: str, overlap: int, device=None) -> torch.Tensor:
    """(height, width) float32 weights, positive everywhere, largest in the tile centre."""
    if mode == "gaussian":
        # Same shape as upstream (variance 0.01 of the tile size), symmetric about the tile centre.
        def axis(n):
            x = torch.arange(n, dtype=torch.float64)
            return torch.exp(-((x - (n - 1) / 2) ** 2) / (n * n) / (2 * 0.01))
    elif mode == "linear":
        # Feather: ramps up over `overlap` pixels from each edge, flat in the middle.
        def axis(n):
            x = torch.arange(n, dtype=torch.float64)
            ramp = torch.minimum(x + 1, n - x) / (max(overlap, 1) + 1)
            return ramp.clamp(max=1.0)
    else:
        raise ValueError(f"blend must be one of {BLEND_MODES}, got {mode!r}")
    return torch.outer(axis(height), axis(width)).float().to(device)


def run_tiled(
    model: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    tile_size: int | None,
    overlap: int = 0,
    batch_size: int = 1,
    blend: str = "gaussian",
    on_tile: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """model(latent tiles) -> outputs of the same shape, blended into one (N, C, H, W) float32 map.

    tile_size None (or a latent that fits in one tile) runs the model once on the whole latent.
    """
    height, width = latents.shape[-2:]
    if tile_size is not None and overlap >= tile_size:
        raise ValueError(f"tile_overlap ({overlap}) must be smaller than tile_size ({tile_size})")
    regions = [(0, height, 0, width)] if tile_size is None else list(tile_regions(height, width, tile_size, overlap))
    if len(regions) == 1:
        out = model(latents).float()
        if on_tile:
            on_tile(1)
        return out
    th, tw = regions[0][1] - regions[0][0], regions[0][3] - regions[0][2]
    weights = blend_weights(th, tw, blend, overlap, device=latents.device)
    accum = None
    weight_sum = torch.zeros(height, width, device=latents.device)
    for i in range(0, len(regions), batch_size):
        batch = regions[i : i + batch_size]
        tiles = torch.cat([latents[..., r0:r1, c0:c1] for r0, r1, c0, c1 in batch])
        outputs = model(tiles).float()
        if accum is None:
            accum = torch.zeros(latents.shape[0], outputs.shape[1], height, width, device=latents.device)
        n = latents.shape[0]
        for j, (r0, r1, c0, c1) in enumerate(batch):
            accum[..., r0:r1, c0:c1] += outputs[j * n : (j + 1) * n] * weights
            weight_sum[r0:r1, c0:c1] += weights
        if on_tile:
            on_tile(len(batch))
    return accum / weight_sum


def count_tiles(height: int, width: int, tile_size: int | None, overlap: int) -> int:
    if tile_size is None:
        return 1
    return sum(1 for _ in tile_regions(height, width, tile_size, overlap))
