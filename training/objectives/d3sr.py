"""D3SR / DFOSD's objective (arXiv 2410.04224 sections 3.1-3.4; no code was released: this follows the paper's
equations, shared docs methods-tadsr-dfosd.md B). No teacher: the one-step generator (SD2.1-base UNet LoRA + a
learned prompt embedding, at T_L) is trained with pixel losses and a diffusion-UNet discriminator on noised latents.

    generator:      z_L = E(x_L);  z^_H = (z_L - sqrt(1 - abar_TL) eps(z_L; T_L)) / sqrt(abar_TL);  x^_H = D(z^_H)
                    L = mse_weight MSE(x^_H, x_H) + perceptual_weight P(x^_H, x_H) + gan_weight L_G
                    (P: the config's `perceptual`, EA-DISTS in the paper; the lambdas are not in the paper)
    F(z, t) = sqrt(abar_t) z + sqrt(1 - abar_t) eps,  t ~ randint(discriminator_timesteps)
    L_G = -E log D(F(z^_H, t))                                      (non-saturating: softplus(-logit))
    L_D = -E log(1 - D(F(sg z^_H, t))) - E log D(F(z_H, t)),  z_H = E(x_H)   (same t and eps for the pair)

Phases per step: the generator (its LoRA and the embedding), then the discriminator (its LoRA and MLP head) on this
step's generated latent, detached; AdamW for both (the paper: 5e-5). D is the NAD (`training/discriminators/nad.py`):
on SD2.1 ("sd21", the generator's base: DFOSD) or on an SDXL UNet ("sdxl": D3SR), conditioned on the generator's
embedding (detached) for SD2.1.

Settings (config `extra:`): see `D3SRSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...pipelines.methods import d3sr as d3sr_method
from ..config import ConfigError, TrainConfig
from ..discriminators.nad import NoiseAwareDiscriminator, load_discriminator_unet
from .base import Phase, SampleDraws, register_objective, require_method, settings_from_extra
from .regression import RegressionObjective

DISCRIMINATORS = ("sd21", "sdxl")
GAN_LOSSES = ("non-saturating", "hinge")


@dataclass(frozen=True)
class D3SRSettings:
    """The objective's settings (config `extra:`). The paper gives rank and alpha 16 and AdamW 5e-5 for both models;
    the lambdas, T_L and the discriminator's t range are this package's choices."""

    gan_weight: float = 0.1  # lambda1 (the perceptual term's lambda2 is `perceptual_weight`)
    gan_loss: str = "non-saturating"  # the paper's; "hinge" as an extra
    discriminator: str = "sd21"  # "sd21": NAD on the generator's base (DFOSD); "sdxl": on an SDXL UNet (D3SR)
    discriminator_base: str = ""  # the SDXL base (a diffusers folder, its unet/ folder, or one .safetensors file)
    discriminator_timesteps: tuple[int, int] = (0, 1000)  # randint range of F's t
    discriminator_rank: int = 16
    discriminator_alpha: float = 16.0
    discriminator_head_width: int = 256
    discriminator_learning_rate: float | None = None  # default: learning_rate
    # a new generator (no `weights`): its T_L and LoRA; a D3SR file given as `weights` carries its own
    timestep: int = d3sr_method.DEFAULT_TIMESTEP
    rank: int = d3sr_method.DEFAULT_RANK
    alpha: float = d3sr_method.DEFAULT_ALPHA

    @classmethod
    def from_extra(cls, extra: dict) -> D3SRSettings:
        s = settings_from_extra(cls, extra, "d3sr", {"gan_loss": GAN_LOSSES, "discriminator": DISCRIMINATORS})
        if s.discriminator == "sdxl" and not (s.discriminator_base and Path(s.discriminator_base).exists()):
            raise ConfigError(
                f"extra.discriminator_base = {s.discriminator_base!r}: the sdxl discriminator needs an existing SDXL "
                "base (a diffusers folder, its unet/ folder, or a single .safetensors file)"
            )
        if not 0 <= s.timestep < 1000:
            raise ConfigError(f"extra.timestep = {s.timestep}: expected T_L in [0, 1000)")
        for key in ("rank", "discriminator_rank", "discriminator_head_width"):
            if getattr(s, key) < 1:
                raise ConfigError(f"extra.{key} = {getattr(s, key)}: expected a whole number >= 1")
        return s


@register_objective
class D3SRObjective(RegressionObjective):
    name = "d3sr"
    method = "d3sr"
    starts_from_base = True

    @classmethod
    def initial_pipeline(cls, config: TrainConfig, device: torch.device):
        s = D3SRSettings.from_extra(config.extra)
        return d3sr_method.build_untrained(config.base, s.timestep, s.rank, s.alpha)

    def __init__(self, pipe, config: TrainConfig, perceptual: torch.nn.Module | None = None):
        hint = "leave `weights` empty to start from the base, or give a d3sr.safetensors"
        require_method(pipe, self.name, self.method, "a D3SR generator", hint)
        if config.prompt:
            raise ConfigError(f"prompt = {config.prompt!r}: D3SR learns its prompt embedding (leave prompt empty)")
        super().__init__(pipe, config, perceptual)
        self.settings = s = D3SRSettings.from_extra(config.extra)
        self.draws = SampleDraws(("generator_t", "generator_noise", "discriminator_t", "discriminator_noise"))
        source = pipe.unet if s.discriminator == "sd21" else load_discriminator_unet(s.discriminator_base)
        self.discriminator = NoiseAwareDiscriminator(
            source, s.discriminator_rank, s.discriminator_alpha, s.discriminator_head_width
        ).to(pipe.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
        if dtype is not None:  # the frozen encoder in the compute dtype (autocast runs it there anyway)
            for p in self.discriminator.encoder.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
        self.discriminator_params = {f"discriminator.{k}": p for k, p in self.discriminator.trainable().items()}
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.float().to(pipe.device)
        self._pending: list[tuple] = []

    @property
    def phases(self) -> list[Phase]:
        s, c = self.settings, self.config
        discriminator_lr = s.discriminator_learning_rate or c.learning_rate
        return [
            Phase("generator", self.trainable, c.learning_rate),
            Phase("discriminator", self.discriminator_params, discriminator_lr, ema=False),
        ]

    def modules(self) -> list[torch.nn.Module]:
        return [*super().modules(), self.discriminator.encoder]

    # ------------------------------------------------------------------ the equations

    def diffuse(self, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """F(z, t) = sqrt(abar_t) z + sqrt(1 - abar_t) eps."""
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return abar.sqrt() * z + (1 - abar).sqrt() * noise

    def generator_gan(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """L_G = -E log sigmoid(D(F(z^_H))) (hinge: -E D)."""
        if self.settings.gan_loss == "hinge":
            return -fake_logits.mean()
        return F.softplus(-fake_logits).mean()

    def discriminator_gan(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """L_D = -E log(1 - sigmoid(D(fake))) - E log sigmoid(D(real)) (hinge: E relu(1 + fake) + E relu(1 - real))."""
        if self.settings.gan_loss == "hinge":
            return F.relu(1 + fake_logits).mean() + F.relu(1 - real_logits).mean()
        return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()

    # ------------------------------------------------------------------ the phases

    def losses(self, phase: str, batch: dict) -> dict[str, torch.Tensor]:
        if phase == "generator":
            return self.generator_losses(batch)
        return self.discriminator_losses()

    def generator_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        pipe, c, s = self.pipe, self.config, self.settings
        count, device = batch["hq"].shape[0], batch["hq"].device
        seeds = batch.get("seed") or list(range(count))
        self.draws.start(seeds)
        self.text = pipe.fixed_conditioning(device, pipe.denoiser_dtype)  # the learned embedding, with its gradient
        step, x_hat = self.generate(batch)
        target = batch["hq"] * 2 - 1
        out = {"mse": F.mse_loss(x_hat, target)}
        loss = c.mse_weight * out["mse"]
        if self.perceptual is not None:
            from .regression import perceptual_value

            out[c.perceptual] = perceptual_value(self.perceptual, x_hat, target).mean()
            loss = loss + c.perceptual_weight * out[c.perceptual]
        with torch.no_grad():
            z_real = pipe.encode(target, "mode", None).float()
        z_fake = step.clean_latent.float()
        # the embedding the generator used this step (a copy: the generator's step updates the parameter in place)
        context = self.text.embeds.detach().float().clone().expand(count, -1, -1)
        t = self.draws.timesteps("generator_t", *s.discriminator_timesteps, count, device)
        noised = self.diffuse(z_fake, t, self.draws.normal("generator_noise", z_fake))
        out["gan"] = self.generator_gan(self.discriminator(noised, t, context).float())
        out["loss"] = loss + s.gan_weight * out["gan"]
        self.keep(z_fake=z_fake, z_real=z_real, x_hat=x_hat, noised_fake=noised, generator_t=t)
        self._pending.append((z_fake.detach(), z_real, context, seeds))
        return out

    def discriminator_losses(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            raise RuntimeError("the discriminator phase runs after the generator phase of the same step")
        z_fake, z_real, context, seeds = self._pending.pop(0)
        self.draws.start(seeds)
        t = self.draws.timesteps("discriminator_t", *self.settings.discriminator_timesteps, len(seeds), z_fake.device)
        noise = self.draws.normal("discriminator_noise", z_fake)
        real = self.discriminator(self.diffuse(z_real, t, noise), t, context).float()
        fake = self.discriminator(self.diffuse(z_fake, t, noise), t, context).float()
        loss = self.discriminator_gan(real, fake)
        self.keep(real_logits=real, fake_logits=fake, discriminator_t=t, context=context)
        return {"gan": loss, "loss": loss, "real_logit": real.mean().detach(), "fake_logit": fake.mean().detach()}
