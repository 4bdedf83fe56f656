"""OSEDiff's objective (cswry/OSEDiff `train_osediff.py`, `osediff.py` `OSEDiff_gen` / `OSEDiff_reg`): the one-step
generator trained with MSE + LPIPS-vgg + variational score distillation (VSD) in latent space, against a frozen
SD2.1 with CFG and a LoRA "regulariser" SD2.1 trained beside it with the ordinary diffusion loss.

Where the official code holds three UNets (generator, frozen `unet_fix`, regulariser `unet_update`), this holds ONE
frozen base shared through peft adapters: the generator is the base with the OSEDiff adapter and its retrained
`conv_in`; the frozen score is the base with adapters off (and the base's own `conv_in`); the regulariser is the
base with its own adapter (and the base's `conv_in`).

One step, as the official loop runs it (../shared/parity/train-osediff README):

    generator:   z_lq = E_lora(x_lq).sample() * 0.18215;  z = x0(UNet_gen(z_lq, 999, c));  x = D(z).clamp(-1, 1)
                 L = 1 MSE(x, x_hq) + 2 LPIPS(x, x_hq) + 1 VSD(z)
    VSD:         t ~ U[20, 980), eps;  z_t = add_noise(z, eps, t);  (no grad) x0_u from the regulariser,
                 x0_f from the frozen UNet with CFG 7.5 on (negative, c);  w = mean|z - x0_f| per sample;
                 L_VSD = MSE(z, (z - (x0_u - x0_f) / w).detach())          (sign: update - fix)
    regulariser: (after the generator's step, on this step's z, detached) n, then t ~ U[0, 1000);
                 L_d = MSE(UNet_reg(add_noise(z, n, t), t, c), n)

The official code has two quirks the parity data reproduces, kept by default and corrected by a setting each:
conv_in's LoRA tensors sit twice in the generator's optimizer (counted twice in the clip norm, updated twice per
step; on CUDA the official foreach AdamW makes this racy, here it is always the deterministic for-loop;
`duplicate_conv_in_lora: false` lists them once), and the regulariser trains only the adapter on the mid-block
("others") modules, because the official code never activates its encoder and decoder adapters
(`regulariser_modules: all` trains one on every generator target).

Settings (config `extra:`): see `VSDSettings`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...pipelines.methods.osediff import ADAPTER, OSEDIFF_LORA_ALPHA, unet_adapter_of
from ...pipelines.pipeline_base import Conditioning
from ...pipelines.tiling.plan import TilingPlan, vae_encode
from ..config import ConfigError, TrainConfig
from .base import (
    Objective,
    Phase,
    SampleDraws,
    add_adapter,
    keep_trained_flags,
    register_objective,
    require_method,
    settings_from_extra,
)
from .regression import perceptual_value

# train_osediff.sh's negative prompt, used only in the VSD's CFG
NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, unreal engine, "
    "blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, "
    "lowres, over-smooth"
)
REGULARISER = "vsd_regulariser"  # the regulariser's peft adapter on the shared UNet


@dataclass(frozen=True)
class VSDSettings:
    """The objective's settings (config `extra:`), defaults as the official training script."""

    vsd_weight: float = 1.0  # lambda_vsd
    cfg_scale: float = 7.5  # the frozen score's classifier-free guidance
    negative_prompt: str = NEGATIVE_PROMPT
    vsd_timesteps: tuple[int, int] = (20, 980)  # t ~ randint(low, high) for the VSD
    regulariser_timesteps: tuple[int, int] = (0, 1000)  # t ~ randint(low, high) for the regulariser's loss
    regulariser_weight: float = 1.0  # lambda_vsd_lora
    regulariser_rank: int | None = None  # default: the generator's UNet LoRA rank (official: the same --lora_rank)
    regulariser_learning_rate: float | None = None  # default: learning_rate
    # the official code's quirks (module doc), kept by default for parity:
    duplicate_conv_in_lora: bool = True  # conv_in's LoRA listed twice in the generator's optimizer
    regulariser_modules: str = "others"  # "others": only the mid-block adapter trains (official); "all": every one
    tagger: str | None = None  # RAM base (ram_swin_large_14m.pth): prompts are the HQ image's tags

    @classmethod
    def from_extra(cls, extra: dict) -> VSDSettings:
        settings = settings_from_extra(cls, extra, "osediff-vsd")
        if settings.regulariser_rank is not None and settings.regulariser_rank < 1:
            raise ConfigError(f"extra.regulariser_rank = {settings.regulariser_rank}: expected a whole number >= 1")
        if settings.regulariser_modules not in ("others", "all"):
            raise ConfigError(
                f"extra.regulariser_modules = {settings.regulariser_modules!r}: expected 'others' or 'all'"
            )
        if settings.tagger is not None and not Path(settings.tagger).is_file():
            raise ConfigError(f"extra.tagger = {settings.tagger!r}: expected an existing RAM file")
        return settings


