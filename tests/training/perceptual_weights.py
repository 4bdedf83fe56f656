"""The seeded random backbones the perceptual parity data was made with (train-common README §B.1): regenerated
from the recipe and checked against its hash, so no 59 MB weight file is shipped."""

from __future__ import annotations

import hashlib
import json
import math
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import save_file

from onestep_sr.training.losses.backbones import alexnet_features, vgg16_features

from helpers import parity_dir

SEEDS = {"vgg16": 20240601, "alexnet": 20240602}


@cache
def seeded_backbone(arch: str) -> dict[str, torch.Tensor]:
    net = vgg16_features() if arch == "vgg16" else alexnet_features()
    g = torch.Generator(device="cpu")
    g.manual_seed(SEEDS[arch])
    sd = {}
    for idx, m in enumerate(net):
        if isinstance(m, torch.nn.Conv2d):
            oc, ic, kh, kw = m.weight.shape
            std = torch.tensor(math.sqrt(2.0 / (ic * kh * kw)), dtype=torch.float32)
            sd[f"features.{idx}.weight"] = torch.randn((oc, ic, kh, kw), generator=g, dtype=torch.float32) * std
            sd[f"features.{idx}.bias"] = torch.randn((oc,), generator=g, dtype=torch.float32) * torch.tensor(0.01)
    return sd


def canonical_sha256(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key, t in sd.items():
        h.update(key.encode() + b"\0" + f"float32{tuple(t.shape)}".encode() + b"\0" + t.numpy().tobytes())
    return h.hexdigest()


def expected_sha256(arch: str) -> str:
    info = json.loads((parity_dir("train-common") / "perceptual" / "perceptual.json").read_text())
    return info["models"][arch]["canonical_sha256"]


def write_backbone_files(folder: Path) -> Path:
    """The two backbones under torchvision's file names (as safetensors content; the loader reads either)."""
    folder.mkdir(parents=True, exist_ok=True)
    for arch, name in (("vgg16", "vgg16-397923af.pth"), ("alexnet", "alexnet-owt-7be5be79.pth")):
        target = folder / name
        if not target.exists():
            torch.save(seeded_backbone(arch), target)
    return folder


def write_backbone_safetensors(path: Path, arch: str = "vgg16") -> Path:
    save_file(seeded_backbone(arch), str(path))
    return path
