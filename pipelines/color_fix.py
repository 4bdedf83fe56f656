"""Colour correction of the SR output against the upsampled low-quality input.

Both methods follow the OSEDiff / StableSR definitions exactly (see shared docs,
methods-osediff.md section 3); they work on float images in [0, 1], shaped
(N, 3, H, W), and return the same shape clamped to [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .options import COLOR_FIX_METHODS

# 3x3 binomial blur [1,2,1] x [1,2,1] / 16, applied a-trous at dilations 1, 2, 4, 8, 16.
_WAVELET_LEVELS = 5


def adain_color_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Give `target` the per-channel mean and std of `source` (unbiased variance + 1e-5, as upstream).

    Only statistics are taken from `source`, so it may have another size (TSD-SR uses the LR itself).
    """
    if target.shape[:2] != source.shape[:2]:
        raise ValueError(
            f"colour fix needs the same batch and channels, got {tuple(target.shape)} and {tuple(source.shape)}"
        )
    t_mean, t_std = _channel_stats(target)
    s_mean, s_std = _channel_stats(source)
    return ((target - t_mean) / t_std * s_std + s_mean).clamp_(0, 1)


def wavelet_color_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Keep the high frequencies of `target` and take the low-frequency residue of `source`."""
    _check_pair(target, source)
    target_high, _ = wavelet_decompose(target)
    _, source_low = wavelet_decompose(source)
    return (target_high + source_low).clamp_(0, 1)


def apply_color_fix(method: str, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    if method == "adain":
        return adain_color_fix(target, source)
    if method == "wavelet":
        return wavelet_color_fix(target, source)
    if method == "none":
        return target.clamp(0, 1)
    raise ValueError(f"color_fix must be one of {COLOR_FIX_METHODS}, got {method!r}")


def wavelet_decompose(image: torch.Tensor, levels: int = _WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (high, low) with high accumulated level by level, as upstream does, and low the last blur."""
    high = torch.zeros_like(image)
    for level in range(levels):
        low = _wavelet_blur(image, radius=2**level)
        high += image - low
        image = low
    return high, image


def _wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    channels = image.shape[1]
    kernel = (
        torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=image.dtype, device=image.device) / 16
    )
    kernel = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def _channel_stats(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = image.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    # torch.var is unbiased by default: upstream relies on that, so a 1-pixel image has var nan -> guard below.
    var = flat.var(dim=2) if flat.shape[2] > 1 else torch.zeros_like(flat[..., 0])
    return mean, (var + 1e-5).sqrt()[..., None, None]


def _check_pair(target: torch.Tensor, source: torch.Tensor) -> None:
    if target.shape != source.shape:
        raise ValueError(
            f"colour fix needs target and source of the same shape, got {tuple(target.shape)} and {tuple(source.shape)}"
        )
