"""How one image is tiled: the user's options validated once, then a frozen plan per image.

`TilingOptions.validate` checks what the user asked for (before any work). `plan_tiling` turns it
into a `TilingPlan` for one image, reading free memory once, so the progress total and the work
done always agree. `retry_on_oom` is the one out-of-memory policy: halve the tile and try again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..options import (
    AUTO_SINGLE_TILE_MAX,
    AUTO_TILE_CANDIDATES,
    BLEND_MODES,
    DEFAULT_VAE_TILE_SIZE,
    MIN_TILE_SIZE,
    MIN_VAE_TILE_SIZE,
    TileDefaults,
)
from .denoiser import count_tiles
from .memory import available_memory
from .streamed_vae import do_nothing, needs_streaming, streamed_vae

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Working memory of one denoiser tile, per latent pixel and per channel of the denoiser's full-resolution
# stage, in bytes per element of its dtype. Measured on SD2.1-base's UNet (320 channels, bf16, CPU):
# peak RSS over the weights was 0.15 GiB at 64x64 latents and 0.30 GiB at 96x96, factors 61 and 54.
UNET_WORKSPACE_FACTOR = 64


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass(frozen=True)
class DenoiserFacts:
    """What tiling needs to know about a pipeline's denoiser."""

    width: int  # channels per latent pixel of its widest full-resolution stage
    dtype: torch.dtype

    def tile_bytes(self, tile: int, batch: int) -> int:
        return int(UNET_WORKSPACE_FACTOR * tile * tile * self.width * self.dtype.itemsize * batch)


@dataclass(frozen=True)
class TilingOptions:
    """The user's tiling request, validated. tile_size: int, None (never tile) or "auto"."""

    tile_size: int | str | None = "auto"
    tile_overlap: int = 32
    tile_batch_size: int = 1
    vae_tile_size: int | None = DEFAULT_VAE_TILE_SIZE
    blend: str = "gaussian"
    default_tile: int = 96

    @classmethod
    def validate(
        cls,
        tile_size: Any,
        tile_overlap: Any,
        tile_batch_size: Any,
        vae_tile_size: Any,
        blend: Any,
        defaults: TileDefaults,
    ) -> TilingOptions:
        if blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")
        for name, value, minimum in (
            ("tile_size", tile_size, MIN_TILE_SIZE),
            ("vae_tile_size", vae_tile_size, MIN_VAE_TILE_SIZE),
        ):
            if value not in (None, "auto") and not (_is_int(value) and value >= minimum):
                raise ValueError(f"{name} must be 'auto', None or an integer >= {minimum}, got {value!r}")
        if tile_overlap == "auto":
            tile_overlap = defaults.tile_overlap
        if not (_is_int(tile_overlap) and tile_overlap >= 0):
            raise ValueError(f"tile_overlap must be 'auto' or a non-negative integer, got {tile_overlap!r}")
        if not (_is_int(tile_batch_size) and tile_batch_size >= 1):
            raise ValueError(f"tile_batch_size must be a positive integer, got {tile_batch_size!r}")
        return cls(
            tile_size=tile_size if tile_size in (None, "auto") else int(tile_size),
            tile_overlap=int(tile_overlap),
            tile_batch_size=int(tile_batch_size),
            vae_tile_size=DEFAULT_VAE_TILE_SIZE if vae_tile_size == "auto" else vae_tile_size,
            blend=blend,
            default_tile=defaults.tile_size,
        )


