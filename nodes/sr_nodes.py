"""The ComfyUI nodes (V3 API, `comfy_api.latest`): a schema and a few lines that call library code each.

Compatibility contract: node ids, input names (and their order: UI workflows store widget values by
position) and output types never change, so every shared workflow keeps loading.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from ..pipelines.images import MAX_OUTPUT_SIDE
from ..pipelines.methods import registered_methods
from ..pipelines.options import BLEND_MODES, COLOR_FIX_METHODS, DEVICE_NAMES, DTYPE_NAMES, LATENT_SAMPLING_MODES
from . import comfy_env
from .values import (
    NO_LORA,
    PIPE_TYPE,
    PROMPT_MODES,
    PROMPT_TYPE,
    SIZE_MODES,
    TAGGER_TYPE,
    TILE_OVERLAP,
    TILE_SIZE,
    TILES_TYPE,
    VAE_TILE_SIZE,
    SizeChoice,
    extract_prompts,
    load_sr_model,
    load_tagger_model,
    make_prompt,
    split,
    stitch,
    upscale_batch,
)

# Core ComfyUI lists model loaders under "loaders" (Load Upscale Model) and upscalers under "image/upscaling".
CATEGORY = "image/upscaling/one-step SR"
LOADERS_CATEGORY = "loaders/one-step SR"
SRPipe = io.Custom(PIPE_TYPE)
SRPrompt = io.Custom(PROMPT_TYPE)
SRTiles = io.Custom(TILES_TYPE)
SRTagger = io.Custom(TAGGER_TYPE)


def _method_names() -> str:
    return ", ".join(m.display_name for m in registered_methods())


def _placement_inputs(what: str) -> list:
    """The loaders' dtype and device widgets (the same names and choices on every loader)."""
    return [
        io.Combo.Input(
            "dtype",
            options=list(DTYPE_NAMES),
            default="auto",
            tooltip=f"Precision of {what}. auto: bf16 where the hardware runs it fast, else fp16 on GPUs, else fp32.",
        ),
        io.Combo.Input(
            "device",
            options=list(DEVICE_NAMES),
            default="auto",
            tooltip=f"Where {what} run. auto: ComfyUI's device; between runs they rest on its offload device.",
        ),
    ]


def _size_input(choice: SizeChoice, tooltip: str) -> io.Combo.Input:
    return io.Combo.Input(
        choice.name,
        options=choice.options,
        default="auto",
        tooltip=f"{tooltip} Any whole number from {choice.lowest} to {choice.highest} is accepted through the API.",
    )


class OneStepSRModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        bases, weights = comfy_env.list_base_models(), comfy_env.list_sr_weights()
        base_default, weights_default = comfy_env.preferred_pair(bases, weights)
        methods = registered_methods()
        return io.Schema(
            node_id="OneStepSRModelLoader",
            display_name="OSEDiff / TSD-SR / TAD-SR / D3SR Loader (one-step SR)",
            category=LOADERS_CATEGORY,
            description=f"Loads a base model plus one-step SR weights ({_method_names()}); the method is detected "
            "from the files. Cached by ComfyUI while the inputs stay the same."
            + "".join(f" {m.notice}" for m in methods if m.notice),
            inputs=[
                io.Combo.Input(
                    "base",
                    options=bases,
                    default=base_default,
                    tooltip="Base model (" + "; ".join(f"{m.display_name}: {m.base.name}" for m in methods) + "). "
                    "Diffusers folders from models/diffusers, single files from models/checkpoints.",
                ),
                io.Combo.Input(
                    "weights",
                    options=weights,
                    default=weights_default,
                    tooltip="SR weights from models/onestep_sr ("
                    + "; ".join(f"{m.display_name}: {m.default_weights}" for m in methods)
                    + ").",
                ),
                *_placement_inputs("the models"),
                io.Boolean.Input(
                    "fuse_lora",
                    default=True,
                    tooltip="Merge the LoRA into the weights (faster). Off keeps separate LoRA layers.",
                ),
            ],
            outputs=[SRPipe.Output(display_name="sr_model", tooltip="The loaded one-step SR pipeline.")],
        )

    @classmethod
    def execute(cls, base: str, weights: str, dtype: str, device: str, fuse_lora: bool) -> io.NodeOutput:
        return io.NodeOutput(load_sr_model(base, weights, dtype, device, fuse_lora))


class OneStepSRPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OneStepSRPrompt",
            display_name="One-step SR Prompt",
            category=CATEGORY,
            description="How the denoiser is conditioned: the weights' own default, your text, or the empty prompt. "
            "A STRING from any node (e.g. a captioner) can be connected to text_input.",
            inputs=[
                io.Combo.Input(
                    "mode",
                    options=list(PROMPT_MODES),
                    default="model default",
                    tooltip="model default: the weights' fixed/learned embedding if they have one, else the empty "
                    "prompt; text: the text below; none: the empty prompt through the text encoders (models with a "
                    "fixed embedding and no text encoders need 'model default').",
                ),
                io.String.Input(
                    "text",
                    default="",
                    multiline=True,
                    tooltip="Prompt text for mode 'text' (needs a model with text encoders).",
                ),
                io.String.Input(
                    "text_input",
                    optional=True,
                    force_input=True,
                    tooltip="Optional prompt from another node; when connected it is used as the text.",
                ),
            ],
            outputs=[
                SRPrompt.Output(
                    display_name="prompt", tooltip="Conditioning choice for One-step Super-Resolution Upscale."
                )
            ],
        )

    @classmethod
    def execute(cls, mode: str, text: str, text_input: str | None = None) -> io.NodeOutput:
        return io.NodeOutput(make_prompt(mode, text, text_input))


class OneStepSRUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OneStepSRUpscale",
            display_name="One-step Super-Resolution Upscale",
            category=CATEGORY,
            description=f"One-step diffusion super-resolution ({_method_names()}): upscales an image batch with one "
            "denoising step (items one at a time). RGBA: alpha is upscaled separately and re-attached; grayscale is "
            "treated as RGB. Progress and Cancel work in every stage.",
            inputs=[
                SRPipe.Input("sr_model", tooltip="From the OSEDiff / TSD-SR / TAD-SR / D3SR Loader."),
                io.Image.Input("image", tooltip="Images to upscale (any batch size)."),
                io.Int.Input(
                    "upscale",
                    default=4,
                    min=1,
                    max=8,
                    step=1,
                    tooltip="Scale factor: the output is exactly this many times the input size (with size_mode "
                    "'target long side', this many times the resized input).",
                ),
                io.Combo.Input(
                    "color_fix",
                    options=["auto", *COLOR_FIX_METHODS],
                    default="auto",
                    tooltip="Colour correction against the input. auto: the method's own.",
                ),
                _size_input(
                    TILE_SIZE,
                    "Denoiser tile size in latent pixels (x8 image pixels for SD, x4 for ResShift). auto: the method's "
                    "official size, smaller when free memory needs it.",
                ),
                _size_input(TILE_OVERLAP, "Denoiser tile overlap in latent pixels. auto: the method's default."),
                _size_input(
                    VAE_TILE_SIZE,
                    "VAE tile size in image pixels. auto: 512. Tiled VAE gives the untiled result (statistics are "
                    "pooled over the whole image).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**63 - 1,
                    control_after_generate=True,
                    tooltip="Only used where sampling draws noise: latent_sampling 'sample', and methods that add "
                    "noise to the input (ResShift, SinSR, TAD-SR). Batch item i uses seed + i. New nodes keep it "
                    "fixed, so a re-queue does not re-run the node.",
                ),
                io.Combo.Input(
                    "latent_sampling",
                    options=list(LATENT_SAMPLING_MODES),
                    default="mode",
                    tooltip="mode: deterministic; sample: a posterior draw, as the official code.",
                ),
                io.Int.Input(
                    "tile_batch_size",
                    default=1,
                    min=1,
                    max=64,
                    step=1,
                    tooltip="Denoiser tiles per model call (more is faster on big GPUs, uses more memory).",
                ),
                io.Combo.Input(
                    "blend",
                    options=list(BLEND_MODES),
                    default="gaussian",
                    tooltip="Weighting of overlapping denoiser tiles: gaussian (as upstream) or linear feather.",
                ),
                SRPrompt.Input(
                    "prompt",
                    optional=True,
                    tooltip="Optional conditioning from One-step SR Prompt (default: model default).",
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Optional transparency (a MASK, 1 = transparent, as Load Image gives): upscaled with the "
                    "image, it replaces the image's own alpha channel.",
                ),
                io.Combo.Input(
                    "size_mode",
                    options=list(SIZE_MODES),
                    default=SIZE_MODES[0],
                    optional=True,
                    tooltip="upscale factor: the output is upscale x the input. target long side: the input is "
                    "first resized (bicubic) so that the output's long side is target_long_side (rounded to a "
                    "multiple of upscale); the model still upscales by exactly upscale.",
                ),
                io.Int.Input(
                    "target_long_side",
                    default=2048,
                    min=16,
                    max=MAX_OUTPUT_SIDE,
                    step=8,
                    optional=True,
                    tooltip="Output long side in pixels for size_mode 'target long side' (ignored otherwise).",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The upscaled images (same channels as the input)."),
                io.Mask.Output(
                    display_name="mask",
                    tooltip="The upscaled transparency as a MASK (1 = transparent); all zeros for opaque inputs.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, tile_size, tile_overlap, vae_tile_size) -> bool | str:
        """The size widgets take "auto", a listed size, any whole number in range (API), or the 0/-1 that older
        workflows stored for auto: ComfyUI's list check is replaced by this one."""
        try:
            for choice, value in ((TILE_SIZE, tile_size), (TILE_OVERLAP, tile_overlap), (VAE_TILE_SIZE, vae_tile_size)):
                if value is not None:  # None: linked from another node, parsed when the node runs
                    choice.parse(value)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def execute(
        cls,
        sr_model,
        image,
        upscale: int,
        color_fix: str,
        tile_size,
        tile_overlap,
        vae_tile_size,
        seed: int,
        latent_sampling: str,
        tile_batch_size: int = 1,
        blend: str = "gaussian",
        prompt=None,
        mask=None,
        size_mode: str = SIZE_MODES[0],
        target_long_side: int = 2048,
    ) -> io.NodeOutput:
        if size_mode not in SIZE_MODES:
            raise ValueError(f"size_mode must be one of {', '.join(SIZE_MODES)}; got {size_mode!r}")
        images, masks = upscale_batch(
            sr_model,
            image,
            prompt,
            seed,
            mask,
            target_long_side=target_long_side if size_mode == "target long side" else None,
            upscale=upscale,
            color_fix=None if color_fix == "auto" else color_fix,
            latent_sampling=latent_sampling,
            tile_size=TILE_SIZE.parse(tile_size),
            tile_overlap=TILE_OVERLAP.parse(tile_overlap),
            vae_tile_size=VAE_TILE_SIZE.parse(vae_tile_size),
            tile_batch_size=tile_batch_size,
            blend=blend,
        )
        return io.NodeOutput(images, masks)


class OneStepSRTaggerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..pipelines.methods.dape import DAPE_FILE, RAM_FILE

        files = comfy_env.list_tagger_files()
        base_default = next((f for f in files if f.endswith(RAM_FILE.name)), files[0] if files else None)
        lora_default = next((f for f in files if f.endswith(DAPE_FILE.name)), NO_LORA)
        return io.Schema(
            node_id="OneStepSRTaggerLoader",
            display_name="DAPE Tagger Loader (OSEDiff prompts)",
            category=LOADERS_CATEGORY,
            description="Loads OSEDiff's prompt extractor: the RAM tagger plus the DAPE LoRA (merged), from "
            "models/onestep_sr or models/RAM.",
            inputs=[
                io.Combo.Input(
                    "tagger",
                    options=files,
                    default=base_default,
                    tooltip=f"The RAM base {RAM_FILE.name} ({RAM_FILE.source}), or a folder written by "
                    "`onestep_sr convert-tagger`.",
                ),
                io.Combo.Input(
                    "lora",
                    options=[NO_LORA, *files],
                    default=lora_default,
                    tooltip=f"The DAPE LoRA {DAPE_FILE.name} ({DAPE_FILE.source}); none for the plain RAM tagger "
                    "(or a converted folder, which has it merged).",
                ),
                *_placement_inputs("the tagger"),
                io.Boolean.Input(
                    "antialias",
                    default=False,
                    tooltip="Antialiased resize to 384 px (better for large inputs; the official tags are without it).",
                ),
            ],
            outputs=[SRTagger.Output(display_name="tagger", tooltip="The loaded DAPE/RAM tagger.")],
        )

    @classmethod
    def execute(cls, tagger: str, lora: str, dtype: str, device: str, antialias: bool) -> io.NodeOutput:
        return io.NodeOutput(load_tagger_model(tagger, lora, dtype, device, antialias))


class OneStepSRPromptExtractor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OneStepSRPromptExtractor",
            display_name="DAPE Prompt Extractor (OSEDiff tags)",
            category=CATEGORY,
            description="Tags each image as OSEDiff does (the image upsampled as the Upscale node will encode it) and "
            "builds the official prompt 'TAGS, USER PROMPT,'. For Split -> Upscale -> Stitch, give it the whole "
            "image: its prompt then applies to every tile.",
            inputs=[
                SRTagger.Input("tagger", tooltip="From the DAPE Tagger Loader."),
                io.Image.Input("image", tooltip="The images the Upscale node will get (tags per batch item)."),
                io.Int.Input(
                    "upscale",
                    default=4,
                    min=1,
                    max=8,
                    step=1,
                    tooltip="The Upscale node's factor: the tagger sees the image at that size, as upstream.",
                ),
                io.String.Input("user_prompt", default="", tooltip="Text after the tags: 'TAGS, USER PROMPT,'."),
            ],
            outputs=[
                SRPrompt.Output(
                    display_name="prompt", tooltip="Per-image prompts for One-step Super-Resolution Upscale."
                ),
                io.String.Output(display_name="tags", tooltip="The tags, one line per image (to show or edit)."),
            ],
        )

    @classmethod
    def execute(cls, tagger, image, upscale: int, user_prompt: str) -> io.NodeOutput:
        return io.NodeOutput(*extract_prompts(tagger, image, upscale, user_prompt))


class OneStepSRTileSplit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OneStepSRTileSplit",
            display_name="One-step SR Tile Split",
            category=CATEGORY,
            description="Splits images into overlapping tiles (one batch) so any node can process them; Tile Stitch "
            "puts them back.",
            inputs=[
                io.Image.Input("image", tooltip="Images to split."),
                io.Int.Input(
                    "tile_size",
                    default=512,
                    min=16,
                    max=8192,
                    step=8,
                    tooltip="Tile size in pixels (edge tiles are shifted inwards, so all tiles are equal).",
                ),
                io.Int.Input(
                    "overlap",
                    default=64,
                    min=0,
                    max=4096,
                    step=8,
                    tooltip="Overlap between neighbouring tiles in pixels (blended when stitching).",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="tiles", tooltip="All tiles as one batch."),
                SRTiles.Output(display_name="layout", tooltip="Where each tile goes, for Tile Stitch."),
            ],
        )

    @classmethod
    def execute(cls, image, tile_size: int, overlap: int) -> io.NodeOutput:
        return io.NodeOutput(*split(image, tile_size, overlap))


class OneStepSRTileStitch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OneStepSRTileStitch",
            display_name="One-step SR Tile Stitch",
            category=CATEGORY,
            description="Stitches a processed tile batch back with feathered blending; tiles may have been scaled by "
            "any integer factor.",
            inputs=[
                io.Image.Input("tiles", tooltip="The tiles from Tile Split, processed by any nodes, same order."),
                SRTiles.Input("layout", tooltip="The layout output of the Tile Split node."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The stitched images.")],
        )

    @classmethod
    def execute(cls, tiles, layout) -> io.NodeOutput:
        return io.NodeOutput(stitch(tiles, layout))


NODE_CLASSES: list[type[io.ComfyNode]] = [
    OneStepSRModelLoader,
    OneStepSRPrompt,
    OneStepSRUpscale,
    OneStepSRTileSplit,
    OneStepSRTileStitch,
    OneStepSRTaggerLoader,
    OneStepSRPromptExtractor,
]


class OneStepSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODE_CLASSES


async def comfy_entrypoint() -> ComfyExtension:
    return OneStepSRExtension()
