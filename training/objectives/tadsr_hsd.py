"""TAD-SR's objective (LearningHx/TAD-SR `trainer.py::TrainerDistillDifIR`, `gaussian_diffusion.py::
training_losses_distill` / `training_losses_D`): a one-step ResShift student distilled from the multi-step ResShift
teacher with high-frequency score distillation (HSD) and a time-aware discriminator on the teacher's encoder features.

Facts: ../shared/parity/train-tadsr README (the official trainer run step by step), shared docs methods-tadsr-dfosd.md
A.6. Notation: eta_t and sqrt(eta_t) from the float64 schedule, used as float32; kappa = 2; T = 15;
scale(x, t) = x / sqrt(kappa^2 eta_t + 1); psi(y, x, n, t) = x + eta_t (y - x) + kappa sqrt(eta_t) n.

    student (t = T - 1):  x_T = z_y + kappa sqrt(eta_T-1) eps;  s = student(scale(x_T), T - 1, lq)
    discriminator phase:  n ~ U[0, 1), t_d ~ randint(0, T - 1)
                          real = psi(z_y, z_gt, n, t_d), fake = psi(z_y, s, n, t_d)
                          F = teacher encoder features of scale(real) / scale(fake) at t_d (fake's keep the graph)
                          L_D = mean relu(1 - D(F_real, t_d)) + mean relu(1 + D(sg F_fake, t_d))   (hinge)
    generator phase:      z_tch = the teacher's 15-step DDIM sample from the same x_T (no grad)
                          L_mse = mean (z_tch - s)^2
                          HSD: t_h ~ randint(0, 3), n_h ~ U[0, 1)
                               x_s = psi(z_y, s, n_h, t_h), x_t = psi(z_y, z_tch, n_h, t_h)
                               x0_* = teacher(scale(scale(x_*)), t_h, lq)   (scaled twice, as the official code)
                               eps(x, x0) = (x - (x0 + eta (z_y - x0))) / (kappa sqrt(eta));  g = sg(eps_s - eps_t)
                               L_hsd = mean(g * s)
                          L_G = -mean D(F_fake, t_d), the discriminator AFTER this step's update
                          loss = L_mse + hsd_weight L_hsd + gan_weight L_G (per sample, then the batch mean)

The whole student UNet is trained (AdamW, no weight decay officially), the discriminator beside it; the teacher
and the VQGAN are frozen. Reproduced on purpose (the parity data records them), each with a setting where the
paper says otherwise: uniform noise where the paper's forward process is Gaussian (`noise`), the teacher input
scaled twice in HSD (`teacher_input`), the student's learning-rate warm-up starting after step 1
(`full_lr_first_step`); the discriminator's learning rate is never scheduled (official).

Settings (config `extra:`): see `TADSettings`.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...pipelines.loading.files import read_weights
from ...pipelines.methods.resshift import load_resshift_unet
from ...pipelines.tiling.plan import TilingPlan, vq_encode
from ..config import ConfigError, TrainConfig
from ..discriminators import TimeAwareProjectedDiscriminator
from ..loop import lr_factor
from .base import Objective, Phase, SampleDraws, register_objective, require_method, settings_from_extra

NOISES = ("uniform", "gaussian")
TEACHER_INPUTS = ("double", "single")
TEACHER_PRECISIONS = ("fp32", "autocast")


@dataclass(frozen=True)
class TADSettings:
    """The objective's settings (config `extra:`), defaults as the official trainer (configs/TAD-SR.yaml)."""

    teacher: str = ""  # the teacher UNet file (ResShift v1, 15 steps); default: `weights`, which the student starts as
    hsd_weight: float = 1.0
    gan_weight: float = 0.02
    hsd_timesteps: tuple[int, int] = (0, 3)  # randint range of the HSD timestep (official: 0..2)
    discriminator_timesteps: tuple[int, int] = (0, 14)  # randint range of the discriminator's t (official: 0..T-2)
    noise: str = "uniform"  # the HSD / discriminator noise: "uniform" (official code) or "gaussian" (the paper's)
    teacher_input: str = "double"  # HSD's teacher input: "double" (official: scaled twice) or "single"
    full_lr_first_step: bool = True  # official: step 1 runs at the full LR, the warm-up starts at step 2
    # under mixed precision: the teacher's forwards (DDIM target, HSD, discriminator features) in "fp32" (its weights
    # kept fp32; HSD divides the teacher's x0 error by kappa sqrt(eta) = 0.04 at t = 0) or under "autocast"
    teacher_precision: str = "fp32"
    discriminator_channels: int = 64  # c_dim: logits per position of each head
    discriminator_learning_rate: float | None = None  # default: learning_rate (never scheduled, as upstream)
    time_aware: bool = True  # false: the discriminator ignores t (an ablation)
    spectral_norm: bool = True

    @classmethod
    def from_extra(cls, extra: dict) -> TADSettings:
        choices = {"noise": NOISES, "teacher_input": TEACHER_INPUTS, "teacher_precision": TEACHER_PRECISIONS}
        settings = settings_from_extra(cls, extra, "tadsr-hsd", choices)
        if settings.teacher and not Path(settings.teacher).is_file():
            raise ConfigError(f"extra.teacher = {settings.teacher!r}: expected an existing ResShift UNet file")
        if settings.discriminator_channels < 1:
            raise ConfigError(f"extra.discriminator_channels = {settings.discriminator_channels}: expected >= 1")
        return settings


