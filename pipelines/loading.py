"""Building ready-to-run pipelines from a base model and official SR weights (local files only)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .checkpoints import (
    CheckpointError,
    detect_format,
    parse_osediff,
    parse_tsdsr_lora,
    read_tsdsr_embeddings,
    read_weight_keys,
    read_weights,
)
from .lora import apply_lora, replace_weights

CONFIG_DIR = Path(__file__).parent / "configs"
SD21_BASE_CONFIG = CONFIG_DIR / "sd21-base"
SD3_MEDIUM_CONFIG = CONFIG_DIR / "sd3-medium"
TSDSR_FILES = ("transformer.safetensors", "vae.safetensors")
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
            what = "an SD3 folder (transformer/)" if (base / "transformer").is_dir() else "not a diffusers model folder"
            raise CheckpointError(
                f"{base}: {what}; these weights need an SD2.1-base diffusers folder (unet/ and vae/ subfolders)"
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
        return _load_sd_single_file(base, Path(config) if config else SD21_BASE_CONFIG, dtype)
    if not base.exists():
        raise CheckpointError(f"base model not found: {base}")
    raise CheckpointError(f"{base}: expected a diffusers folder or a single-file checkpoint {SINGLE_FILE_SUFFIXES}")


def _load_sd_single_file(path: Path, config: Path, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    _check_single_file_is_sd2(path)
    try:
        with quiet_diffusers():
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(config), local_files_only=True, safety_checker=None,
                requires_safety_checker=False, torch_dtype=dtype,
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
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler", local_files_only=True),
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
                transformer = SD3Transformer2DModel.from_single_file(str(base), config=str(config), subfolder="transformer", **kw)
                vae = AutoencoderKL.from_single_file(str(base), config=str(config), subfolder="vae", **kw)
            return {
                "transformer": transformer,
                "vae": vae,
                "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(config, subfolder="scheduler", local_files_only=True),
            }
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{base}: could not be read as an SD3 checkpoint: {err}") from err
    if not base.exists():
        raise CheckpointError(f"base model not found: {base}")
    raise CheckpointError(f"{base}: expected an SD3 diffusers folder or a single-file checkpoint {SINGLE_FILE_SUFFIXES}")


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


def identify_weights(weights: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """("osediff", {"state": ...}) or ("tsdsr", {"transformer": state, "vae": state, "dir": folder})."""
    path = Path(weights)
    if path.is_dir():
        missing = [name for name in TSDSR_FILES if not (path / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{path}: a weights folder must hold the TSD-SR LoRA files {TSDSR_FILES}; missing {missing}. "
                "For OSEDiff pass the osediff.pkl file itself."
            )
        path = path / TSDSR_FILES[0]
    state = read_weights(path)
    fmt = detect_format(state, path)
    if fmt == "osediff":
        return fmt, {"state": state}
    if fmt == "tsdsr-vae":
        raise CheckpointError(
            f"{path}: this is the TSD-SR VAE LoRA; pass the folder holding transformer.safetensors and "
            "vae.safetensors, or the transformer file (with vae.safetensors beside it)"
        )
    vae_path = path.parent / TSDSR_FILES[1]
    if not vae_path.is_file():
        raise CheckpointError(f"{path}: TSD-SR needs its VAE-encoder LoRA too; expected {vae_path}")
    vae_state = read_weights(vae_path)
    if detect_format(vae_state, vae_path) != "tsdsr-vae":
        raise CheckpointError(f"{vae_path}: not a TSD-SR VAE LoRA (keys transformer.encoder.*.lora_A.weight expected)")
    return "tsdsr", {"transformer": state, "vae": vae_state, "dir": path.parent, "files": (path, vae_path)}


def find_tsdsr_embeddings(weights_dir: Path, embeddings: str | os.PathLike | None):
    if embeddings is not None:
        return read_tsdsr_embeddings(embeddings)
    for candidate in (weights_dir, weights_dir / "embeddings"):
        if (candidate / "prompt_embeds.pt").is_file() or (candidate / "embeddings.safetensors").is_file():
            return read_tsdsr_embeddings(candidate)
    raise CheckpointError(
        f"TSD-SR prompt embeddings not found beside the weights ({weights_dir} or {weights_dir / 'embeddings'}): "
        "put the official prompt_embeds.pt and pool_embeds.pt there, or pass embeddings=FOLDER_OR_FILE"
    )


def load_pipeline(
    base: str | os.PathLike,
    weights: str | os.PathLike,
    dtype: Any = None,
    device: Any = None,
    fuse_lora: bool = True,
    base_config: str | os.PathLike | None = None,
    embeddings: str | os.PathLike | None = None,
):
    """A ready pipeline from a base model and official SR weights, format detected from the files' keys.

    Args:
        base: the base model as a diffusers folder or single-file checkpoint (.safetensors/.ckpt):
            SD2.1-base for OSEDiff, SD3-medium for TSD-SR.
        weights: the official SR weights: `osediff.pkl`; or for TSD-SR the folder holding
            `transformer.safetensors` and `vae.safetensors` (or the transformer file, the VAE file beside it).
        dtype: None (fp32), "auto", "fp32", "bf16", "fp16" or a torch dtype.
        device: None (stay on CPU), "auto", or any torch device string.
        fuse_lora: merge the LoRA into the base weights (default: faster, no peft layers remain);
            False keeps peft LoRA layers (inspectable, can be disabled or unfused).
        base_config: configs for a single-file base (default: the bundled SD2.1-base / SD3-medium configs).
        embeddings: TSD-SR prompt embeddings: a folder with prompt_embeds.pt + pool_embeds.pt, or one
            safetensors file with both; looked for beside the weights when not given.
    """
    device = resolve_device(device) if device is not None else torch.device("cpu")
    dtype = resolve_dtype(dtype, device)
    fmt, found = identify_weights(weights)
    if fmt == "tsdsr":
        pipe = _build_tsdsr(base, found, dtype, fuse_lora, base_config, embeddings)
    else:
        pipe = _build_osediff(base, found["state"], weights, dtype, fuse_lora, base_config)
    return prepare_for_inference(pipe, device, dtype)


def _build_osediff(base, state, weights, dtype, fuse_lora, base_config):
    from .pipeline_onestep_sr import OneStepSRPipeline

    sr = parse_osediff(state, weights)
    components = load_sd_base(base, base_config, dtype)
    source = str(weights)
    # conv_in is retrained in full: replace the base layer first, then add its LoRA on top.
    replace_weights(components["unet"], sr.unet_replacements, source)
    apply_lora(components["unet"], sr.unet_lora, fuse=fuse_lora, adapter_name="osediff", source=source)
    apply_lora(components["vae"], sr.vae_lora, fuse=fuse_lora, adapter_name="osediff", source=source)
    return OneStepSRPipeline(**components, timestep=999)


def _build_tsdsr(base, found, dtype, fuse_lora, base_config, embeddings):
    from .pipeline_onestep_sr_sd3 import OneStepSRSD3Pipeline
    from .prompt_embedding import PromptEmbedding

    embeds, pooled = find_tsdsr_embeddings(found["dir"], embeddings)
    components = load_sd3_base(base, base_config, dtype)
    transformer_file, vae_file = found["files"]
    apply_lora(components["transformer"], parse_tsdsr_lora(found["transformer"], transformer_file),
               fuse=fuse_lora, adapter_name="tsdsr", source=str(transformer_file))
    apply_lora(components["vae"], parse_tsdsr_lora(found["vae"], vae_file), fuse=fuse_lora,
               adapter_name="tsdsr", source=str(vae_file))
    _check_embeddings_fit(embeds, pooled, components["transformer"], embeddings or found["dir"])
    # TSD-SR: t = 1000 (sigma 1), latents scaled by 1.5305 WITHOUT the shift factor, as it was trained
    return OneStepSRSD3Pipeline(**components, prompt_embedding=PromptEmbedding.from_tensors(embeds, pooled),
                                timestep=1000.0, use_shift_factor=False)


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


def prepare_for_inference(pipe, device: torch.device, dtype: torch.dtype):
    """Eval mode, device, dtype, and channels-last convolution weights (measured faster: see README)."""
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval()
    pipe.to(device)
    with quiet_diffusers():
        pipe.to(dtype=dtype)  # the text encoders, and anything loaded in another dtype
    for name in ("unet", "transformer", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(memory_format=torch.channels_last)
    return pipe


def _check_embeddings_fit(embeds: torch.Tensor, pooled: torch.Tensor, transformer, source) -> None:
    cfg = transformer.config
    if embeds.shape[-1] != cfg.joint_attention_dim or pooled.shape[-1] != cfg.pooled_projection_dim:
        raise CheckpointError(
            f"{source}: prompt embeddings {tuple(embeds.shape)} / pooled {tuple(pooled.shape)} do not fit the base "
            f"transformer (joint_attention_dim {cfg.joint_attention_dim}, pooled_projection_dim {cfg.pooled_projection_dim})"
        )


def convert_to_diffusers(base, weights, out_dir, base_config=None, embeddings=None) -> Path:
    """Write a self-contained diffusers folder (safetensors, LoRA fused) for `OneStepSRPipeline.from_pretrained`.

    The LoRA is fused first: saving a model that still holds peft layers writes wrapped keys
    that reload as random weights, and a separate LoRA file without metadata reloads at the
    wrong scale (OSEDiff's alpha/r is 2, not 1). Load the folder with the pipeline class the
    method uses (OneStepSRPipeline for OSEDiff, OneStepSRSD3Pipeline for TSD-SR).
    """
    pipe = load_pipeline(base, weights, fuse_lora=True, base_config=base_config, embeddings=embeddings)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
