"""The one-step generator trained with MSE + a perceptual loss: no teacher, no discriminator, any family.

The generator is the method's own forward (`pipe.one_step`): the LQ batch is encoded, denoised in one step and
decoded, and the decoded image is compared with the HQ crop:

    loss = mse_weight * MSE(x_hat, x_H) + perceptual_weight * P(x_hat, x_H)        (images in [-1, 1] for MSE)

What is trained is what the method's weights hold (`Method.trainable`: OSEDiff's LoRA + conv_in, TSD-SR's LoRA,
the ResShift family's UNet), so the result is written back in the method's own format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ConfigError, TrainConfig
from .base import Objective, Phase, register_objective


def build_perceptual(config: TrainConfig, search: list) -> torch.nn.Module | None:
    """The configured perceptual loss (frozen), its backbone found from `perceptual_weights` or `search`."""
    from ..losses.backbones import find_backbone_file
    from ..losses.perceptual import DISTS, EADISTS, LPIPS

    kind = config.perceptual
    if kind == "none" or config.perceptual_weight == 0:
        return None
    arch = "alexnet" if kind == "lpips-alex" else "vgg16"
    path = find_backbone_file(arch, config.perceptual_weights, search)
    if kind.startswith("lpips"):
        return LPIPS(kind.split("-")[1], path)
    return DISTS(path) if kind == "dists" else EADISTS(path)


def perceptual_value(module: torch.nn.Module, x_m11: torch.Tensor, y_m11: torch.Tensor) -> torch.Tensor:
    """[B] values; LPIPS takes [-1, 1] images, DISTS / EA-DISTS take [0, 1]."""
    from ..losses.perceptual import LPIPS

    if isinstance(module, LPIPS):
        return module(x_m11, y_m11)
    return module(x_m11 * 0.5 + 0.5, y_m11 * 0.5 + 0.5)


@register_objective
class RegressionObjective(Objective):
    name = "regression"

    def __init__(self, pipe, config: TrainConfig, perceptual: torch.nn.Module | None = None):
        method = pipe.sr_method
        if method is None or method.trainable is None:
            raise ConfigError(f"{type(pipe).__name__}: its method says nothing about what to train")
        self.pipe, self.config, self.perceptual = pipe, config, perceptual
        self.trainable = method.trainable(pipe)
        # the SD methods train on LQ resized back to HQ size; the ResShift family on the LR itself
        self.lq_at_hq_size = pipe.fixed_upscale is None
        device = pipe._execution_device
        with torch.no_grad():
            self.text = pipe.encode_prompt(config.prompt, None, None, 0, device)
        if config.prompt and not self.text.from_text:
            raise ConfigError(f"prompt = {config.prompt!r}: {method.display_name} here has no text encoder")

    @property
    def phases(self) -> list[Phase]:
        return [Phase("generator", self.trainable, self.config.learning_rate)]

    def modules(self) -> list[torch.nn.Module]:
        # the VAE too where diffusers can checkpoint it: its decoder's activations at full resolution are as
        # large as the denoiser's (the ResShift family's VQModel cannot; its decode is short)
        vae = self.pipe.vae
        return [self.pipe.denoiser_module, *([vae] if getattr(vae, "_supports_gradient_checkpointing", False) else [])]

    def start_noise(self, batch: dict, latent_shape: torch.Size) -> torch.Tensor | None:
        """Per-sample start noise for methods that noise the LQ latent (seeded by the sample, not the batch)."""
        if not self.pipe.accepts_noise:
            return None
        device = batch["hq"].device
        draws = [
            torch.randn(latent_shape[1:], generator=torch.Generator(device=device).manual_seed(seed + 1), device=device)
            for seed in batch["seed"]
        ]
        return torch.stack(draws)

    def model_lq(self, lq: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
        """The LQ as the method trains on it: at HQ size for the SD methods (paired LR images are upsampled with
        torch bicubic), at HQ / 4 for the ResShift family."""
        if self.lq_at_hq_size:
            if lq.shape[-2:] != hq.shape[-2:]:
                lq = F.interpolate(lq, size=hq.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
            return lq
        expected = tuple(n // self.pipe.fixed_upscale for n in hq.shape[-2:])
        if tuple(lq.shape[-2:]) != expected:
            raise ConfigError(
                f"{self.pipe.display_name} trains on LR images at 1/{self.pipe.fixed_upscale} of the HQ size "
                f"{tuple(hq.shape[-2:])}, got LQ {tuple(lq.shape[-2:])} (train_lq_data, scale)"
            )
        return lq

    def generate(self, batch: dict):
        """The generator's one step on the batch's LQ: (one_step result, decoded image cropped to the HQ size)."""
        pipe = self.pipe
        image, low = pipe.prepare_batch(self.model_lq(batch["lq"], batch["hq"]))
        cond = pipe.condition_on_image(self.text, low, image.device)
        latent_hw = tuple(n // pipe.vae_scale_factor for n in image.shape[-2:])
        noise = self.start_noise(batch, (image.shape[0], pipe.vae.config.latent_channels, *latent_hw))
        step = pipe.one_step(image, cond, latent_sampling="mode", noise=noise)
        h, w = batch["hq"].shape[-2:]
        return step, step.image[..., :h, :w].float()

    def losses(self, phase: str, batch: dict) -> dict[str, torch.Tensor]:
        _, x_hat = self.generate(batch)
        target = batch["hq"] * 2 - 1
        mse = F.mse_loss(x_hat, target)
        out = {"mse": mse}
        loss = self.config.mse_weight * mse
        if self.perceptual is not None:
            perceptual = perceptual_value(self.perceptual, x_hat, target).mean()
            out[self.config.perceptual] = perceptual
            loss = loss + self.config.perceptual_weight * perceptual
        out["loss"] = loss
        return out
