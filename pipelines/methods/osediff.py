"""OSEDiff (cswry/OSEDiff): SD2.1-base UNet + VAE encoder with LoRA, one step at t = 999.

Weights: `osediff.pkl`, a plain torch.save dict with keys state_dict_unet, state_dict_vae (peft
LoRA keys in three UNet adapters and one VAE-encoder adapter, plus the fully retrained UNet
`conv_in` as `conv_in.base_layer.*`), rank_unet and rank_vae.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..loading.bases import load_sd_base
from ..loading.files import CheckpointError, MappedPages, WeightsProbe
from ..loading.lora import LoRAWeights, apply_lora, collect_lora_factors, replace_weights
from ..options import TileDefaults
from ..pipeline_onestep_sr import OneStepSRPipeline
from .registry import BaseModel, BuildOptions, Method, WeightFile, register

# peft's default lora_alpha, which OSEDiff never overrides: every delta is (8 / rank) * B @ A.
OSEDIFF_LORA_ALPHA = 8
OSEDIFF_KEYS = {"state_dict_unet", "state_dict_vae", "rank_unet", "rank_vae"}
TIMESTEP = 999


@dataclass
class OSEDiffWeights:
    unet_lora: LoRAWeights
    vae_lora: LoRAWeights
    unet_replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. conv_in.weight


def detect(probe: WeightsProbe) -> bool:
    return not probe.is_dir and probe.keys().keys() >= OSEDIFF_KEYS


def parse_osediff(state: dict[str, Any], path: str | os.PathLike = "<weights>") -> OSEDiffWeights:
    try:
        rank_unet, rank_vae = int(state["rank_unet"]), int(state["rank_vae"])
        unet_sd, vae_sd = state["state_dict_unet"], state["state_dict_vae"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: malformed OSEDiff checkpoint: {err}") from err
    for key, rank in (("rank_unet", rank_unet), ("rank_vae", rank_vae)):
        if not 1 <= rank <= 4096:
            raise CheckpointError(f"{path}: {key}={rank}; a LoRA rank is a whole number >= 1 (the scale divides by it)")
    replacements = {}
    for key, value in unet_sd.items():
        if ".base_layer." in key:  # a fully retrained base layer (conv_in in OSEDiff)
            replacements[key.replace(".base_layer.", ".")] = value
    unet_lora = LoRAWeights(collect_lora_factors(unet_sd, path), OSEDIFF_LORA_ALPHA / rank_unet)
    vae_lora = LoRAWeights(collect_lora_factors(vae_sd, path), OSEDIFF_LORA_ALPHA / rank_vae)
    for name, lora, rank in (("UNet", unet_lora, rank_unet), ("VAE", vae_lora, rank_vae)):
        ranks = {a.shape[0] for a, _ in lora.factors.values()}
        if ranks and ranks != {rank}:
            raise CheckpointError(f"{path}: the {name} LoRA factors have rank {sorted(ranks)} but the file says {rank}")
    return OSEDiffWeights(unet_lora=unet_lora, vae_lora=vae_lora, unet_replacements=replacements)


def build(base: str | os.PathLike, probe: WeightsProbe, options: BuildOptions) -> OneStepSRPipeline:
    sr = parse_osediff(probe.state(), probe.path)
    components = load_sd_base(base, options.base_config, options.dtype, needed_by="OSEDiff weights")
    source = str(probe.path)
    # conv_in is retrained in full: replace the base layer first, then add its LoRA on top.
    replace_weights(components["unet"], sr.unet_replacements, source)
    release = MappedPages(probe.path).release
    for name, lora in (("unet", sr.unet_lora), ("vae", sr.vae_lora)):
        apply_lora(components[name], lora, fuse=options.fuse_lora, adapter_name=ADAPTER, source=source, release=release)
    return OneStepSRPipeline(**components, timestep=TIMESTEP, method=METHOD.id)


ADAPTER = "osediff"
# the official code routes each UNet LoRA target to one of three adapters by where it sits
UNET_ADAPTERS = ("default_encoder", "default_decoder", "default_others")
VAE_ADAPTER = "default_encoder"


def unet_adapter_of(module: str) -> str:
    if "down_blocks" in module or "conv_in" in module:
        return "default_encoder"
    if "up_blocks" in module or "conv_out" in module:
        return "default_decoder"
    return "default_others"


def trainable(pipe: OneStepSRPipeline) -> dict[str, torch.nn.Parameter]:
    """OSEDiff's trainable weights: the UNet and VAE-encoder LoRA factors and the fully retrained UNet conv_in."""
    params = {}
    for component in ("unet", "vae"):
        for name, p in getattr(pipe, component).named_parameters():
            if f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name:
                params[f"{component}.{name}"] = p
    for name, p in pipe.unet.conv_in.named_parameters():
        if name.startswith("base_layer."):
            params[f"unet.conv_in.{name}"] = p
    if not params:
        raise ValueError(
            "this OSEDiff pipeline holds no LoRA layers: build it with load_pipeline(..., fuse_lora=False)"
        )
    return params


