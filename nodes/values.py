"""The values passed between the nodes, and the library calls the nodes make (no node schemas here).

ComfyUI services come from `comfy_env`; everything else is library code from `pipelines/`.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch

from ..pipelines.images import input_size_for_long_side, resize_planes
from ..pipelines.loading import resolve_device, resolve_dtype
from ..pipelines.methods import load_pipeline
from ..pipelines.options import DTYPES
from ..pipelines.tiling.tile_layout import TileLayout, split_tiles, stitch_tiles
from . import comfy_env

PIPE_TYPE = "ONESTEP_SR_PIPE"
PROMPT_TYPE = "ONESTEP_SR_PROMPT"
TILES_TYPE = "ONESTEP_SR_TILES"
PROMPT_MODES = ("model default", "text", "none")
SIZE_MODES = ("upscale factor", "target long side")


@dataclass(frozen=True)
class SizeChoice:
    """A tile-size widget: "auto" or a size, offered as a list of common sizes.

    Workflows saved by earlier versions stored these as numbers, "auto" being 0 (sizes) or -1 (overlap);
    `parse` still reads them (as the UI extension does, nodes/web), and any whole number in range is accepted
    from the API, listed or not."""

    name: str
    sizes: tuple[int, ...]
    lowest: int
    highest: int
    legacy_auto_below: int  # stored numbers below this meant "auto"

    @property
    def options(self) -> list[str]:
        return ["auto", *map(str, self.sizes)]

    def parse(self, value: Any) -> str | int:
        """ "auto" or the size as an int; ValueError naming the widget and what it takes."""
        number = value
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "auto":
                return "auto"
            number = int(text) if text.lstrip("-").isdigit() else None
        if isinstance(number, bool) or not isinstance(number, int):
            raise ValueError(
                f"{self.name}: expected 'auto' or a whole number from {self.lowest} to {self.highest}, got {value!r}"
            )
        if number < self.legacy_auto_below:
            return "auto"
        if not self.lowest <= number <= self.highest:
            raise ValueError(f"{self.name}: {number} is outside {self.lowest}..{self.highest} (or 'auto')")
        return number


# latent pixels for the denoiser (x8 image pixels for SD, x4 for ResShift); image pixels for the VAE
TILE_SIZE = SizeChoice("tile_size", (32, 48, 64, 80, 96, 128, 192, 256, 384, 512), 8, 512, legacy_auto_below=1)
TILE_OVERLAP = SizeChoice("tile_overlap", (0, 4, 8, 16, 24, 32, 48, 64, 96, 128), 0, 256, legacy_auto_below=0)
VAE_TILE_SIZE = SizeChoice(
    "vae_tile_size", (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096), 64, 4096, legacy_auto_below=1
)


@dataclass
class LoadedSR:
    """ONESTEP_SR_PIPE: a loaded pipeline and the device it runs on (it rests on ComfyUI's offload device)."""

    pipe: Any
    device: torch.device
    rest_device: torch.device
    patchers: list | None = None  # ComfyUI ModelPatchers of the pipeline's modules, made at the first run

    @property
    def method(self) -> str:
        return self.pipe.display_name


@dataclass(frozen=True)
class PromptSpec:
    """ONESTEP_SR_PROMPT: how the denoiser is conditioned.

    "model default": the weights' fixed/learned embedding if they have one, else the empty prompt;
    "text": `text` through the text encoders; "none": the empty prompt through the text encoders
    (never the fixed embedding), an error for a model without text encoders.
    """

    mode: str = "model default"
    text: str = ""
    per_image: tuple[str, ...] = ()  # "text" mode from the Prompt Extractor: one prompt per batch item

    def pipeline_kwargs(self, pipe, index: int = 0, count: int = 1) -> dict[str, Any]:
        """The prompt arguments for the pipeline's __call__ on batch item `index` of `count`."""
        if self.per_image:
            if len(self.per_image) not in (1, count):
                raise ValueError(
                    f"the prompt holds {len(self.per_image)} per-image prompts but the image batch has {count} "
                    "items; give the Prompt Extractor the same batch (or a single image for all items)"
                )
            text = self.per_image[index if len(self.per_image) == count else 0]
            return {"prompt": text, "use_tagger": False}  # the tags are in the text already
        if self.mode == "text":
            return {"prompt": self.text}
        if self.mode == "none":
            if not pipe.has_text_encoders:
                raise ValueError(
                    f"{pipe.display_name} here has no text encoder, so it has no empty-prompt conditioning: "
                    "use the prompt mode 'model default'"
                )
            cond = pipe.text_conditioning("")
            return {"prompt_embeds": cond.embeds, "pooled_prompt_embeds": cond.pooled}
        return {"prompt": ""}


def placement(dtype: str, device: str) -> tuple[torch.dtype, torch.device, torch.device]:
    """(dtype, device to run on, device to rest on) from the loader widgets; "auto" follows ComfyUI."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    target = comfy_env.torch_device() if device == "auto" else resolve_device(device)
    rest = comfy_env.offload_device() if device == "auto" else target
    return resolve_dtype("auto" if dtype == "auto" else DTYPES[dtype], target), target, rest


def load_sr_model(base: str, weights: str, dtype: str, device: str, fuse_lora: bool) -> LoadedSR:
    """The pipeline, resting on its offload device; ComfyUI's model management moves it (see comfy_env.load_models)."""
    chosen, target, rest = placement(dtype, device)
    pipe = load_pipeline(
        comfy_env.resolve_base_model(base),
        comfy_env.resolve_sr_weights(weights),
        dtype=chosen,
        device=rest,
        fuse_lora=fuse_lora,
    )
    pipe.set_progress_bar_config(disable=True)  # progress goes to ComfyUI's bar instead
    return LoadedSR(pipe, target, rest)


def make_prompt(mode: str, text: str, text_input: str | None = None) -> PromptSpec:
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, got {mode!r}")
    if text_input is not None:  # a STRING from another node (a captioner, a tagger) wins over the widget
        mode, text = "text", text_input
    return PromptSpec(mode, text)


def check_image(image: Any, name: str = "image") -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{name}: expected an IMAGE tensor, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{name}: got shape {tuple(image.shape)}, which looks like a MASK (B, H, W); convert it with "
            "'Convert Mask to Image' first"
        )
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{name}: expected an IMAGE (batch, height, width, 1/3/4 channels), got shape {tuple(image.shape)}"
        )
    if image.shape[0] == 0:
        raise ValueError(f"{name}: the image batch is empty")
    return image


