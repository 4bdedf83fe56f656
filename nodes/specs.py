"""The nodes, described once: inputs with tooltips, outputs, and a thin `run` that calls library code.

`v3.py` turns these into ComfyUI V3 nodes, `v1.py` into V1 classes for older ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..pipelines.loading import DTYPES, load_pipeline, resolve_dtype
from ..pipelines.tile_layout import TileLayout, split_tiles, stitch_tiles
from . import comfy_env

CATEGORY = "image/upscaling/one-step SR"
PIPE_TYPE = "ONESTEP_SR_PIPE"
PROMPT_TYPE = "ONESTEP_SR_PROMPT"
TILES_TYPE = "ONESTEP_SR_TILES"
# Working memory asked of ComfyUI on top of the model weights before a run on a GPU: the default tiles
# (96 latent px for SD2.1, 64 for SD3) and the streamed VAE's feature maps at ~2 MP stay under this.
WORKSPACE_BYTES = 3 << 30


@dataclass
class Param:
    name: str
    kind: str  # IMAGE, INT, FLOAT, STRING, BOOLEAN, COMBO, or a custom type name
    tooltip: str
    default: Any = None
    options: list | Callable[[], list] | None = None
    min: int | None = None
    max: int | None = None
    step: int | None = None
    optional: bool = False
    multiline: bool = False
    force_input: bool = False
    control_after_generate: bool = False

    def choices(self) -> list:
        return self.options() if callable(self.options) else list(self.options or [])


@dataclass
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: list[Param]
    outputs: list[tuple[str, str, str]]  # (type, name, tooltip)
    run: Callable[..., tuple]

    def widget_names(self) -> list[str]:
        """Inputs shown as widgets, in order (what a UI workflow's widgets_values lists)."""
        return [p.name for p in self.inputs if p.kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") and not p.force_input]


# ---------------------------------------------------------------------------- values passed between nodes


@dataclass
class LoadedSR:
    """ONESTEP_SR_PIPE: a loaded pipeline and the device it runs on (it rests on ComfyUI's offload device)."""

    pipe: Any
    device: torch.device
    rest_device: torch.device

    @property
    def method(self) -> str:
        return "TSD-SR" if hasattr(self.pipe, "transformer") else "OSEDiff"


@dataclass(frozen=True)
class PromptSpec:
    """ONESTEP_SR_PROMPT: how the denoiser is conditioned. New modes (e.g. an image tagger) add a branch to `resolve`."""

    mode: str  # "model default" | "text" | "none"
    text: str = ""

    def resolve(self, image: torch.Tensor | None = None) -> str:
        if self.mode == "text":
            return self.text
        return ""  # "model default": the weights' own embedding if they have one, else the empty prompt


PROMPT_MODES = ["model default", "text", "none"]


# ---------------------------------------------------------------------------- run functions


def run_loader(base: str, weights: str, dtype: str, device: str, fuse_lora: bool) -> tuple:
    target = comfy_env.torch_device() if device == "auto" else torch.device(device)
    rest = comfy_env.offload_device() if device == "auto" else target
    chosen = resolve_dtype("auto" if dtype == "auto" else DTYPES[dtype], target)
    pipe = load_pipeline(comfy_env.resolve_base_model(base), comfy_env.resolve_sr_weights(weights), dtype=chosen,
                         device=rest, fuse_lora=fuse_lora)
    pipe.set_progress_bar_config(disable=True)  # progress goes to ComfyUI's bar instead
    return (LoadedSR(pipe, target, rest),)


def run_prompt(mode: str, text: str, text_input: str | None = None) -> tuple:
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, got {mode!r}")
    if text_input is not None:  # a STRING from another node (a captioner, a tagger) wins over the widget
        mode, text = "text", text_input
    return (PromptSpec(mode, text),)


def check_image(image: Any, name: str = "image") -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{name}: expected an IMAGE tensor, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: got shape {tuple(image.shape)}, which looks like a MASK (B, H, W); convert it with "
                         "'Convert Mask to Image' first")
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: expected an IMAGE (batch, height, width, 1/3/4 channels), got shape {tuple(image.shape)}")
    if image.shape[0] == 0:
        raise ValueError(f"{name}: the image batch is empty")
    return image


def run_upscale(sr_model: LoadedSR, image: torch.Tensor, upscale: int, color_fix: str, tile_size: int, tile_overlap: int,
                vae_tile_size: int, seed: int, latent_sampling: str, tile_batch_size: int = 1, blend: str = "gaussian",
                prompt: PromptSpec | None = None) -> tuple:
    sr = sr_model
    image = check_image(image)
    pipe = sr.pipe
    spec = prompt or PromptSpec("model default")
    if spec.mode == "none" and pipe.prompt_embedding is not None and getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"{sr.method} here has no text encoder: use the prompt mode 'model default'")
    options = dict(
        upscale=upscale, color_fix=None if color_fix == "auto" else color_fix, latent_sampling=latent_sampling,
        tile_size="auto" if tile_size == 0 else tile_size, tile_overlap="auto" if tile_overlap < 0 else tile_overlap,
        vae_tile_size="auto" if vae_tile_size == 0 else vae_tile_size, tile_batch_size=tile_batch_size,
        blend=blend, output_type="pt",
    )
    comfy_env.free_memory_for(_modules(pipe), sr.device, WORKSPACE_BYTES)
    pipe.to(sr.device)
    try:
        batch = image.shape[0]
        report = comfy_env.progress_reporter(batch)
        outputs = []
        for i in range(batch):  # one at a time: memory stays bounded whatever the batch size
            def progress(done, total, i=i):
                report(i * total + done, batch * total)

            chw = image[i].movedim(-1, 0).float().clamp(0, 1)
            result = pipe(chw, prompt=spec.resolve(image[i]), generator=torch.Generator().manual_seed(seed + i),
                          progress_callback=progress, **options).images
            outputs.append(result[0].movedim(0, -1).cpu())
    finally:
        pipe.to(sr.rest_device)
    return (torch.stack(outputs),)


