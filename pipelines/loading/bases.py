"""Base models from local files: SD2.x and SD3 diffusers folders, or single files read with bundled configs."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..options import SINGLE_FILE_SUFFIXES
from .files import CheckpointError, MappedPages, read_weight_keys
from .lean import build_with_weights
from .validation import load_component

CONFIG_DIR = Path(__file__).parent / "configs"
SD21_BASE_CONFIG = CONFIG_DIR / "sd21-base"
SD3_MEDIUM_CONFIG = CONFIG_DIR / "sd3-medium"


def load_sd_base(
    base: str | os.PathLike,
    config: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    needed_by: str = "these weights",
) -> dict[str, Any]:
    """Components of an SD2.x base model: a diffusers folder, or a single-file checkpoint.

    Single files are read offline with the SD2.1-base configs bundled in this package
    (or `config`, a diffusers folder without weights).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = Path(base)
    if base.is_dir():
        if not (base / "unet").is_dir() or not (base / "vae").is_dir():
            what = "an SD3 folder (transformer/)" if (base / "transformer").is_dir() else "not a diffusers model folder"
            raise CheckpointError(
                f"{base}: {what}; {needed_by} need an SD2.1-base diffusers folder (unet/ and vae/ subfolders)"
            )
        # loading straight into the target dtype keeps peak memory at one copy of the weights
        components = {
            "unet": load_component(UNet2DConditionModel, base, "unet", torch_dtype=dtype),
            "vae": load_component(AutoencoderKL, base, "vae", torch_dtype=dtype),
            # SD2.1 folders name a PNDM scheduler; only its alphas and prediction type are read.
            "scheduler": load_component(DDPMScheduler, base, "scheduler"),
        }
        if (base / "text_encoder").is_dir() and (base / "tokenizer").is_dir():
            components["text_encoder"] = load_component(CLIPTextModel, base, "text_encoder", torch_dtype=dtype)
            components["tokenizer"] = load_component(CLIPTokenizer, base, "tokenizer")
        return components
    if base.is_file() and base.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return _load_sd_single_file(base, Path(config) if config else SD21_BASE_CONFIG, dtype, needed_by)
    if not base.exists():
        raise CheckpointError(f"base model not found: {base}")
    raise CheckpointError(f"{base}: expected a diffusers folder or a single-file checkpoint {SINGLE_FILE_SUFFIXES}")


def _load_sd_single_file(path: Path, config: Path, dtype: torch.dtype, needed_by: str) -> dict[str, Any]:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    _check_single_file_is_sd2(path, needed_by)
    try:
        with quiet_diffusers():
            pipe = StableDiffusionPipeline.from_single_file(
                str(path),
                config=str(config),
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
                torch_dtype=dtype,
            )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: could not be read as an SD2.1 checkpoint: {err}") from err
    return {
        "unet": pipe.unet,
        "vae": pipe.vae,
        # the prediction type comes from our config, not from diffusers' guess for single files
        "scheduler": DDPMScheduler.from_pretrained(config, subfolder="scheduler", local_files_only=True),
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
    }


def _check_single_file_is_sd2(path: Path, needed_by: str) -> None:
    """SD2.x keeps its OpenCLIP text encoder under cond_stage_model.model.*; SD1.x uses CLIP ViT-L, SDXL a
    conditioner."""
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    state = read_weight_keys(path)
    if key not in state:
        raise CheckpointError(f"{path}: not a Stable Diffusion 1/2 checkpoint (no {key}); {needed_by} need SD2.1-base")
    if "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in state:
        raise CheckpointError(f"{path}: this is an SDXL checkpoint; {needed_by} need SD2.1-base")
    if not any(k.startswith("cond_stage_model.model.") for k in state):
        raise CheckpointError(
            f"{path}: this is an SD1.x checkpoint (CLIP ViT-L text encoder); {needed_by} need SD2.1-base"
        )


def load_sd3_base(
    base: str | os.PathLike, config: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Components of an SD3-family base: a diffusers folder (text encoders optional) or a single file."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    base = Path(base)
    kw = {"local_files_only": True, "torch_dtype": dtype}
    if base.is_dir():
        if not (base / "transformer").is_dir() or not (base / "vae").is_dir():
            raise CheckpointError(f"{base}: not an SD3 diffusers folder (expected transformer/ and vae/ subfolders)")
        components = {
            "transformer": load_component(SD3Transformer2DModel, base, "transformer", torch_dtype=dtype),
            "vae": load_component(AutoencoderKL, base, "vae", torch_dtype=dtype),
            "scheduler": load_component(FlowMatchEulerDiscreteScheduler, base, "scheduler"),
        }
        components.update(_load_sd3_text_encoders(base, dtype))
        return components
    if base.is_file() and base.suffix.lower() in SINGLE_FILE_SUFFIXES:
        config = Path(config) if config else SD3_MEDIUM_CONFIG
        keys = read_weight_keys(base)
        if not any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys):
            raise CheckpointError(f"{base}: not an SD3 checkpoint (no model.diffusion_model.joint_blocks.* keys)")
        try:
            with quiet_diffusers():
                transformer = SD3Transformer2DModel.from_single_file(
                    str(base), config=str(config), subfolder="transformer", **kw
                )
                vae = AutoencoderKL.from_single_file(str(base), config=str(config), subfolder="vae", **kw)
            return {
                "transformer": transformer,
                "vae": vae,
                "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(
                    config, subfolder="scheduler", local_files_only=True
                ),
            }
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{base}: could not be read as an SD3 checkpoint: {err}") from err
    if not base.exists():
        raise CheckpointError(f"base model not found: {base}")
    raise CheckpointError(
        f"{base}: expected an SD3 diffusers folder or a single-file checkpoint {SINGLE_FILE_SUFFIXES}"
    )


