"""TAD-SR's time-aware discriminator (LearningHx/TAD-SR `models/unet.py::ProjectedDiscriminator`; facts from
../shared/parity/train-tadsr README step 4): heads on a frozen teacher's multi-scale encoder features of a noised
latent, conditioned on the noise level t.

Per feature map k (channels C_k):

    emb = sinusoid(t, embed_dim)                               (cos first, as the UNet's timestep embedding)
    scale, shift = Linear(SiLU(emb)).chunk(2)
    h = Conv3x3_zero(SiLU(GroupNorm32(x_k) * (1 + scale) + shift))    (FiLM; the conv starts at zero)
    logits_k = Head_k(h flattened to (B, C_k, L))               -> (B, c_dim * L)

    Head = SN-Conv1d(1) GN(4) LReLU(0.2) -> residual [SN-Conv1d(9, circular) GN(4) LReLU(0.2)] / sqrt(2)
           -> SN-Conv1d(C, c_dim, 1)

SN is `torch.nn.utils.spectral_norm` (one power iteration on every training-mode forward; parameter names
`weight_orig`, buffers `weight_u` / `weight_v`, as the official checkpoints). Because the FiLM sits in front of a
zero-initialised conv, a fresh discriminator's logits do not depend on t until its first update.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...pipelines.models.resshift_unet import GroupNorm32, timestep_embedding


def _conv1d(cin: int, cout: int, kernel: int, spectral: bool) -> nn.Module:
    conv = nn.Conv1d(cin, cout, kernel, padding=kernel // 2, padding_mode="circular")
    return nn.utils.spectral_norm(conv, n_power_iterations=1, eps=1e-12, dim=0) if spectral else conv


def _block(channels: int, kernel: int, spectral: bool) -> nn.Sequential:
    return nn.Sequential(_conv1d(channels, channels, kernel, spectral), nn.GroupNorm(4, channels), nn.LeakyReLU(0.2))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


class Head(nn.Module):
    def __init__(self, channels: int, c_dim: int, spectral: bool):
        super().__init__()
        self.main = nn.Sequential(_block(channels, 1, spectral), Residual(_block(channels, 9, spectral)))
        self.cls = _conv1d(channels, c_dim, 1, spectral)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.main(x))


class TimeAwareProjectedDiscriminator(nn.Module):
    """(features [(B, C_k, H_k, W_k)], t (B,)) -> logits (B, sum_k c_dim H_k W_k).

    `time_aware=False` drops the FiLM (an ablation: the paper's point is that t matters); `spectral_norm=False`
    plain convolutions (parameters named `weight`).
    """

    def __init__(
        self,
        feature_channels: list[int],
        embed_dim: int,
        c_dim: int = 64,
        time_aware: bool = True,
        spectral_norm: bool = True,
    ):
        super().__init__()
        self.embed_dim, self.time_aware = embed_dim, time_aware
        self.emb_layers = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * c)) for c in feature_channels)
        self.out_layers = nn.ModuleList(
            nn.Sequential(GroupNorm32(c), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(c, c, 3, padding=1))
            for c in feature_channels
        )
        for layers in self.out_layers:  # zero-initialised, as upstream
            nn.init.zeros_(layers[3].weight)
            nn.init.zeros_(layers[3].bias)
        self.heads = nn.ModuleList(Head(c, c_dim, spectral_norm) for c in feature_channels)

    def forward(self, features: list[torch.Tensor], t: torch.Tensor, detach: bool = False) -> torch.Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature maps, got {len(features)}")
        emb = timestep_embedding(t, self.embed_dim)
        logits = []
        for x, emb_layer, out_layer, head in zip(features, self.emb_layers, self.out_layers, self.heads):
            x = x.detach() if detach else x
            h = out_layer[0](x)
            if self.time_aware:
                scale, shift = emb_layer(emb).type(h.dtype)[..., None, None].chunk(2, dim=1)
                h = h * (1 + scale) + shift
            h = out_layer[1:](h)
            logits.append(head(h.flatten(2)).flatten(1))
        return torch.cat(logits, dim=1)

    def power_iteration_state(self) -> dict[str, torch.Tensor]:
        """The spectral norm's u / v vectors (buffers, not parameters: a training checkpoint stores them apart)."""
        return {k: v for k, v in self.state_dict().items() if k.endswith(("weight_u", "weight_v"))}
