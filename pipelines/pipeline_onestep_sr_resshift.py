"""OneStepSRResShiftPipeline: residual-shifting SR in a VQGAN-f4 latent (TAD-SR and SinSR in one step, ResShift in
its own 4 or 15 steps). Facts: shared docs methods-tadsr-dfosd.md A, parity README sections 3, 5 and 9.

The LR in [-1, 1] is reflect-padded (bottom/right) to a multiple of 64 LR px, upsampled x4 (torch bicubic, no
clamp) and encoded without quantisation to z_y; the start is x_T = z_y + kappa sqrt(eta_T) eps. Each step feeds the
UNet x / sqrt(kappa^2 eta_t + 1) with the integer t and the padded LR as `lq`; it predicts x0. Decoding quantises to
the nearest code, decodes, crops and clamps. Unlike the official tiled inference (fresh noise per pixel patch),
denoiser tiles here share one noise map drawn for the whole latent, so tiled output is seam-free and deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import VQModel

from .images import LQImage, pad_to_multiple, upsample_torch_bicubic
from .models.resshift_unet import ResShiftUNet
from .pipeline_base import Conditioning, OneStepSRBase
from .tiling.plan import TilingPlan, vq_encode


def sqrt_eta_schedule(steps: int, min_noise_level: float, kappa: float, etas_end: float, power: float,
                      clamp_start: bool) -> np.ndarray:  # fmt: skip
    """sqrt(eta_t) = eta_0 (eta_end / eta_0)^((t / (T - 1))^p), float64. eta_0 = min(min_noise / kappa, min_noise),
    also capped at sqrt(0.001) in TAD-SR and SinSR (clamp_start) but not in ResShift."""
    start = min(min_noise_level / kappa, min_noise_level)
    if clamp_start:
        start = min(start, 0.001**0.5)
    t = np.arange(steps, dtype=np.float64)
    return start * (etas_end / start) ** ((t / (steps - 1)) ** power)


# Latent vectors per distance block: the full (vectors x codes) matrix would be 8.6 GB at 2048 px output with
# the 8192-code release codebook; row blocks give the same per-row arithmetic in bounded memory.
VQ_ROWS_PER_BLOCK = 16384


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """VQ as upstream: argmin over |z|^2 + |e|^2 - 2 z.e in float32, then z + (e - z) (not exactly e), with
    upstream's straight-through gradient (the difference is detached: d out / d z = 1)."""
    b, c, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()
    e = codebook.float()
    e_sq = e.pow(2).sum(1)
    indices = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], VQ_ROWS_PER_BLOCK):
        rows = flat[start : start + VQ_ROWS_PER_BLOCK]
        distance = rows.pow(2).sum(1, keepdim=True) + e_sq - 2 * rows @ e.t()
        indices[start : start + VQ_ROWS_PER_BLOCK] = distance.argmin(dim=1)
    codes = e[indices].view(b, h, w, c).permute(0, 3, 1, 2)
    return z + (codes.to(z.dtype) - z).detach()


