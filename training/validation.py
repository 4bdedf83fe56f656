"""Validation during training: the pipeline's own `__call__` on a folder of LQ/HQ pairs, PSNR/SSIM on Y (see
metrics.py), the perceptual loss when the run has one, and a few saved sample images."""

from __future__ import annotations

from pathlib import Path

import torch

from ..pipelines.images import postprocess, save_png_atomically
from .config import TrainConfig
from .data.datasets import read_rgb, validation_pairs
from .metrics import mean_finite, psnr_y, ssim_y


@torch.no_grad()
def run_validation(pipe, config: TrainConfig, step: int, folder: Path, perceptual=None) -> dict[str, float]:
    from .objectives.regression import perceptual_value

    border = config.scale if config.val_crop_border is None else config.val_crop_border
    psnrs, ssims, percs = [], [], []
    for i, (lq_path, hq_path) in enumerate(validation_pairs(config.val_data)):
        lq, hq = read_rgb(lq_path)[None], read_rgb(hq_path)[None]
        upscale = hq.shape[-1] // lq.shape[-1]
        generator = torch.Generator().manual_seed(config.seed)
        sr = pipe(lq, upscale=upscale, output_type="pt", generator=generator).images[:, :3].cpu()
        if sr.shape != hq.shape:
            raise ValueError(f"validation pair {lq_path.name}: output {tuple(sr.shape)} vs HQ {tuple(hq.shape)}")
        psnrs.append(psnr_y(sr, hq, border).item())
        ssims.append(ssim_y(sr, hq, border).item())
        if perceptual is not None:
            device = next(perceptual.parameters()).device
            percs.append(perceptual_value(perceptual, sr.to(device) * 2 - 1, hq.to(device) * 2 - 1).item())
        if i < config.val_samples:
            save_png_atomically(postprocess([sr], "pil")[0], folder / f"{lq_path.stem}.png")
    metrics = {"psnr_y": mean_finite(psnrs), "ssim_y": sum(ssims) / len(ssims)}
    if percs:
        metrics[config.perceptual] = sum(percs) / len(percs)
    return metrics
