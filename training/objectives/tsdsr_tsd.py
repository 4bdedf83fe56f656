"""TSD-SR's objective (Microtreei/TSD-SR `train/train.py`): the one-step SD3 student (transformer + VAE-encoder LoRA)
trained with LPIPS-alex + latent MSE + Target Score Distillation against a frozen teacher (SD3 + the teacher LoRA)
with CFG, and a "fake score" regulariser LoRA trained beside it.

Where the official code holds a second full SD3 transformer for the teacher and the regulariser, this holds ONE
frozen base with three peft adapters: the student's, the teacher's (frozen) and the regulariser's; each model is the
base with only its own adapter active, as the official `set_adapter` calls make them.

One step (../shared/parity/train-tsdsr README, flow matching, sigma = shift s / (1 + (shift - 1) s), T = 1000 sigma):

    student:     z_lr = E_lora(x_lq).sample() * scaling;  z_s = z_lr - v(z_lr, T = 1000, default prompt)
                 x = D(z_s).clamp(-1, 1);  L = 1 LPIPS(x, x_hq) + 1 MSE(z_s, z_hr) + L_TSD
    TSD:         idx ~ randint(50, 950) per sample, eps;
                 z^_b = s_b eps + (1 - s_b) z_s,  z_b = s_b eps + (1 - s_b) z_hr
                 (s_b = sigma[idx_b]); the teacher and the fake score at T[idx_0] for every sample (the official
                 batch quirk), CFG 7.5 over (null, per-image prompt) for both:
                 grad = s0^2 (0.7 (v_tea(z^) - v_reg(z^)) + 0.3 (v_tea(z^) - v_tea(z)))
                 L_TSD = 0.5 MSE(z_s, sg(z_s - grad))
    regulariser: (after the student's step, on this step's z_s detached) idx_l, eps_l, u ~ N(0, 1):
                 x0 = noisy - s_l v_reg(noisy, T[idx_l], per-image prompt, no CFG);
                 L_reg = 0.5 mean(sigmoid(u)) MSE(x0, z_s)

In the published script the TSD loss is computed under `no_grad`, so it trains nothing (the student learns from
LPIPS + MSE only). `tsd_gradient: true` (default) is the paper's objective; `false` is the published script's.

Settings (config `extra:`): see `TSDSettings`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...pipelines.loading.files import CheckpointError, read_weights
from ...pipelines.loading.lora import apply_lora
from ...pipelines.methods.tsdsr import ADAPTER, parse_tsdsr_lora
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

TEACHER, REGULARISER = "tsd_teacher", "tsd_regulariser"
# the official fake score's targets (the attention projections only; the student's list is wider)
REGULARISER_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]


@dataclass(frozen=True)
class TSDSettings:
    """The objective's settings (config `extra:`), defaults as the official training script."""

    teacher_lora: str = ""  # the teacher LoRA file (official format, alpha = rank); required
    null_embeddings: str = ""  # a folder (or .safetensors) with the null prompt's embeddings, CFG's uncond; required
    tsd_gradient: bool = True  # the paper's objective; false: the published script's (TSD computed without grad)
    tsd_weight: float = 1.0
    vsd_weight: float = 0.7  # of the TSD gradient: the VSD part (teacher - fake score on the student's latent)
    tsm_weight: float = 0.3  # the target score matching part (teacher on the student's latent - on the HR latent)
    cfg_scale: float = 7.5
    tsd_timesteps: tuple[int, int] = (50, 950)  # randint range of the schedule index
    regulariser_timesteps: tuple[int, int] = (50, 950)
    regulariser_rank: int = 64  # the official script's --rank_lora
    regulariser_learning_rate: float | None = None  # default: learning_rate (the script: 1e-6 beside 5e-6)
    regulariser_weight: float = 1.0

    @classmethod
    def from_extra(cls, extra: dict) -> TSDSettings:
        settings = settings_from_extra(cls, extra, "tsdsr-tsd")
        for key in ("teacher_lora", "null_embeddings"):
            path = getattr(settings, key)
            if not path or not Path(path).exists():
                raise ConfigError(f"extra.{key} = {path!r}: expected an existing path (required by tsdsr-tsd)")
        if settings.regulariser_rank < 1:
            raise ConfigError(f"extra.regulariser_rank = {settings.regulariser_rank}: expected a whole number >= 1")
        return settings


