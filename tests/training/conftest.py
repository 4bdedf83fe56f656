"""Shared training fixtures: small image folders and the seeded perceptual backbones, made once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from perceptual_weights import write_backbone_files
from training_helpers import TRAIN_TEST_DEVICE

if TRAIN_TEST_DEVICE.startswith("cuda"):  # true fp32 for the parity tolerances (PyTorch lets cuDNN use TF32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


def write_images(folder: Path, count: int, size: tuple[int, int], seed: int) -> Path:
    """Smooth random colour images (bicubic-upsampled noise), 8-bit PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        x = F.interpolate(torch.rand(1, 3, 10, 10, generator=g), size=size, mode="bicubic").clamp(0, 1)
        Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="session")
def train_images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("train") / "hq", 6, (72, 88), seed=1)


@pytest.fixture(scope="session")
def val_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("val")
    hq = write_images(root / "hq", 2, (64, 64), seed=2)
    (root / "lq").mkdir()
    for p in hq.iterdir():
        Image.open(p).resize((16, 16), Image.BICUBIC).save(root / "lq" / p.name)
    return root


@pytest.fixture(scope="session")
def backbones(tmp_path_factory) -> Path:
    return write_backbone_files(tmp_path_factory.mktemp("backbones"))
