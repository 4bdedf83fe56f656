"""What every one-step SR pipeline shares: the __call__ story, VAE stages, tiling, progress, outputs.

A method subclasses `OneStepSRBase` and says only what differs: how the input is upsampled,
how latents are scaled, how the denoiser is conditioned and called, and how its output gives x0.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .color_fix import COLOR_FIX_METHODS, apply_color_fix
from .images import LQImage, check_upscale, load_images, pad_to_multiple, postprocess
from .tiling import run_tiled
from .tiling_options import TilingOptions

LATENT_SAMPLING_MODES = ("mode", "sample")


class OneStepSRBase(DiffusionPipeline):
    default_color_fix = "adain"
    default_tile_size = 96  # latent pixels
    default_tile_overlap = 32

    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        prompt: str | list[str] = "",
        upscale: int = 4,
        color_fix: str | None = None,
        latent_sampling: str = "mode",
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        tile_size: int | str | None = "auto",
        tile_overlap: int | str = "auto",
        tile_batch_size: int = 1,
        vae_tile_size: int | str | None = "auto",
        blend: str = "gaussian",
        progress_callback: Callable[[int, int], None] | None = None,
    ):
        r"""
        Args:
            image: PIL image, HWC numpy array, CHW/NCHW tensor in [0, 1], or a list (a batch; sizes may differ).
                Grayscale is treated as RGB; an alpha channel is upscaled separately and re-attached.
            prompt: text for the text encoder(s) (one per image, or one for all). Without text encoders only ""
                is valid, and the pipeline's fixed `prompt_embedding` is used.
            upscale: integer factor; the output is exactly `upscale` times the input size.
            color_fix: "adain", "wavelet" or "none" (default: the method's official choice).
            latent_sampling: "mode" (deterministic posterior mean) or "sample" (the official behaviour:
                a posterior draw; a CPU generator seeded S reproduces the official `torch.manual_seed(S)`).
            generator: torch generator(s), used only by `latent_sampling="sample"`.
            output_type: "pil", "np" (NHWC float) or "pt" (NCHW float), values in [0, 1].
            prompt_embeds, pooled_prompt_embeds: precomputed conditioning, bypassing the prompt.
            tile_size: denoiser tile size in latent pixels; "auto" picks one from free memory; None never tiles.
            tile_overlap: overlap of denoiser tiles in latent pixels ("auto": the method's default).
            tile_batch_size: how many denoiser tiles go through the model at once.
            vae_tile_size: VAE tile size in image pixels ("auto": 512); None runs the VAE untiled. The tiled
                VAE equals the untiled one except for mid-block attention on very large images.
            blend: weighting of overlapping denoiser tiles, "gaussian" or "linear".
            progress_callback: called as f(done, total) after each unit of work (encode, each denoiser
                tile, decode); raising from it cancels the run between tiles.
        """
        color_fix = self.default_color_fix if color_fix is None else color_fix
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
                lq_up = self.upsample(lq, factors[i])
                # 2. Pad to the latent grid (cropped away after decoding) and encode.
                padded, (height, width) = pad_to_multiple(lq_up.rgb * 2 - 1, self.pad_multiple)
                latents = self.encode(padded.to(device), latent_sampling, generators[i], tiling)
                advance()
                # 3. One denoising step from the LQ latent itself, tile by tile.
                cond = self.encode_prompt(prompts[i], prompt_embeds, pooled_prompt_embeds, index=i, device=device)
                clean = self.denoise(latents, cond, tiling, on_tile=advance)
                # 4. Decode, crop the padding, colour-correct.
                decoded = self.decode(clean, tiling)[..., :height, :width]
                advance()
                sr = (decoded.float().cpu() * 0.5 + 0.5).clamp(0, 1)
                sr = apply_color_fix(color_fix, sr, self.color_fix_source(color_fix, lq, lq_up))
                if lq_up.alpha is not None:
                    sr = torch.cat([sr, lq_up.alpha], dim=1)
                results.append(sr)

        output = postprocess(results, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output,)
        return ImagePipelineOutput(images=output)

    # ------------------------------------------------------------------ shared stages

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pad_multiple(self) -> int:
        """Images are padded to this multiple so the latent fits the denoiser's grid."""
        return self.vae_scale_factor

    def encode(
        self, image: torch.Tensor, latent_sampling: str, generator: torch.Generator | None,
        tiling: TilingOptions | None = None,
    ) -> torch.Tensor:
        """[-1, 1] image -> the denoiser's latent (posterior mode, or one posterior draw)."""
        tiling = tiling or TilingOptions.untiled()
        posterior = tiling.vae_encode(self.vae, image.to(self.vae.dtype))
        latents = posterior.mean
        if latent_sampling == "sample":
            # Drawn as float32 on the generator's device, so a CPU generator seeded S gives
            # exactly torch.manual_seed(S); torch.randn(shape), as the official code does.
            gen_device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=torch.float32)
            latents = latents + posterior.std * noise.to(latents.device, latents.dtype)
        return self.to_model_latents(latents)

    def denoise(
        self, latents: torch.Tensor, cond: Any, tiling: TilingOptions | None = None,
        on_tile: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """One denoiser evaluation (tile by tile, outputs blended), then x0 in closed form once."""
        tiling = tiling or TilingOptions.untiled()

        def run(tile_size: int | None) -> torch.Tensor:
            if tile_size is None:
                out = self.model_output(latents, cond).float()
                if on_tile:
                    on_tile(1)
                return out
            return run_tiled(lambda x: self.model_output(x, cond), latents, tile_size, tiling.overlap_for(tile_size),
                             tiling.tile_batch_size, tiling.blend, on_tile)

        model_output = tiling.run_denoiser(run, latents.shape[-2:])
        return self.predict_clean_latent(model_output, latents.float())

    def decode(self, latents: torch.Tensor, tiling: TilingOptions | None = None) -> torch.Tensor:
        """Denoiser latent -> image in [-1, 1]; fp16/bf16 overflow falls back to an fp32 decode."""
        tiling = tiling or TilingOptions.untiled()
        latents = self.from_model_latents(latents)
        image = tiling.vae_decode(self.vae, latents.to(self.vae.dtype))
        if not torch.isfinite(image).all() and self.vae.dtype != torch.float32:
            dtype = self.vae.dtype
            self.vae.to(torch.float32)
            try:
                image = tiling.vae_decode(self.vae, latents.float())
            finally:
                self.vae.to(dtype)
        return image.clamp(-1, 1)

    def color_fix_source(self, method: str, lq: LQImage, lq_up: LQImage) -> torch.Tensor:
        """The reference image for the colour fix (default: the upsampled input, as OSEDiff)."""
        return lq_up.rgb

    # ------------------------------------------------------------------ what each method defines

    denoiser_width: int  # channels per latent pixel of the denoiser's widest full-resolution stage
    denoiser_dtype: torch.dtype

    def upsample(self, lq: LQImage, factor: int) -> LQImage:
        raise NotImplementedError

    def to_model_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.vae.config.scaling_factor

    def from_model_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.vae.config.scaling_factor

    def encode_prompt(self, prompt, prompt_embeds, pooled_prompt_embeds, index: int, device) -> Any:
        raise NotImplementedError

    def model_output(self, latents: torch.Tensor, cond: Any) -> torch.Tensor:
        raise NotImplementedError

    def predict_clean_latent(self, model_output: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    def _fixed_embedding_or_error(self, prompt: str, device, dtype):
        if self.prompt_embedding is None:
            raise ValueError("this pipeline has no text encoder and no prompt embedding; pass prompt_embeds=")
        if prompt:
            raise ValueError(
                f"this pipeline has no text encoder, so a custom prompt ({prompt!r}) cannot be used; "
                "leave prompt empty to use the model's own prompt embedding"
            )
        return self.prompt_embedding.to_conditioning(device, dtype)

    @staticmethod
    def _per_image(value: Any, count: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise ValueError(f"got {len(value)} {name}s for {count} images; pass one, or one per image")
            return list(value)
        return [value] * count

    @staticmethod
    def _pick(embeds: torch.Tensor, index: int) -> torch.Tensor:
        return embeds[index : index + 1] if embeds.shape[0] > 1 else embeds
