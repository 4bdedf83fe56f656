"""The values passed between the nodes, and the library calls the nodes make (no node schemas here).

ComfyUI services come from `comfy_env`; everything else is library code from `pipelines/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..pipelines.loading import resolve_device, resolve_dtype
from ..pipelines.methods import load_pipeline
from ..pipelines.options import DTYPES
from ..pipelines.tiling.tile_layout import TileLayout, split_tiles, stitch_tiles
from . import comfy_env

PIPE_TYPE = "ONESTEP_SR_PIPE"
PROMPT_TYPE = "ONESTEP_SR_PROMPT"
TILES_TYPE = "ONESTEP_SR_TILES"
# Working memory asked of ComfyUI on top of the model weights before a run on a GPU: the default tiles
# (96 latent px for SD2.1, 64 for SD3) and the streamed VAE's feature maps at ~2 MP stay under this.
WORKSPACE_BYTES = 3 << 30
PROMPT_MODES = ("model default", "text", "none")


@dataclass
class LoadedSR:
    """ONESTEP_SR_PIPE: a loaded pipeline and the device it runs on (it rests on ComfyUI's offload device)."""

    pipe: Any
    device: torch.device
    rest_device: torch.device

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
    **options: Any,
) -> torch.Tensor:
    """Each batch item through the pipeline in turn (bounded memory), on ComfyUI's progress bar."""
    image = check_image(image)
    pipe = sr_model.pipe
    spec = prompt or PromptSpec()
    comfy_env.free_memory_for(_modules(pipe), sr_model.device, WORKSPACE_BYTES)
    pipe.to(sr_model.device)
    try:
        batch = image.shape[0]
        report = comfy_env.progress_reporter(batch)
        outputs = []
        for i in range(batch):

            def progress(done, total, i=i):
                report(i * total + done, batch * total)

            chw = image[i].movedim(-1, 0).float().clamp(0, 1)
            generator = torch.Generator().manual_seed(seed + i)
            prompt_kwargs = spec.pipeline_kwargs(pipe, i, batch)
            result = pipe(
                chw, generator=generator, progress_callback=progress, output_type="pt", **prompt_kwargs, **options
            )
            outputs.append(result.images[0].movedim(0, -1).cpu())
    finally:
        pipe.to(sr_model.rest_device)
    return torch.stack(outputs)


def split(image: torch.Tensor, tile_size: int, overlap: int) -> tuple[torch.Tensor, TileLayout]:
    return split_tiles(check_image(image), tile_size, overlap)


def stitch(tiles: torch.Tensor, layout: Any) -> torch.Tensor:
    if not isinstance(layout, TileLayout):
        raise ValueError("layout: connect the ONESTEP_SR_TILES output of a Tile Split node")
    return stitch_tiles(check_image(tiles, "tiles"), layout).clamp(0, 1)


def _modules(pipe) -> list[torch.nn.Module]:
    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]


# ---------------------------------------------------------------------------- the DAPE tagger

TAGGER_TYPE = "ONESTEP_SR_TAGGER"


@dataclass
class LoadedTagger:
    """ONESTEP_SR_TAGGER: a loaded tagger and the device it runs on (it rests on ComfyUI's offload device)."""

    tagger: Any
    device: torch.device
    rest_device: torch.device


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
    tagger.to(loaded.device)
    try:
        tags = []
        for i in range(image.shape[0]):
            comfy_env.check_interrupted()
            (lq,) = load_images(image[i].movedim(-1, 0).float().clamp(0, 1))
            tags.extend(tagger.tags(upsample_pil_bicubic(lq, upscale).rgb))
    finally:
        tagger.to(loaded.rest_device)
    prompts = tuple(official_prompt(t, user_prompt) for t in tags)
    return PromptSpec("text", prompts[0], per_image=prompts), "\n".join(tags)
