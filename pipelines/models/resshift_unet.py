"""ResShift's Swin-UNet (`UNetModelSwin`), the denoiser of ResShift, SinSR and TAD-SR (shared docs
methods-tadsr-dfosd.md A, parity README sections 2 and 4), as a diffusers-style model.

A guided-diffusion UNet (ResBlocks with scale-shift norm, an integer-timestep sinusoidal embedding with cos
first) whose attention is a Swin `BasicLayer` of GroupNorm blocks with 1x1-conv MLPs, placed after the first
ResBlock of each level listed in `attention_resolutions`, in the middle, and after the first ResBlock of each
decoder level. The LQ image (the padded LR) is concatenated to the input. Parameter names follow the official
checkpoints, so they load without a key map. Each Swin block's window and shift are fixed at construction
from the training resolution (`image_size`), as upstream: this changes outputs and must not follow the input.
"""

from __future__ import annotations

import itertools
import math
import re

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .swin import WindowAttention


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 (guided diffusion's `normalization`)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 whatever the model's dtype (upstream keeps its norms in float32 when it runs in fp16)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps: [cos(t f), sin(t f)], f = 10000^(-i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


def resshift_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(nW, N, N) shifted-window mask exactly as ResShift builds it (0 / -100).

    Upstream labels an NCHW map with the channel and row axes where Swin uses rows and columns, so the
    regions differ by row only, and it flattens each window column-major: within window (r, c) token k
    carries the label of row r * window + (k mod window). Reproduced here because the released weights
    were trained with it (the checkpoints store it for the training size).
    """
    rows = torch.zeros(height)
    rows[height - window : height - shift] = 1
    rows[height - shift :] = 2
    per_window = rows.view(height // window, window)  # (window rows, position in window)
    labels = per_window[:, None, :].expand(-1, width // window, -1).reshape(-1, window)  # row-major windows
    tokens = labels.repeat(1, window)  # token k -> label of row (k mod window)
    diff = tokens[:, None, :] - tokens[:, :, None]
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class ConvMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class GNSwinBlock(nn.Module):
    """Swin block on NCHW maps with GroupNorm: x + attn(GN(x)), then x + mlp(GN(x))."""

    def __init__(self, dim: int, heads: int, resolution: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        if resolution <= window:  # fixed from the training resolution, as upstream
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = GroupNorm32(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = GroupNorm32(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        mask = resshift_window_mask(resolution, resolution, window, shift) if shift else None
        # recomputed, not loaded: checkpoints store it, and loaders check it against this one
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ws = self.window
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(2, 3))
        windows = y.view(b, c, h // ws, ws, w // ws, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, c)
        mask = None
        if self.shift:
            same = (h, w) == (self.resolution, self.resolution)
            mask = self.attn_mask if same else resshift_window_mask(h, w, ws, self.shift).to(x.device)
            mask = mask.to(x.dtype)
        out = self.attn(windows, mask)
        y = out.view(b, h // ws, w // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(2, 3))
        x = x + y
        return x + self.mlp(self.norm2(x))


class Proj(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.proj(x)


class BasicLayer(nn.Module):
    """1x1 conv in, `depth` Swin blocks (odd ones shifted by window // 2), 1x1 conv out; no outer residual."""

    def __init__(self, channels: int, embed_dim: int, heads: int, window: int, depth: int, resolution: int, mlp_ratio):
        super().__init__()
        self.patch_embed = Proj(channels, embed_dim)
        self.blocks = nn.ModuleList(
            GNSwinBlock(embed_dim, heads, resolution, window, 0 if i % 2 == 0 else window // 2, mlp_ratio)
            for i in range(depth)
        )
        self.patch_unembed = Proj(embed_dim, channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.patch_unembed(x)


class ResBlock(nn.Module):
    """GN-SiLU-conv, then GN(h) * (1 + scale) + shift from the timestep embedding, SiLU-conv; 1x1 skip if needed."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb).type(h.dtype)[..., None, None].chunk(2, dim=1)
        norm, rest = self.out_layers[0], self.out_layers[1:]
        h = rest(norm(h) * (1 + scale) + shift)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, BasicLayer, Downsample, Upsample)) else layer(x)
        return x


class ResShiftUNet(ModelMixin, ConfigMixin):
    r"""`UNetModelSwin`: (x (B, C, H, W), integer timesteps (B,), lq (B, C_lq, H, W)) -> x0 (B, out, H, W).

    `image_size` is the training latent size: it fixes the Swin windows and shifts of every level.
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 3,
        lq_channels: int = 3,
        model_channels: int = 160,
        out_channels: int = 3,
        channel_mult: tuple[int, ...] = (1, 2, 2, 4),
        num_res_blocks: tuple[int, ...] = (2, 2, 2, 2),
        attention_resolutions: tuple[int, ...] = (64, 32, 16, 8),
        swin_embed_dim: int = 192,
        swin_depth: int = 2,
        num_head_channels: int = 32,
        window_size: int = 8,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        emb_ch = model_channels * 4
        heads = swin_embed_dim // num_head_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        def swin(ch: int, resolution: int) -> BasicLayer:
            return BasicLayer(ch, swin_embed_dim, heads, window_size, swin_depth, resolution, mlp_ratio)

        blocks = [EmbedSequential(nn.Conv2d(in_channels + lq_channels, model_channels, 3, padding=1))]
        skip_channels, ch, resolution = [model_channels], model_channels, image_size
        for level, mult in enumerate(channel_mult):
            for j in range(num_res_blocks[level]):
                layers = [ResBlock(ch, emb_ch, mult * model_channels)]
                ch = mult * model_channels
                if resolution in attention_resolutions and j == 0:
                    layers.append(swin(ch, resolution))
                blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                resolution //= 2
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = EmbedSequential(ResBlock(ch, emb_ch, ch), swin(ch, resolution), ResBlock(ch, emb_ch, ch))
        blocks = []
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_ch, model_channels * mult)]
                ch = model_channels * mult
                if resolution in attention_resolutions and i == 0:
                    layers.append(swin(ch, resolution))
                if level and i == num_res_blocks[level]:
                    layers.append(Upsample(ch))
                    resolution *= 2
                blocks.append(EmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), nn.Conv2d(model_channels * channel_mult[0], out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        skips, h, emb = self._encode(x, timesteps, lq)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def _encode(self, x, timesteps, lq) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The encoder: every input block's output (the skips), the middle block's output, the embedding."""
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(self.dtype))
        h = torch.cat([x, lq], dim=1).to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return skips, self.middle_block(h, emb), emb

    @property
    def feature_channels(self) -> list[int]:
        """The channels of `encoder_features`' maps."""
        c = self.config
        return [c.model_channels * m for m in c.channel_mult[:-1]] + [c.model_channels * c.channel_mult[-1]] * 2

    def encoder_features(self, x: torch.Tensor, timesteps: torch.Tensor, lq: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's multi-scale features (TAD-SR's discriminator input, upstream `only_fea=True`): the output
        of each downsampler, of the last input block, and of the middle block (the decoder does not run)."""
        skips, middle, _ = self._encode(x, timesteps, lq)
        downsamplers = [i for i, b in enumerate(self.input_blocks) if isinstance(b[0], Downsample)]
        return [skips[i] for i in downsamplers] + [skips[-1], middle]


def resshift_unet_config(state: dict[str, torch.Tensor], image_size: int = 64) -> dict:
    """The UNet's config read from an official checkpoint's shapes (image_size, the training size, from the
    stored attention masks when present, else the given default)."""
    conv_in = state["input_blocks.0.0.weight"]
    model_channels = conv_in.shape[0]
    res_out = {}  # input block index -> ResBlock out channels
    for key, t in state.items():
        m = re.match(r"input_blocks\.(\d+)\.0\.in_layers\.2\.weight$", key)
        if m:
            res_out[int(m.group(1))] = t.shape[0]
    downs = sorted(int(m.group(1)) for k in state if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    bounds = [0, *downs, max(res_out) + 1]
    levels = [[i for i in res_out if lo < i < hi] for lo, hi in itertools.pairwise(bounds)]
    swin_levels = [any(f"input_blocks.{i}.1.patch_embed.proj.weight" in state for i in lv) for lv in levels]
    embed = state["middle_block.1.patch_embed.proj.weight"]
    table = state["middle_block.1.blocks.0.attn.relative_position_bias_table"]
    depth = len({k.split(".")[3] for k in state if k.startswith("middle_block.1.blocks.")})
    masks = {k: t for k, t in state.items() if k.startswith("input_blocks.") and k.endswith("attn_mask")}
    if masks:  # the first level's mask: (resolution / window)^2 windows
        first = min(masks, key=lambda k: int(k.split(".")[1]))
        window = round(masks[first].shape[-1] ** 0.5)
        image_size = round(masks[first].shape[0] ** 0.5) * window
    window = (round(table.shape[0] ** 0.5) + 1) // 2
    resolutions = [image_size // 2**i for i in range(len(levels))]
    return dict(
        image_size=image_size,
        in_channels=state["out.2.weight"].shape[0],
        lq_channels=conv_in.shape[1] - state["out.2.weight"].shape[0],
        model_channels=model_channels,
        out_channels=state["out.2.weight"].shape[0],
        channel_mult=tuple(res_out[lv[0]] // model_channels for lv in levels),
        num_res_blocks=tuple(len(lv) for lv in levels),
        attention_resolutions=tuple(r for r, s in zip(resolutions, swin_levels) if s),
        swin_embed_dim=embed.shape[0],
        swin_depth=depth,
        num_head_channels=embed.shape[0] // table.shape[1],
        window_size=window,
        mlp_ratio=state["middle_block.1.blocks.0.mlp.fc1.weight"].shape[0] / embed.shape[0],
    )
