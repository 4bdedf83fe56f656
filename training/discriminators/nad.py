"""DFOSD's noise-aware discriminator (NAD) and D3SR's SDXL version (arXiv 2410.04224 section 3.2; shared docs
methods-tadsr-dfosd.md B): a pretrained diffusion UNet's encoder reads a latent diffused to a random t,
F(z, t) = sqrt(abar_t) z + sqrt(1 - abar_t) eps, and a randomly initialised MLP maps its middle block's output to one
real/fake logit per latent patch (1/8 of the latent per side on SD2.1, 1/4 on SDXL's three levels).

The encoder is a frozen copy of the UNet's conv_in, time embedding (SDXL: and its added text/time embedding), down
blocks and middle block, "initialised with the corresponding parameters of the SD UNet", with a LoRA of its own
(the paper: rank 16, alpha 16 in the generator and the discriminator). Conditioning: SD2.1's cross-attention reads
the generator's prompt embedding (as the generator); an SDXL UNet, whose 2048-wide context and pooled text the
SD2.1 generator cannot give, reads a null (zero) prompt and the image size as its time ids (the paper is silent).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from ...pipelines.loading.bases import CONFIG_DIR
from ...pipelines.loading.files import CheckpointError, read_weight_keys

ADAPTER = "nad"
# the generator's choice of LoRA targets, on the encoder's layers (the paper names none)
TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "proj_in",
                  "proj_out", "ff.net.2", "ff.net.0.proj")  # fmt: skip


def without_lora(module: nn.Module) -> nn.Module:
    """`module` with every peft LoRA layer replaced by its base layer (a copy taken from a UNet that already carries
    the generator's adapter must not carry it)."""
    for name, child in list(module.named_children()):
        if hasattr(child, "base_layer") and hasattr(child, "lora_A"):
            setattr(module, name, without_lora(child.base_layer))
        else:
            without_lora(child)
    return module


class NoiseAwareDiscriminator(nn.Module):
    """(latents (B, 4, h, w), t (B,), context (B, N, D) or None) -> logits (B, 1, h / 8, w / 8) (SDXL: / 4).

    `unet`: an SD2.1-style or SDXL-style `UNet2DConditionModel` (copied, not shared: the generator's adapter and
    gradient checkpointing stay out of it). Trainable: the LoRA factors and the head (`trainable()`)."""

    def __init__(
        self,
        unet: nn.Module,
        rank: int = 16,
        alpha: float = 16,
        head_width: int = 256,
        target_modules: tuple[str, ...] = TARGET_MODULES,
    ):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        config = unet.config
        self.sdxl = config.addition_embed_type == "text_time"
        self.context_width = config.cross_attention_dim
        parts = {
            "conv_in": unet.conv_in,
            "time_proj": unet.time_proj,
            "time_embedding": unet.time_embedding,
            "down_blocks": unet.down_blocks,
            "mid_block": unet.mid_block,
        }
        if self.sdxl:
            parts.update(add_time_proj=unet.add_time_proj, add_embedding=unet.add_embedding)
            self.text_embeds_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        encoder = nn.Module()
        for name, part in parts.items():
            encoder.add_module(name, without_lora(copy.deepcopy(part)))
        encoder.requires_grad_(False)
        lora = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(target_modules))
        self.encoder = inject_adapter_in_model(lora, encoder, adapter_name=ADAPTER)
        channels = config.block_out_channels[-1]
        self.head = nn.Sequential(nn.Conv2d(channels, head_width, 1), nn.SiLU(), nn.Conv2d(head_width, 1, 1))

    def trainable(self) -> dict[str, nn.Parameter]:
        params = {f"encoder.{k}": p for k, p in self.encoder.named_parameters() if f".{ADAPTER}." in k}
        params.update({f"head.{k}": p for k, p in self.head.named_parameters()})
        return params

    def null_conditioning(self, latents: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """SDXL's inputs for no prompt: a zero context and pooled text, the image size as time ids."""
        count, device, dtype = latents.shape[0], latents.device, latents.dtype
        height, width = (8 * n for n in latents.shape[-2:])
        context = torch.zeros(count, 77, self.context_width, device=device, dtype=dtype)
        ids = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype).repeat(count, 1)
        return context, {"text_embeds": torch.zeros(count, self.text_embeds_width, device=device, dtype=dtype),
                         "time_ids": ids}  # fmt: skip

    def forward(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        e = self.encoder
        added = None
        if self.sdxl:
            context, added = self.null_conditioning(latents)
        elif context is None:
            raise ValueError("the SD2.1 discriminator reads the generator's prompt embedding: pass context")
        emb = e.time_embedding(e.time_proj(t).to(latents.dtype))
        if added is not None:
            time_embeds = e.add_time_proj(added["time_ids"].flatten()).reshape(latents.shape[0], -1)
            emb = emb + e.add_embedding(torch.cat([added["text_embeds"], time_embeds.to(emb.dtype)], dim=-1))
        h = e.conv_in(latents)
        for block in e.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        h = e.mid_block(h, emb, encoder_hidden_states=context)
        return self.head(h)


SDXL_CONFIG = CONFIG_DIR / "sdxl-base"
SDXL_KEY = "model.diffusion_model.label_emb.0.0.weight"  # SDXL's added text/time embedding


def load_discriminator_unet(path: str | os.PathLike, config: str | os.PathLike | None = None) -> nn.Module:
    """An SDXL-style UNet for the discriminator: a diffusers pipeline folder (its unet/), a UNet folder, or one
    original-layout .safetensors file (read offline with the bundled SDXL-base config, or `config`: a folder with
    unet/config.json)."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    try:
        if path.is_dir():
            folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
            if not (folder / "config.json").is_file():
                raise CheckpointError(f"{path}: not a diffusers UNet or pipeline folder (no config.json)")
            unet = UNet2DConditionModel.from_pretrained(folder, local_files_only=True)
        elif path.suffix.lower() == ".safetensors":
            if SDXL_KEY not in read_weight_keys(path):
                raise CheckpointError(f"{path}: not an SDXL checkpoint (no {SDXL_KEY})")
            unet = UNet2DConditionModel.from_single_file(
                str(path), config=str(config or SDXL_CONFIG), subfolder="unet", local_files_only=True
            )
        else:
            raise CheckpointError(f"{path}: expected an SDXL diffusers folder or a .safetensors single file")
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: could not be read as an SDXL UNet: {err}") from err
    if unet.config.addition_embed_type != "text_time":
        raise CheckpointError(f"{path}: not an SDXL-style UNet (no text/time added embedding)")
    return unet