def write_weights(pipe: OneStepSRPipeline, path: str | os.PathLike) -> Path:
    """The official `osediff.pkl` layout (a torch.save of a plain dict of tensors, ints and name lists, readable
    with weights_only=True): three UNet adapters routed as the official code routes them, the VAE-encoder
    adapter, conv_in as `conv_in.base_layer.*`, ranks."""
    unet_sd: dict[str, torch.Tensor] = {}
    vae_sd: dict[str, torch.Tensor] = {}
    modules: dict[str, list[str]] = {a: [] for a in UNET_ADAPTERS}
    vae_modules: list[str] = []
    ranks = {}
    for key, p in trainable(pipe).items():
        component, name = key.split(".", 1)
        value = p.detach().float().cpu().clone()
        if ".lora_" not in name:
            unet_sd[name] = value
            continue
        module, factor = name.split(".lora_")
        factor = factor.split(".")[0]  # "A" or "B"
        if component == "unet":
            adapter = unet_adapter_of(module)
            unet_sd[f"{module}.lora_{factor}.{adapter}.weight"] = value
            if factor == "A":
                modules[adapter].append(module)
                ranks["unet"] = value.shape[0]
        else:
            vae_sd[f"{module}.lora_{factor}.{VAE_ADAPTER}.weight"] = value
            if factor == "A":
                vae_modules.append(module)
                ranks["vae"] = value.shape[0]
    return save_osediff_checkpoint(
        path, unet_sd, vae_sd, modules, vae_modules, ranks.get("unet", 0), ranks.get("vae", 0)
    )


def save_osediff_checkpoint(
    path: str | os.PathLike,
    unet_sd: dict[str, torch.Tensor],
    vae_sd: dict[str, torch.Tensor],
    unet_modules: dict[str, list[str]],
    vae_modules: list[str],
    rank_unet: int,
    rank_vae: int,
) -> Path:
    """torch.save of the official dict: module lists per adapter, ranks, the two state dicts."""
    checkpoint = {
        "unet_lora_encoder_modules": unet_modules["default_encoder"],
        "unet_lora_decoder_modules": unet_modules["default_decoder"],
        "unet_lora_others_modules": unet_modules["default_others"],
        "vae_lora_encoder_modules": vae_modules,
        "rank_unet": int(rank_unet),
        "rank_vae": int(rank_vae),
        "state_dict_unet": unet_sd,
        "state_dict_vae": vae_sd,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


METHOD = register(
    Method(
        id="osediff",
        display_name="OSEDiff",
        pipeline_class=OneStepSRPipeline,
        detect=detect,
        build=build,
        weight_files=(WeightFile("osediff.pkl", "cswry/OSEDiff, preset/models/osediff.pkl"),),
        base=BaseModel(
            name="SD2.1-base",
            folder="stable-diffusion-2-1-base",
            single_files=("v2-1_512-ema-pruned.safetensors", "v2-1_512-ema-pruned.ckpt"),
            hint="a diffusers folder with unet/ vae/ text_encoder/ tokenizer/ scheduler/, or a single file "
            "such as v2-1_512-ema-pruned.safetensors",
        ),
        # official: adain colour fix, latent tiles of 96 with 32 overlap, Gaussian weights
        defaults=TileDefaults(color_fix="adain", tile_size=96, tile_overlap=32),
        licence="OSEDiff code and weights: Apache-2.0 (cswry/OSEDiff). The SD2.1-base base model: "
        "CreativeML Open RAIL++-M (stabilityai).",
        aliases=("OSEDiff", "one-step effective diffusion"),
        trainable=trainable,
        write_weights=write_weights,
    )
)
