"""OneStepSRPipeline: one-step diffusion SR on an SD2.1-style UNet (OSEDiff; D3SR/DFOSD-style fixed prompts)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers import SchedulerMixin

from .images import LQImage, upsample_pil_bicubic
from .models.prompt_embedding import PromptEmbedding
from .models.ram_tagger import RAMTagger
from .pipeline_base import Conditioning, PromptConditionedSRBase


class OneStepSRPipeline(PromptConditionedSRBase):
    r"""Upscale an image, encode it, denoise its latent in ONE UNet step, decode, colour-correct.

    The low-quality latent itself is the diffusion state at `timestep` (no noise is added);
    the clean latent follows in closed form from the scheduler's `alphas_cumprod` and
    prediction type, so the scheduler is only read, never stepped.

    Components:
        vae ([`AutoencoderKL`]), unet ([`UNet2DConditionModel`]), scheduler (any scheduler with
        `alphas_cumprod`; its `prediction_type` is honoured), text_encoder + tokenizer (optional,
        for text prompts), prompt_embedding ([`PromptEmbedding`], optional, a fixed/learned prompt),
        tagger ([`RAMTagger`], optional: OSEDiff's DAPE; each image's prompt becomes f"{tags}, {prompt},").
    Config:
        timestep (int): the diffusion timestep the LQ latent is treated as (OSEDiff: 999).
        method (str): the registered method that built it (its defaults: colour fix, tiling).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["text_encoder", "tokenizer", "prompt_embedding", "tagger"]
    accepts_tagger = True

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        text_encoder: torch.nn.Module | None = None,
        tokenizer=None,
        prompt_embedding: PromptEmbedding | None = None,
        tagger: RAMTagger | None = None,
        timestep: int = 999,
        method: str | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            unet=unet,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            prompt_embedding=prompt_embedding,
            tagger=tagger,
        )
        self.register_to_config(timestep=int(timestep), method=method)

    def check_config(self, source) -> None:
        from .loading.validation import check_timestep

        check_timestep(self.config.timestep, 0, self.scheduler.config.num_train_timesteps, source)

    @property
    def denoiser_width(self) -> int:
        return self.unet.config.block_out_channels[0]

    @property
    def conditioning_width(self) -> int:
        width = self.unet.config.cross_attention_dim
        return width if isinstance(width, int) else width[0]

    @property
    def denoiser_dtype(self) -> torch.dtype:
        return self.unet.dtype

    def upsample(self, lq: LQImage, factor: int) -> LQImage:
        # Pillow BICUBIC, as the official code: 8-bit inputs give a bit-identical model input
        return upsample_pil_bicubic(lq, factor)

    def check_conditioning(self, prompts, prompt_embeds, pooled_prompt_embeds) -> None:
        if pooled_prompt_embeds is not None:
            raise ValueError("pooled_prompt_embeds is for SD3-style pipelines; this UNet takes prompt_embeds only")
        super().check_conditioning(prompts, prompt_embeds, pooled_prompt_embeds)

    def encode_text(self, prompt: str, device: torch.device, dtype: torch.dtype) -> Conditioning:
        """CLIP's last hidden state for the prompt, padded to the tokenizer's length (77), as SD2.1 is trained."""
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return Conditioning(self.text_encoder(ids.to(self.text_encoder.device))[0].to(device, dtype), from_text=True)

    def model_output(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        context = cond.embeds.expand(latents.shape[0], -1, -1)
        return self.unet(latents.to(self.unet.dtype), self.config.timestep, encoder_hidden_states=context).sample

    def predict_clean_latent(self, model_output: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        t = self.config.timestep
        alpha_bar = self.scheduler.alphas_cumprod[t].to(torch.float32)
        sqrt_a, sqrt_1ma = alpha_bar.sqrt().item(), (1 - alpha_bar).sqrt().item()
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type == "epsilon":
            return (latents - sqrt_1ma * model_output) / sqrt_a
        if prediction_type == "v_prediction":
            return sqrt_a * latents - sqrt_1ma * model_output
        if prediction_type == "sample":
            return model_output
        raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")
