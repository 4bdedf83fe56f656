"""Validation metrics, defined as BasicSR/most SR papers report them:

- images are 8-bit (values rounded to 0..255), `crop_border` pixels are removed on each side;
- PSNR and SSIM on the Y channel of ITU-R BT.601 YCbCr: Y = 16 + 65.481 R + 128.553 G + 24.966 B for R, G, B in
  [0, 1] (Y in 16..235);
- PSNR = 10 log10(255^2 / MSE); SSIM: 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, L 255, valid region
  only (no padding), mean over the map. float64 throughout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_y(rgb01: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> Y [B, 1, H, W] in 16..235 (float64, from 8-bit-rounded RGB)."""
    rgb = (rgb01.double().clamp(0, 1) * 255).round() / 255
    w = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64, device=rgb.device).view(1, 3, 1, 1)
    return (rgb * w).sum(1, keepdim=True) + 16.0


def _crop(x: torch.Tensor, border: int) -> torch.Tensor:
    return x[..., border : x.shape[-2] - border, border : x.shape[-1] - border] if border else x


def psnr_y(sr: torch.Tensor, hq: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """[B] PSNR in dB (inf for identical images)."""
    mse = ((_crop(to_y(sr), crop_border) - _crop(to_y(hq), crop_border)) ** 2).mean((1, 2, 3))
    return 10 * torch.log10(255.0**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_y(sr: torch.Tensor, hq: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """[B] SSIM of the Y channels."""
    x, y = _crop(to_y(sr), crop_border), _crop(to_y(hq), crop_border)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {tuple(x.shape[-2:])}")
    window = gaussian_window().to(x.device).view(1, 1, 11, 11)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(t):
        return F.conv2d(t, window)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return ssim_map.mean((1, 2, 3))


def mean_finite(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("inf")
