"""Split images into overlapping tiles and stitch (possibly rescaled) tiles back with feathered blending.

Used by the ComfyUI Tile Split / Tile Stitch nodes so that any node can run between them. Images
are (B, H, W, C) float tensors (ComfyUI's IMAGE layout). Stitch(Split(x)) == x exactly: weights
are normalised and blending runs in float64, so identical overlapping tiles reproduce x after
rounding back to float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .denoiser import tile_starts


@dataclass(frozen=True)
class TileLayout:
    """Where each tile of a split came from. Tiles are ordered image by image, row-major."""

    image_height: int
    image_width: int
    batch: int
    tile_height: int
    tile_width: int
    overlap: int
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def tiles_per_image(self) -> int:
        return len(self.rows) * len(self.cols)


def split_tiles(images: torch.Tensor, tile_size: int, overlap: int) -> tuple[torch.Tensor, TileLayout]:
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty image batch (B, H, W, C), got shape {tuple(images.shape)}")
    if tile_size < 1 or overlap < 0 or overlap >= tile_size:
        raise ValueError(f"need tile_size >= 1 and 0 <= overlap < tile_size, got {tile_size} and {overlap}")
    batch, height, width, _ = images.shape
    th, tw = min(tile_size, height), min(tile_size, width)
    rows = tuple(tile_starts(height, th, min(overlap, th - 1) if th > 1 else 0))
    cols = tuple(tile_starts(width, tw, min(overlap, tw - 1) if tw > 1 else 0))
    tiles = [images[b, r : r + th, c : c + tw] for b in range(batch) for r in rows for c in cols]
    layout = TileLayout(height, width, batch, th, tw, overlap, rows, cols)
    return torch.stack(tiles), layout


def stitch_tiles(tiles: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    expected = layout.batch * layout.tiles_per_image
    if tiles.ndim != 4 or tiles.shape[0] != expected:
        raise ValueError(
            f"expected {expected} tiles (B, H, W, C) for this layout, got shape {tuple(tiles.shape)}; "
            "keep the batch from Tile Split in the same order and size"
        )
    scale_h, rem_h = divmod(tiles.shape[1], layout.tile_height)
    scale_w, rem_w = divmod(tiles.shape[2], layout.tile_width)
    if rem_h or rem_w or scale_h != scale_w or scale_h < 1:
        raise ValueError(
            f"tiles are {tiles.shape[2]}x{tiles.shape[1]} but were split as {layout.tile_width}x{layout.tile_height}; "
            "they may only be scaled by the same integer factor in both directions"
        )
    s = scale_h
    th, tw = layout.tile_height * s, layout.tile_width * s
    weights = (
        _feather(th, layout.overlap * s, tiles.device)[:, None]
        * _feather(tw, layout.overlap * s, tiles.device)[None, :]
    )
    out_h, out_w = layout.image_height * s, layout.image_width * s
    channels = tiles.shape[-1]
    results = []
    i = 0
    for _ in range(layout.batch):
        accum = torch.zeros(out_h, out_w, channels, dtype=torch.float64, device=tiles.device)
        weight_sum = torch.zeros(out_h, out_w, 1, dtype=torch.float64, device=tiles.device)
        for r in layout.rows:
            for c in layout.cols:
                accum[r * s : r * s + th, c * s : c * s + tw] += tiles[i].double() * weights[..., None]
                weight_sum[r * s : r * s + th, c * s : c * s + tw] += weights[..., None]
                i += 1
        results.append((accum / weight_sum).to(tiles.dtype))
    return torch.stack(results)


def _feather(n: int, overlap: int, device) -> torch.Tensor:
    """Linear ramp over `overlap` pixels at both ends, 1 in the middle, never zero."""
    x = torch.arange(n, dtype=torch.float64, device=device)
    return (torch.minimum(x + 1, n - x) / (max(overlap, 1) + 1)).clamp(max=1.0)