@register_objective
class TSDSRObjective(Objective):
    name = "tsdsr-tsd"
    lq_at_hq_size = True  # TSD-SR trains on the LQ upsampled to the HQ size

    def __init__(self, pipe, config: TrainConfig, perceptual: torch.nn.Module | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        method = require_method(pipe, self.name, "tsdsr", "TSD-SR weights")
        self.pipe, self.config, self.perceptual = pipe, config, perceptual
        self.settings = TSDSettings.from_extra(config.extra)
        self.draws = SampleDraws(("vae_eps", "hr_eps", "tsd_index", "tsd_noise", "reg_index", "reg_noise", "reg_u"))
        self.transformer = pipe.transformer
        self.student_params = method.trainable(pipe)
        # the 1000-entry training tables (set_timesteps is never called officially): index 0 is T = 1000, sigma = 1
        tables = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.timesteps_table, self.sigmas_table = tables.timesteps.float(), tables.sigmas.float()
        self._add_teacher()
        self.regulariser_params = self._add_regulariser()
        self.trained = {id(p) for p in (*self.student_params.values(), *self.regulariser_params.values())}
        self.null = read_embeddings(self.settings.null_embeddings, pipe.device)
        self._pending: list[tuple] = []
        self.use(ADAPTER)

    @property
    def phases(self) -> list[Phase]:
        lr_reg = self.settings.regulariser_learning_rate or self.config.learning_rate
        return [
            Phase("generator", self.student_params, self.config.learning_rate),
            Phase("regulariser", self.regulariser_params, lr_reg),
        ]

    def _add_teacher(self) -> None:
        path = self.settings.teacher_lora
        lora = parse_tsdsr_lora(read_weights(path), path)
        with warnings.catch_warnings():  # more adapters on one transformer are the point here
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            apply_lora(self.transformer, lora, fuse=False, adapter_name=TEACHER, source=str(path))

    def _add_regulariser(self) -> dict[str, torch.nn.Parameter]:
        from peft import LoraConfig

        rank = self.settings.regulariser_rank
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=REGULARISER_TARGETS)
        return add_adapter(self.transformer, config, REGULARISER, "transformer")

    def modules(self) -> list[torch.nn.Module]:
        vae = self.pipe.vae
        return [self.transformer, *([vae] if getattr(vae, "_supports_gradient_checkpointing", False) else [])]

    def use(self, adapter: str) -> None:
        """Make the shared transformer the student, the teacher or the fake score (only that adapter active)."""
        self.transformer.set_adapters([adapter])
        keep_trained_flags(self.transformer, self.trained)

    def after_step(self) -> None:
        self.use(ADAPTER)  # what validation, export and inference see

    # ------------------------------------------------------------------ the losses

    def losses(self, phase: str, batch: dict) -> dict[str, torch.Tensor]:
        if phase == "generator":
            return self.generator_losses(batch)
        return self.regulariser_losses()

    def prompt_conditioning(self, batch: dict, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's prompt embeddings for the teacher and the fake score (`prompt_embeds` and
        `pooled_prompt_embeds` in the batch: a `<image>.safetensors` beside a training image), else the default."""
        device = self.pipe.device
        if batch.get("prompt_embeds") is not None:
            return batch["prompt_embeds"].to(device), batch["pooled_prompt_embeds"].to(device)
        embeds, pooled = self.pipe.prompt_embedding.to_conditioning(device, torch.float32)
        return embeds.expand(count, -1, -1), pooled.expand(count, -1)

    def hr_latent(self, batch: dict, target: torch.Tensor) -> torch.Tensor:
        """The HQ image's latent by the plain VAE (no LoRA), one posterior draw, as the official data script
        precomputes it (`hq_latent` in the batch instead, e.g. those files)."""
        if batch.get("hq_latent") is not None:
            return batch["hq_latent"].to(target.device)
        vae = self.pipe.vae
        with torch.no_grad():
            vae.disable_adapters()
            try:
                posterior = vae_encode(vae, target.to(vae.dtype), TilingPlan.untiled())
            finally:
                vae.enable_adapters()
            eps = self.draws.normal("hr_eps", posterior.mean)
            return self.pipe.to_model_latents(posterior.mean + posterior.std * eps.to(posterior.mean.dtype))

    def generator_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        pipe, c, s = self.pipe, self.config, self.settings
        self.use(ADAPTER)
        target = batch["hq"] * 2 - 1
        count = target.shape[0]
        seeds = batch.get("seed") or list(range(count))
        self.draws.start(seeds)
        image, _ = pipe.prepare_batch(batch["lq"])
        posterior = vae_encode(pipe.vae, image.to(pipe.vae.dtype), TilingPlan.untiled())
        eps = self.draws.normal("vae_eps", posterior.mean)
        z_lr = pipe.to_model_latents(posterior.mean + posterior.std * eps.to(posterior.mean.dtype))
        z_hr = self.hr_latent(batch, target)
        default = pipe.encode_prompt("", None, None, 0, pipe.device)
        step = pipe.one_step_from_latents(z_lr, default)
        z_s, x_hat = step.clean_latent.float(), step.image.float().clamp(-1, 1)
        embeds, pooled = self.prompt_conditioning(batch, count)
        self.keep(**{"g/model_input": z_lr, "g/model_input_hr": z_hr, "g/latent_stu": z_s})
        self.keep(**{"g/image_stu": x_hat * 0.5 + 0.5})
        out = {"mse": F.mse_loss(z_s, z_hr)}
        loss = c.mse_weight * out["mse"]
        if self.perceptual is not None:
            from .regression import perceptual_value

            out[c.perceptual] = perceptual_value(self.perceptual, x_hat, target).mean()
            loss = loss + c.perceptual_weight * out[c.perceptual]
        out["tsd"] = self.tsd_loss(z_s, z_hr, embeds, pooled)
        out["loss"] = loss + s.tsd_weight * out["tsd"]
        self._pending.append((z_s.detach(), embeds, pooled, seeds))
        return out

    def cfg(self, adapter: str, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor):
        """One forward of [x; x] at [t; t] with [null; per-image] prompts, uncond + scale (cond - uncond)."""
        count = x.shape[0]
        null_embeds, null_pooled = (n.expand(count, *n.shape[1:]) for n in self.null)
        self.use(adapter)
        both = self.transformer(
            hidden_states=torch.cat([x, x]),
            timestep=torch.cat([t, t]),
            encoder_hidden_states=torch.cat([null_embeds, embeds]),
            pooled_projections=torch.cat([null_pooled, pooled]),
        ).sample.float()
        uncond, cond = both.chunk(2)
        return uncond + self.settings.cfg_scale * (cond - uncond)

    def teacher_time(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps [B], sigma) the teacher and the fake score see: every sample at the FIRST sample's timestep
        (the official batch quirk: the noise of sample b is still added at sigma[index_b])."""
        first = index[0]
        return self.timesteps_table.to(index.device)[first].repeat(len(index)), self.sigmas_table.to(index.device)[
            first
        ]

    @staticmethod
    def score_weight(sigma: torch.Tensor) -> torch.Tensor:
        """The weighting of a score difference: sigma^2."""
        return sigma**2

    @staticmethod
    def fake_score_loss(x0: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor) -> torch.Tensor:
        """The official fake-score loss: a per-sample weight times ONE batch-mean MSE, so only mean(w) matters."""
        return torch.mean(torch.nan_to_num(0.5 * weighting.view(-1, 1, 1, 1) * F.mse_loss(x0, target)))

    def tsd_loss(self, z_s, z_hr, embeds, pooled) -> torch.Tensor:
        s, count = self.settings, z_s.shape[0]
        index = self.draws.timesteps("tsd_index", *s.tsd_timesteps, count, z_s.device)
        noise = self.draws.normal("tsd_noise", z_s)
        sigma_b = self.sigmas_table.to(z_s.device)[index].view(-1, 1, 1, 1)
        noisy = sigma_b * noise + (1 - sigma_b) * z_s
        noisy_hr = sigma_b * noise + (1 - sigma_b) * z_hr
        t, sigma = self.teacher_time(index)
        with torch.no_grad():
            v_teacher = self.cfg(TEACHER, noisy, t, embeds, pooled)
            v_teacher_hr = self.cfg(TEACHER, noisy_hr, t, embeds, pooled)
            v_fake = self.cfg(REGULARISER, noisy, t, embeds, pooled)
            self.use(ADAPTER)
            grad_vsd = torch.nan_to_num((v_teacher - v_fake) * self.score_weight(sigma))
            grad_tsm = torch.nan_to_num((v_teacher - v_teacher_hr) * self.score_weight(sigma))
        self.keep(**{"g/noise": noise, "g/noisy_input": noisy, "g/noisy_hr": noisy_hr, "g/model_pred_tea": v_teacher})
        self.keep(**{"g/model_pred_tea_hr": v_teacher_hr, "g/model_pred_reg": v_fake, "g/grad_vsd": grad_vsd})
        self.keep(**{"g/grad_tsm": grad_tsm})
        with torch.set_grad_enabled(s.tsd_gradient and torch.is_grad_enabled()):
            grad = s.vsd_weight * grad_vsd + s.tsm_weight * grad_tsm
            self.keep(**{"g/grad": grad})
            return 0.5 * F.mse_loss(z_s, (z_s - grad).detach())

    def regulariser_losses(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            raise RuntimeError("the regulariser phase runs after the generator phase of the same step")
        z_s, embeds, pooled, seeds = self._pending.pop(0)
        self.use(REGULARISER)  # kept through the backward pass (checkpointed blocks recompute with it)
        self.draws.start(seeds)
        s, count = self.settings, z_s.shape[0]
        index = self.draws.timesteps("reg_index", *s.regulariser_timesteps, count, z_s.device)
        noise = self.draws.normal("reg_noise", z_s)
        sigma = self.sigmas_table.to(z_s.device)[index].view(-1, 1, 1, 1)
        noisy = (sigma * noise + (1 - sigma) * z_s).detach()
        v = self.transformer(
            hidden_states=noisy,
            timestep=self.timesteps_table.to(z_s.device)[index],
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
        ).sample.float()
        x0 = noisy - sigma * v
        u = self.draws.normal("reg_u", torch.empty(count, device=z_s.device))
        weighting = torch.sigmoid(u)
        loss = self.fake_score_loss(x0, z_s, weighting)
        self.keep(**{"r/noisy_student": noisy, "r/model_pred_reg_v": v, "r/model_pred_reg": x0})
        return {"diffusion": loss, "loss": s.regulariser_weight * loss}


def read_embeddings(path: str | os.PathLike, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeds [1, N, D], pooled [1, P]) from a TSD-SR embeddings folder or file."""
    from ...pipelines.methods.tsdsr import read_tsdsr_embeddings

    try:
        embeds, pooled = read_tsdsr_embeddings(path)
    except (OSError, KeyError) as err:
        raise CheckpointError(f"{path}: cannot read prompt embeddings ({err})") from err
    return embeds.reshape(1, *embeds.shape[-2:]).to(device).float(), pooled.reshape(1, -1).to(device).float()
