"""ImageNet backbones of the perceptual losses, in torchvision's layout (`features.<index>.*` keys), built here
(torchvision does not load beside every torch) and filled from local files only: nothing is downloaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...pipelines.loading.files import CheckpointError, read_weights


@dataclass(frozen=True)
class Backbone:
    arch: str
    file_name: str  # torchvision's file name for the ImageNet weights
    source: str


BACKBONES = {
    "vgg16": Backbone("vgg16", "vgg16-397923af.pth", "torchvision's VGG16_Weights.IMAGENET1K_V1"),
    "alexnet": Backbone("alexnet", "alexnet-owt-7be5be79.pth", "torchvision's AlexNet_Weights.IMAGENET1K_V1"),
}

# (out channels or "M" for a 2x2 max-pool) of torchvision's VGG16 `features`
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU()]
            channels = v
    return nn.Sequential(*layers)


def alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
    )


def find_backbone_file(arch: str, path: str | os.PathLike | None, search: list[Path] | None = None) -> Path:
    """The backbone file: `path` (a file, or a folder holding torchvision's file name), else the first of
    `search` folders that holds it. A clear error names the file, where it comes from and where it goes."""
    info = BACKBONES[arch]
    candidates = []
    if path is not None:
        p = Path(path)
        candidates.append(p / info.file_name if p.is_dir() else p)
    candidates += [Path(folder) / info.file_name for folder in search or []]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = ", ".join(str(c) for c in candidates) or "(no path given)"
    raise FileNotFoundError(
        f"the perceptual loss needs the ImageNet {arch} weights {info.file_name} ({info.source}; torchvision's "
        f"file as it is, or a safetensors file with the same `features.*` keys). Looked in: {where}. Put the "
        "file in your models folder or pass its path (config key `perceptual_weights`); nothing is downloaded."
    )


def load_backbone(arch: str, source: str | os.PathLike | dict[str, torch.Tensor]) -> nn.Sequential:
    """`features` of the architecture with weights from a torchvision file (.pth read with weights_only=True,
    or .safetensors) or a state dict; other keys (the classifier) are ignored, a missing feature key is an error."""
    net = vgg16_features() if arch == "vgg16" else alexnet_features()
    state = source if isinstance(source, dict) else read_weights(source)
    expected = {f"features.{k}" for k in net.state_dict()}
    missing = sorted(expected - state.keys())
    if missing:
        raise CheckpointError(
            f"{source if not isinstance(source, dict) else 'weights'}: not {arch} ImageNet "
            f"weights in torchvision's layout (missing {missing[:3]})"
        )
    try:
        net.load_state_dict({k[len("features.") :]: state[k].float() for k in expected})
    except RuntimeError as err:
        raise CheckpointError(f"{source}: {arch} weights do not fit torchvision's architecture: {err}") from err
    return net.eval().requires_grad_(False)