def _load_sd3_text_encoders(base: Path, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The SD3 text encoders, when the folder has them (needed only for custom prompts), read in `dtype`."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    found: dict[str, Any] = {}
    for suffix, cls in (("", CLIPTextModelWithProjection), ("_2", CLIPTextModelWithProjection), ("_3", T5EncoderModel)):
        enc, tok = base / f"text_encoder{suffix}", base / f"tokenizer{suffix}"
        if enc.is_dir() and tok.is_dir():
            found[f"text_encoder{suffix}"] = load_component(cls, base, enc.name, torch_dtype=dtype)
            found[f"tokenizer{suffix}"] = load_component(AutoTokenizer, base, tok.name)
    if ("text_encoder" in found) != ("text_encoder_2" in found):
        found = {k: v for k, v in found.items() if k.endswith("_3")}
    return found if "text_encoder" in found else {}


@contextmanager
def quiet_diffusers():
    """diffusers warns about "modules to keep in float32" on every cast, even when that list is empty."""
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


# ---------------------------------------------------------------------------- VQGAN-f4 (ResShift family)


# ResShift's released autoencoder_vq_f4.pth (ch 128, ch_mult [1, 2, 4], 8192 codes of 3 channels; 55,322,782
# parameters), as a diffusers VQModel config: what a full-size model is built from without a file.
RESSHIFT_VQ_F4_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(128, 256, 512),
    layers_per_block=2,
    latent_channels=3,
    num_vq_embeddings=8192,
    vq_embed_dim=3,
    norm_num_groups=32,
    scaling_factor=1.0,
)


def vq_config_from_ldm(state: dict[str, Any], path) -> dict[str, Any]:
    """diffusers `VQModel` config read from an LDM-layout VQGAN checkpoint's shapes."""
    try:
        levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
        blocks = {k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")}
        return dict(
            in_channels=state["encoder.conv_in.weight"].shape[1],
            out_channels=state["decoder.conv_out.weight"].shape[0],
            down_block_types=("DownEncoderBlock2D",) * len(levels),
            up_block_types=("UpDecoderBlock2D",) * len(levels),
            block_out_channels=tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels),
            layers_per_block=len(blocks),
            latent_channels=state["encoder.conv_out.weight"].shape[0],
            num_vq_embeddings=state["quantize.embedding.weight"].shape[0],
            vq_embed_dim=state["quant_conv.weight"].shape[0],
            norm_num_groups=32,
            scaling_factor=1.0,
        )
    except (KeyError, IndexError, ValueError) as err:
        raise CheckpointError(f"{path}: not an LDM VQGAN checkpoint (missing or malformed {err})") from err


def vq_state_from_ldm(state: dict[str, Any], levels: int) -> dict[str, Any]:
    """LDM VQGAN key names -> diffusers VQModel names (decoder levels reversed, attention 1x1 convs -> linears)."""
    attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    out = {}
    for key, value in state.items():
        new = key
        new = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", new)
        new = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", new)
        m = re.match(r"^decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.*)$", new)
        if m:
            level = levels - 1 - int(m.group(1))
            inner = f"resnets.{m.group(3)}" if m.group(3) is not None else "upsamplers.0"
            new = f"decoder.up_blocks.{level}.{inner}.{m.group(4)}"
        new = re.sub(r"\.mid\.block_1\.", ".mid_block.resnets.0.", new)
        new = re.sub(r"\.mid\.block_2\.", ".mid_block.resnets.1.", new)
        m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", new)
        if m:
            new = f"{m.group(1)}.mid_block.attentions.0.{attn[m.group(2)]}.{m.group(3)}"
            if m.group(2) != "norm" and value.ndim == 4:
                value = value[:, :, 0, 0]
        new = new.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")
        out[new] = value
    return out


def load_vq_f4(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """ResShift's VQGAN-f4 (`autoencoder_vq_f4.pth`, LDM layout) as a diffusers `VQModel`, keys checked strictly."""
    from diffusers import VQModel

    from .files import read_weights

    path = Path(path)
    if path.is_dir():  # a diffusers VQModel folder (e.g. the vae/ of a converted pipeline)
        config = path / "config.json"
        if not config.is_file() or '"VQModel"' not in config.read_text(encoding="utf-8"):
            raise CheckpointError(
                f"{path}: not a VQ autoencoder (a VQModel folder or autoencoder_vq_f4.pth); the ResShift family needs "
                "autoencoder_vq_f4.pth as its base"
            )
        return load_component(VQModel, path, torch_dtype=dtype)
    state = read_weights(path)
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {_strip_wrappers(k): v for k, v in state.items()}
    if "quantize.embedding.weight" not in state:
        raise CheckpointError(
            f"{path}: not a VQGAN autoencoder (no quantize.embedding.weight); the ResShift family needs "
            "autoencoder_vq_f4.pth as its base"
        )
    config = vq_config_from_ldm(state, path)
    converted = vq_state_from_ldm(state, len(config["block_out_channels"]))
    return build_with_weights(lambda: VQModel(**config), converted, dtype, path, "VQGAN", MappedPages(path))


def _strip_wrappers(key: str) -> str:
    """`module.` (DataParallel) and `_orig_mod.` (torch.compile) prefixes, as the official loaders strip them."""
    key = key[len("module.") :] if key.startswith("module.") else key
    return key.replace("_orig_mod.", "")
