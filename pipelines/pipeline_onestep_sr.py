"""OneStepSRPipeline: one-step diffusion super-resolution on an SD2.1-style UNet (OSEDiff, D3SR/DFOSD)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import SchedulerMixin

from .color_fix import COLOR_FIX_METHODS, apply_color_fix
from .images import check_upscale, load_images, pad_to_multiple, postprocess, upsample_pil_bicubic
from .prompt_embedding import PromptEmbedding
from .tiling import run_tiled
from .tiling_options import TilingOptions

LATENT_SAMPLING_MODES = ("mode", "sample")


class OneStepSRPipeline(DiffusionPipeline):
    r"""Upscale an image, encode it, denoise its latent in ONE UNet step, decode, colour-correct.

    The low-quality latent itself is the diffusion state at `timestep` (no noise is added);
    the clean latent follows in closed form from the scheduler's `alphas_cumprod` and
    prediction type, so the scheduler is only read, never stepped.

    Components:
        vae ([`AutoencoderKL`]), unet ([`UNet2DConditionModel`]), scheduler (any scheduler with
        `alphas_cumprod`; its `prediction_type` is honoured), text_encoder + tokenizer (optional,
        for text prompts), prompt_embedding ([`PromptEmbedding`], optional, a fixed/learned prompt).
    Config:
        timestep (int): the diffusion timestep the LQ latent is treated as (OSEDiff: 999).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["text_encoder", "tokenizer", "prompt_embedding"]

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        text_encoder: Any = None,
        tokenizer: Any = None,
        prompt_embedding: PromptEmbedding | None = None,
        timestep: int = 999,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            unet=unet,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            prompt_embedding=prompt_embedding,
        )
        self.register_to_config(timestep=int(timestep))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def denoiser_width(self) -> int:
        """Channels of the denoiser's first block: scales its working memory per latent pixel."""
        return self.unet.config.block_out_channels[0]

    @property
    def denoiser_dtype(self) -> torch.dtype:
        return self.unet.dtype

    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        prompt: str | list[str] = "",
        upscale: int = 4,
        color_fix: str = "adain",
        latent_sampling: str = "mode",
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        tile_size: int | str | None = "auto",
        tile_overlap: int = 32,
        tile_batch_size: int = 1,
        vae_tile_size: int | str | None = "auto",
        blend: str = "gaussian",
        progress_callback: Callable[[int, int], None] | None = None,
    ):
        r"""
        Args:
            image: PIL image, HWC numpy array, CHW/NCHW tensor in [0, 1], or a list (a batch; sizes may differ).
                Grayscale is treated as RGB; an alpha channel is upscaled separately and re-attached.
            prompt: text for the text encoder (one per image, or one for all). With no text encoder,
                only "" is valid and the pipeline's fixed `prompt_embedding` is used.
            upscale: integer factor; the output is exactly `upscale` times the input size.
            color_fix: "adain" (default, as OSEDiff), "wavelet" or "none", against the upsampled input.
            latent_sampling: "mode" (deterministic posterior mean) or "sample" (the official behaviour:
                a posterior draw; a CPU generator seeded S reproduces the official `torch.manual_seed(S)`).
            generator: torch generator(s), used only by `latent_sampling="sample"`.
            output_type: "pil", "np" (NHWC float) or "pt" (NCHW float), values in [0, 1].
            prompt_embeds: precomputed encoder hidden states (1 or N, tokens, dim), bypassing the prompt.
            tile_size: denoiser tile size in latent pixels; "auto" picks one from free memory; None never tiles.
            tile_overlap: overlap of denoiser tiles in latent pixels.
            tile_batch_size: how many denoiser tiles go through the model at once.
            vae_tile_size: VAE tile size in image pixels ("auto": 512); None runs the VAE untiled. Tiled
                encode/decode equals the untiled result except for mid-block attention on very large images.
            blend: weighting of overlapping denoiser tiles, "gaussian" or "linear".
            progress_callback: called as f(done, total) after each unit of work (encode, each tile,
                decode); raising from it cancels the run between tiles.
        """
        if color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"color_fix must be one of {COLOR_FIX_METHODS}, got {color_fix!r}")
        if latent_sampling not in LATENT_SAMPLING_MODES:
            raise ValueError(f"latent_sampling must be one of {LATENT_SAMPLING_MODES}, got {latent_sampling!r}")
        images = load_images(image)
        prompts = self._per_image(prompt, len(images), "prompt")
        generators = self._per_image(generator, len(images), "generator")
        device = self._execution_device
        tiling = TilingOptions.resolve(self, tile_size, tile_overlap, tile_batch_size, vae_tile_size, blend)
        factors = [check_upscale(upscale, lq) for lq in images]
        total = sum(tiling.work_units(self, lq.size, f) for lq, f in zip(images, factors))

        results = []
        with self.progress_bar(total=total) as progress:
            done = 0

            def advance(n: int = 1) -> None:
                nonlocal done
                done += n
                progress.update(n)
                if progress_callback is not None:
                    progress_callback(done, total)

            for i, lq in enumerate(images):
                # 1. Upsample to output size: the network itself never changes resolution.
                lq_up = upsample_pil_bicubic(lq, factors[i])
                # 2. Pad to the VAE grid (cropped away after decoding) and encode.
                padded, (height, width) = pad_to_multiple(lq_up.rgb * 2 - 1, self.vae_scale_factor)
                latents = self.encode(padded.to(device), latent_sampling, generators[i], tiling)
                advance()
                # 3. One denoising step from the LQ latent itself, tile by tile.
                cond = self.encode_prompt(prompts[i], prompt_embeds, index=i, device=device)
                clean = self.denoise(latents, cond, tiling, on_tile=advance)
                # 4. Decode, crop the padding, colour-correct against the upsampled input.
                decoded = self.decode(clean, tiling)[..., :height, :width]
                advance()
                sr = (decoded.float().cpu() * 0.5 + 0.5).clamp(0, 1)
                sr = apply_color_fix(color_fix, sr, lq_up.rgb)
                if lq_up.alpha is not None:
                    sr = torch.cat([sr, lq_up.alpha], dim=1)
                results.append(sr)

        output = postprocess(results, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output,)
        return ImagePipelineOutput(images=output)

    # ------------------------------------------------------------------ stages

    def encode(
        self, image: torch.Tensor, latent_sampling: str, generator: torch.Generator | None, tiling: TilingOptions | None = None
    ) -> torch.Tensor:
        """[-1, 1] image -> scaled latent (posterior mode, or one posterior draw)."""
        tiling = tiling or TilingOptions.untiled()
        posterior = tiling.vae_encode(self.vae, image.to(self.vae.dtype))
        latents = posterior.mean
        if latent_sampling == "sample":
            # Drawn as float32 on the generator's device, so a CPU generator seeded S gives
            # exactly torch.manual_seed(S); torch.randn(shape) as the official code does.
            gen_device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=torch.float32)
            latents = latents + posterior.std * noise.to(latents.device, latents.dtype)
        return latents * self.vae.config.scaling_factor

    def encode_prompt(self, prompt: str, prompt_embeds: torch.Tensor | None, index: int, device) -> torch.Tensor:
        dtype = self.unet.dtype
        if prompt_embeds is not None:
            embeds = prompt_embeds[index : index + 1] if prompt_embeds.shape[0] > 1 else prompt_embeds
            return embeds.to(device, dtype)
        if self.text_encoder is None or self.tokenizer is None:
            if self.prompt_embedding is None:
                raise ValueError("this pipeline has neither a text encoder nor a prompt embedding; pass prompt_embeds=")
            if prompt:
                raise ValueError(
                    f"this pipeline has no text encoder, so a custom prompt ({prompt!r}) cannot be used; "
                    "leave prompt empty to use the model's own prompt embedding"
                )
            return self.prompt_embedding().to(device, dtype)
        if not prompt and self.prompt_embedding is not None:
            return self.prompt_embedding().to(device, dtype)
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0].to(device, dtype)

    def denoise(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        tiling: TilingOptions | None = None,
        on_tile: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """One UNet evaluation at `timestep` (tile by tile, outputs blended), then x0 in closed form once."""
        t = self.config.timestep
        tiling = tiling or TilingOptions.untiled()

        def model(x: torch.Tensor) -> torch.Tensor:
            context = cond.expand(x.shape[0], -1, -1)
            return self.unet(x.to(self.unet.dtype), t, encoder_hidden_states=context).sample

        def run(tile_size: int | None) -> torch.Tensor:
            if tile_size is None:
                out = model(latents).float()
                if on_tile:
                    on_tile(1)
                return out
            return run_tiled(model, latents, tile_size, tiling.overlap_for(tile_size), tiling.tile_batch_size,
                             tiling.blend, on_tile)

        model_output = tiling.run_denoiser(run, latents.shape[-2:])
        return self.predict_clean_latent(model_output, latents.float(), t)

    def predict_clean_latent(self, model_output: torch.Tensor, latents: torch.Tensor, t: int) -> torch.Tensor:
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

    def decode(self, latents: torch.Tensor, tiling: TilingOptions | None = None) -> torch.Tensor:
        """Scaled latent -> image in [-1, 1]; fp16/bf16 overflow falls back to an fp32 decode."""
        tiling = tiling or TilingOptions.untiled()
        latents = latents / self.vae.config.scaling_factor
        image = tiling.vae_decode(self.vae, latents.to(self.vae.dtype))
        if not torch.isfinite(image).all() and self.vae.dtype != torch.float32:
            dtype = self.vae.dtype
            self.vae.to(torch.float32)
            try:
                image = tiling.vae_decode(self.vae, latents.float())
            finally:
                self.vae.to(dtype)
        return image.clamp(-1, 1)

    @staticmethod
    def _per_image(value: Any, count: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise ValueError(f"got {len(value)} {name}s for {count} images; pass one, or one per image")
            return list(value)
        return [value] * count