def _modules(pipe) -> list[torch.nn.Module]:
    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]


def run_split(image: torch.Tensor, tile_size: int, overlap: int) -> tuple:
    tiles, layout = split_tiles(check_image(image), tile_size, overlap)
    return tiles, layout


def run_stitch(tiles: torch.Tensor, layout: TileLayout) -> tuple:
    if not isinstance(layout, TileLayout):
        raise ValueError("layout: connect the ONESTEP_SR_TILES output of a Tile Split node")
    return (stitch_tiles(check_image(tiles, "tiles"), layout).clamp(0, 1),)


# ---------------------------------------------------------------------------- the nodes

TILE_HELP = "latent pixels (x8 image pixels for SD); 0 = automatic (from free memory; the method's official size)"

NODES = [
    NodeSpec(
        "OneStepSRModelLoader", "One-step SR Model Loader",
        "Loads a base model plus one-step SR weights (OSEDiff osediff.pkl, or a TSD-SR folder); the format is "
        "detected from the files. Cached by ComfyUI while the inputs stay the same.",
        [
            Param("base", "COMBO", "Base model: SD2.1-base for OSEDiff, SD3-medium for TSD-SR. Diffusers folders from "
                  "models/diffusers, single files from models/checkpoints.", options=lambda: comfy_env.list_base_models()),
            Param("weights", "COMBO", "SR weights from models/onestep_sr: osediff.pkl, or a folder holding the TSD-SR "
                  "transformer.safetensors, vae.safetensors, prompt_embeds.pt and pool_embeds.pt.",
                  options=lambda: comfy_env.list_sr_weights()),
            Param("dtype", "COMBO", "Precision. auto: bf16 where the hardware runs it fast, else fp16 on GPUs, else fp32.",
                  default="auto", options=["auto", "fp32", "bf16", "fp16"]),
            Param("device", "COMBO", "Where the models run. auto: ComfyUI's device; they rest on its offload device "
                  "between runs.", default="auto", options=["auto", "cpu", "cuda"]),
            Param("fuse_lora", "BOOLEAN", "Merge the LoRA into the weights (faster). Off keeps separate LoRA layers.",
                  default=True),
        ],
        [(PIPE_TYPE, "sr_model", "The loaded one-step SR pipeline.")],
        run_loader,
    ),
    NodeSpec(
        "OneStepSRPrompt", "One-step SR Prompt",
        "How the denoiser is conditioned: the weights' own default, your text, or no prompt. A STRING from any "
        "node (e.g. a captioner) can be connected to text_input.",
        [
            Param("mode", "COMBO", "model default: the weights' fixed/learned embedding (TSD-SR) or the empty prompt "
                  "(OSEDiff); text: the text below; none: the empty prompt.", default="model default", options=PROMPT_MODES),
            Param("text", "STRING", "Prompt text for mode 'text' (needs a model with text encoders).", default="",
                  multiline=True),
            Param("text_input", "STRING", "Optional prompt from another node; when connected it is used as the text.",
                  optional=True, force_input=True),
        ],
        [(PROMPT_TYPE, "prompt", "Conditioning choice for One-step SR Upscale.")],
        run_prompt,
    ),
    NodeSpec(
        "OneStepSRUpscale", "One-step SR Upscale",
        "Upscales an image batch with one denoising step (items one at a time). RGBA: alpha is upscaled separately "
        "and re-attached; grayscale is treated as RGB. Cancel stops between tiles.",
        [
            Param("sr_model", PIPE_TYPE, "From One-step SR Model Loader."),
            Param("image", "IMAGE", "Images to upscale (any batch size)."),
            Param("upscale", "INT", "Scale factor: the output is exactly this many times the input size.", default=4,
                  min=1, max=8, step=1),
            Param("color_fix", "COMBO", "Colour correction against the input. auto: the method's own (adain for "
                  "OSEDiff, wavelet for TSD-SR).", default="auto", options=["auto", "adain", "wavelet", "none"]),
            Param("tile_size", "INT", "Denoiser tile size in " + TILE_HELP, default=0, min=0, max=512, step=8),
            Param("tile_overlap", "INT", "Denoiser tile overlap in latent pixels; -1 = the method's default.",
                  default=-1, min=-1, max=256, step=1),
            Param("vae_tile_size", "INT", "VAE tile size in image pixels; 0 = automatic (512). Tiled VAE gives the "
                  "untiled result (statistics are pooled over the whole image).", default=0, min=0, max=4096, step=64),
            Param("seed", "INT", "Seed for latent_sampling 'sample' (batch item i uses seed + i).", default=0, min=0,
                  max=2**63 - 1, control_after_generate=True),
            Param("latent_sampling", "COMBO", "mode: deterministic; sample: a posterior draw, as the official code.",
                  default="mode", options=["mode", "sample"]),
            Param("tile_batch_size", "INT", "Denoiser tiles per model call (more is faster on big GPUs, uses more memory).",
                  default=1, min=1, max=64, step=1),
            Param("blend", "COMBO", "Weighting of overlapping denoiser tiles: gaussian (as upstream) or linear feather.",
                  default="gaussian", options=["gaussian", "linear"]),
            Param("prompt", PROMPT_TYPE, "Optional conditioning from One-step SR Prompt (default: model default).",
                  optional=True),
        ],
        [("IMAGE", "image", "The upscaled images.")],
        run_upscale,
    ),
    NodeSpec(
        "OneStepSRTileSplit", "One-step SR Tile Split",
        "Splits images into overlapping tiles (one batch) so any node can process them; Tile Stitch puts them back.",
        [
            Param("image", "IMAGE", "Images to split."),
            Param("tile_size", "INT", "Tile size in pixels (edge tiles are shifted inwards, so all tiles are equal).",
                  default=512, min=16, max=8192, step=8),
            Param("overlap", "INT", "Overlap between neighbouring tiles in pixels (blended when stitching).",
                  default=64, min=0, max=4096, step=8),
        ],
        [("IMAGE", "tiles", "All tiles as one batch."), (TILES_TYPE, "layout", "Where each tile goes, for Tile Stitch.")],
        run_split,
    ),
    NodeSpec(
        "OneStepSRTileStitch", "One-step SR Tile Stitch",
        "Stitches a processed tile batch back with feathered blending; tiles may have been scaled by any integer factor.",
        [
            Param("tiles", "IMAGE", "The tiles from Tile Split, processed by any nodes, same order."),
            Param("layout", TILES_TYPE, "The layout output of the Tile Split node."),
        ],
        [("IMAGE", "image", "The stitched images.")],
        run_stitch,
    ),
]
