"""VAE encode/decode in bounded working memory, with the same result as the untiled VAE.

Why not tile the image and run the VAE per tile: every GroupNorm would then normalise with its
tile's own statistics, which is what leaves colour seams (diffusers' `enable_tiling`).

What we do instead: the VAE runs layer by layer over whole feature maps, but every convolution,
normalisation and attention is computed tile by tile ("streamed"):
- a convolution reads each output tile's input region plus its exact halo, so it equals the
  untiled convolution (no seams, no receptive-field padding needed);
- GroupNorm statistics are accumulated over the whole feature map first (exact, float64 sums),
  then each tile is normalised with them on the fly, fused into the next convolution;
- the mid-block self-attention is global (PyTorch SDPA, or chunked matrix products where they are faster:
  `models.vae_attention`; memory linear in the tokens either way)
  while the feature map has at most `global_attention_tokens` tokens (256^2: a 2048x2048 image
  for SD's 8x VAE), else per tile with `attention_pad` tokens of context on every side, the only
  approximation (measured in tests/benchmarks). Padded attention tiles cost as much as global
  attention unless the pad is small next to the tile, hence the generous global limit.
Peak memory: a few feature maps (the block input, one intermediate, the output) plus one tile's
workspace, instead of every intermediate of the untiled graph at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from ..models.vae_attention import vae_attention

Region = tuple[int, int, int, int]  # r0, r1, c0, c1 (half-open)


def tiles(height: int, width: int, size: int) -> Iterator[Region]:
    for r0 in range(0, height, size):
        for c0 in range(0, width, size):
            yield r0, min(r0 + size, height), c0, min(c0 + size, width)


class StreamedVAE:
    """Streamed forward passes of a diffusers AutoencoderKL (SD-style Encoder/Decoder)."""

    def __init__(
        self,
        vae,
        tile_size: int,
        attention_tile: int,
        attention_pad: int,
        global_attention_tokens: int = 0,
        per_tile_stats: bool = False,
        on_tile: Callable[[], None] | None = None,
        on_layer: Callable[[], None] | None = None,
    ):
        self.vae = vae
        self.tile = max(8, int(tile_size))
        self.attention_tile = max(1, int(attention_tile))
        self.attention_pad = max(0, int(attention_pad))
        self.global_attention_tokens = int(global_attention_tokens)
        # Only for tests that document why global statistics are needed; never used in production.
        self.per_tile_stats = per_tile_stats
        # Progress and cancellation: on_tile after every tile of every layer (a fraction of a second of work;
        # it may raise to cancel), on_layer after each of the `layer_count` layers of a pass.
        self.on_tile = on_tile or do_nothing
        self.on_layer = on_layer or do_nothing

    def layer_count(self, stage: str) -> int:
        """How many times `on_layer` fires in `encode` ("encode") or `decode` ("decode")."""
        if stage == "encode":
            enc = self.vae.encoder
            down = sum(len(b.resnets) + (b.downsamplers is not None) for b in enc.down_blocks)
            return 2 + down + _mid_layers(enc.mid_block) + (self.vae.quant_conv is not None)
        if stage == "decode":
            dec = self.vae.decoder
            up = sum(len(b.resnets) + (b.upsamplers is not None) for b in dec.up_blocks)
            return 2 + up + _mid_layers(dec.mid_block) + (self.vae.post_quant_conv is not None)
        raise ValueError(f"stage must be 'encode' or 'decode', got {stage!r}")

    def layer(self, out):
        self.on_layer()
        return out

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.encode_moments(image))

    @torch.no_grad()
    def encode_moments(self, image: torch.Tensor) -> torch.Tensor:
        """The encoder + quant_conv output itself (a VQ model's latent; a KL model's mean and log-variance)."""
        enc, layer = self.vae.encoder, self.layer
        x = layer(self.conv(enc.conv_in, image))
        for block in enc.down_blocks:
            for resnet in block.resnets:
                x = layer(self.resnet(resnet, x))
            if block.downsamplers is not None:
                x = layer(self.downsample(block.downsamplers[0], x))
        x = self.mid_block(enc.mid_block, x)
        x = layer(self.conv(enc.conv_out, x, pre=self.norm_act(enc.conv_norm_out, enc.conv_act, x)))
        if self.vae.quant_conv is not None:
            x = layer(self.conv(self.vae.quant_conv, x))
        return x

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        dec, layer = self.vae.decoder, self.layer
        x = latents
        if self.vae.post_quant_conv is not None:
            x = layer(self.conv(self.vae.post_quant_conv, x))
        x = layer(self.conv(dec.conv_in, x))
        x = self.mid_block(dec.mid_block, x)
        for block in dec.up_blocks:
            for resnet in block.resnets:
                x = layer(self.resnet(resnet, x))
            if block.upsamplers is not None:
                x = UpsampledMap(block.upsamplers[0], x)
                if x.nbytes <= LAZY_UPSAMPLE_BYTES:  # small enough: store it rather than recompute it
                    x = self.materialize(x)
                self.on_layer()
        return layer(self.conv(dec.conv_out, x, pre=self.norm_act(dec.conv_norm_out, dec.conv_act, x)))

    # ------------------------------------------------------------------ blocks

    def resnet(self, block, x: torch.Tensor) -> torch.Tensor:
        if getattr(block, "upsample", None) is not None or getattr(block, "downsample", None) is not None:
            raise NotImplementedError("resnets with built-in resampling are not used by SD-style VAEs")
        h = self.conv(block.conv1, x, pre=self.norm_act(block.norm1, block.nonlinearity, x))
        shortcut = block.conv_shortcut

        def residual(r0, r1, c0, c1):
            region = x[..., r0:r1, c0:c1]
            return region if shortcut is None else shortcut(region)

        # With an identity shortcut each output tile needs x at that tile only, so it can overwrite x
        # there: one whole feature map less at the largest stages. Callers never reuse a resnet's input.
        in_place = shortcut is None and isinstance(x, torch.Tensor)
        out = self.conv(
            block.conv2,
            h,
            pre=self.norm_act(block.norm2, block.nonlinearity, h),
            residual=residual,
            out=x if in_place else None,
        )
        del h
        if block.output_scale_factor != 1:
            out.div_(block.output_scale_factor)
        return out

    def mid_block(self, block, x: torch.Tensor) -> torch.Tensor:
        x = self.layer(self.resnet(block.resnets[0], x))
        for attention, resnet in zip(block.attentions, block.resnets[1:]):
            if attention is not None:
                x = self.layer(self.attention(attention, x))
            x = self.layer(self.resnet(resnet, x))
        return x

    def attention(self, attn, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        core, pad = self.attention_tile, self.attention_pad
        normalize = self.norm_act(attn.group_norm, None, x)
        if height * width <= self.global_attention_tokens or (height <= core + 2 * pad and width <= core + 2 * pad):
            core, pad = max(height, width), 0  # one global attention, exactly as untiled
        out = _empty_map(x, x.shape[1], height, width)
        for r0, r1, c0, c1 in tiles(height, width, core):
            a0, a1, b0, b1 = max(r0 - pad, 0), min(r1 + pad, height), max(c0 - pad, 0), min(c1 + pad, width)
            h = normalize(x[..., a0:a1, b0:b1])
            n, c, th, tw = h.shape
            tokens = h.flatten(2).transpose(1, 2)
            q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
            heads = attn.heads
            q, k, v = (t.view(n, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
            o = vae_attention(q, k, v, scale=attn.scale)
            o = attn.to_out[0](o.transpose(1, 2).reshape(n, -1, c))
            o = o.transpose(1, 2).reshape(n, c, th, tw)[..., r0 - a0 : r1 - a0, c0 - b0 : c1 - b0]
            region = out[..., r0:r1, c0:c1]
            if attn.residual_connection:
                torch.add(o, x[..., r0:r1, c0:c1], out=region)
            else:
                region.copy_(o)
            region.div_(attn.rescale_output_factor)
            self.on_tile()
        return out

    def downsample(self, down, x: torch.Tensor) -> torch.Tensor:
        """diffusers Downsample2D with padding 0: zero-pad right/bottom by one, then a stride-2 3x3 conv."""
        conv = down.conv
        height, width = x.shape[-2:]
        out_h, out_w = (height + 1 - 3) // 2 + 1, (width + 1 - 3) // 2 + 1
        out = _empty_map(x, _out_channels(conv), out_h, out_w)
        for r0, r1, c0, c1 in tiles(out_h, out_w, self.tile):
            a1, b1 = min(2 * r1 + 1, height), min(2 * c1 + 1, width)
            region = x[..., 2 * r0 : a1, 2 * c0 : b1]
            region = F.pad(region, (0, 2 * c1 + 1 - b1, 0, 2 * r1 + 1 - a1))
            out[..., r0:r1, c0:c1] = conv(region)
            self.on_tile()
        return out

    def materialize(self, lazy: UpsampledMap) -> torch.Tensor:
        out = _empty_map(lazy, lazy.shape[1], *lazy.shape[-2:])
        for r0, r1, c0, c1 in tiles(*lazy.shape[-2:], self.tile):
            out[..., r0:r1, c0:c1] = lazy[..., r0:r1, c0:c1]
            self.on_tile()
        return out

    # ------------------------------------------------------------------ primitives

    def conv(
        self,
        conv,
        x: torch.Tensor,
        pre: Callable | None = None,
        residual: Callable | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A stride-1 'same' convolution tile by tile: each tile reads its region plus the kernel's halo.

        Zero padding then only happens at the true image border, exactly as in the untiled conv.
        `pre` transforms each input region first (GroupNorm + activation with global statistics);
        `residual(r0, r1, c0, c1)` is added to each output tile; `out` may be given (a map that only
        `residual` reads, at the tile being written).
        """
        base = getattr(conv, "base_layer", conv)  # peft LoRA layers wrap the real conv
        halo = base.padding[0] if isinstance(base.padding, tuple) else int(base.padding)
        if base.stride not in ((1, 1), 1) or base.kernel_size[0] != 2 * halo + 1:
            raise NotImplementedError(f"streamed conv expects a stride-1 'same' conv, got {base}")
        height, width = x.shape[-2:]
        if out is None:
            out = _empty_map(x, _out_channels(conv), height, width)
        for r0, r1, c0, c1 in tiles(height, width, self.tile):
            a0, a1, b0, b1 = max(r0 - halo, 0), min(r1 + halo, height), max(c0 - halo, 0), min(c1 + halo, width)
            region = x[..., a0:a1, b0:b1]
            if pre is not None:
                region = pre(region)
            y = conv(region)[..., r0 - a0 : r1 - a0, c0 - b0 : c1 - b0]
            if residual is not None:
                y = y + residual(r0, r1, c0, c1)
            out[..., r0:r1, c0:c1] = y
            self.on_tile()
        return out

    def norm_act(self, norm: nn.GroupNorm, act: Callable | None, x: torch.Tensor) -> Callable:
        """GroupNorm (+ activation) of regions of `x`, with statistics of the whole of `x`."""
        groups = norm.num_groups
        if self.per_tile_stats:

            def per_tile(region):
                y = F.group_norm(region, groups, norm.weight, norm.bias, norm.eps)
                return act(y) if act is not None else y

            return per_tile
        mean, rstd = group_statistics(x, groups, norm.eps, self.tile)
        channels = x.shape[1]
        per_channel = channels // groups
        scale = (rstd.repeat_interleave(per_channel) * norm.weight.double()).view(1, channels, 1, 1)
        shift = (
            norm.bias.double().view(1, channels, 1, 1)
            - mean.repeat_interleave(per_channel).view(1, channels, 1, 1) * scale
        )
        scale, shift = scale.float(), shift.float()

        def apply(region: torch.Tensor) -> torch.Tensor:
            # normalised in float32 (type promotion, no extra copy), then activated in the map's dtype,
            # as torch's GroupNorm followed by SiLU does in the untiled VAE
            y = torch.addcmul(shift, region, scale).to(region.dtype)
            if isinstance(act, nn.SiLU):
                return F.silu(y, inplace=True)
            return act(y) if act is not None else y

        return apply


