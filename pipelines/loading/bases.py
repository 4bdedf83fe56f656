"""Base models from local files: SD2.x and SD3 diffusers folders, or single files read with bundled configs."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..options import SINGLE_FILE_SUFFIXES
from .files import CheckpointError, read_weight_keys

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
        kw = {"local_files_only": True}
        # loading straight into the target dtype keeps peak memory at one copy of the weights
        components = {
            "unet": UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=dtype, **kw),
            "vae": AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=dtype, **kw),
            # SD2.1 folders name a PNDM scheduler; only its alphas and prediction type are read.
            "scheduler": DDPMScheduler.from_pretrained(base, subfolder="scheduler", **kw),
        }
        if (base / "text_encoder").is_dir() and (base / "tokenizer").is_dir():
            components["text_encoder"] = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **kw)
            components["tokenizer"] = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **kw)
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
            "transformer": SD3Transformer2DModel.from_pretrained(base, subfolder="transformer", **kw),
            "vae": AutoencoderKL.from_pretrained(base, subfolder="vae", **kw),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(
                base, subfolder="scheduler", local_files_only=True
            ),
        }
        components.update(_load_sd3_text_encoders(base))
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


def _load_sd3_text_encoders(base: Path) -> dict[str, Any]:
    """The SD3 text encoders, when the folder has them (needed only for custom prompts)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    found: dict[str, Any] = {}
    for suffix, cls in (("", CLIPTextModelWithProjection), ("_2", CLIPTextModelWithProjection), ("_3", T5EncoderModel)):
        enc, tok = base / f"text_encoder{suffix}", base / f"tokenizer{suffix}"
        if enc.is_dir() and tok.is_dir():
            found[f"text_encoder{suffix}"] = cls.from_pretrained(enc, local_files_only=True)
            found[f"tokenizer{suffix}"] = AutoTokenizer.from_pretrained(tok, local_files_only=True)
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
