"""Building ready-to-run pipelines from a base model and official SR weights (local files only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .checkpoints import CheckpointError, detect_format, parse_osediff, read_weight_keys, read_weights
from .lora import apply_lora, replace_weights

CONFIG_DIR = Path(__file__).parent / "configs"
SD21_BASE_CONFIG = CONFIG_DIR / "sd21-base"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".sft", ".pt", ".pth", ".bin")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_device(device: Any) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """None -> float32; "auto" -> bf16 where it runs fast (CUDA with bf16, CPUs with AMX/AVX512-BF16), else fp16 on CUDA, else fp32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and _cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be 'auto', 'fp32', 'bf16', 'fp16' or a torch.dtype, got {dtype!r}")


def _cpu_has_fast_bf16() -> bool:
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def load_sd_base(
    base: str | os.PathLike, config: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
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
            raise CheckpointError(f"{base}: not a diffusers model folder (expected unet/ and vae/ subfolders)")
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
        return _load_sd_single_file(base, Path(config) if config else SD21_BASE_CONFIG, dtype)
    if not base.exists():
        raise CheckpointError(f"base model not found: {base}")
    raise CheckpointError(f"{base}: expected a diffusers folder or a single-file checkpoint {SINGLE_FILE_SUFFIXES}")


def _load_sd_single_file(path: Path, config: Path, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    _check_single_file_is_sd2(path)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, safety_checker=None, requires_safety_checker=False,
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


def _check_single_file_is_sd2(path: Path) -> None:
    """SD2.x keeps its OpenCLIP text encoder under cond_stage_model.model.*; SD1.x uses CLIP ViT-L, SDXL a conditioner."""
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    state = read_weight_keys(path)
    if key not in state:
        raise CheckpointError(f"{path}: not a Stable Diffusion 1/2 checkpoint (no {key}); OSEDiff needs SD2.1-base")
    if "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in state:
        raise CheckpointError(f"{path}: this is an SDXL checkpoint; OSEDiff needs SD2.1-base")
    if not any(k.startswith("cond_stage_model.model.") for k in state):
        raise CheckpointError(f"{path}: this is an SD1.x checkpoint (CLIP ViT-L text encoder); OSEDiff needs SD2.1-base")


def load_pipeline(
    base: str | os.PathLike,
    weights: str | os.PathLike,
    dtype: Any = None,
    device: Any = None,
    fuse_lora: bool = True,
    base_config: str | os.PathLike | None = None,
):
    """A ready pipeline from a base model and official SR weights, format detected from the file's keys.

    Args:
        base: SD2.1-base diffusers folder, or single-file checkpoint (.safetensors/.ckpt).
        weights: the official SR weights, e.g. `osediff.pkl`.
        dtype: None (fp32), "auto", "fp32", "bf16", "fp16" or a torch dtype.
        device: None (stay on CPU), "auto", or any torch device string.
        fuse_lora: merge the LoRA into the base weights (default: faster, no peft layers remain);
            False keeps peft LoRA layers (inspectable, can be disabled or unfused).
        base_config: configs for a single-file base (default: bundled SD2.1-base configs).
    """
    from .pipeline_onestep_sr import OneStepSRPipeline

    device = resolve_device(device) if device is not None else torch.device("cpu")
    dtype = resolve_dtype(dtype, device)
    state = read_weights(weights)
    fmt = detect_format(state, weights)
    if fmt == "osediff":
        sr = parse_osediff(state, weights)
        components = load_sd_base(base, base_config, dtype)
        source = str(weights)
        # conv_in is retrained in full: replace the base layer first, then add its LoRA on top.
        replace_weights(components["unet"], sr.unet_replacements, source)
        apply_lora(components["unet"], sr.unet_lora, fuse=fuse_lora, adapter_name="osediff", source=source)
        apply_lora(components["vae"], sr.vae_lora, fuse=fuse_lora, adapter_name="osediff", source=source)
        pipe = OneStepSRPipeline(**components, timestep=999)
    else:  # pragma: no cover - detect_format only returns known names
        raise CheckpointError(f"{weights}: format {fmt!r} is not supported by load_pipeline")
    return prepare_for_inference(pipe, device, dtype)


def prepare_for_inference(pipe, device: torch.device, dtype: torch.dtype):
    """Eval mode, device, dtype, and channels-last convolution weights (measured faster: see README)."""
    from diffusers.utils import logging as diffusers_logging

    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        if module is not None:
            module.eval()
    pipe.to(device)
    # diffusers warns about "modules to keep in float32" even when that list is empty
    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.to(dtype=dtype)  # the text encoder, and anything loaded in another dtype
    finally:
        diffusers_logging.set_verbosity(previous)
    for module in (pipe.unet, pipe.vae):
        module.to(memory_format=torch.channels_last)
    return pipe


def convert_to_diffusers(base, weights, out_dir, base_config=None) -> Path:
    """Write a self-contained diffusers folder (safetensors, LoRA fused) for `OneStepSRPipeline.from_pretrained`.

    The LoRA is fused first: saving a model that still holds peft layers writes wrapped keys
    that reload as random weights, and a separate LoRA file without metadata reloads at the
    wrong scale (OSEDiff's alpha/r is 2, not 1).
    """
    pipe = load_pipeline(base, weights, fuse_lora=True, base_config=base_config)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