class UpsampledMap:
    """The output of a diffusers Upsample2D (nearest x2, then a 3x3 conv), computed per region on demand.

    The biggest feature maps of the decoder are upsampler outputs (at 2048x2048 the last one is
    256 channels at full resolution, 2 GiB in bf16). The next resnet reads that map three times
    (GroupNorm statistics, its first conv, its shortcut), so recomputing those regions from the
    half-size input costs about two extra upsampler convs and saves the whole map. Regions are
    computed with their exact halo, so values equal the materialised map's.
    """

    def __init__(self, up, source: torch.Tensor):
        self.conv, self.source = up.conv, source
        n, _, height, width = source.shape
        self.shape = torch.Size((n, _out_channels(up.conv), 2 * height, 2 * width))
        self.dtype, self.device = source.dtype, source.device
        self.nbytes = self.shape.numel() * source.element_size()

    def __getitem__(self, index) -> torch.Tensor:
        rows, cols = _spatial_slices(index, self.shape)
        r0, r1, c0, c1 = rows.start, rows.stop, cols.start, cols.stop
        height, width = self.source.shape[-2:]
        s0, s1 = max((r0 - 1) // 2, 0), min(r1 // 2 + 1, height)
        t0, t1 = max((c0 - 1) // 2, 0), min(c1 // 2 + 1, width)
        region = F.interpolate(self.source[..., s0:s1, t0:t1], scale_factor=2.0, mode="nearest")
        return self.conv(region)[..., r0 - 2 * s0 : r1 - 2 * s0, c0 - 2 * t0 : c1 - 2 * t0]


def _spatial_slices(index, shape) -> tuple[slice, slice]:
    """(row slice, col slice) of `x[..., r, c]` or `x[:, :, r]` style indices, with bounds filled in."""
    index = index if isinstance(index, tuple) else (index,)
    if index and index[0] is Ellipsis:
        spatial = list(index[1:])
    else:
        if any(s != slice(None) for s in index[:2]):
            raise IndexError("UpsampledMap supports spatial slicing only")
        spatial = list(index[2:])
    spatial += [slice(None)] * (2 - len(spatial))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(spatial, shape[-2:]))


def group_statistics(x: torch.Tensor, groups: int, eps: float, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and 1/sqrt(var + eps) over the whole map (batch 1).

    Row strips go through torch's own fused group-norm kernel (16x faster than summing in Python
    here); their means and variances are merged exactly (Chan et al.'s pairwise update) in float64.
    """
    if x.shape[0] != 1:
        raise NotImplementedError("streamed VAE runs one image at a time")
    channels, height, width = x.shape[1:]
    step = max(1, (rows * rows) // max(width, 1))
    count = torch.zeros((), dtype=torch.float64)
    mean = torch.zeros(groups, dtype=torch.float64, device=x.device)
    m2 = torch.zeros_like(mean)
    for r0 in range(0, height, step):
        strip = x[:, :, r0 : r0 + step]
        n = strip.shape[-2] * width * (channels // groups)
        _, strip_mean, strip_rstd = torch.ops.aten.native_group_norm(
            strip, None, None, 1, channels, strip.shape[-2] * width, groups, eps
        )
        strip_mean = strip_mean.reshape(groups).double()
        strip_var = (1 / strip_rstd.reshape(groups).double() ** 2 - eps).clamp_min(0)
        delta = strip_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + strip_var * n + delta * delta * (count * n / total)
        count = total
    return mean, torch.rsqrt(m2 / count + eps)


def do_nothing() -> None:
    pass


def _mid_layers(block) -> int:
    return len(block.resnets) + sum(a is not None for a in block.attentions)


def _empty_map(like, channels: int, height: int, width: int) -> torch.Tensor:
    # channels-last, like the conv outputs written into it (the weights are channels-last for speed)
    return torch.empty(
        like.shape[0], channels, height, width, dtype=like.dtype, device=like.device, memory_format=torch.channels_last
    )


def _out_channels(conv) -> int:
    return getattr(conv, "base_layer", conv).out_channels


# Mid-block attention: global up to 256^2 tokens; beyond, 128^2 tiles with 32 tokens of context
# (measured in tests/benchmarks/benchmark_tiling.py: see README, "Large images and memory").
GLOBAL_ATTENTION_TOKENS = 256 * 256
# Upsampler outputs above this size are recomputed region by region instead of stored (+2 upsampler
# convs of time): at 2048x2048 that is only the last one, 2 GiB in bf16; at 1024x1024 none.
LAZY_UPSAMPLE_BYTES = 1 << 30
ATTENTION_TILE, ATTENTION_PAD = 128, 32


def streamed_vae(vae, vae_tile_size: int, on_tile=None, on_layer=None) -> StreamedVAE:
    return StreamedVAE(
        vae,
        tile_size=vae_tile_size,
        attention_tile=ATTENTION_TILE,
        attention_pad=ATTENTION_PAD,
        global_attention_tokens=GLOBAL_ATTENTION_TOKENS,
        on_tile=on_tile,
        on_layer=on_layer,
    )


def needs_streaming(height: int, width: int, vae_tile_size: int | None) -> bool:
    return vae_tile_size is not None and max(height, width) > vae_tile_size
