"""D3SR / DFOSD (JianzeLi-114/D3SR, arXiv 2410.04224): SD2.1-base UNet with LoRA (rank 16, alpha 16), a learned prompt
embedding in place of the text encoder, ONE step at an intermediate timestep T_L from the LQ latent, frozen VAE.

Neither code nor weights were released: every D3SR checkpoint is one trained with this package (`objective: d3sr`),
unofficial. Its file is ours: `d3sr.safetensors` with the generator's LoRA factors (`unet.<module>.lora_A.weight`,
`...lora_B.weight`), the prompt embedding (`prompt_embeds`, 1 x 77 x 1024) and, in the header's metadata, the format
tag, T_L and the LoRA settings (rank, alpha, target modules).

The paper fixes the rank and alpha (16) and says "only the UNet is fine-tuned using LoRA" without naming layers; the
targets here are OSEDiff's on the same UNet (attention projections, the ResNet and sampler convolutions, the
transformer blocks' projections and feed-forwards). T_L is not given either: the default 500 (alpha_bar = 0.28 in
SD2.1's schedule) treats the LQ latent as a half-noised state, so x0 = (z - 0.85 eps) / 0.53: a moderate correction
whose error is amplified 1.9x, where t = 999 (OSEDiff) amplifies it 14.6x. It is stored in every checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..loading.bases import load_sd_base
from ..loading.files import CheckpointError, WeightsProbe
from ..loading.lora import LoRAWeights, apply_lora
from ..models.prompt_embedding import PromptEmbedding
from ..options import TileDefaults
from ..pipeline_onestep_sr import OneStepSRPipeline
from .osediff import METHOD as OSEDIFF
from .registry import BuildOptions, Method, WeightFile, register

FORMAT = "onestep-sr/d3sr"
VERSION = 1
ADAPTER = "d3sr"
DEFAULT_TIMESTEP = 500
DEFAULT_RANK = DEFAULT_ALPHA = 16
TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
                  "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj")  # fmt: skip
UNOFFICIAL = (
    "D3SR has no released weights: a D3SR checkpoint is one trained with this package (unofficial; "
    "python -m onestep_sr train with objective: d3sr)."
)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's header metadata ({} for other files or none)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # (a corrupt header is reported by the loader that reads it)
        return {}


def detect(probe: WeightsProbe) -> bool:
    return not probe.is_dir and read_metadata(probe.path).get("format") == FORMAT


def parse_settings(metadata: dict[str, str], path) -> dict:
    """T_L and the LoRA settings from the header, checked."""
    try:
        version = int(metadata.get("version", "0"))
        timestep, rank = int(metadata["timestep"]), int(metadata["lora_rank"])
        alpha = float(metadata["lora_alpha"])
        targets = json.loads(metadata["target_modules"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: malformed D3SR header ({err}); expected one written by this package") from err
    if version > VERSION:
        raise CheckpointError(f"{path}: D3SR file version {version} is newer than this package reads ({VERSION})")
    if not 1 <= rank <= 4096 or not alpha > 0 or not isinstance(targets, list):
        raise CheckpointError(f"{path}: D3SR LoRA rank {rank} / alpha {alpha} / targets {targets!r} out of range")
    return {"timestep": timestep, "rank": rank, "alpha": alpha, "target_modules": targets}


def build(base: str | os.PathLike, probe: WeightsProbe, options: BuildOptions) -> OneStepSRPipeline:
    settings = parse_settings(read_metadata(probe.path), probe.path)
    state = probe.state()
    embeds = state.get("prompt_embeds")
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
        raise CheckpointError(f"{probe.path}: no prompt_embeds (1 x tokens x width) in this D3SR file")
    factors = {}
    for key, value in state.items():
        if key.startswith("unet.") and key.endswith(".lora_A.weight"):
            module = key[len("unet.") : -len(".lora_A.weight")]
            b = state.get(f"unet.{module}.lora_B.weight")
            if b is None:
                raise CheckpointError(f"{probe.path}: {key} has no lora_B partner; the file looks truncated")
            factors[module] = (value, b)
    components = load_sd_base(base, options.base_config, options.dtype, needed_by="D3SR weights")
    components.pop("text_encoder", None), components.pop("tokenizer", None)  # (a learned embedding replaces it)
    unet = components["unet"]
    if embeds.shape[-1] != unet.config.cross_attention_dim:
        raise CheckpointError(
            f"{probe.path}: the prompt embedding's width {embeds.shape[-1]} does not fit the UNet's cross-attention "
            f"({unet.config.cross_attention_dim}); wrong base for these weights?"
        )
    lora = LoRAWeights(factors, settings["alpha"] / settings["rank"])
    apply_lora(unet, lora, fuse=options.fuse_lora, adapter_name=ADAPTER, source=str(probe.path))
    return OneStepSRPipeline(
        **components,
        prompt_embedding=PromptEmbedding.from_tensors(embeds.float()).to(options.dtype),
        timestep=settings["timestep"],
        method=METHOD.id,
    )


def build_untrained(
    base: str | os.PathLike,
    timestep: int = DEFAULT_TIMESTEP,
    rank: int = DEFAULT_RANK,
    alpha: float = DEFAULT_ALPHA,
    target_modules: tuple[str, ...] = TARGET_MODULES,
    dtype: torch.dtype = torch.float32,
) -> OneStepSRPipeline:
    """The generator before training: the SD2.1 base with a fresh LoRA (peft's init: B = 0, so it starts as the
    base) and the prompt embedding of the empty prompt through the base's text encoder (zeros when the base has
    none), which the text encoder then leaves."""
    from peft import LoraConfig

    components = load_sd_base(base, None, dtype, needed_by="D3SR training")
    text_encoder, tokenizer = components.pop("text_encoder", None), components.pop("tokenizer", None)
    unet = components["unet"]
    if text_encoder is not None and tokenizer is not None:
        ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            embeds = text_encoder(ids.input_ids)[0].float()
    else:
        embeds = torch.zeros(1, 77, unet.config.cross_attention_dim)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(target_modules))
    unet.add_adapter(config, adapter_name=ADAPTER)
    return OneStepSRPipeline(
        **components,
        prompt_embedding=PromptEmbedding.from_tensors(embeds),
        timestep=timestep,
        method=METHOD.id,
    )


def trainable(pipe: OneStepSRPipeline) -> dict[str, torch.nn.Parameter]:
    """The generator's LoRA factors and the learned prompt embedding."""
    params = {
        f"unet.{name}": p
        for name, p in pipe.unet.named_parameters()
        if f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name
    }
    if not params:
        raise ValueError("this D3SR pipeline holds no LoRA layers: build it with load_pipeline(..., fuse_lora=False)")
    params["prompt_embedding.embeds"] = pipe.prompt_embedding.embeds
    return params


