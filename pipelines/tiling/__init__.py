"""Any image size in bounded memory: denoiser tiles, the exact streamed VAE, tile plans, split/stitch."""

from .denoiser import blend_weights, count_tiles, run_tiled, tile_regions, tile_starts
from .plan import TilingOptions, TilingPlan, plan_tiling, retry_on_oom
from .streamed_vae import StreamedVAE
from .tile_layout import TileLayout, split_tiles, stitch_tiles

__all__ = [
    "StreamedVAE",
    "TileLayout",
    "TilingOptions",
    "TilingPlan",
    "blend_weights",
    "count_tiles",
    "plan_tiling",
    "retry_on_oom",
    "run_tiled",
    "split_tiles",
    "stitch_tiles",
    "tile_regions",
    "tile_starts",
]
