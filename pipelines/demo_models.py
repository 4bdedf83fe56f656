"""Demo fixtures: tiny randomly initialised SD2.1-style models and OSEDiff-format weights, built offline.

For `--demo` (a new user sees the whole path work without any weights) and for tests. The
models are untrained: their output is a colour-corrected smear, not a super-resolved image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    norm_num_groups=8,
)
TINY_VAE = dict(
    block_out_channels=(16, 32),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
    scaling_factor=0.18215,
)
TINY_TEXT = dict(
    bos_token_id=0,
    eos_token_id=2,
    hidden_size=32,
    intermediate_size=37,
    layer_norm_eps=1e-5,
    num_attention_heads=4,
    num_hidden_layers=2,
    pad_token_id=1,
    vocab_size=1000,
    projection_dim=32,
    hidden_act="gelu",
)
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def write_offline_clip_tokenizer(folder: str | os.PathLike) -> Path:
    """A byte-level CLIP tokenizer with no merges (514 tokens): valid, tiny, needs no download."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = {
        "model_max_length": 77,
        "pad_token": "!",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def build_tiny_sd_base(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny SD2.1-style diffusers folder (unet, vae, text encoder, tokenizer, scheduler)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(folder / "unet")
    AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).save_pretrained(folder / "text_encoder")
    DDPMScheduler(**SD_SCHEDULER).save_pretrained(folder / "scheduler")
    write_offline_clip_tokenizer(folder / "tokenizer")
    return folder


def osediff_lora_targets(unet, vae) -> tuple[dict[str, list[str]], list[str]]:
    """The official OSEDiff target selection: UNet modules routed to three adapters, VAE encoder + quant_conv."""
    patterns = (
        "to_k",
        "to_q",
        "to_v",
        "to_out.0",
        "conv",
        "conv1",
        "conv2",
        "conv_in",
        "conv_shortcut",
        "conv_out",
        "proj_out",
        "proj_in",
        "ff.net.2",
        "ff.net.0.proj",
    )
    from .methods.osediff import UNET_ADAPTERS, unet_adapter_of

    unet_targets: dict[str, list[str]] = {adapter: [] for adapter in UNET_ADAPTERS}
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name or not any(p in name for p in patterns):
            continue
        module = name[: -len(".weight")]
        unet_targets[unet_adapter_of(module)].append(module)
    vae_targets = [
        name[: -len(".weight")]
        for name, _ in vae.named_parameters()
        if "bias" not in name and "norm" not in name and name.startswith("encoder.") and name.endswith(".weight")
    ] + ["quant_conv"]
    return unet_targets, vae_targets


def make_osediff_checkpoint(
    base: str | os.PathLike, path: str | os.PathLike, rank: int = 4, seed: int = 0, std: float = 0.05
) -> Path:
    """Write random LoRA weights for `base` in the official `osediff.pkl` layout (torch.save of a plain dict)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", local_files_only=True)
    unet_targets, vae_targets = osediff_lora_targets(unet, vae)
    g = torch.Generator().manual_seed(seed)
    modules = {**dict(unet.named_modules())}

    def factors(module, adapter, prefix=""):
        w = module.weight
        a_shape = (rank, w.shape[1]) if w.ndim == 2 else (rank, *w.shape[1:])
        b_shape = (w.shape[0], rank) if w.ndim == 2 else (w.shape[0], rank, 1, 1)
        return {
            f"{prefix}.lora_A.{adapter}.weight": torch.randn(a_shape, generator=g) * std,
            f"{prefix}.lora_B.{adapter}.weight": torch.randn(b_shape, generator=g) * std,
        }

    state_unet = {
        "conv_in.base_layer.weight": unet.conv_in.weight.detach()
        + torch.randn(unet.conv_in.weight.shape, generator=g) * 0.02,
        "conv_in.base_layer.bias": unet.conv_in.bias.detach().clone(),
    }
    for adapter, names in unet_targets.items():
        for name in names:
            state_unet.update(factors(modules[name], adapter, name))
    vae_modules = dict(vae.named_modules())
    state_vae = {}
    for name in dict.fromkeys(vae_targets):
        state_vae.update(factors(vae_modules[name], "default_encoder", name))
    from .methods.osediff import save_osediff_checkpoint

    return save_osediff_checkpoint(path, state_unet, state_vae, unet_targets, vae_targets, rank, rank)


def build_demo_model(folder: str | os.PathLike) -> tuple[Path, Path]:
    """(base, weights) of a tiny untrained model in `folder`, as `--demo` runs it."""
    folder = Path(folder)
    base = build_tiny_sd_base(folder / "base")
    return base, make_osediff_checkpoint(base, folder / "osediff.pkl")
