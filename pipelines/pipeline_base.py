"""What every one-step SR pipeline shares: the __call__ story, input checks, VAE stages, tiling, outputs.

A pipeline subclasses `OneStepSRBase` and says only what differs: how the input is upsampled,
how latents are scaled, how the denoiser is conditioned and called, and how its output gives x0.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .color_fix import apply_color_fix
from .images import LQImage, check_upscale, image_sizes, load_images, pad_to_multiple, postprocess
from .loading.validation import all_finite
from .methods.registry import Method, method_of
from .options import COLOR_FIX_METHODS, GENERIC_DEFAULTS, LATENT_SAMPLING_MODES, OUTPUT_TYPES, TileDefaults
from .tiling.denoiser import run_tiled
from .tiling.memory import RunEstimate, VAEFacts, check_fits, estimate_run, fits
from .tiling.plan import (
    DenoiserFacts,
    StageReport,
    TilingOptions,
    TilingPlan,
    halve_denoiser_tile,
    plan_tiling,
    retry_on_oom,
    vae_decode,
    vae_encode,
    vae_units,
)
from .tiling.streamed_vae import needs_streaming


class NonFiniteOutputError(RuntimeError):
    """A stage (encode, denoise or decode) produced NaN/Inf values: never returned as an image."""


NON_FINITE_HINT = "the weights are probably damaged or do not belong together (check the base and SR weight files)"


@dataclass
class OneStepSROutput(ImagePipelineOutput):
    """`images` as diffusers' ImagePipelineOutput, plus the prompt each image was conditioned on (None where
    precomputed embeddings or the fixed prompt embedding were used)."""

    prompts: list[str | None] | None = None


@dataclass(frozen=True)
class OneStepResult:
    """What `one_step` computes (autograd intact): the LQ latent the denoiser starts from (before any start
    noise), the predicted clean latent (both in the denoiser's latent space) and the decoded image in [-1, 1],
    not clamped."""

    lq_latent: torch.Tensor
    clean_latent: torch.Tensor
    image: torch.Tensor


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser is conditioned on: a token sequence and, for SD3-style models, a pooled vector."""

    embeds: torch.Tensor | None
    pooled: torch.Tensor | None = None
    from_text: bool = False  # encoded from a prompt by the text encoders (not given, not the fixed embedding)
    image: torch.Tensor | None = None  # an image the denoiser is conditioned on (ResShift: the padded LR)

    @staticmethod
    def cat(conds: list[Conditioning]) -> Conditioning:
        """Several images' conditionings as one batch (rows in order)."""
        if len(conds) == 1:
            return conds[0]

        def rows(name: str) -> torch.Tensor | None:
            parts = [getattr(c, name) for c in conds]
            return None if parts[0] is None else torch.cat(parts)

        return Conditioning(rows("embeds"), rows("pooled"), conds[0].from_text, rows("image"))


@dataclass(frozen=True)
class CallInputs:
    """The arguments of one `__call__`, checked and normalised (one entry per image where it varies)."""

    images: list[LQImage]
    prompts: list[str]
    generators: list[torch.Generator | None]
    upscale: int
    color_fix: str
    latent_sampling: str
    output_type: str
    prompt_embeds: torch.Tensor | None
    pooled_prompt_embeds: torch.Tensor | None
    tiling: TilingOptions
    plans: list[TilingPlan]
    use_tagger: bool
    noise: torch.Tensor | None = None
    batch_size: int = 1


class Progress:
    """Drives the pipeline's progress bar and the user's callback; the callback may raise to cancel.

    `advance` after each unit of work; `tick` inside long units (every VAE tile, every denoiser block) calls the
    callback again with the same counts at most every `TICK_SECONDS`, so cancelling takes effect within about a
    second of work in every stage.
    """

    TICK_SECONDS = 0.25

    def __init__(self, bar, total: int, callback: Callable[[int, int], None] | None):
        self.bar, self.total, self.callback, self.done = bar, total, callback, 0
        self.last_call = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        self._call()

    def tick(self) -> None:
        if self.callback is not None and time.monotonic() - self.last_call >= self.TICK_SECONDS:
            self._call()

    def stage(self, units: int) -> StageReport:
        return StageReport(self.advance, self.tick, units)

    def _call(self) -> None:
        self.last_call = time.monotonic()
        if self.callback is not None:
            self.callback(self.done, self.total)


class OneStepSRBase(DiffusionPipeline, abc.ABC):
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A local pipeline folder (e.g. from `convert_to_diffusers`), validated before diffusers reads it: only
        known components of diffusers, transformers or this package, inside the folder, safetensors weights that
        match their configs, finite, config values in range (see loading/validation.py). Never downloads, never
        imports custom code."""
        from .loading.files import CheckpointError
        from .loading.validation import check_pipeline_folder, check_text_components, load_component

        for refused in ("custom_pipeline", "trust_remote_code", "custom_revision"):
            if kwargs.get(refused):
                raise ValueError(f"{refused}= is not supported: pipelines never import code from model folders")
        folder, components = check_pipeline_folder(pretrained_model_name_or_path, cls)
        dtype = kwargs.get("torch_dtype")
        for name, component_cls in components.items():
            if name not in kwargs:  # each component loaded and checked by us; diffusers only assembles them
                extra = {"torch_dtype": dtype} if dtype is not None and hasattr(component_cls, "dtype") else {}
                kwargs[name] = load_component(component_cls, folder, name, **extra)
        kwargs["local_files_only"] = True
        try:
            pipe = super().from_pretrained(folder, **kwargs)
        except CheckpointError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise CheckpointError(f"{folder}: could not be loaded as a {cls.__name__}: {err}") from err
        pipe.check_config(folder)  # (each component's weights were checked as it was loaded)
        check_text_components(pipe, folder)
        return pipe

    def check_config(self, source: Any) -> None:
        """Pipeline config values in the ranges the method allows (pipelines with a timestep override this)."""

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
        use_tagger: bool = True,
        noise: torch.Tensor | None = None,
        batch_size: int = 1,
    ) -> OneStepSROutput | tuple:
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
            use_tagger: with a `tagger` component (OSEDiff's DAPE), each image's prompt is the official
                f"{tags}, {prompt}," of the upsampled input; False uses `prompt` as given.
            noise: for pipelines that start from a noised latent (ResShift family): the latent-shaped eps to
                inject (one image) instead of drawing it from `generator`.
            batch_size: up to this many consecutive images of equal size that run untiled go through the model
                in one forward (faster on GPUs for small images; working memory grows with it, and a batch that
                would not fit is made smaller). Each image keeps its own generator's draws, so a batched image
                equals its unbatched run within the precision's tolerance.
        """
        # 0. Check every argument before any work, and plan each image's tiling once.
        inputs = self.check_inputs(
            image, prompt, upscale, color_fix, latent_sampling, generator, output_type, prompt_embeds,
            pooled_prompt_embeds, tile_size, tile_overlap, tile_batch_size, vae_tile_size, blend, use_tagger, noise,
            batch_size,
        )  # fmt: skip
        device = self._execution_device
        plans = inputs.plans

        results, used_prompts = [], []
        units = [
            (self.vae_units(p, "encode"), self.denoiser_calls * p.denoiser_tiles, self.vae_units(p, "decode"))
            for p in plans
        ]
        with self.progress_bar(total=sum(map(sum, units))) as bar:
            progress = Progress(bar, bar.total, progress_callback)
            # Images go one by one, or (batch_size > 1) in batches of equal-size untiled images; each image keeps
            # its own generator, so its draws do not depend on the batch it lands in.
            for batch in self.batches(plans, inputs.batch_size):
                lqs, plan = [inputs.images[i] for i in batch], plans[batch[0]]
                generators = [inputs.generators[i] for i in batch]
                generator = generators[0] if len(batch) == 1 else generators
                stage_units = [sum(units[i][stage] for i in batch) for stage in range(3)]
                # 1. Upsample to output size: the network itself never changes resolution.
                lq_ups = [self.upsample(lq, inputs.upscale) for lq in lqs]
                # 2. Pad to the latent grid (cropped away after decoding) and encode.
                padded, crops = zip(*(self.model_input(lq, up) for lq, up in zip(lqs, lq_ups)))
                report = progress.stage(stage_units[0])
                latents = self.encode(torch.cat(padded).to(device), inputs.latent_sampling, generator, plan, report)
                # 3. One denoising step from the LQ latent itself, tile by tile, conditioned on the prompt
                #    (the tags of the image the VAE encodes, once per image, when there is a tagger).
                tag = inputs.use_tagger and inputs.prompt_embeds is None
                conds = []
                for i, lq, lq_up in zip(batch, lqs, lq_ups):
                    prompt_i = self.image_prompt(lq_up, inputs.prompts[i], tag)
                    cond = self.encode_prompt(prompt_i, inputs.prompt_embeds, inputs.pooled_prompt_embeds, i, device)
                    used_prompts.append(prompt_i if cond.from_text else None)
                    conds.append(self.condition_on_image(cond, lq, device))
                cond = Conditioning.cat(conds)
                if self.runs_untiled(plan):
                    # 3-4 in one piece: the same differentiable forward that training calls
                    with self.heartbeat(progress.tick):
                        step = self.one_step_from_latents(latents, cond, inputs.noise, generator)
                    progress.advance(stage_units[1])
                    decoded = self.decode(step.clean_latent, plan, progress.stage(stage_units[2]), decoded=step.image)
                else:
                    latents = self.start_latents(latents, inputs.noise, generator)
                    with self.heartbeat(progress.tick):
                        clean = self.denoise(latents, cond, plan, on_tile=progress.advance, generator=generator)
                    decoded = self.decode(clean, plan, progress.stage(stage_units[2]))
                # 4. Crop the padding, colour-correct.
                for row, lq, lq_up, (height, width) in zip(decoded, lqs, lq_ups, crops):
                    sr = (row[None, :, :height, :width].float().cpu() * 0.5 + 0.5).clamp(0, 1)
                    sr = apply_color_fix(inputs.color_fix, sr, self.color_fix_source(inputs.color_fix, lq, lq_up))
                    if lq_up.alpha is not None:
                        sr = torch.cat([sr, lq_up.alpha], dim=1)
                    results.append(sr)

        output = postprocess(results, inputs.output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output,)
        return OneStepSROutput(images=output, prompts=used_prompts)

    # ------------------------------------------------------------------ the one-step forward

    def one_step(
        self,
        image: torch.Tensor,
        cond: Conditioning,
        latent_sampling: str = "mode",
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> OneStepResult:
        """The method's whole forward on a model-ready batch, differentiable end to end.

        image: the VAE's input, [B, 3, H, W] in [-1, 1] at output size (`model_input` of the upsampled LQ; H, W
            multiples of `pad_multiple`). cond: the denoiser's conditioning (`encode_prompt`/`text_conditioning`/
            `fixed_conditioning`, plus `condition_on_image` for methods that see the LR). Returns the LQ latent,
            the predicted clean latent and the decoded image in [-1, 1], NOT clamped, no colour fix, no tiling, no
            no_grad and no module dtype changes: what `__call__` computes untiled, and what training
            differentiates. `latent_sampling`/`generator`: the posterior mean or one draw; `noise`: methods that
            start from a noised latent (ResShift family) take their eps here (else drawn from `generator`).
        """
        if self.denoiser_calls != 1:
            raise ValueError(
                f"{self.display_name} runs {self.denoiser_calls} denoiser steps; one_step is the one-step forward"
            )
        lq_latent = self.encode(image, latent_sampling, generator)
        return self.one_step_from_latents(lq_latent, cond, noise, generator)

    def prepare_batch(self, lq: torch.Tensor) -> tuple[torch.Tensor, LQImage]:
        """A training batch's model input: LQ [B, 3, h, w] in [0, 1] -> (the VAE input in [-1, 1], padded to the
        latent grid; the LQ as an `LQImage` for `condition_on_image`). The SD methods take the LQ already at output
        size (as they train); the ResShift family takes the LR itself and upsamples it in `model_input`."""
        low = LQImage(rgb=lq)
        image, _ = self.model_input(low, low)
        return image, low

    def one_step_from_latents(
        self,
        lq_latent: torch.Tensor,
        cond: Conditioning,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> OneStepResult:
        """`one_step` after the encode: start state, one denoiser evaluation, x0, untiled decode."""
        start = self.start_latents(lq_latent, noise, generator)
        clean = self.denoise(start, cond, generator=generator)
        decoded = self._vae_decode(self.decoder_input(clean).to(self.vae.dtype), TilingPlan.untiled(), None)
        return OneStepResult(lq_latent=lq_latent, clean_latent=clean, image=decoded)

    def runs_untiled(self, plan: TilingPlan) -> bool:
        """Whether an image with this plan runs in one piece (then `__call__` goes through `one_step`)."""
        out_hw = tuple(n * self.vae_scale_factor for n in plan.latent_hw)
        one_tile = plan.tile_size is None or plan.denoiser_tiles == 1
        return one_tile and self.denoiser_calls == 1 and not needs_streaming(*out_hw, plan.vae_tile_size)

    # ------------------------------------------------------------------ checks and plans

    def check_inputs(
        self,
        image: Any,
        prompt: str | list[str],
        upscale: Any,
        color_fix: str | None,
        latent_sampling: str,
        generator: Any,
        output_type: str,
        prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        tile_size: Any,
        tile_overlap: Any,
        tile_batch_size: Any,
        vae_tile_size: Any,
        blend: str,
        use_tagger: bool = True,
        noise: torch.Tensor | None = None,
        batch_size: Any = 1,
    ) -> CallInputs:
        """Every argument checked in one place (clear errors before any work), normalised per image."""
        color_fix = self.defaults.color_fix if color_fix is None else color_fix
        if color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"color_fix must be one of {COLOR_FIX_METHODS}, got {color_fix!r}")
        if latent_sampling not in LATENT_SAMPLING_MODES:
            raise ValueError(f"latent_sampling must be one of {LATENT_SAMPLING_MODES}, got {latent_sampling!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        tiling = TilingOptions.validate(tile_size, tile_overlap, tile_batch_size, vae_tile_size, blend, self.defaults)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        # sizes first, from shapes alone: a hopeless size is refused before a large input is converted
        sizes = image_sizes(image)
        if sizes is not None:
            factor = self._check_factor(upscale, sizes)
            plans = [self._plan(tiling, hw, factor) for hw in sizes]
            self.check_memory(plans)
        images = load_images(image)
        factor = self._check_factor(upscale, [lq.size for lq in images])
        if sizes != [lq.size for lq in images]:  # input not understood from its shape alone
            plans = [self._plan(tiling, lq.size, factor) for lq in images]
            self.check_memory(plans)
        prompts = self._per_image(prompt, len(images), "prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a list of strings, got {prompt!r}")
        for p in prompts:
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"prompt {p!r} is not encodable text ({err.reason} at position {err.start})") from None
        generators = self._per_image(generator, len(images), "generator")
        for g in generators:
            if g is not None and not isinstance(g, torch.Generator):
                raise ValueError(f"generator must be a torch.Generator (or a list of them), got {type(g).__name__}")
        self.check_conditioning(prompts, prompt_embeds, pooled_prompt_embeds)
        if noise is not None and not self.accepts_noise:
            raise ValueError(f"{self.display_name} starts from the LQ latent itself and takes no noise=")
        if noise is not None and len(images) != 1:
            raise ValueError(f"noise= is one latent for one image; got {len(images)} images")
        tagging = bool(use_tagger) and self.tagger_component is not None and prompt_embeds is None
        if tagging and not self.has_text_encoders:
            raise ValueError("this pipeline has a tagger but no text encoder to encode its tags; pass use_tagger=False")
        return CallInputs(
            images=images,
            prompts=prompts,
            generators=generators,
            upscale=factor,
            color_fix=color_fix,
            latent_sampling=latent_sampling,
            output_type=output_type,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            tiling=tiling,
            plans=plans,
            use_tagger=bool(use_tagger),
            noise=noise,
            batch_size=batch_size,
        )

    def check_conditioning(
        self, prompts: list[str], prompt_embeds: torch.Tensor | None, pooled_prompt_embeds: torch.Tensor | None
    ) -> None:
        """Default: the denoiser takes no prompt (pipelines conditioned on text override this)."""
        if prompt_embeds is not None or pooled_prompt_embeds is not None or any(prompts):
            raise ValueError(f"{self.display_name} takes no prompt (its denoiser is conditioned on the LR image only)")

    def plan_tiling(
        self,
        latent_hw: tuple[int, int],
        tile_size: int | str | None = "auto",
        tile_overlap: int | str = "auto",
        tile_batch_size: int = 1,
        vae_tile_size: int | str | None = "auto",
        blend: str = "gaussian",
    ) -> TilingPlan:
        """The tiling plan `__call__` would use for a latent of this size (free memory is read now)."""
        options = TilingOptions.validate(tile_size, tile_overlap, tile_batch_size, vae_tile_size, blend, self.defaults)
        return plan_tiling(options, latent_hw, self.denoiser_facts, self._execution_device, self.tile_multiple)

    def _plan(self, options: TilingOptions, lq_hw: tuple[int, int], upscale: int) -> TilingPlan:
        return plan_tiling(
            options, self.latent_size(lq_hw, upscale), self.denoiser_facts, self._execution_device, self.tile_multiple
        )

    def _check_factor(self, upscale: Any, sizes: list[tuple[int, int]]) -> int:
        factors = {check_upscale(upscale, hw) for hw in sizes}
        if self.fixed_upscale is not None and factors != {self.fixed_upscale}:
            raise ValueError(f"{self.display_name} upscales by exactly {self.fixed_upscale}x (got upscale={upscale})")
        return factors.pop()

    def estimate_memory(self, plan: TilingPlan) -> RunEstimate:
        """Working memory of one image's run with this plan (bytes; the weights, already resident, not included).
        The one estimate used to refuse runs up front and to ask ComfyUI for memory (see tiling/memory.py)."""
        out_hw = tuple(n * self.vae_scale_factor for n in plan.latent_hw)
        denoiser = self.denoiser_facts.tile_bytes(plan.tile_size or max(plan.latent_hw), plan.batch_size)
        streamed = needs_streaming(*out_hw, plan.vae_tile_size)
        return estimate_run(out_hw, VAEFacts.of(self.vae), streamed, denoiser)

    def batches(self, plans: list[TilingPlan], batch_size: int) -> list[list[int]]:
        """Image indices in runs of at most `batch_size` consecutive images that can share one forward: the same
        plan (so the same latent size), untiled, and together within the device's free memory."""
        batches: list[list[int]] = []
        for i, plan in enumerate(plans):
            last = batches[-1] if batches else None
            if (
                last is not None
                and len(last) < batch_size
                and plans[last[0]] == plan
                and self.runs_untiled(plan)
                and fits(self.estimate_memory(plan).scaled(len(last) + 1), plan.device)
            ):
                last.append(i)
            else:
                batches.append([i])
        return batches

    def check_memory(self, plans: list[TilingPlan]) -> None:
        """Refuse, before any work, an image whose estimated peak cannot fit in the device's free memory."""
        for plan in plans:
            check_fits(self.estimate_memory(plan), plan.device, self.display_name)

    def latent_size(self, lq_hw: tuple[int, int], upscale: int) -> tuple[int, int]:
        """The denoiser's latent size for an input of this size (the padded output over the VAE factor)."""
        pad, f = self.pad_multiple, self.vae_scale_factor
        return tuple(-(-side * upscale // pad) * pad // f for side in lq_hw)

    # ------------------------------------------------------------------ what the method is

    @property
    def sr_method(self) -> Method | None:
        """The registered method that built this pipeline (from its config), if any."""
        return method_of(self)

    @property
    def defaults(self) -> TileDefaults:
        """The method's official colour fix and tiling, which "auto" and None resolve to."""
        method = self.sr_method
        return method.defaults if method is not None else GENERIC_DEFAULTS

    @property
    def display_name(self) -> str:
        method = self.sr_method
        return method.display_name if method is not None else type(self).__name__

    accepts_tagger = False  # pipelines with a `tagger` component (an image tagger writing the prompt) say True
    accepts_noise = False  # pipelines that start from a noised latent say True
    tile_multiple = 1  # denoiser tiles must be multiples of this many latent pixels
    denoiser_calls = 1  # denoiser evaluations per image (one step; multi-step samplers say more)
    fixed_upscale: int | None = None  # the only factor a model supports (its latent is tied to the LR size)
    channels_last = True  # convolution weights and maps in channels-last (faster; see README)

    @property
    def maps_channels_last(self) -> bool:
        """Whether the VAE's feature maps are made channels-last (the weights' format, by default)."""
        return self.channels_last

    @property
    def tagger_component(self):
        return getattr(self, "tagger", None) if self.accepts_tagger else None

    def image_prompt(self, lq_up: LQImage, prompt: str, use_tagger: bool) -> str:
        """The prompt for one image: with a tagger, the official f"{tags}, {prompt}," of the upsampled input."""
        tagger = self.tagger_component
        if tagger is None or not use_tagger:
            return prompt
        return tagger.prompt(lq_up.rgb, prompt)[0]

    @property
    def has_text_encoders(self) -> bool:
        """Whether free-text prompts can be encoded (else only the fixed prompt embedding is available)."""
        return getattr(self, "text_encoder", None) is not None and getattr(self, "tokenizer", None) is not None

    # ------------------------------------------------------------------ shared stages

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pad_multiple(self) -> int:
        """Images are padded to this multiple so the latent fits the denoiser's grid."""
        return self.vae_scale_factor

    @property
    def denoiser_facts(self) -> DenoiserFacts:
        return DenoiserFacts(width=self.denoiser_width, dtype=self.denoiser_dtype)

    def model_input(self, lq: LQImage, lq_up: LQImage) -> tuple[torch.Tensor, tuple[int, int]]:
        """The VAE's input in [-1, 1], padded to the latent grid, and the size to crop the output back to."""
        return pad_to_multiple(lq_up.rgb * 2 - 1, self.pad_multiple)

    def condition_on_image(self, cond: Conditioning, lq: LQImage, device: torch.device) -> Conditioning:
        """Add image conditioning (denoisers that see the LQ image itself override this)."""
        return cond

    def start_latents(
        self, latents: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The diffusion state the denoiser starts from: the LQ latent itself (one-step SD methods)."""
        return latents

    def encode(
        self,
        image: torch.Tensor,
        latent_sampling: str,
        generator: torch.Generator | None,
        plan: TilingPlan | None = None,
        report: StageReport | None = None,
    ) -> torch.Tensor:
        """[-1, 1] image -> the denoiser's latent (posterior mode, or one posterior draw)."""
        plan = plan or TilingPlan.untiled()
        posterior = vae_encode(self.vae, image.to(self.vae.dtype), plan, report)
        latents = posterior.mean
        if latent_sampling == "sample":
            noise = self.randn(latents.shape, generator)
            latents = latents + posterior.std * noise.to(latents.device, latents.dtype)
        return self.to_model_latents(latents)

    @abc.abstractmethod
    def denoise(
        self,
        latents: torch.Tensor,
        cond: Conditioning,
        plan: TilingPlan | None = None,
        on_tile: Callable[[int], None] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The start latent -> the clean latent: the method's sampler (one step, or its own steps), tile by tile
        with `run_denoiser` and `plan` (untiled when None), calling `on_tile` after each tile."""

    @staticmethod
    def run_denoiser(model: Callable, latents: torch.Tensor, plan: TilingPlan, on_tile) -> torch.Tensor:
        """model(latent tiles) over the plan's tiles, blended; out-of-memory halves the tile and retries."""

        def run(p: TilingPlan) -> torch.Tensor:
            return run_tiled(model, latents, p.tile_size, p.overlap, p.batch_size, p.blend, on_tile)

        return retry_on_oom(run, plan, halve_denoiser_tile, plan.device, "denoiser")

    def decode(
        self,
        latents: torch.Tensor,
        plan: TilingPlan | None = None,
        report: StageReport | None = None,
        decoded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoiser latent -> image in [-1, 1]; fp16/bf16 overflow falls back to an fp32 decode. Still non-finite
        (a NaN latent from the denoiser, or a broken VAE): a clear error naming the stage, never a NaN image.
        `decoded`: the decode already made (`one_step`'s image), checked and clamped the same way."""
        plan = plan or TilingPlan.untiled()
        if not all_finite(latents):
            raise NonFiniteOutputError(
                f"{self.display_name}: the denoiser produced non-finite latents (NaN/Inf) before decoding; "
                + NON_FINITE_HINT
            )
        latents = self.decoder_input(latents)
        if decoded is None:
            image = self._vae_decode(latents.to(self.vae.dtype), plan, report)
        else:
            image = decoded
            (report or StageReport()).finish()
        finite = all_finite(image)
        if not finite and self.vae.dtype != torch.float32:
            dtype = self.vae.dtype
            self.vae.to(torch.float32)
            try:
                image = self._vae_decode(latents.float(), plan, None)
            finally:
                self.vae.to(dtype)
            finite = all_finite(image)
        if not finite:
            raise NonFiniteOutputError(
                f"{self.display_name}: the VAE decode produced non-finite pixels (NaN/Inf) even in fp32; "
                + NON_FINITE_HINT
            )
        return image.clamp(-1, 1)

    vae_decode_kwargs: dict = {}  # extra arguments of the untiled vae.decode (VQ: force_not_quantize)

    def _vae_decode(self, latents: torch.Tensor, plan: TilingPlan, report: StageReport | None) -> torch.Tensor:
        return vae_decode(
            self.vae, latents, plan, self.vae_scale_factor, self.maps_channels_last, report, **self.vae_decode_kwargs
        )

    def vae_units(self, plan: TilingPlan, stage: str) -> int:
        """Progress units of the VAE encode or decode of an image with this plan."""
        return vae_units(self.vae, tuple(n * self.vae_scale_factor for n in plan.latent_hw), plan, stage)

    @property
    def denoiser_module(self) -> torch.nn.Module | None:
        return getattr(self, "unet", None) or getattr(self, "transformer", None)

    @contextmanager
    def heartbeat(self, tick: Callable[[], None]):
        """Call `tick` after every block of the denoiser while inside (cancellation within a tile). The hooks sit on
        the shared denoiser, so each fires only for forwards in the thread that entered: another call running the
        same pipeline in another thread never reports progress to, or is cancelled by, this call's callback."""
        module, handles, owner = self.denoiser_module, [], threading.get_ident()

        def hook(*_):
            if threading.get_ident() == owner:
                tick()

        if module is not None:
            for child in module.children():
                blocks = child if isinstance(child, torch.nn.ModuleList) else [child]
                handles += [b.register_forward_hook(hook) for b in blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def decoder_input(self, latents: torch.Tensor) -> torch.Tensor:
        """What the VAE decodes (default: the denoiser latent unscaled)."""
        return self.from_model_latents(latents)

    @staticmethod
    def randn(shape, generator: torch.Generator | list[torch.Generator | None] | None) -> torch.Tensor:
        """float32 normal noise on the generator's device: a CPU generator seeded S gives exactly what
        torch.manual_seed(S); torch.randn(shape) gives, as the official scripts draw it. A list: one generator per
        batch row, each row drawn as that image alone would draw it."""
        if isinstance(generator, list):
            rows = [OneStepSRBase.randn((1, *shape[1:]), g) for g in generator]
            return torch.cat([r.to(rows[0].device) for r in rows])
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    def encode_prompt(
        self,
        prompt: str,
        prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        index: int,
        device: torch.device,
    ) -> Conditioning:
        """Image `index`'s conditioning; default: none (check_conditioning refused any prompt)."""
        return Conditioning(None)

    def to_model_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.vae.config.scaling_factor

    def from_model_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.vae.config.scaling_factor

    def color_fix_source(self, method: str, lq: LQImage, lq_up: LQImage) -> torch.Tensor:
        """The reference image for the colour fix (default: the upsampled input, as OSEDiff)."""
        return lq_up.rgb

    # ------------------------------------------------------------------ what each pipeline defines

    @property
    @abc.abstractmethod
    def denoiser_width(self) -> int:
        """Channels per latent pixel of the denoiser's widest full-resolution stage (memory estimates)."""

    @property
    @abc.abstractmethod
    def denoiser_dtype(self) -> torch.dtype: ...

    @abc.abstractmethod
    def upsample(self, lq: LQImage, factor: int) -> LQImage:
        """The LQ image at output size, exactly as the method's official code computes it."""

    # ------------------------------------------------------------------ helpers

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


class PromptConditionedSRBase(OneStepSRBase):
    """Pipelines whose denoiser is conditioned on a prompt (text encoders, a fixed or learned prompt embedding, or
    given embeddings) and runs ONE evaluation, x0 following in closed form (the SD2.1 UNet and SD3 transformer
    families). Subclasses say how text is encoded, how the denoiser is called and what its output means."""

    def check_conditioning(
        self, prompts: list[str], prompt_embeds: torch.Tensor | None, pooled_prompt_embeds: torch.Tensor | None
    ) -> None:
        """Prompts need text encoders unless embeddings are given (or the prompt is empty and a fixed one exists);
        given embeddings must be finite and as wide as the denoiser's conditioning."""
        for name, embeds, width, ndim in (
            ("prompt_embeds", prompt_embeds, self.conditioning_width, 3),
            ("pooled_prompt_embeds", pooled_prompt_embeds, self.pooled_width, 2),
        ):
            if embeds is None:
                continue
            if not isinstance(embeds, torch.Tensor) or embeds.ndim != ndim or embeds.shape[-1] != width:
                shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
                raise ValueError(f"{name} must be a {ndim}-D tensor of width {width} for this denoiser, got {shape}")
            if not all_finite(embeds.float()):
                raise ValueError(f"{name} holds NaN or Inf values")
        if prompt_embeds is not None or pooled_prompt_embeds is not None or self.has_text_encoders:
            return
        if self.prompt_embedding is None:
            raise ValueError("this pipeline has no text encoder and no prompt embedding; pass prompt_embeds=")
        custom = next((p for p in prompts if p), None)
        if custom is not None:
            raise ValueError(
                f"this pipeline has no text encoder, so a custom prompt ({custom!r}) cannot be used; "
                "leave prompt empty to use the model's own prompt embedding"
            )

    def encode_prompt(
        self,
        prompt: str,
        prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        index: int,
        device: torch.device,
    ) -> Conditioning:
        """Image `index`'s conditioning: precomputed embeddings, else the fixed embedding for an empty prompt
        (when the pipeline has one), else the text encoders."""
        dtype = self.denoiser_dtype
        if prompt_embeds is not None:
            pooled = None if pooled_prompt_embeds is None else self._pick(pooled_prompt_embeds, index).to(device, dtype)
            return Conditioning(self._pick(prompt_embeds, index).to(device, dtype), pooled)
        if not self.has_text_encoders or (not prompt and self.prompt_embedding is not None):
            return self.fixed_conditioning(device, dtype)
        return self.encode_text(prompt, device, dtype)

    def text_conditioning(self, prompt: str) -> Conditioning:
        """The prompt through the text encoders even when it is empty (never the fixed embedding)."""
        if not self.has_text_encoders:
            raise ValueError(f"{self.display_name} here has no text encoder, so it cannot encode the prompt {prompt!r}")
        return self.encode_text(prompt, self._execution_device, self.denoiser_dtype)

    def denoise(
        self,
        latents: torch.Tensor,
        cond: Conditioning,
        plan: TilingPlan | None = None,
        on_tile: Callable[[int], None] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One denoiser evaluation (tile by tile, outputs blended), then x0 in closed form once."""
        plan = plan or TilingPlan.untiled(tuple(latents.shape[-2:]))
        model_output = self.run_denoiser(partial(self.model_output, cond=cond), latents, plan, on_tile)
        return self.predict_clean_latent(model_output, latents.float())

    def fixed_conditioning(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        """The pipeline's fixed/learned prompt embedding (check_conditioning made sure it exists)."""
        embeds, pooled = self.prompt_embedding.to_conditioning(device, dtype)
        return Conditioning(embeds, pooled)

    @property
    @abc.abstractmethod
    def conditioning_width(self) -> int:
        """The width of the token embeddings the denoiser attends to."""

    @property
    def pooled_width(self) -> int | None:
        """The width of the pooled embedding (SD3-style denoisers), else None."""
        return None

    @abc.abstractmethod
    def encode_text(self, prompt: str, device: torch.device, dtype: torch.dtype) -> Conditioning:
        """The prompt through the pipeline's text encoder(s) (only called when `has_text_encoders`)."""

    @abc.abstractmethod
    def model_output(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's raw output (eps, v, x0 or velocity) for a batch of latent tiles."""

    @abc.abstractmethod
    def predict_clean_latent(self, model_output: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x0 in closed form from the (blended) model output and the input latent."""