def lora_settings(pipe: OneStepSRPipeline) -> tuple[int, float, list[str]]:
    config = pipe.unet.peft_config[ADAPTER]
    return int(config.r), float(config.lora_alpha), sorted(config.target_modules)


def write_weights(pipe: OneStepSRPipeline, path: str | os.PathLike) -> Path:
    """`d3sr.safetensors`: the LoRA factors, the prompt embedding and the header (format tag, T_L, LoRA settings),
    written to a temporary name and renamed."""
    from safetensors.torch import save_file

    rank, alpha, targets = lora_settings(pipe)
    tensors = {}
    for key, p in trainable(pipe).items():
        if key == "prompt_embedding.embeds":
            tensors["prompt_embeds"] = p.detach().float().cpu().contiguous()
        else:  # unet.<module>.lora_A.d3sr.weight -> unet.<module>.lora_A.weight
            tensors[key.replace(f".{ADAPTER}.", ".")] = p.detach().float().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "timestep": str(int(pipe.config.timestep)),
        "lora_rank": str(rank),
        "lora_alpha": str(alpha),
        "target_modules": json.dumps(targets),
        "base": "SD2.1-base",
        "note": UNOFFICIAL,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


METHOD = register(
    Method(
        id="d3sr",
        display_name="D3SR (unofficial)",
        pipeline_class=OneStepSRPipeline,
        detect=detect,
        build=build,
        weight_files=(
            WeightFile("d3sr.safetensors", "trained with this package (objective: d3sr); no official weights"),
        ),
        base=OSEDIFF.base,
        # (no official defaults: OSEDiff's, on the same backbone)
        defaults=TileDefaults(color_fix="adain", tile_size=96, tile_overlap=32),
        licence="D3SR/DFOSD: no code or weights released; checkpoints trained with this package are yours, on the "
        "SD2.1-base model (CreativeML Open RAIL++-M). " + UNOFFICIAL,
        aliases=("D3SR", "DFOSD", "distillation-free one-step diffusion"),
        trainable=trainable,
        write_weights=write_weights,
        notice=UNOFFICIAL,
    )
)