@register_objective
class OSEDiffVSDObjective(Objective):
    name = "osediff-vsd"
    lq_at_hq_size = True  # OSEDiff trains on the LQ resized back to the HQ size

    def __init__(self, pipe, config: TrainConfig, perceptual: torch.nn.Module | None = None):
        method = require_method(pipe, self.name, "osediff", "OSEDiff weights")
        if not pipe.has_text_encoders:
            raise ConfigError("objective = osediff-vsd needs the base's text encoder and tokenizer (SD2.1-base)")
        self.pipe, self.config, self.perceptual = pipe, config, perceptual
        self.settings = VSDSettings.from_extra(config.extra)
        self.draws = SampleDraws(("vae_eps", "vsd_t", "vsd_noise", "reg_noise", "reg_t"))
        self.unet = pipe.unet
        self.generator_params = method.trainable(pipe)
        self.conv_in_base = base_conv_in(config.base, self.unet.conv_in, pipe.device)
        self.regulariser_params = self._add_regulariser()
        self.trained = {id(p) for p in (*self.generator_params.values(), *self.regulariser_params.values())}
        self.tagger = self._load_tagger()
        self._pending: list[tuple] = []  # this step's (z, c, seeds) for the regulariser
        with torch.no_grad():
            self.negative = pipe.encode_prompt(self.settings.negative_prompt, None, None, 0, pipe.device).embeds
        self.use("generator")

    # ------------------------------------------------------------------ what is trained

    @property
    def phases(self) -> list[Phase]:
        lr_reg = self.settings.regulariser_learning_rate or self.config.learning_rate
        return [
            Phase("generator", self.generator_params, self.config.learning_rate, self._generator_optimizer_list()),
            Phase("regulariser", self.regulariser_params, lr_reg),
        ]

    def _generator_optimizer_list(self) -> list[torch.nn.Parameter]:
        """The official `layers_to_opt` order: the UNet's LoRA, then all of conv_in's parameters (its LoRA
        again, with official_quirks), then the VAE's LoRA."""
        params = self.generator_params
        unet_lora = [p for k, p in params.items() if k.startswith("unet.") and ".lora_" in k]
        conv_in = [p for k, p in params.items() if k.startswith("unet.conv_in.") and ".lora_" not in k]
        if self.settings.duplicate_conv_in_lora:
            conv_in += [p for k, p in params.items() if k.startswith("unet.conv_in.lora_")]
        vae_lora = [p for k, p in params.items() if k.startswith("vae.")]
        return unet_lora + conv_in + vae_lora

    def _add_regulariser(self) -> dict[str, torch.nn.Parameter]:
        """The regulariser's LoRA on the shared UNet: on the generator's UNet targets (official: only the
        mid-block "others" ones, see the module doc), peft's gaussian init (B = 0: it starts as the base)."""
        from peft import LoraConfig

        targets = [n for n, m in self.unet.named_modules() if ADAPTER in getattr(m, "lora_A", {})]
        if self.settings.regulariser_modules == "others":
            targets = [n for n in targets if unet_adapter_of(n) == "default_others"]
        rank = self.settings.regulariser_rank or self.unet.conv_in.lora_A[ADAPTER].weight.shape[0]
        config = LoraConfig(
            r=rank,
            lora_alpha=OSEDIFF_LORA_ALPHA,
            init_lora_weights="gaussian",
            target_modules="^(" + "|".join(n.replace(".", r"\.") for n in targets) + ")$",
        )
        return add_adapter(self.unet, config, REGULARISER, "unet")

    def _load_tagger(self):
        if self.settings.tagger is None:
            return None
        from ...pipelines.methods.dape import load_tagger

        tagger = load_tagger(self.settings.tagger, None)  # plain RAM: training tags the HQ image, not with DAPE
        return tagger.to(self.pipe.device).eval().requires_grad_(False)

    def modules(self) -> list[torch.nn.Module]:
        vae = self.pipe.vae
        return [self.unet, *([vae] if getattr(vae, "_supports_gradient_checkpointing", False) else [])]

    # ------------------------------------------------------------------ which UNet the shared base is

    def use(self, role: str) -> None:
        """Make the shared UNet the generator (OSEDiff adapter, retrained conv_in), the regulariser (its adapter,
        the base's conv_in) or the frozen score (no adapter, the base's conv_in). Which weights train is never
        changed by this (peft's switching toggles requires_grad; it is put back)."""
        unet = self.unet
        if role == "frozen":
            unet.disable_adapters()
        else:
            unet.enable_adapters()
            unet.set_adapters([ADAPTER if role == "generator" else REGULARISER])
        conv, trained = unet.conv_in.base_layer, self.generator_params
        if role == "generator":
            conv.weight, conv.bias = trained["unet.conv_in.base_layer.weight"], trained["unet.conv_in.base_layer.bias"]
        else:
            conv.weight, conv.bias = self.conv_in_base
        keep_trained_flags(unet, self.trained)

    @contextmanager
    def using(self, role: str, then: str):
        self.use(role)
        try:
            yield
        finally:
            self.use(then)

    def after_step(self) -> None:
        self.use("generator")  # what validation, export and inference see

    # ------------------------------------------------------------------ the losses

    def losses(self, phase: str, batch: dict) -> dict[str, torch.Tensor]:
        if phase == "generator":
            return self.generator_losses(batch)
        return self.regulariser_losses()

    def prompts(self, batch: dict) -> list[str]:
        """Each sample's prompt: its own (`prompt` in the batch: a `.txt` beside the training image), else the
        tagger's tags of the HQ image (as the official loop tags x_HQ with plain RAM), else the config's prompt."""
        given = batch.get("prompt") or [None] * batch["hq"].shape[0]
        prompts = []
        for i, prompt in enumerate(given):
            if prompt is None and self.tagger is not None:
                with torch.no_grad():
                    prompt = self.tagger.tags(batch["hq"][i : i + 1])[0]
            prompts.append(self.config.prompt if prompt is None else prompt)
        return prompts

    def prompt_embeds(self, batch: dict) -> torch.Tensor:
        """[B, 77, D]: each prompt encoded alone, without gradients, as officially."""
        with torch.no_grad():
            return torch.cat(
                [self.pipe.encode_prompt(p, None, None, 0, self.pipe.device).embeds for p in self.prompts(batch)]
            )

    def generator_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        pipe, c = self.pipe, self.config
        self.use("generator")
        target = batch["hq"] * 2 - 1
        seeds = batch.get("seed") or list(range(target.shape[0]))
        self.draws.start(seeds)
        image, _ = pipe.prepare_batch(batch["lq"])
        embeds = self.prompt_embeds(batch)
        # the posterior draw, as `latent_dist.sample()`
        posterior = vae_encode(pipe.vae, image.to(pipe.vae.dtype), TilingPlan.untiled())
        eps = self.draws.normal("vae_eps", posterior.mean)
        z_lq = pipe.to_model_latents(posterior.mean + posterior.std * eps.to(posterior.mean.dtype))
        step = pipe.one_step_from_latents(z_lq, Conditioning(embeds, from_text=True))
        z, x_hat = step.clean_latent, step.image.float().clamp(-1, 1)
        self.keep(**{"gen/encoded_control": z_lq, "gen/x_denoised": z, "gen/output_image": x_hat})
        out = {"mse": F.mse_loss(x_hat, target)}
        loss = c.mse_weight * out["mse"]
        if self.perceptual is not None:
            out[c.perceptual] = perceptual_value(self.perceptual, x_hat, target).mean()
            loss = loss + c.perceptual_weight * out[c.perceptual]
        out["vsd"] = self.vsd_loss(z, embeds)
        out["loss"] = loss + self.settings.vsd_weight * out["vsd"]
        self._pending.append((z.detach(), embeds, seeds))
        return out

    def eps_to_x0(self, noisy: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha = self.pipe.scheduler.alphas_cumprod.to(noisy.device)[t].float().view(-1, 1, 1, 1)
        return (noisy - (1 - alpha) ** 0.5 * eps) / alpha**0.5

    def score(self, noisy: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, t, encoder_hidden_states=embeds).sample.float()

    def vsd_loss(self, z: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        s = self.settings
        t = self.draws.timesteps("vsd_t", *s.vsd_timesteps, z.shape[0], z.device)
        noise = self.draws.normal("vsd_noise", z)
        noisy = self.pipe.scheduler.add_noise(z, noise.to(z.dtype), t)
        with torch.no_grad():
            with self.using("regulariser", then="generator"):
                x0_update = self.eps_to_x0(noisy, self.score(noisy, t, embeds), t)
            with self.using("frozen", then="generator"):
                negative = self.negative.expand_as(embeds)
                both = self.score(torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([negative, embeds]))
            eps_neg, eps_pos = both.chunk(2)
            x0_fix = self.eps_to_x0(noisy, eps_neg + s.cfg_scale * (eps_pos - eps_neg), t)
        weight = (z - x0_fix).abs().mean(dim=[1, 2, 3], keepdim=True)  # per sample
        grad = (x0_update - x0_fix) / weight  # update - fix
        self.keep(**{"vsd/noisy_latents": noisy, "vsd/x0_pred_update": x0_update, "vsd/x0_pred_fix": x0_fix})
        self.keep(**{"vsd/weighting_factor": weight, "vsd/grad": grad})
        return F.mse_loss(z, (z - grad).detach())

    def regulariser_losses(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            raise RuntimeError("the regulariser phase runs after the generator phase of the same step")
        z, embeds, seeds = self._pending.pop(0)
        self.use("regulariser")  # kept through the backward pass (checkpointed blocks recompute with it)
        self.draws.start(seeds)
        noise = self.draws.normal("reg_noise", z)
        t = self.draws.timesteps("reg_t", *self.settings.regulariser_timesteps, z.shape[0], z.device)
        noisy = self.pipe.scheduler.add_noise(z, noise.to(z.dtype), t)
        prediction = self.score(noisy, t, embeds)
        self.keep(**{"reg/noise_pred": prediction})
        loss_d = F.mse_loss(prediction, noise)
        return {"diffusion": loss_d, "loss": self.settings.regulariser_weight * loss_d}


def base_conv_in(base: str | os.PathLike, conv_in: torch.nn.Module, device) -> tuple[torch.nn.Parameter, ...]:
    """The base model's own conv_in (weight, bias), frozen: the frozen score and the regulariser use it, while the
    generator trains its copy. Read from the base's UNet file (a diffusers folder or an SD2.1 single file)."""
    from safetensors import safe_open

    from ...pipelines.loading.files import CheckpointError, read_weights

    base = Path(base)
    names = {"weight": "conv_in.weight", "bias": "conv_in.bias"}
    if base.is_dir():
        path = base / "unet" / "diffusion_pytorch_model.safetensors"
    else:
        path = base
        names = {k: f"model.diffusion_model.input_blocks.0.0.{k}" for k in names}
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                tensors = {k: f.get_tensor(v) for k, v in names.items()}
        else:
            state = read_weights(path)
            state = state.get("state_dict", state)
            tensors = {k: state[v] for k, v in names.items()}
    except (OSError, KeyError) as err:
        raise CheckpointError(f"{path}: cannot read the base UNet's conv_in ({err})") from err
    reference = conv_in.base_layer
    frozen = []
    for key in ("weight", "bias"):
        value = tensors[key]
        if tuple(value.shape) != tuple(getattr(reference, key).shape):
            raise CheckpointError(f"{path}: conv_in.{key} has shape {tuple(value.shape)}, the UNet's is different")
        frozen.append(torch.nn.Parameter(value.to(device, torch.float32), requires_grad=False))
    return tuple(frozen)