class ResShiftSchedule:
    """The residual-shifting schedule as the official training code uses it: float64 tables gathered per sample
    and cast to float32 before any arithmetic (`_extract_into_tensor`)."""

    def __init__(self, pipe, device: torch.device):
        sqrt_etas = pipe.sqrt_etas
        self.steps, self.kappa = len(sqrt_etas), float(pipe.config.kappa)
        self.etas64 = sqrt_etas**2
        self.eta = torch.from_numpy(self.etas64).float().to(device)
        self.sqrt_eta = torch.from_numpy(sqrt_etas).float().to(device)

    def _at(self, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return table[t].view(-1, 1, 1, 1)

    def scale(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network input x / sqrt(kappa^2 eta_t + 1)."""
        return x / torch.sqrt(self._at(self.eta, t) * self.kappa**2 + 1)

    def noised(self, y: torch.Tensor, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """psi: x moved towards y by eta_t plus kappa sqrt(eta_t) noise (`prior_sample_intermediate`)."""
        return x + self._at(self.eta, t) * (y - x) + self.kappa * self._at(self.sqrt_eta, t) * noise

    def implied_noise(self, x: torch.Tensor, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise that puts x at psi(y, x0, ., t)."""
        return (x - (x0 + self._at(self.eta, t) * (y - x0))) / (self._at(self.sqrt_eta, t) * self.kappa)

    def ddim_coefficients(self, t: int) -> tuple[float, float, float]:
        """(k, m, j) of the deterministic step x_{t-1} = k x0 + m x_t + j z_y (eta_{-1} = 0), float32 arithmetic."""
        eta = np.float32(self.etas64[t])
        prev = np.float32(self.etas64[t - 1]) if t > 0 else np.float32(0.0)
        k = np.float32(1) - prev + np.sqrt(eta * prev) - np.sqrt(prev / eta)
        return float(k), float(np.sqrt(prev / eta)), float(prev - np.sqrt(eta * prev))


@register_objective
class TADSRObjective(Objective):
    name = "tadsr-hsd"
    method = "tadsr"  # the student is the one-step TAD-SR model, whatever the teacher file's name says
    lq_at_hq_size = False  # the UNet sees the LR itself (and its x4 bicubic through the VQGAN)
    perceptual_loss = False  # no LPIPS term officially (the `perceptual` keys are not used)

    def __init__(self, pipe, config: TrainConfig, perceptual: torch.nn.Module | None = None):
        hint = "leave `method` unset (or set it to tadsr) with `weights` = the ResShift teacher file"
        method = require_method(pipe, self.name, self.method, "a one-step TAD-SR student", hint)
        lr_multiple = pipe.config.lr_pad_multiple * pipe.fixed_upscale
        if config.crop_size % lr_multiple or config.scale != pipe.fixed_upscale:
            raise ConfigError(
                f"crop_size = {config.crop_size}, scale = {config.scale}: TAD-SR trains x{pipe.fixed_upscale} on HQ "
                f"crops that are multiples of {lr_multiple} px (the Swin windows; the official crop is 256)"
            )
        self.pipe, self.config, self.perceptual = pipe, config, perceptual
        self.settings = s = TADSettings.from_extra(config.extra)
        self.draws = SampleDraws(
            ("student_noise", "discriminator_noise", "discriminator_timestep", "hsd_timestep", "hsd_noise")
        )
        self.unet = pipe.unet
        self.student_params = method.trainable(pipe)
        self.teacher = self._build_teacher(pipe)
        self.discriminator = TimeAwareProjectedDiscriminator(
            self.teacher.feature_channels,
            self.teacher.config.model_channels,
            s.discriminator_channels,
            time_aware=s.time_aware,
            spectral_norm=s.spectral_norm,
        ).to(pipe.device)
        self.discriminator_params = {f"discriminator.{k}": p for k, p in self.discriminator.named_parameters()}
        self.schedule = ResShiftSchedule(pipe, pipe.device)
        self._pending: list[dict] = []

    def _build_teacher(self, pipe) -> torch.nn.Module:
        """The frozen teacher: the starting weights (the student begins as an exact copy) or `extra.teacher`."""
        path = self.settings.teacher
        if path:
            teacher = load_resshift_unet(read_weights(path), path, torch.float32).to(pipe.device)
            if teacher.config != pipe.unet.config:
                raise ConfigError(f"extra.teacher = {path!r}: its UNet is not the student's architecture")
        else:
            teacher = copy.deepcopy(pipe.unet)
        teacher.requires_grad_(False).eval()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.mixed_precision)
        if dtype is not None and self.settings.teacher_precision == "autocast":
            teacher.to(dtype)  # (autocast computes in it anyway)
        return teacher

    def teacher_precision(self):
        """The context of every teacher forward: autocast off for an fp32 teacher, else the loop's."""
        enabled = self.settings.teacher_precision == "autocast"
        return contextlib.nullcontext() if enabled else torch.autocast(self.pipe.device.type, enabled=False)

    @property
    def phases(self) -> list[Phase]:
        s, c = self.settings, self.config

        def student_lr(step: int) -> float:
            return 1.0 if step == 0 and s.full_lr_first_step else lr_factor(c, step)

        return [
            Phase(
                "discriminator",
                self.discriminator_params,
                s.discriminator_learning_rate or c.learning_rate,
                lr_factor=lambda step: 1.0,
                ema=False,
            ),
            Phase("generator", self.student_params, c.learning_rate, lr_factor=student_lr),
        ]

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.teacher]

    def buffers(self) -> dict[str, torch.Tensor]:
        return {f"discriminator.{k}": v for k, v in self.discriminator.power_iteration_state().items()}

    # ------------------------------------------------------------------ the losses

    def losses(self, phase: str, batch: dict) -> dict[str, torch.Tensor]:
        if phase == "discriminator":
            return self.discriminator_losses(batch)
        return self.generator_losses()

    def noise(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.draws.uniform(name, like) if self.settings.noise == "uniform" else self.draws.normal(name, like)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """The VQGAN encoder + quant_conv (no quantisation), float32."""
        vae = self.pipe.vae
        return vq_encode(vae, image.to(vae.dtype), TilingPlan.untiled()).float()

    def discriminator_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        sched, s = self.schedule, self.settings
        lq, hq = batch["lq"] * 2 - 1, batch["hq"] * 2 - 1
        count, device = lq.shape[0], lq.device
        seeds = batch.get("seed") or list(range(count))
        self.draws.start(seeds)
        with torch.no_grad():
            up = F.interpolate(lq, scale_factor=self.pipe.fixed_upscale, mode="bicubic", align_corners=False)
            z_y, z_gt = self.encode(up), self.encode(hq)
        # the student at T - 1 from the prior sample (with grad: the generator phase backpropagates through it)
        t_student = torch.full((count,), sched.steps - 1, dtype=torch.int64, device=device)
        x_T = self.pipe.start_latents(z_y, self.draws.normal("student_noise", z_y), None)
        x_in = sched.scale(x_T, t_student)
        student = self.unet(x_in, t_student, lq).float()
        noise = self.noise("discriminator_noise", z_gt)
        t_dis = self.draws.timesteps("discriminator_timestep", *s.discriminator_timesteps, count, device)
        real = sched.noised(z_y, z_gt, noise, t_dis)
        fake = sched.noised(z_y, student, noise, t_dis)
        with torch.no_grad(), self.teacher_precision():
            real_features = self.teacher.encoder_features(sched.scale(real, t_dis), t_dis, lq)
        with self.teacher_precision():
            fake_features = self.teacher.encoder_features(sched.scale(fake, t_dis), t_dis, lq)
        pred_real = self.discriminator(real_features, t_dis).float()
        pred_fake = self.discriminator(fake_features, t_dis, detach=True).float()
        per_sample = F.relu(1 - pred_real).mean(1) + F.relu(1 + pred_fake).mean(1)
        self.keep(z_y=z_y, z_T_student_input=x_T, student_out=student, dis_noisy_gt=real, dis_noisy_stu=fake)
        self.keep(t_dis=t_dis, D_real_logits=pred_real, D_fake_detached_logits=pred_fake)
        self.keep(loss_D_per_sample=per_sample)
        self._pending.append(dict(lq=lq, z_y=z_y, x_T=x_T, student=student, features=fake_features, t_dis=t_dis,
                                  seeds=seeds))  # fmt: skip
        return {"hinge": per_sample.mean(), "loss": per_sample.mean()}

    @torch.no_grad()
    def teacher_sample(self, x_T: torch.Tensor, z_y: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """The teacher's deterministic (DDIM) sampler from x_T through every t = T - 1 ... 0, no clipping."""
        sched, x = self.schedule, x_T
        for t in range(sched.steps - 1, -1, -1):
            steps = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
            with self.teacher_precision():
                x0 = self.teacher(sched.scale(x, steps), steps, lq).float()
            k, m, j = sched.ddim_coefficients(t)
            x = x0 * k + m * x + j * z_y
        return x

    @torch.no_grad()
    def hsd_gradient(self, student: torch.Tensor, target: torch.Tensor, z_y: torch.Tensor, lq: torch.Tensor):
        """The HSD direction: the teacher's implied noise on the noised student minus on the noised teacher
        target, at a small t (high frequencies), the same noise for both."""
        sched, s = self.schedule, self.settings
        t = self.draws.timesteps("hsd_timestep", *s.hsd_timesteps, student.shape[0], student.device)
        noise = self.noise("hsd_noise", student)
        x_stu, x_tch = sched.noised(z_y, student, noise, t), sched.noised(z_y, target, noise, t)
        in_stu, in_tch = sched.scale(x_stu, t), sched.scale(x_tch, t)
        twice = s.teacher_input == "double"
        with self.teacher_precision():
            x0_stu = self.teacher(sched.scale(in_stu, t) if twice else in_stu, t, lq).float()
            x0_tch = self.teacher(sched.scale(in_tch, t) if twice else in_tch, t, lq).float()
        g = sched.implied_noise(x_stu, x0_stu, z_y, t) - sched.implied_noise(x_tch, x0_tch, z_y, t)
        self.keep(hsd_x_stu=x_stu, hsd_x_tch=x_tch, hsd_x_stu_t=t, hsd_stu_model_input=in_stu)
        self.keep(hsd_tch_model_input=in_tch, hsd_stu_pred_x0=x0_stu, hsd_tch_pred_x0=x0_tch)
        return torch.nan_to_num(g)

    def generator_losses(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            raise RuntimeError("the generator phase runs after the discriminator phase of the same step")
        p = self._pending.pop(0)
        s, student = self.settings, p["student"]
        self.draws.start(p["seeds"])
        target = self.teacher_sample(p["x_T"], p["z_y"], p["lq"])
        mse = ((target - student) ** 2).mean(dim=(1, 2, 3))
        hsd = (self.hsd_gradient(student.detach(), target, p["z_y"], p["lq"]) * student).mean(dim=(1, 2, 3))
        pred = self.discriminator(p["features"], p["t_dis"]).float()
        gan = -pred.mean(1)
        per_sample = self.config.mse_weight * mse + s.hsd_weight * hsd + s.gan_weight * gan
        self.keep(z_start_teacher=target, D_fake_for_G_logits=pred, loss_mse=mse, loss_loss=per_sample)
        self.keep(loss_mse_hsd=s.hsd_weight * hsd, loss_GAN_loss=s.gan_weight * gan)  # (as the official log: weighted)
        return {"mse": mse.mean(), "hsd": hsd.mean(), "gan": gan.mean(), "loss": per_sample.mean()}
