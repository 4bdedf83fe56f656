"""OneStepSRSD3Pipeline: one-step flow-matching SR on an SD3-family transformer (TSD-SR)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.schedulers import SchedulerMixin

from .images import LQImage, upsample_pil_bicubic, upsample_torch_bicubic
from .pipeline_base import OneStepSRBase
from .prompt_embedding import PromptEmbedding


class OneStepSRSD3Pipeline(OneStepSRBase):
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
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components = [
        "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3", "prompt_embedding",
    ]
    default_color_fix = "wavelet"  # TSD-SR's default --align_method
    default_tile_size = 64  # official TSD-SR latent tiling: 64 with overlap 8
    default_tile_overlap = 8

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
    ):
        super().__init__()
        self.register_modules(
            vae=vae, transformer=transformer, scheduler=scheduler, prompt_embedding=prompt_embedding,
            text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        )
        self.register_to_config(timestep=float(timestep), use_shift_factor=bool(use_shift_factor))

    @property
    def pad_multiple(self) -> int:
        # the transformer patchifies the latent: pad images to VAE factor x patch size (16 for SD3)
        return self.vae_scale_factor * self.transformer.config.patch_size

    @property
    def denoiser_width(self) -> int:
        cfg = self.transformer.config
        return cfg.num_attention_heads * cfg.attention_head_dim // cfg.patch_size**2

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

    def encode_prompt(self, prompt, prompt_embeds, pooled_prompt_embeds, index: int, device):
        dtype = self.transformer.dtype
        if prompt_embeds is not None or pooled_prompt_embeds is not None:
            if prompt_embeds is None or pooled_prompt_embeds is None:
                raise ValueError("SD3 conditioning needs both prompt_embeds and pooled_prompt_embeds")
            return self._pick(prompt_embeds, index).to(device, dtype), self._pick(pooled_prompt_embeds, index).to(device, dtype)
        has_text_encoders = self.text_encoder is not None and self.text_encoder_2 is not None
        if not has_text_encoders or (not prompt and self.prompt_embedding is not None):
            embeds, pooled = self._fixed_embedding_or_error(prompt, device, dtype)
            if pooled is None:
                raise ValueError("the prompt embedding has no pooled vector, which SD3 transformers need")
            return embeds, pooled
        return self._encode_text(prompt, device, dtype)

    def _encode_text(self, prompt: str, device, dtype):
        """Custom prompts through the SD3 text encoders, exactly as diffusers' StableDiffusion3Pipeline does."""
        from diffusers import StableDiffusion3Pipeline

        text_pipe = StableDiffusion3Pipeline(
            transformer=self.transformer, scheduler=self.scheduler, vae=self.vae,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2, text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
        )
        embeds, _, pooled, _ = text_pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=256,
        )
        return embeds.to(device, dtype), pooled.to(device, dtype)

    def model_output(self, latents: torch.Tensor, cond) -> torch.Tensor:
        embeds, pooled = cond
        n = latents.shape[0]
        timestep = torch.full((n,), self.config.timestep, device=latents.device, dtype=torch.float32)
        return self.transformer(
            hidden_states=latents.to(self.transformer.dtype), timestep=timestep,
            encoder_hidden_states=embeds.expand(n, -1, -1), pooled_projections=pooled.expand(n, -1),
        ).sample

    def predict_clean_latent(self, model_output: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return latents - self.sigma * model_output