@dataclass(frozen=True)
class TilingPlan:
    """How one image runs: the denoiser tile (None: one piece) and the VAE tile (None: untiled)."""

    latent_hw: tuple[int, int]
    tile_size: int | None
    tile_overlap: int  # as requested; the overlap used is capped at half the tile
    batch_size: int
    blend: str
    vae_tile_size: int | None
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (torch.device is immutable)
    tile_multiple: int = 1  # denoiser tiles must be multiples of this (e.g. 64 for ResShift's Swin windows)

    @classmethod
    def untiled(cls, latent_hw: tuple[int, int] = (0, 0)) -> TilingPlan:
        return cls(latent_hw, None, 0, 1, "gaussian", None)

    @property
    def overlap(self) -> int:
        return 0 if self.tile_size is None else min(self.tile_overlap, self.tile_size // 2)

    @property
    def denoiser_tiles(self) -> int:
        return count_tiles(*self.latent_hw, self.tile_size, self.overlap)

    def with_tile(self, tile: int | None) -> TilingPlan:
        if tile is not None:
            tile = max(self.tile_multiple, tile - tile % self.tile_multiple)
        if tile is not None and self.latent_hw[0] <= tile and self.latent_hw[1] <= tile:
            tile = None
        return dataclasses.replace(self, tile_size=tile)


def plan_tiling(
    options: TilingOptions,
    latent_hw: tuple[int, int],
    denoiser: DenoiserFacts,
    device: torch.device,
    tile_multiple: int = 1,
) -> TilingPlan:
    """The plan for a latent of this size; "auto" reads free memory here, once."""
    tile = options.tile_size
    if tile == "auto":
        budget = available_memory(device) // 2  # leave room for the VAE maps and the rest of the process
        single = max(latent_hw)
        one_piece_max = max(AUTO_SINGLE_TILE_MAX, options.default_tile)
        if single <= one_piece_max and denoiser.tile_bytes(single, options.tile_batch_size) <= budget:
            tile = None
        else:
            # the method's own default (its official tiling) unless free memory asks for smaller tiles
            candidates = [t for t in AUTO_TILE_CANDIDATES if t <= options.default_tile] or [MIN_TILE_SIZE]
            fits = (t for t in candidates if denoiser.tile_bytes(t, options.tile_batch_size) <= budget)
            tile = next(fits, candidates[-1])
    plan = TilingPlan(
        latent_hw=tuple(latent_hw),
        tile_size=None,
        tile_overlap=options.tile_overlap,
        batch_size=options.tile_batch_size,
        blend=options.blend,
        vae_tile_size=options.vae_tile_size,
        device=device,
        tile_multiple=tile_multiple,
    )
    return plan.with_tile(tile)


def retry_on_oom(
    attempt: Callable[[T], R], first: T, shrink: Callable[[T], T | None], device: torch.device, what: str
) -> R:
    """attempt(first); on out-of-memory, attempt(shrink(previous)) until it works or shrink gives None."""
    size = first
    while True:
        try:
            return attempt(size)
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not is_out_of_memory(err):
                raise
            smaller = shrink(size)
            if smaller is None:
                raise MemoryError(f"out of memory in the {what} even at the smallest tile ({size}): {err}") from err
            logger.warning("out of memory in the %s with tile %s; retrying with %s", what, size, smaller)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            size = smaller


def halve_denoiser_tile(plan: TilingPlan) -> TilingPlan | None:
    smaller = (max(plan.latent_hw) if plan.tile_size is None else plan.tile_size) // 2
    if smaller < max(MIN_TILE_SIZE, plan.tile_multiple) or smaller % plan.tile_multiple:
        return None
    return plan.with_tile(smaller)


class StageReport:
    """Progress of one VAE stage worth `units` progress units: `tick` is a cancellation point (after every
    tile), `fraction` moves the bar; `finish` completes the stage's units whatever path ran."""

    def __init__(self, advance: Callable[[int], None] | None = None, tick: Callable[[], None] | None = None, units=1):
        self.advance, self.tick, self.units, self.reported = advance, tick or do_nothing, units, 0

    def fraction(self, done: float) -> None:
        target = min(self.units, int(self.units * done))
        if target > self.reported and self.advance is not None:
            self.advance(target - self.reported)
            self.reported = target
        self.tick()

    def finish(self) -> None:
        self.fraction(1.0)


def vae_units(vae, image_hw: tuple[int, int], plan: TilingPlan, stage: str) -> int:
    """Progress units of a VAE stage: one per layer when the VAE is streamed (see StreamedVAE.layer_count)."""
    if not needs_streaming(*image_hw, plan.vae_tile_size):
        return 1
    return streamed_vae(vae, plan.vae_tile_size).layer_count(stage)


def vae_encode(vae, image: torch.Tensor, plan: TilingPlan, report: StageReport | None = None):
    """The VAE posterior of an image, streamed in tiles when it is larger than the plan's VAE tile."""
    image = image.contiguous(memory_format=torch.channels_last)  # matches the weights: ~10% faster on CPU
    return _run_vae(
        plan, image.shape[-2:], lambda: vae.encode(image).latent_dist, lambda s: s.encode(image), vae, "encode", report
    )


def vq_encode(
    vae, image: torch.Tensor, plan: TilingPlan, channels_last: bool = False, report: StageReport | None = None
) -> torch.Tensor:
    """A VQ model's latent (encoder + quant_conv, not quantised), streamed like `vae_encode`. In the default
    memory format unless asked: the VQ argmin is fragile and channels-last reorders the encoder's sums (measured
    2e-4), so fp32 keeps the official order."""
    image = image.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    untiled, streamed = lambda: vae.encode(image).latents, lambda s: s.encode_moments(image)
    return _run_vae(plan, image.shape[-2:], untiled, streamed, vae, "encode", report)


def vae_decode(
    vae,
    latents: torch.Tensor,
    plan: TilingPlan,
    scale_factor: int,
    channels_last: bool = True,
    report: StageReport | None = None,
    **decode_kwargs,
) -> torch.Tensor:
    """decode_kwargs go to the untiled `vae.decode` (e.g. force_not_quantize=True for already quantised latents)."""
    latents = latents.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    size = tuple(n * scale_factor for n in latents.shape[-2:])
    untiled, streamed = lambda: vae.decode(latents, **decode_kwargs).sample, lambda s: s.decode(latents)
    return _run_vae(plan, size, untiled, streamed, vae, "decode", report)


def _run_vae(plan: TilingPlan, image_hw, untiled: Callable, streamed: Callable, vae, stage: str, report):
    report = report or StageReport()

    def attempt(tile: int | None):
        if not needs_streaming(*image_hw, tile):
            return untiled()
        runner = streamed_vae(vae, tile, on_tile=report.tick)
        count, done = runner.layer_count(stage), 0

        def on_layer() -> None:
            nonlocal done
            done += 1
            report.fraction(done / count)

        runner.on_layer = on_layer
        return streamed(runner)

    def shrink(tile: int | None) -> int | None:
        smaller = (max(image_hw) if tile is None else tile) // 2
        return None if smaller < MIN_VAE_TILE_SIZE else smaller

    out = retry_on_oom(attempt, plan.vae_tile_size, shrink, plan.device, "VAE")
    report.finish()
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
