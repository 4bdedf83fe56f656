"""LPIPS (vgg, alex), DISTS and EA-DISTS as frozen `nn.Module`s computing per-image values with gradients.

Facts: tests/data/parity/train-common/README.md §B-C (lpips 0.1.4, DISTS_pytorch 0.1, D3SR/DFOSD eq. 5-7).
Backbones come from local torchvision files (see backbones.py); the small heads ship with the package
(`weights/`: LPIPS linear layers, BSD-2-Clause; DISTS alpha/beta, MIT; see NOTICE).

Input ranges, as the reference packages take them: LPIPS images in [-1, 1] (OSEDiff calls it so), DISTS and
EA-DISTS images in [0, 1]. Each returns a [B] tensor; a loss is its mean.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .backbones import load_backbone

HEADS = Path(__file__).parent / "weights"

# LPIPS taps: the slices of `features` after which each tap is read
LPIPS_TAPS = {"vgg": (4, 9, 16, 23, 30), "alex": (2, 5, 8, 10, 12)}
LPIPS_ARCH = {"vgg": "vgg16", "alex": "alexnet"}
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _slices(features: nn.Sequential, ends: tuple[int, ...]) -> nn.ModuleList:
    starts = (0, *ends[:-1])
    return nn.ModuleList(nn.Sequential(*list(features)[a:b]) for a, b in zip(starts, ends))


class LPIPS(nn.Module):
    """LPIPS v0.1 (eval mode: its dropout is off): images in [-1, 1] -> [B]."""

    def __init__(self, net: str, backbone: str | os.PathLike | dict[str, torch.Tensor]):
        super().__init__()
        if net not in LPIPS_TAPS:
            raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_TAPS)}, got {net!r}")
        self.net = net
        self.stages = _slices(load_backbone(LPIPS_ARCH[net], backbone), LPIPS_TAPS[net])
        head = load_file(HEADS / f"lpips_{net}_head.safetensors")
        self.heads = nn.ParameterList(
            nn.Parameter(head[f"lin{i}.model.1.weight"], requires_grad=False) for i in range(5)
        )
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a frozen metric: never in train mode

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift) / self.scale
        taps = []
        for stage in self.stages:
            h = stage(h)
            taps.append(h / (torch.sqrt((h**2).sum(dim=1, keepdim=True)) + 1e-10))
        return taps

    def layers(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B, 5]: each tap's term."""
        terms = [
            F.conv2d((a - b) ** 2, w).mean(dim=(2, 3)).flatten(1)
            for a, b, w in zip(self._taps(x), self._taps(y), self.heads)
        ]
        return torch.cat(terms, dim=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.layers(x, y).sum(dim=1)


class L2Pool(nn.Module):
    """DISTS' replacement of VGG's max-pool: sqrt(hann-weighted 3x3 average of x^2, stride 2, + 1e-12)."""

    def __init__(self, channels: int):
        super().__init__()
        h = torch.tensor([0.5, 1.0, 0.5])
        g = torch.outer(h, h)
        self.register_buffer("kernel", (g / g.sum()).expand(channels, 1, 3, 3).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(F.conv2d(x**2, self.kernel, stride=2, padding=1, groups=x.shape[1]) + 1e-12)


class DISTS(nn.Module):
    """DISTS: images in [0, 1] -> [B]. Six feature sets (the raw image, then VGG16 relu1_2 .. relu5_3 with
    L2 pooling), structure and texture similarities weighted by the learned alpha/beta."""

    CHANNELS = (3, 64, 128, 256, 512, 512)

    def __init__(self, backbone: str | os.PathLike | dict[str, torch.Tensor]):
        super().__init__()
        layers = list(load_backbone("vgg16", backbone))
        self.stages = nn.ModuleList(
            [nn.Sequential(*layers[0:4])]
            + [
                nn.Sequential(L2Pool(c), *layers[a:b])
                for c, a, b in ((64, 5, 9), (128, 10, 16), (256, 17, 23), (512, 24, 30))
            ]
        )
        head = load_file(HEADS / "dists_head.safetensors")
        self.alpha = nn.Parameter(head["alpha"], requires_grad=False)
        self.beta = nn.Parameter(head["beta"], requires_grad=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [x], (x - self.mean) / self.std
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def terms(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B, 6, 2]: per feature set, its weighted structure (alpha * S1) and texture (beta * S2) terms;
        DISTS = 1 - terms.sum((1, 2))."""
        total = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / total, self.CHANNELS, dim=1)
        betas = torch.split(self.beta / total, self.CHANNELS, dim=1)
        c = 1e-6
        out = []
        for fx, fy, a, b in zip(self.features(x), self.features(y), alphas, betas):
            mx, my = fx.mean((2, 3), keepdim=True), fy.mean((2, 3), keepdim=True)
            vx, vy = ((fx - mx) ** 2).mean((2, 3), keepdim=True), ((fy - my) ** 2).mean((2, 3), keepdim=True)
            cov = (fx * fy).mean((2, 3), keepdim=True) - mx * my
            s1 = (2 * mx * my + c) / (mx**2 + my**2 + c)
            s2 = (2 * cov + c) / (vx + vy + c)
            out.append(torch.stack([(a * s1).sum((1, 2, 3)), (b * s2).sum((1, 2, 3))], dim=1))
        return torch.stack(out, dim=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1 - self.terms(x, y).sum((1, 2))


SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
SOBEL_Y = ((-1.0, -2.0, -1.0), (0.0, 0.0, 0.0), (1.0, 2.0, 1.0))


def sobel(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Edge magnitude sqrt(gx^2 + gy^2 + eps) per channel, replicate padding (the project's definition of the
    paper's S; README of train-common §C lists the choices the paper leaves open)."""
    c = x.shape[1]
    kx = torch.tensor(SOBEL_X, dtype=x.dtype, device=x.device).expand(c, 1, 3, 3)
    ky = torch.tensor(SOBEL_Y, dtype=x.dtype, device=x.device).expand(c, 1, 3, 3)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, kx, groups=c), F.conv2d(padded, ky, groups=c)
    return torch.sqrt(gx**2 + gy**2 + eps)


class EADISTS(nn.Module):
    """Edge-aware DISTS (D3SR/DFOSD eq. 5-7): DISTS(x, y) + DISTS(S(x), S(y)); images in [0, 1] -> [B]."""

    def __init__(self, backbone: str | os.PathLike | dict[str, torch.Tensor] | None = None, dists: DISTS | None = None):
        super().__init__()
        self.dists = dists if dists is not None else DISTS(backbone)

    def parts(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dists(x, y), self.dists(sobel(x), sobel(y))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        image, edge = self.parts(x, y)
        return image + edge