def upscale_batch(
    sr_model: LoadedSR,
    image: torch.Tensor,
    prompt: PromptSpec | None,
    seed: int,
    mask: torch.Tensor | None = None,
    target_long_side: int | None = None,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each batch item through the pipeline in turn (bounded memory), on ComfyUI's progress bar.

    Returns (images, masks): the images keep the input's channel count (RGBA stays RGBA); the masks are ComfyUI
    MASKs (1 = transparent, as LoadImage's) of the upscaled alpha: the image's own alpha channel, or `mask`
    when one is connected (it then replaces the alpha), else all zeros. With `target_long_side` the images (and
    mask) are first resized so that the output's long side is that many pixels (see input_size_for_long_side).
    """
    image = check_image(image)
    mask = check_mask(mask, image) if mask is not None else None
    if target_long_side is not None:
        image, mask = resize_batch_for_long_side(image, mask, options.get("upscale", 4), target_long_side)
    pipe = sr_model.pipe
    spec = prompt or PromptSpec()
    batch = image.shape[0]
    with release_on_failure():
        comfy_env.load_models(sr_model, _memory_needed(pipe, image, options))
        report = comfy_env.progress_reporter(batch)
        outputs, masks = [], []
        for i in range(batch):

            def progress(done, total, i=i):
                report(i * total + done, batch * total)

            chw = image[i].movedim(-1, 0).float().clamp(0, 1)
            if mask is not None:
                alpha = 1 - mask[i if mask.shape[0] == batch else 0].float().clamp(0, 1)
                chw = torch.cat([chw[:3] if chw.shape[0] >= 3 else chw[:1].expand(3, -1, -1), alpha[None]])
            generator = torch.Generator().manual_seed(seed + i)
            prompt_kwargs = spec.pipeline_kwargs(pipe, i, batch)
            result = pipe(
                chw, generator=generator, progress_callback=progress, output_type="pt", **prompt_kwargs, **options
            ).images[0]
            masks.append(1 - result[3] if result.shape[0] == 4 else torch.zeros(result.shape[-2:]))
            keep = 4 if image.shape[-1] == 4 else 3
            outputs.append(result[:keep].movedim(0, -1).cpu())
            del result
    return torch.stack(outputs), torch.stack(masks).cpu()


def resize_batch_for_long_side(
    image: torch.Tensor, mask: torch.Tensor | None, upscale: int, long_side: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """IMAGE (and MASK) batches resized so that `upscale` x them has the long side `long_side`."""
    size = input_size_for_long_side(tuple(image.shape[1:3]), upscale, long_side)
    image = resize_planes(image.movedim(-1, 1).float(), size).movedim(1, -1)
    mask = None if mask is None else resize_planes(mask[:, None].float(), size)[:, 0]
    return image, mask


def check_mask(mask: Any, image: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask: expected a MASK tensor, got {type(mask).__name__}")
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.ndim != 3 or tuple(mask.shape[1:]) != tuple(image.shape[1:3]):
        raise ValueError(
            f"mask: expected a MASK of the image's size (batch, {image.shape[1]}, {image.shape[2]}), got shape "
            f"{tuple(mask.shape)}"
        )
    if mask.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"mask: batch of {mask.shape[0]} for {image.shape[0]} images; give one mask or one per image")
    return mask


def _memory_needed(pipe, image: torch.Tensor, options: dict[str, Any]) -> int:
    """Working memory of the largest batch item's run (the pipelines' own estimate, see tiling/memory.py)."""
    tiling = {
        k: options[k]
        for k in ("tile_size", "tile_overlap", "tile_batch_size", "vae_tile_size", "blend")
        if k in options
    }
    latent_hw = pipe.latent_size(tuple(image.shape[1:3]), options.get("upscale", 4))
    return pipe.estimate_memory(pipe.plan_tiling(latent_hw, **tiling)).peak


@contextmanager
def release_on_failure():
    """On failure, re-raise without the frames that hold the run's tensors, and give their memory back.

    The ComfyUI server keeps a failed node's exception and traceback (to show it); frames deep in the pipeline
    reference the large intermediate tensors, which would stay alive until the next failure. The message and
    type are kept; the traceback is cut here."""
    try:
        yield
    except BaseException as err:
        tb = err.__traceback__
        err.__traceback__, err.__context__, err.__cause__ = None, None, None
        while tb is not None:  # drop the locals of every finished frame below (the tensors)
            with suppress(RuntimeError):  # frames still running (the caller's) cannot be cleared
                tb.tb_frame.clear()
            tb = tb.tb_next
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise err.with_traceback(None) from None


def split(image: torch.Tensor, tile_size: int, overlap: int) -> tuple[torch.Tensor, TileLayout]:
    return split_tiles(check_image(image), tile_size, overlap)


def stitch(tiles: torch.Tensor, layout: Any) -> torch.Tensor:
    if not isinstance(layout, TileLayout):
        raise ValueError("layout: connect the ONESTEP_SR_TILES output of a Tile Split node")
    return stitch_tiles(check_image(tiles, "tiles"), layout).clamp(0, 1)


# ---------------------------------------------------------------------------- the DAPE tagger

TAGGER_TYPE = "ONESTEP_SR_TAGGER"


@dataclass
class LoadedTagger:
    """ONESTEP_SR_TAGGER: a loaded tagger and the device it runs on (it rests on ComfyUI's offload device)."""

    tagger: Any
    device: torch.device
    rest_device: torch.device
    patchers: list | None = None  # as LoadedSR's


def load_tagger_model(base: str, lora: str, dtype: str, device: str, antialias: bool) -> LoadedTagger:
    from ..pipelines.methods.dape import load_tagger

    chosen, target, rest = placement(dtype, device)
    lora_path = None if lora == NO_LORA else comfy_env.resolve_tagger_file(lora)
    tagger = load_tagger(comfy_env.resolve_tagger_file(base), lora_path, dtype=chosen, device=rest, antialias=antialias)
    return LoadedTagger(tagger, target, rest)


NO_LORA = "none"


def extract_prompts(
    loaded: LoadedTagger, image: torch.Tensor, upscale: int, user_prompt: str
) -> tuple[PromptSpec, str]:
    """Tags of each batch item as the Upscale node will encode it (upsampled by `upscale` as OSEDiff does), and
    the official per-image prompts f"{tags}, {user_prompt},"; the tags come back one line per item."""
    from ..pipelines.images import load_images, upsample_pil_bicubic
    from ..pipelines.models.ram_tagger import official_prompt

    image = check_image(image)
    tagger = loaded.tagger
    with release_on_failure():
        comfy_env.load_models(loaded, 0)
        tags = []
        for i in range(image.shape[0]):
            comfy_env.check_interrupted()
            (lq,) = load_images(image[i].movedim(-1, 0).float().clamp(0, 1))
            tags.extend(tagger.tags(upsample_pil_bicubic(lq, upscale).rgb))
    prompts = tuple(official_prompt(t, user_prompt) for t in tags)
    return PromptSpec("text", prompts[0], per_image=prompts), "\n".join(tags)
