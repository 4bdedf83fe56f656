"""OneStepSRSD3Pipeline: one-step flow-matching SR on an SD3-family transformer (TSD-SR)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.schedulers import SchedulerMixin

from .images import LQImage, upsample_pil_bicubic, upsample_torch_bicubic
from .models.prompt_embedding import PromptEmbedding
from .models.sd3_text import encode_sd3_prompt
from .pipeline_base import Conditioning, PromptConditionedSRBase


class OneStepSRSD3Pipeline(PromptConditionedSRBase):
    r"""Upscale, encode, ONE flow-matching step on an SD3 transformer, decode, colour-correct.

    The low-quality latent is the flow state at sigma = timestep / num_train_timesteps (TSD-SR:
    t = 1000, sigma = 1) and the transformer predicts the velocity v, so x0 = x - sigma * v.

    Components:
        vae ([`AutoencoderKL`], 16 latent channels), transformer ([`SD3Transformer2DModel`]), scheduler
        (read for `num_train_timesteps`), prompt_embedding ([`PromptEmbedding`] with a pooled vector: the
        fixed TSD-SR embeddings), and optionally the three SD3 text encoders/tokenizers for custom prompts.
    Config:
        timestep (float): 1000 for TSD-SR.
        use_shift_factor (bool): subtract the VAE's shift_factor before scaling (diffusers' SD3 convention).
            TSD-SR was trained WITHOUT it, so the default is False.
        method (str): the registered method that built it (its defaults: colour fix, tiling).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components = [
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
        "prompt_embedding",
    ]

    def __init__(
        self,
        vae: AutoencoderKL,
        transformer: SD3Transformer2DModel,
        scheduler: SchedulerMixin,
        prompt_embedding: PromptEmbedding | None = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
        text_encoder_2: Any = None,
        tokenizer_2: Any = None,
        text_encoder_3: Any = None,
        tokenizer_3: Any = None,
        timestep: float = 1000.0,
        use_shift_factor: bool = False,
        method: str | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
            prompt_embedding=prompt_embedding,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        self.register_to_config(timestep=float(timestep), use_shift_factor=bool(use_shift_factor), method=method)

    def check_config(self, source) -> None:
        from .loading.validation import check_timestep

        high = self.scheduler.config.num_train_timesteps
        check_timestep(self.config.timestep, 0, high, source, inclusive_high=True)

    @property
    def pad_multiple(self) -> int:
        # the transformer patchifies the latent: pad images to VAE factor x patch size (16 for SD3)
        return self.vae_scale_factor * self.transformer.config.patch_size

    @property
    def denoiser_width(self) -> int:
        cfg = self.transformer.config
        return cfg.num_attention_heads * cfg.attention_head_dim // cfg.patch_size**2

    @property
    def conditioning_width(self) -> int:
        return self.transformer.config.joint_attention_dim

    @property
    def pooled_width(self) -> int:
        return self.transformer.config.pooled_projection_dim

    @property
    def denoiser_dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def sigma(self) -> float:
        return self.config.timestep / self.scheduler.config.num_train_timesteps

    def upsample(self, lq: LQImage, factor: int) -> LQImage:
        # TSD-SR: torch bicubic (align_corners=False) straight from the LR tensor, then clamp
        return upsample_torch_bicubic(lq, factor)

    def to_model_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.config.use_shift_factor:
            latents = latents - self.vae.config.shift_factor
        return latents * self.vae.config.scaling_factor

    def from_model_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.vae.config.scaling_factor
        if self.config.use_shift_factor:
            latents = latents + self.vae.config.shift_factor
        return latents

    def color_fix_source(self, method: str, lq: LQImage, lq_up: LQImage) -> torch.Tensor:
        # TSD-SR's references: wavelet against LR.resize(4x) in Pillow (bicubic), adain against the LR itself
        if method == "adain":
            return lq.rgb
        factor = lq_up.size[0] // lq.size[0]
        return upsample_pil_bicubic(lq, factor).rgb

    @property
    def has_text_encoders(self) -> bool:
        # both CLIPs are required; T5 is optional (256 zero tokens without it)
        return all(
            getattr(self, n, None) is not None for n in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        )

    def check_conditioning(self, prompts, prompt_embeds, pooled_prompt_embeds) -> None:
        if (prompt_embeds is None) != (pooled_prompt_embeds is None):
            raise ValueError("SD3 conditioning needs both prompt_embeds and pooled_prompt_embeds")
        super().check_conditioning(prompts, prompt_embeds, pooled_prompt_embeds)
        if prompt_embeds is None and self.prompt_embedding is not None and self.prompt_embedding.pooled is None:
            raise ValueError("the prompt embedding has no pooled vector, which SD3 transformers need")

    def encode_text(self, prompt: str, device: torch.device, dtype: torch.dtype) -> Conditioning:
        """Custom prompts through the SD3 text encoders (CLIP-L, CLIP-G, optional T5)."""
        t5 = (self.text_encoder_3, self.tokenizer_3) if self.text_encoder_3 is not None else None
        clips = [(self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)]
        joint_dim = self.transformer.config.joint_attention_dim
        return Conditioning(*encode_sd3_prompt(prompt, clips, t5, joint_dim, device, dtype), from_text=True)

    def model_output(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        embeds, pooled = cond.embeds, cond.pooled
        n = latents.shape[0]
        timestep = torch.full((n,), self.config.timestep, device=latents.device, dtype=torch.float32)
        return self.transformer(
            hidden_states=latents.to(self.transformer.dtype),
            timestep=timestep,
            encoder_hidden_states=embeds.expand(n, -1, -1),
            pooled_projections=pooled.expand(n, -1),
        ).sample

    def predict_clean_latent(self, model_output: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return latents - self.sigma * model_output