class OneStepSRResShiftPipeline(OneStepSRBase):
    r"""Components: vae ([`VQModel`], the VQGAN-f4), unet ([`ResShiftUNet`]).
    Config: the diffusion schedule (num_train_steps, kappa, min_noise_level, etas_end, power, clamp_etas_start),
    num_inference_steps (1: one step at t = T - 1, TAD-SR/SinSR; T: ResShift's own sampler), lr_pad_multiple (64),
    method (the registered method that built it).
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components = []
    accepts_noise = True
    tile_multiple = 64  # the Swin windows of the deepest level (8 latent px there) need multiples of 64
    fixed_upscale = 4

    @property
    def channels_last(self) -> bool:
        """Channels-last maps and weights in bf16/fp16 only (faster: README). fp32 keeps the official summation
        order, which the fragile VQ argmin needs for code-exact parity (see tiling.plan.vq_encode)."""
        return self.vae.dtype != torch.float32

    @property
    def maps_channels_last(self) -> bool:
        """Maps follow the VQGAN's weights: a copy that was never converted (a trainer's frozen bf16 VQGAN) keeps
        the default format, as it computed before."""
        return self.channels_last and self.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    def __init__(
        self,
        vae: VQModel,
        unet: ResShiftUNet,
        num_train_steps: int = 15,
        kappa: float = 2.0,
        min_noise_level: float = 0.04,
        etas_end: float = 0.99,
        power: float = 0.3,
        clamp_etas_start: bool = True,
        num_inference_steps: int = 1,
        lr_pad_multiple: int = 64,
        method: str | None = None,
    ):
        super().__init__()
        self.register_modules(vae=vae, unet=unet)
        self.register_to_config(
            num_train_steps=int(num_train_steps), kappa=float(kappa), min_noise_level=float(min_noise_level),
            etas_end=float(etas_end), power=float(power), clamp_etas_start=bool(clamp_etas_start),
            num_inference_steps=int(num_inference_steps), lr_pad_multiple=int(lr_pad_multiple), method=method,
        )  # fmt: skip
        if num_inference_steps not in (1, num_train_steps):
            raise ValueError(
                f"num_inference_steps must be 1 or the schedule's {num_train_steps}, got {num_inference_steps}"
            )

    @torch.no_grad()
    def __call__(
        self,
        image,
        upscale: int = 4,
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        color_fix: str | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        tile_size: int | str | None = "auto",
        tile_overlap: int | str = "auto",
        tile_batch_size: int = 1,
        vae_tile_size: int | str | None = "auto",
        blend: str = "gaussian",
        progress_callback: Callable[[int, int], None] | None = None,
        batch_size: int = 1,
        **unused,
    ):
        r"""Upscale x4: pad the LR (reflect, to 64 px), bicubic x4, encode to z_y (no quantisation), start from
        x_T = z_y + kappa sqrt(eta_T) eps, run the sampler (TAD-SR / SinSR: x0 = UNet(x_T, T - 1, LR) in one step;
        ResShift: its own 15 or 4 posterior steps), quantise to the nearest codes, decode, crop, clamp.

        Args:
            image: as every pipeline takes it (PIL, numpy, tensor in [0, 1], or a list).
            upscale: 4 (the model's only factor).
            generator: draws eps (a CPU generator seeded S reproduces the official `torch.manual_seed(S)`).
            noise: the latent-shaped eps to inject instead (one image).
            color_fix: "none" by default (the official scripts apply none), or "adain" / "wavelet".
            output_type, return_dict, tile_size, tile_overlap, tile_batch_size, vae_tile_size, blend,
            progress_callback, batch_size: as in every pipeline (see `OneStepSRBase.__call__`). Denoiser tiles share
                one noise map drawn for the whole latent, so tiled output is seam-free and deterministic.
            The text arguments other pipelines take (`prompt`, `prompt_embeds`, ...) are accepted only empty, so a
            caller can drive every pipeline alike; `latent_sampling` and `use_tagger` do not apply and are ignored.
        """
        refused = {k: v for k, v in unused.items() if k not in ("latent_sampling", "use_tagger") and v}
        return super().__call__(
            image, upscale=upscale, generator=generator, noise=noise, color_fix=color_fix, output_type=output_type,
            return_dict=return_dict, tile_size=tile_size, tile_overlap=tile_overlap, tile_batch_size=tile_batch_size,
            vae_tile_size=vae_tile_size, blend=blend, progress_callback=progress_callback, batch_size=batch_size,
            **refused,
        )  # fmt: skip

    def check_config(self, source) -> None:
        from .loading.files import CheckpointError

        c = self.config
        ok = 1 <= c.num_train_steps <= 1000 and 0 < c.kappa < 1e3 and 0 < c.min_noise_level < c.etas_end < 1
        if not (ok and 0 < c.power < 10 and 1 <= c.lr_pad_multiple <= 4096):
            raise CheckpointError(
                f"{source}: ResShift schedule out of range (num_train_steps={c.num_train_steps}, kappa={c.kappa}, "
                f"min_noise_level={c.min_noise_level}, etas_end={c.etas_end}, power={c.power}, "
                f"lr_pad_multiple={c.lr_pad_multiple}); expected 1..1000 steps, 0 < min_noise_level < etas_end < 1"
            )

    # ------------------------------------------------------------------ the schedule (float64, used as float32)

    @property
    def sqrt_etas(self) -> np.ndarray:
        c = self.config
        return sqrt_eta_schedule(c.num_train_steps, c.min_noise_level, c.kappa, c.etas_end, c.power, c.clamp_etas_start)

    def _f32(self, values: np.ndarray, t: int) -> float:
        """Upstream indexes the float64 table and casts to float32 before using a coefficient."""
        return float(np.float32(values[t]))

    def input_norm(self, t: int) -> torch.Tensor:
        """sqrt(kappa^2 eta_t + 1), the UNet input's divisor, as upstream computes it: eta_t rounded to float32, then
        float32 arithmetic and sqrt."""
        eta32 = torch.tensor(self.sqrt_etas[t] ** 2, dtype=torch.float64).float()
        return torch.sqrt(eta32 * self.config.kappa**2 + 1)

    @property
    def timesteps(self) -> list[int]:
        last = self.config.num_train_steps - 1
        return [last] if self.config.num_inference_steps == 1 else list(range(last, -1, -1))

    @property
    def denoiser_calls(self) -> int:
        return len(self.timesteps)

    # ------------------------------------------------------------------ stages

    @property
    def pad_multiple(self) -> int:
        return self.config.lr_pad_multiple * self.fixed_upscale

    @property
    def denoiser_width(self) -> int:
        return self.unet.config.model_channels

    @property
    def denoiser_dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def has_text_encoders(self) -> bool:
        return False

    def upsample(self, lq: LQImage, factor: int) -> LQImage:
        # for the colour-fix reference and the alpha channel; the model input is made in model_input
        return upsample_torch_bicubic(lq, factor)

    def _padded_lr(self, lq: LQImage) -> torch.Tensor:
        padded, _ = pad_to_multiple(lq.rgb * 2 - 1, self.config.lr_pad_multiple)
        return padded

    def model_input(self, lq: LQImage, lq_up: LQImage) -> tuple[torch.Tensor, tuple[int, int]]:
        # pad the LR, THEN upsample (torch bicubic, no clamp), as upstream
        x_up = F.interpolate(self._padded_lr(lq), scale_factor=self.fixed_upscale, mode="bicubic", align_corners=False)
        h, w = lq.size
        return x_up, (h * self.fixed_upscale, w * self.fixed_upscale)

    def condition_on_image(self, cond: Conditioning, lq: LQImage, device: torch.device) -> Conditioning:
        return Conditioning(None, image=self._padded_lr(lq).to(device))

    def encode(self, image, latent_sampling, generator, plan: TilingPlan | None = None, report=None) -> torch.Tensor:
        """z_y: the encoder + quant_conv output, not quantised (float32, as upstream computes x_T)."""
        plan = plan or TilingPlan.untiled()
        return self.to_model_latents(
            vq_encode(self.vae, image.to(self.vae.dtype), plan, self.maps_channels_last, report).float()
        )

    def start_latents(self, latents: torch.Tensor, noise: torch.Tensor | None, generator) -> torch.Tensor:
        """x_T = z_y + fl32(kappa sqrt(eta_T)) eps; eps given, or one float32 draw on the generator's device
        (a CPU generator seeded S reproduces the official torch.manual_seed(S))."""
        if noise is None:
            noise = self.randn(latents.shape, generator)
        elif tuple(noise.shape) != tuple(latents.shape):
            raise ValueError(f"noise must have the latent's shape {tuple(latents.shape)}, got {tuple(noise.shape)}")
        t = self.config.num_train_steps - 1
        scale = self._f32(self.config.kappa * self.sqrt_etas, t)
        return latents + scale * noise.to(latents.device, torch.float32)

    def denoise(self, latents, cond: Conditioning, plan=None, on_tile: Callable[[int], None] | None = None,
                generator=None) -> torch.Tensor:  # fmt: skip
        """The sampler: at each t, x0 = UNet(x / sqrt(kappa^2 eta_t + 1), t, lq) tile by tile; one step returns it,
        more steps move along ResShift's posterior (one noise draw per step, as upstream, t = 0 included)."""
        plan = plan or TilingPlan.untiled(tuple(latents.shape[-2:]))
        sqrt_etas = self.sqrt_etas
        etas = sqrt_etas**2
        etas_prev = np.concatenate([[0.0], etas[:-1]])
        alpha = etas - etas_prev
        kappa = self.config.kappa
        variance = kappa**2 * etas_prev / etas * alpha
        log_variance = np.log(np.concatenate([[variance[1]], variance[1:]]))
        x = latents.float()
        for t in self.timesteps:
            x_in = x / self.input_norm(t)
            x0 = self._predict_x0(x_in, t, cond.image, plan, on_tile)
            noise = self.randn(x.shape, generator)  # drawn every step, also where unused (upstream's RNG stream)
            if self.config.num_inference_steps == 1:
                return x0
            mean = self._f32(etas_prev / etas, t) * x + self._f32(alpha / etas, t) * x0
            std = torch.exp(0.5 * torch.tensor(log_variance[t], dtype=torch.float64).float()).item()
            x = mean + (t > 0) * std * noise.to(x.device)
        return x

    def _predict_x0(self, x_in, t: int, lq: torch.Tensor, plan: TilingPlan, on_tile) -> torch.Tensor:
        channels = x_in.shape[1]
        stacked = torch.cat([x_in, lq.to(x_in.device, x_in.dtype)], dim=1)  # tiled together, so the LQ tiles align

        def model(tiles: torch.Tensor) -> torch.Tensor:
            steps = torch.full((tiles.shape[0],), t, dtype=torch.int64, device=tiles.device)
            return self.unet(tiles[:, :channels], steps, tiles[:, channels:]).float()

        return self.run_denoiser(model, stacked, plan, on_tile)

    vae_decode_kwargs = {"force_not_quantize": True}  # the latent is quantised by decoder_input, as upstream

    def decoder_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The nearest codes (then the VQ decoder, post_quant_conv included, runs in the shared decode)."""
        return nearest_codes(self.from_model_latents(latents), self.vae.quantize.embedding.weight)
